//! The invariant checker: a pure function from what the database says, what
//! the simulated cloud really holds, and which commands the api
//! acknowledged, to the list of broken promises.
//!
//! Design notes: it is pure so it can be tested with fabricated worlds, one
//! broken invariant at a time, without any process running. The same
//! function decides convergence: the run polls snapshots until it returns
//! nothing, so "converged" and "correct" can never drift apart. The
//! provider's truth is the judge, never the database alone: a row that says
//! `terminated` while its machine still runs is a leak.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use flotilla_core::InstanceState;
use uuid::Uuid;

/// One instance row, as much of it as the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbInstance {
    pub id: Uuid,
    pub state: String,
    pub desired_state: String,
    pub provider_machine_id: Option<String>,
}

/// One `instance_volumes` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbVolume {
    pub instance_id: Uuid,
    pub provider_volume_id: Option<String>,
    pub state: String,
}

/// One `action_logs` transition the checker judges against the provider's
/// history (a verdict that an instance was gone, or its termination), with
/// the machine its row records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbTransition {
    pub instance: Uuid,
    pub machine: Option<String>,
    /// The state the transition moved the instance to.
    pub to: String,
    pub actor: String,
    /// When it was written (the transaction's start, after the provider
    /// call it rests on answered).
    pub at: DateTime<Utc>,
}

/// The database side of one observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbSnapshot {
    pub instances: Vec<DbInstance>,
    pub volumes: Vec<DbVolume>,
    /// Transitions to `lost` or `worker_dead`.
    pub verdicts: Vec<DbTransition>,
    /// Transitions to `terminated`.
    pub terminations: Vec<DbTransition>,
}

/// A state a machine entered at the provider, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateAt {
    pub state: String,
    pub at: DateTime<Utc>,
}

/// A machine as the simulated cloud knows it (destroyed ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMachine {
    pub id: String,
    /// Fly's spelling: `started`, `stopped`, `destroyed`, …
    pub state: String,
    /// The instance id tag in the machine's metadata, if any.
    pub instance_tag: Option<String>,
    /// Every state it entered, oldest first.
    pub history: Vec<StateAt>,
}

/// Fly's states of a machine whose worker runs, or is on its way back to
/// running without anyone stopping it.
const RUNNING: &[&str] = &["starting", "started", "restarting", "replacing", "updating"];

impl ProviderMachine {
    /// Still costs money: anything but `destroyed`.
    pub fn is_live(&self) -> bool {
        self.state != "destroyed"
    }

    /// The state it was in at `at` (`None` before it existed).
    pub fn state_at(&self, at: DateTime<Utc>) -> Option<&str> {
        self.history
            .iter()
            .take_while(|c| c.at <= at)
            .last()
            .map(|c| c.state.as_str())
    }

    /// The state it was in at `at`, when that was a running one.
    pub fn running_at(&self, at: DateTime<Utc>) -> Option<&str> {
        self.state_at(at).filter(|s| RUNNING.contains(s))
    }
}

/// A volume as the simulated cloud knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderVolume {
    pub id: String,
    pub name: String,
    pub state: String,
}

impl ProviderVolume {
    pub fn is_live(&self) -> bool {
        self.state != "destroyed"
    }
}

/// The provider side of one observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderSnapshot {
    pub machines: Vec<ProviderMachine>,
    pub volumes: Vec<ProviderVolume>,
}

/// Every command the api answered OK, by the instance ids it named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Instances created by an acknowledged `Provision`.
    pub provisioned: BTreeSet<Uuid>,
    /// Instances named (accepted or unchanged) by an acknowledged `Terminate`.
    pub terminated: BTreeSet<Uuid>,
    /// Instances named by a `Terminate` that never got its answer: the api
    /// may or may not have taken it, so either end state is a kept promise.
    pub unsure: BTreeSet<Uuid>,
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// An acknowledged command whose effect is not (yet) there.
    Lost { instance: Uuid, detail: String },
    /// A machine or volume at the provider that no live instance owns.
    Leaked { resource: String, detail: String },
    /// More than one live machine for one instance.
    Duplicated {
        instance: String,
        machines: Vec<String>,
    },
    /// The database says something the provider contradicts.
    Mismatch { instance: Uuid, detail: String },
    /// A row still on its way somewhere (requested, draining, …).
    NotConverged { instance: Uuid, state: String },
    /// Declared gone (`lost`, `worker_dead`), and so replaced, while its
    /// machine was running at the provider.
    ReplacedAlive { instance: Uuid, detail: String },
    /// Written `terminated` while its machine was not being deleted (a
    /// leak until the orphan scan finds it, and a state that lied).
    TerminatedUndeleted { instance: Uuid, detail: String },
}

