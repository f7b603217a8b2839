//! Waiting for instances to reach a state, with a progress line.
//!
//! Design notes: the wait polls `ListInstances` for the pool (one call per
//! round, whatever the number of instances) rather than following
//! `WatchEvents`: polling reads the recorded truth, so a missed event or a
//! reconnect cannot leave it waiting forever. An instance counts as failed
//! as soon as the goal is no longer reachable from its state in the
//! transition table (`startup_failed` may still be retried; `worker_dead`
//! may not), so the CLI never gives up on something the control plane is
//! still retrying, and never waits on something it has given up. An
//! instance whose step keeps failing (`needs_attention`) is still waited
//! for, but the user is told at once, and again if the wait times out,
//! that the step may never succeed and what the ways out are (`terminate
//! --force`, `abandon`). An abandoned instance will never be `terminated`:
//! it is reported as such, with what may be left of it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use flotilla_core::InstanceState;
use flotilla_proto::v1;

use crate::client::Api;
use crate::error::CliError;
use crate::output::{attention_hint, state_name, state_of};

const POLL: Duration = Duration::from_millis(500);
const BAR_WIDTH: usize = 24;

/// Whether `goal` can still be reached from `from` through the transition
/// table. Not through warm stock: an instance goes back to `warm` only when
/// pool capacity sends an idle one there (idle action `stop`) or the pool
/// makes one, never on the way of one a caller is waiting for — a dead
/// worker's `stopped` leads to `deleting`, not back to `ready`.
pub fn can_reach(from: InstanceState, goal: InstanceState) -> bool {
    let mut seen = HashSet::from([from]);
    let mut queue = VecDeque::from([from]);
    while let Some(s) = queue.pop_front() {
        if s == goal {
            return true;
        }
        for &next in s.exits() {
            if next == InstanceState::Warm && from != InstanceState::Warm {
                continue;
            }
            if seen.insert(next) {
                queue.push_back(next);
            }
        }
    }
    false
}

/// Where a set of instances stands against a goal.
#[derive(Debug, Default)]
pub struct Tally {
    pub done: usize,
    pub failed: Vec<v1::Instance>,
    /// Instances still on their way, by state.
    pub pending: BTreeMap<String, usize>,
    /// Pending instances whose current step keeps failing.
    pub attention: Vec<v1::Instance>,
    pub missing: usize,
}

impl Tally {
    pub fn of(ids: &[String], seen: &[v1::Instance], goal: InstanceState) -> Tally {
        let mut tally = Tally::default();
        for id in ids {
            let Some(i) = seen.iter().find(|i| &i.id == id) else {
                tally.missing += 1;
                continue;
            };
            match state_of(i) {
                Some(s) if s == goal => tally.done += 1,
                Some(s) if !can_reach(s, goal) => tally.failed.push(i.clone()),
                // Asked to go away while we wait for it to be ready.
                _ if goal != InstanceState::Terminated
                    && i.desired_state == v1::DesiredState::Terminated as i32 =>
                {
                    tally.failed.push(i.clone())
                }
                _ => {
                    *tally.pending.entry(state_name(i.state)).or_default() += 1;
                    if i.needs_attention {
                        tally.attention.push(i.clone());
                    }
                }
            }
        }
        tally
    }

    pub fn finished(&self) -> bool {
        self.pending.is_empty() && self.missing == 0
    }

    fn summary(&self, total: usize, goal: InstanceState) -> String {
        let mut parts = vec![format!("{}/{total} {goal}", self.done)];
        if !self.failed.is_empty() {
            parts.push(format!("{} failed", self.failed.len()));
        }
        parts.extend(self.pending.iter().map(|(s, n)| format!("{n} {s}")));
        if !self.attention.is_empty() {
            parts.push(format!("{} need attention", self.attention.len()));
        }
        parts.join(", ")
    }
}