impl Violation {
    /// Short class name, for counting.
    pub fn class(&self) -> &'static str {
        match self {
            Violation::Lost { .. } => "lost",
            Violation::Leaked { .. } => "leaked",
            Violation::Duplicated { .. } => "duplicated",
            Violation::Mismatch { .. } => "mismatch",
            Violation::NotConverged { .. } => "not_converged",
            Violation::ReplacedAlive { .. } => "replaced_alive",
            Violation::TerminatedUndeleted { .. } => "terminated_undeleted",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Lost { instance, detail } => write!(f, "lost: {instance}: {detail}"),
            Violation::Leaked { resource, detail } => write!(f, "leaked: {resource}: {detail}"),
            Violation::Duplicated { instance, machines } => {
                write!(f, "duplicated: {instance} has machines {machines:?}")
            }
            Violation::Mismatch { instance, detail } => {
                write!(f, "db != provider: {instance}: {detail}")
            }
            Violation::NotConverged { instance, state } => {
                write!(f, "not converged: {instance} still {state}")
            }
            Violation::ReplacedAlive { instance, detail } => {
                write!(f, "replaced alive: {instance}: {detail}")
            }
            Violation::TerminatedUndeleted { instance, detail } => {
                write!(f, "terminated undeleted: {instance}: {detail}")
            }
        }
    }
}

/// Live machines grouped by their instance tag, only where there is more
/// than one. Also used on snapshots taken during the storm ("never").
pub fn duplicates(provider: &ProviderSnapshot) -> Vec<Violation> {
    let mut by_instance: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in provider.machines.iter().filter(|m| m.is_live()) {
        if let Some(tag) = &m.instance_tag {
            by_instance.entry(tag).or_default().push(m.id.clone());
        }
    }
    by_instance
        .into_iter()
        .filter(|(_, machines)| machines.len() > 1)
        .map(|(instance, machines)| Violation::Duplicated {
            instance: instance.to_owned(),
            machines,
        })
        .collect()
}

fn parse_state(raw: &str) -> Option<InstanceState> {
    raw.parse().ok()
}

/// Every invariant over one observation; empty means converged and correct.
pub fn check(db: &DbSnapshot, provider: &ProviderSnapshot, ledger: &Ledger) -> Vec<Violation> {
    let mut out = Vec::new();
    let rows: BTreeMap<Uuid, &DbInstance> = db.instances.iter().map(|i| (i.id, i)).collect();
    let machines: BTreeMap<&str, &ProviderMachine> = provider
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m))
        .collect();
    let is_terminated =
        |row: &DbInstance| parse_state(&row.state) == Some(InstanceState::Terminated);
    let is_live = |row: &DbInstance| {
        parse_state(&row.state).is_some_and(|s| InstanceState::LIVE.contains(&s))
    };

    // 0 lost: every acknowledged command took effect.
    for id in &ledger.provisioned {
        if ledger.terminated.contains(id) {
            continue;
        }
        let may_be_terminated = ledger.unsure.contains(id);
        match rows.get(id) {
            None => out.push(Violation::Lost {
                instance: *id,
                detail: "acknowledged Provision but no instance row".into(),
            }),
            Some(row) if may_be_terminated && row.desired_state == "terminated" => {}
            Some(row) if row.desired_state != "running" => out.push(Violation::Lost {
                instance: *id,
                detail: format!(
                    "acknowledged Provision, never terminated, but desired {}",
                    row.desired_state
                ),
            }),
            Some(row) if !is_live(row) => out.push(Violation::Lost {
                instance: *id,
                detail: format!("acknowledged Provision but state {}", row.state),
            }),
            Some(_) => {}
        }
    }
    for id in &ledger.terminated {
        match rows.get(id) {
            None => out.push(Violation::Lost {
                instance: *id,
                detail: "acknowledged Terminate but no instance row".into(),
            }),
            Some(row) if !is_terminated(row) => out.push(Violation::Lost {
                instance: *id,
                detail: format!("acknowledged Terminate but state {}", row.state),
            }),
            Some(_) => {}
        }
    }

    // 0 leaked: every live machine and volume belongs to a live row that
    // records it.
    for m in provider.machines.iter().filter(|m| m.is_live()) {
        let owner = m
            .instance_tag
            .as_deref()
            .and_then(|tag| Uuid::parse_str(tag).ok())
            .and_then(|id| rows.get(&id));
        let detail = match owner {
            None => Some(format!(
                "machine ({}) tagged {:?}, which no instance row has",
                m.state, m.instance_tag
            )),
            Some(row) if is_terminated(row) => Some(format!(
                "machine ({}) of terminated instance {}",
                m.state, row.id
            )),
            Some(row) if row.provider_machine_id.as_deref() != Some(m.id.as_str()) => {
                Some(format!(
                    "machine ({}) of instance {} which records {:?}",
                    m.state, row.id, row.provider_machine_id
                ))
            }
            Some(_) => None,
        };
        if let Some(detail) = detail {
            out.push(Violation::Leaked {
                resource: format!("machine {}", m.id),
                detail,
            });
        }
    }
    for v in provider.volumes.iter().filter(|v| v.is_live()) {
        let owner =
            flotilla_provider::fly::instance_of_volume(&v.name).and_then(|id| rows.get(&id.0));
        let detail = match owner {
            None => Some(format!("volume {:?} names no instance row", v.name)),
            Some(row) if is_terminated(row) => {
                Some(format!("volume of terminated instance {}", row.id))
            }
            Some(_) => None,
        };
        if let Some(detail) = detail {
            out.push(Violation::Leaked {
                resource: format!("volume {}", v.id),
                detail,
            });
        }
    }

    // 0 duplicated.
    out.extend(duplicates(provider));

    out.extend(replaced_alive(db, provider));
    out.extend(terminated_undeleted(db, provider));

    // Database equals provider, and nothing is half-way.
    for row in &db.instances {
        match parse_state(&row.state) {
            Some(InstanceState::Terminated) => {}
            Some(s) if InstanceState::LIVE.contains(&s) => {
                let machine = row
                    .provider_machine_id
                    .as_deref()
                    .and_then(|id| machines.get(id));
                let detail = match machine {
                    None => Some(format!(
                        "{} but machine {:?} is unknown to the provider",
                        row.state, row.provider_machine_id
                    )),
                    Some(m) if m.state != "started" => {
                        Some(format!("{} but machine {} is {}", row.state, m.id, m.state))
                    }
                    Some(_) => None,
                };
                if let Some(detail) = detail {
                    out.push(Violation::Mismatch {
                        instance: row.id,
                        detail,
                    });
                }
            }
            _ => out.push(Violation::NotConverged {
                instance: row.id,
                state: row.state.clone(),
            }),
        }
    }
    let volumes: BTreeMap<&str, &ProviderVolume> = provider
        .volumes
        .iter()
        .map(|v| (v.id.as_str(), v))
        .collect();
    for vol in &db.volumes {
        let at_provider = vol
            .provider_volume_id
            .as_deref()
            .and_then(|id| volumes.get(id))
            .filter(|v| v.is_live());
        match (vol.state.as_str(), at_provider) {
            ("created", None) => out.push(Violation::Mismatch {
                instance: vol.instance_id,
                detail: format!(
                    "volume {:?} created in the database, absent at the provider",
                    vol.provider_volume_id
                ),
            }),
            ("deleted", Some(v)) => out.push(Violation::Mismatch {
                instance: vol.instance_id,
                detail: format!(
                    "volume {} deleted in the database, live at the provider",
                    v.id
                ),
            }),
            ("created" | "deleted", _) => {}
            (other, _) => out.push(Violation::NotConverged {
                instance: vol.instance_id,
                state: format!("volume {other}"),
            }),
        }
    }
    out.sort();
    out
}