/// The progress line on stderr: redrawn in place on a terminal, one line
/// per change otherwise (logs, CI, tests).
struct Progress {
    tty: bool,
    last: String,
    started: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
            started: Instant::now(),
        }
    }

    fn show(&mut self, tally: &Tally, total: usize, goal: InstanceState) {
        let summary = tally.summary(total, goal);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let filled = (tally.done + tally.failed.len()) * BAR_WIDTH / total.max(1);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {summary} ({}s)",
                "#".repeat(filled),
                ".".repeat(BAR_WIDTH - filled),
                self.started.elapsed().as_secs()
            );
            let _ = err.flush();
        } else if summary != self.last {
            let _ = writeln!(
                err,
                "[{:>5.1}s] {summary}",
                self.started.elapsed().as_secs_f64()
            );
        }
        self.last = summary;
    }

    fn end(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

async fn fetch(api: &Api, pool: &str) -> Result<Vec<v1::Instance>, CliError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .client()
            .list_instances(api.request(v1::ListInstancesRequest {
                pool: pool.to_owned(),
                page_size: 1000,
                page_token,
                ..Default::default()
            }))
            .await
            .map_err(|s| api.error(s))?
            .into_inner();
        all.extend(page.instances);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// Waits until every instance in `ids` (all of `pool`, or of every pool
/// when empty) reached `goal` or can no longer reach it. Returns their last
/// view; failures and a timeout are `Incomplete`, naming each instance and
/// its reason.
pub async fn wait_for(
    api: &Api,
    pool: &str,
    ids: &[String],
    goal: InstanceState,
    timeout: Duration,
) -> Result<Vec<v1::Instance>, CliError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new();
    let mut told: HashSet<String> = HashSet::new();
    loop {
        let seen = fetch(api, pool).await?;
        let tally = Tally::of(ids, &seen, goal);
        progress.show(&tally, ids.len(), goal);
        let new: Vec<v1::Instance> = tally
            .attention
            .iter()
            .filter(|i| told.insert(i.id.clone()))
            .cloned()
            .collect();
        if !new.is_empty() {
            progress.end();
            eprintln!("{}", attention_hint(&new));
        }
        let ours: Vec<v1::Instance> = ids
            .iter()
            .filter_map(|id| seen.iter().find(|i| &i.id == id).cloned())
            .collect();
        if tally.finished() {
            progress.end();
            if tally.failed.is_empty() {
                return Ok(ours);
            }
            return Err(CliError::Incomplete(failure_report(
                &tally,
                ids.len(),
                goal,
            )));
        }
        if Instant::now() >= deadline {
            progress.end();
            return Err(CliError::Incomplete(timeout_report(
                &tally,
                ids.len(),
                goal,
                timeout,
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The error of a wait that timed out: where things stand, and for steps
/// that keep failing, that they may never succeed and the ways out.
pub fn timeout_report(
    tally: &Tally,
    total: usize,
    goal: InstanceState,
    timeout: Duration,
) -> String {
    let mut out = format!(
        "timed out after {}s: {}",
        timeout.as_secs(),
        tally.summary(total, goal)
    );
    if !tally.attention.is_empty() {
        out.push('\n');
        out.push_str(&attention_hint(&tally.attention));
    }
    out.push_str(
        "\nhint: the instances are still being worked on; follow them with `flotilla list` or \
         `flotilla watch`, or wait longer with --wait-timeout",
    );
    out
}

pub fn failure_report(tally: &Tally, total: usize, goal: InstanceState) -> String {
    let mut out = format!(
        "{} of {total} instances will not reach {goal}:",
        tally.failed.len()
    );
    for i in &tally.failed {
        let why = if state_of(i) == Some(InstanceState::Abandoned) {
            format!(
                "abandoned by an operator without any provider call; machine {} may still \
                 exist (see `flotilla get {}`)",
                if i.provider_machine_id.is_empty() {
                    "-"
                } else {
                    &i.provider_machine_id
                },
                i.id
            )
        } else if i.last_error.is_empty() {
            "no error recorded; see `flotilla get ID` for its history".to_owned()
        } else {
            i.last_error.clone()
        };
        out.push_str(&format!("\n  {}  {}: {why}", i.id, state_name(i.state)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, state: v1::InstanceState) -> v1::Instance {
        v1::Instance {
            id: id.into(),
            state: state as i32,
            desired_state: v1::DesiredState::Running as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_retried_startup_failure_is_still_pending_but_a_dead_worker_has_failed() {
        let ids: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let seen = [
            inst("a", v1::InstanceState::Ready),
            inst("b", v1::InstanceState::StartupFailed),
            inst("c", v1::InstanceState::WorkerDead),
        ];
        let t = Tally::of(&ids, &seen, InstanceState::Ready);
        assert_eq!(t.done, 1);
        assert_eq!(t.failed.len(), 1);
        assert_eq!(t.failed[0].id, "c");
        assert_eq!(t.pending.get("startup_failed"), Some(&1));
        assert_eq!(t.missing, 1);
        assert!(!t.finished());
    }

    #[test]
    fn everything_but_an_abandoned_instance_can_still_be_terminated() {
        for s in InstanceState::ALL {
            assert_eq!(
                can_reach(s, InstanceState::Terminated),
                s != InstanceState::Abandoned,
                "{s}"
            );
        }
        assert!(!can_reach(InstanceState::WorkerDead, InstanceState::Ready));
        assert!(can_reach(InstanceState::Requested, InstanceState::Ready));
    }

    #[test]
    fn a_teardown_that_keeps_failing_is_still_waited_for_but_its_way_out_is_named() {
        let ids: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let mut stuck = inst("a", v1::InstanceState::Deleting);
        stuck.needs_attention = true;
        stuck.attempts = 9;
        stuck.last_error = "unavailable: provider gone".into();
        let seen = [stuck, inst("b", v1::InstanceState::Terminated)];
        let t = Tally::of(&ids, &seen, InstanceState::Terminated);
        assert_eq!(t.done, 1);
        assert!(t.failed.is_empty(), "still retried by the control plane");
        assert_eq!(t.attention.len(), 1);
        assert!(!t.finished());
        let report = timeout_report(&t, 2, InstanceState::Terminated, Duration::from_secs(30));
        assert!(report.contains("1 need attention"), "{report}");
        assert!(report.contains("may never succeed"), "{report}");
        assert!(report.contains("unavailable: provider gone"), "{report}");
        assert!(report.contains("flotilla abandon a --reason"), "{report}");
        assert!(report.contains("flotilla terminate --force a"), "{report}");
    }

    #[test]
    fn an_abandoned_instance_will_not_be_terminated_and_says_what_may_be_left() {
        let ids = vec!["a".to_owned()];
        let mut gone = inst("a", v1::InstanceState::Abandoned);
        gone.provider_machine_id = "m-7".into();
        let t = Tally::of(&ids, &[gone], InstanceState::Terminated);
        assert_eq!(t.failed.len(), 1);
        assert!(t.finished());
        let report = failure_report(&t, 1, InstanceState::Terminated);
        assert!(report.contains("machine m-7 may still exist"), "{report}");
    }
}