/// No instance replaced that was alive: every verdict that an instance was
/// gone, against what its machine was at the provider at that moment. The
/// machine is the one the row records, or, when it records none, any
/// machine carrying the instance's tag. The chaos never stops or destroys
/// a machine itself, so every machine Flotilla did not stop was running,
/// and a verdict on it came from a signal that lied (a listing, a 404, a
/// partition): exactly what ARCHITECTURE.md promise 7 forbids acting on.
pub fn replaced_alive(db: &DbSnapshot, provider: &ProviderSnapshot) -> Vec<Violation> {
    let machines: BTreeMap<&str, &ProviderMachine> = provider
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m))
        .collect();
    let mut out = Vec::new();
    for v in &db.verdicts {
        let tag = v.instance.to_string();
        let candidates: Vec<&ProviderMachine> = match v.machine.as_deref() {
            Some(id) => machines.get(id).copied().into_iter().collect(),
            None => provider
                .machines
                .iter()
                .filter(|m| m.instance_tag.as_deref() == Some(tag.as_str()))
                .collect(),
        };
        for m in candidates {
            if let Some(state) = m.running_at(v.at) {
                out.push(Violation::ReplacedAlive {
                    instance: v.instance,
                    detail: format!(
                        "declared {} by {} at {} while machine {} was {state}",
                        v.to, v.actor, v.at, m.id
                    ),
                });
            }
        }
    }
    out
}

/// `terminated` only after the provider confirmed the deletion
/// (ARCHITECTURE.md, promise 5): every termination of an instance with a
/// recorded machine, against what that machine was at the provider at that
/// moment. Being destroyed (or unknown to the provider: never created
/// there) is fine; anything else means the row said `terminated` over a
/// machine left behind, which only the orphan scan would clean up later —
/// so the end state alone cannot show it.
pub fn terminated_undeleted(db: &DbSnapshot, provider: &ProviderSnapshot) -> Vec<Violation> {
    let machines: BTreeMap<&str, &ProviderMachine> = provider
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m))
        .collect();
    let mut out = Vec::new();
    for t in &db.terminations {
        let Some(m) = t.machine.as_deref().and_then(|id| machines.get(id)) else {
            continue;
        };
        match m.state_at(t.at) {
            Some("destroying" | "destroyed") | None => {}
            Some(state) => out.push(Violation::TerminatedUndeleted {
                instance: t.instance,
                detail: format!(
                    "terminated by {} at {} while machine {} was {state}",
                    t.actor, t.at, m.id
                ),
            }),
        }
    }
    out
}

/// Violations counted by class, for reports.
pub fn tally(violations: &[Violation]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for v in violations {
        *counts.entry(v.class()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small consistent world: two running instances with a started
    /// machine each (one with a volume), one terminated instance whose
    /// machine and volume are destroyed; all three acknowledged.
    fn world() -> (DbSnapshot, ProviderSnapshot, Ledger) {
        let ids: Vec<Uuid> = (1..=3).map(Uuid::from_u128).collect();
        let row = |id: Uuid, state: &str, desired: &str, machine: &str| DbInstance {
            id,
            state: state.into(),
            desired_state: desired.into(),
            provider_machine_id: Some(machine.into()),
        };
        let machine = |id: &str, state: &str, owner: Uuid| ProviderMachine {
            id: id.into(),
            state: state.into(),
            instance_tag: Some(owner.to_string()),
            history: history(state),
        };
        let vol_name = |id: Uuid| {
            flotilla_provider::fly::volume_name("flotilla", flotilla_core::InstanceId(id))
        };
        let db = DbSnapshot {
            instances: vec![
                row(ids[0], "booting", "running", "m1"),
                row(ids[1], "ready", "running", "m2"),
                row(ids[2], "terminated", "terminated", "m3"),
            ],
            verdicts: Vec::new(),
            terminations: vec![DbTransition {
                to: "terminated".into(),
                ..verdict(ids[2], "m3", t(60))
            }],
            volumes: vec![
                DbVolume {
                    instance_id: ids[1],
                    provider_volume_id: Some("vol_2".into()),
                    state: "created".into(),
                },
                DbVolume {
                    instance_id: ids[2],
                    provider_volume_id: Some("vol_3".into()),
                    state: "deleted".into(),
                },
            ],
        };
        let provider = ProviderSnapshot {
            machines: vec![
                machine("m1", "started", ids[0]),
                machine("m2", "started", ids[1]),
                machine("m3", "destroyed", ids[2]),
            ],
            volumes: vec![
                ProviderVolume {
                    id: "vol_2".into(),
                    name: vol_name(ids[1]),
                    state: "created".into(),
                },
                ProviderVolume {
                    id: "vol_3".into(),
                    name: vol_name(ids[2]),
                    state: "destroyed".into(),
                },
            ],
        };
        let ledger = Ledger {
            provisioned: ids.iter().copied().collect(),
            terminated: [ids[2]].into_iter().collect(),
            unsure: BTreeSet::new(),
        };
        (db, provider, ledger)
    }

    /// The world's clock: the machines started at T0 + 1 s; a destroyed
    /// one was destroyed at T0 + 60 s.
    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("valid")
    }

    fn history(state: &str) -> Vec<StateAt> {
        let at = |state: &str, secs| StateAt {
            state: state.into(),
            at: t(secs),
        };
        let mut h = vec![at("created", 0), at("starting", 0), at("started", 1)];
        if state == "destroyed" {
            h.extend([
                at("stopping", 50),
                at("stopped", 51),
                at("destroying", 59),
                at("destroyed", 60),
            ]);
        } else if state != "started" {
            h.push(at(state, 50));
        }
        h
    }

    fn verdict(instance: Uuid, machine: &str, at: DateTime<Utc>) -> DbTransition {
        DbTransition {
            instance,
            machine: Some(machine.into()),
            to: "lost".into(),
            actor: "watchdog".into(),
            at,
        }
    }

    fn classes(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(Violation::class).collect()
    }

    #[test]
    fn a_consistent_world_has_no_violation() {
        let (db, provider, ledger) = world();
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn an_acknowledged_provision_without_its_row_is_lost() {
        let (db, provider, mut ledger) = world();
        ledger.provisioned.insert(Uuid::from_u128(99));
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["lost"]);
    }

    #[test]
    fn an_acknowledged_provision_that_failed_is_lost() {
        let (mut db, mut provider, ledger) = world();
        db.instances[0].state = "provisioning_failed".into();
        provider.machines[0].state = "destroyed".into();
        let found = check(&db, &provider, &ledger);
        assert!(classes(&found).contains(&"lost"), "{found:?}");
    }

    #[test]
    fn an_acknowledged_terminate_still_running_is_lost() {
        let (db, provider, mut ledger) = world();
        ledger.terminated.insert(db.instances[1].id);
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["lost"]);
    }

    #[test]
    fn a_machine_of_a_terminated_instance_is_leaked() {
        let (db, mut provider, ledger) = world();
        provider.machines[2].state = "stopped".into();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn a_machine_no_row_owns_is_leaked() {
        let (db, mut provider, ledger) = world();
        provider.machines.push(ProviderMachine {
            id: "m9".into(),
            state: "started".into(),
            instance_tag: Some(Uuid::from_u128(9).to_string()),
            history: history("started"),
        });
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn a_volume_of_a_terminated_instance_is_leaked() {
        let (mut db, mut provider, ledger) = world();
        provider.volumes[1].state = "created".into();
        db.volumes.pop();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn two_live_machines_for_one_instance_are_a_duplicate() {
        let (db, mut provider, ledger) = world();
        let owner = db.instances[0].id;
        provider.machines.push(ProviderMachine {
            id: "m1b".into(),
            state: "started".into(),
            instance_tag: Some(owner.to_string()),
            history: history("started"),
        });
        let found = check(&db, &provider, &ledger);
        // The second machine is also not the one the row records.
        assert_eq!(classes(&found), ["leaked", "duplicated"]);
        assert_eq!(duplicates(&provider).len(), 1);
    }

    #[test]
    fn a_live_row_whose_machine_is_stopped_is_a_mismatch() {
        let (db, mut provider, ledger) = world();
        provider.machines[1].state = "stopped".into();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["mismatch"]);
    }

    #[test]
    fn a_created_volume_missing_at_the_provider_is_a_mismatch() {
        let (db, mut provider, ledger) = world();
        provider.volumes.remove(0);
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["mismatch"]);
    }

    #[test]
    fn an_unanswered_terminate_allows_either_end_state() {
        let (mut db, mut provider, mut ledger) = world();
        let id = db.instances[0].id;
        ledger.unsure.insert(id);
        assert_eq!(check(&db, &provider, &ledger), vec![]);
        db.instances[0].state = "terminated".into();
        db.instances[0].desired_state = "terminated".into();
        provider.machines[0].state = "destroyed".into();
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn a_verdict_on_a_machine_that_was_running_is_caught() {
        // A false verdict planted on purpose: instance 3's machine was
        // started from T0 + 1 s until its stop at T0 + 50 s.
        let (mut db, provider, ledger) = world();
        let id = db.instances[2].id;
        db.verdicts.push(verdict(id, "m3", t(30)));
        let found = check(&db, &provider, &ledger);
        assert_eq!(classes(&found), ["replaced_alive"], "{found:?}");
        assert!(found[0].to_string().contains("was started"), "{}", found[0]);
    }

    #[test]
    fn a_verdict_after_the_machine_stopped_or_was_destroyed_is_no_violation() {
        let (mut db, provider, ledger) = world();
        let id = db.instances[2].id;
        db.verdicts.push(verdict(id, "m3", t(51)));
        db.verdicts.push(verdict(id, "m3", t(61)));
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn a_machine_on_its_way_back_to_running_counts_as_alive() {
        let (mut db, mut provider, ledger) = world();
        let id = db.instances[2].id;
        provider.machines[2].history = [
            ("created", 0),
            ("started", 1),
            ("stopped", 40),
            ("restarting", 45),
            ("started", 46),
            ("destroyed", 60),
        ]
        .into_iter()
        .map(|(state, secs)| StateAt {
            state: state.into(),
            at: t(secs),
        })
        .collect();
        db.verdicts.push(verdict(id, "m3", t(41)));
        assert_eq!(check(&db, &provider, &ledger), vec![]);
        db.verdicts.push(verdict(id, "m3", t(45)));
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["replaced_alive"]);
    }

    #[test]
    fn a_verdict_on_a_row_without_machine_is_judged_by_the_machines_tagged_for_it() {
        let (mut db, provider, ledger) = world();
        let id = db.instances[0].id;
        db.verdicts.push(DbTransition {
            machine: None,
            ..verdict(id, "", t(10))
        });
        let found = check(&db, &provider, &ledger);
        assert_eq!(classes(&found), ["replaced_alive"], "{found:?}");
    }

    #[test]
    fn a_termination_written_while_its_machine_was_only_stopped_is_caught() {
        // Instance 3's machine was stopped at T0 + 51 s and destroyed at
        // T0 + 60 s; a `terminated` written in between left it behind.
        let (mut db, provider, ledger) = world();
        db.terminations[0].at = t(55);
        let found = check(&db, &provider, &ledger);
        assert_eq!(classes(&found), ["terminated_undeleted"], "{found:?}");
        assert!(found[0].to_string().contains("was stopped"), "{}", found[0]);
        // While the destroy ran, it is fine.
        db.terminations[0].at = t(59);
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn a_row_half_way_through_teardown_is_not_converged() {
        let (mut db, provider, ledger) = world();
        let id = Uuid::from_u128(7);
        db.instances.push(DbInstance {
            id,
            state: "draining".into(),
            desired_state: "terminated".into(),
            provider_machine_id: None,
        });
        assert_eq!(
            check(&db, &provider, &ledger),
            [Violation::NotConverged {
                instance: id,
                state: "draining".into()
            }]
        );
    }
}
