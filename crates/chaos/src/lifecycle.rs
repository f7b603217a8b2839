//! The lifecycle scenario: one pool with a data volume per instance, driven
//! the way a platform team drives it, against the simulated cloud with its
//! documented rules on and ~10 % injected faults, every service a process:
//!
//! 1. provision 20 instances and wait until each has its machine;
//! 2. terminate 10 of them (a normal, drained termination);
//! 3. scale the pool up by its desired capacity, then down to zero;
//! 4. provision 20 more and `kill -9` every scheduler right after the
//!    answer, so the new instances are carried out by restarted replicas;
//! 5. provision 20 more and `SIGSTOP` a scheduler in the middle of its
//!    creates for three leases, then `SIGCONT` it: its claims were taken
//!    over, and it must create no second machine and overwrite nothing;
//! 6. terminate the whole pool, with a terminator paused the same way
//!    between its stops and deletes.
//!
//! It ends when every instance is `terminated` and the provider holds no
//! machine and no volume, with no duplicate seen at any sample — or fails
//! with the phase that did not finish in its bound.
//!
//! It exists because a scale-down that never completes (a wait the
//! provider refuses, a volume still bound) passes every check that only
//! looks at one step: only a whole lifecycle shows money left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::v1;
use uuid::Uuid;

use crate::cluster::{Cluster, POOL};
use crate::invariants::{self, DbSnapshot, Ledger, Violation};
use crate::run::ChaosConfig;
use crate::storm::{Recorder, with_retries};
use crate::truth;

/// Instances asked for in each of the two `Provision` phases.
const BATCH: u32 = 20;
/// How many of the first batch are terminated one by one.
const TERMINATE_FIRST: usize = 10;
/// Desired capacity the pool is scaled up to before scaling down.
const SCALE_TO: u32 = 4;
/// How long one phase may take before the scenario fails.
const PHASE_LIMIT: Duration = Duration::from_secs(120);

/// What one lifecycle run measured and found.
#[derive(Debug, Clone, Default)]
pub struct LifecycleReport {
    /// Each finished phase and how long it took.
    pub phases: Vec<(String, Duration)>,
    /// The phase that did not finish in its bound, with what it saw last.
    pub stuck: Option<String>,
    /// Last phase end to the first observation with no violation.
    pub convergence: Option<Duration>,
    pub violations: Vec<Violation>,
    pub duplicates_seen: usize,
    pub rows_by_state: BTreeMap<String, usize>,
    pub provider_machines_ever: usize,
    pub provider_live_machines: usize,
    pub provider_volumes_ever: usize,
    pub provider_live_volumes: usize,
    pub provider_error_answers: BTreeMap<u16, u64>,
}

impl LifecycleReport {
    /// Every phase finished, every row terminated, nothing left at the
    /// provider, no duplicate ever.
    pub fn passed(&self) -> bool {
        self.stuck.is_none()
            && self.convergence.is_some()
            && self.violations.is_empty()
            && self.duplicates_seen == 0
            && self.provider_live_machines == 0
            && self.provider_live_volumes == 0
            && self.rows_by_state.keys().all(|s| s == "terminated")
    }
}

impl std::fmt::Display for LifecycleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        writeln!(f, "== lifecycle report ({verdict})")?;
        for (phase, took) in &self.phases {
            writeln!(f, "  {phase}: {:.1}s", took.as_secs_f64())?;
        }
        if let Some(stuck) = &self.stuck {
            writeln!(f, "  STUCK: {stuck}")?;
        }
        match self.convergence {
            Some(t) => writeln!(f, "converged {:.1}s after the last phase", t.as_secs_f64())?,
            None => writeln!(f, "DID NOT CONVERGE")?,
        }
        writeln!(
            f,
            "provider: machines ever {}, live {}; volumes ever {}, live {}; error answers {:?}",
            self.provider_machines_ever,
            self.provider_live_machines,
            self.provider_volumes_ever,
            self.provider_live_volumes,
            self.provider_error_answers
        )?;
        writeln!(f, "database: {:?}", self.rows_by_state)?;
        writeln!(
            f,
            "invariants: {} violations {:?}, duplicates seen {}",
            self.violations.len(),
            invariants::tally(&self.violations),
            self.duplicates_seen
        )?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

/// Runs the lifecycle on a fresh [`Cluster`]; `Err` only when the harness
/// itself could not run.
pub async fn lifecycle(config: ChaosConfig) -> anyhow::Result<LifecycleReport> {
    let work = tempfile::Builder::new()
        .prefix("flotilla-lifecycle-")
        .tempdir()?;
    eprintln!("lifecycle: work dir {}", work.path().display());
    let result = run_in(&config, work.path()).await;
    if config.keep_dir || !result.as_ref().is_ok_and(LifecycleReport::passed) {
        let _ = work.keep();
    }
    result
}

async fn run_in(config: &ChaosConfig, work_dir: &Path) -> anyhow::Result<LifecycleReport> {
    let cluster = Cluster::start(config, work_dir).await?;
    let mut report = LifecycleReport::default();
    let mut ledger = Ledger::default();
    let mut duplicates = BTreeSet::new();
    let outcome = phases(&cluster, &mut report, &mut ledger, &mut duplicates).await;
    if let Err(e) = outcome {
        report.stuck = Some(format!("{e:#}"));
    }
    let (convergence, violations) = cluster.converge(&ledger, config.converge_timeout).await;
    report.convergence = convergence;
    report.violations = violations;
    report.duplicates_seen = duplicates.len();

    let db = truth::db_snapshot(&cluster.db).await.unwrap_or_default();
    for row in &db.instances {
        *report.rows_by_state.entry(row.state.clone()).or_default() += 1;
    }
    let provider = cluster.admin.snapshot().await.unwrap_or_default();
    report.provider_machines_ever = provider.machines.len();
    report.provider_live_machines = provider.machines.iter().filter(|m| m.is_live()).count();
    report.provider_volumes_ever = provider.volumes.len();
    report.provider_live_volumes = provider.volumes.iter().filter(|v| v.is_live()).count();
    if let Ok(stats) = cluster.admin.stats().await {
        report.provider_error_answers = truth::error_answers(&stats);
    }
    cluster.shutdown().await;
    Ok(report)
}

async fn phases(
    cluster: &Cluster,
    report: &mut LifecycleReport,
    ledger: &mut Ledger,
    duplicates: &mut BTreeSet<Violation>,
) -> anyhow::Result<()> {
    let recorder = Recorder::default();

    // 1. Twenty instances, each with its volume and machine.
    let started = Instant::now();
    let first = provision(cluster, &recorder, "lifecycle-1").await?;
    ledger.provisioned.extend(first.iter().copied());
    let ids: BTreeSet<Uuid> = first.iter().copied().collect();
    wait_until(cluster, duplicates, "the first 20 have machines", |db| {
        with_machine(db, &ids) == ids.len()
    })
    .await?;
    report
        .phases
        .push(("provision 20".into(), started.elapsed()));

    // 2. Terminate ten of them, drained as usual.
    let started = Instant::now();
    let victims: Vec<Uuid> = first.iter().copied().take(TERMINATE_FIRST).collect();
    terminate(
        cluster,
        &recorder,
        v1::InstanceSelector {
            instance_ids: victims.iter().map(Uuid::to_string).collect(),
            ..Default::default()
        },
    )
    .await?;
    ledger.terminated.extend(victims.iter().copied());
    let gone: BTreeSet<Uuid> = victims.into_iter().collect();
    wait_until(cluster, duplicates, "10 terminated", |db| {
        in_state(db, &gone, "terminated") == gone.len()
    })
    .await?;
    report
        .phases
        .push(("terminate 10".into(), started.elapsed()));

    // 3. Scale the pool up by its desired capacity, then down to zero.
    // Desired capacity counts every live instance of the pool, the ones
    // `Provision` asked for too, so "SCALE_TO more" is the live ones plus it.
    let started = Instant::now();
    let live = truth::db_snapshot(&cluster.db)
        .await
        .context("reading the live instances")?
        .instances
        .iter()
        .filter(|i| {
            i.desired_state == "running"
                && i.state
                    .parse::<flotilla_core::InstanceState>()
                    .is_ok_and(|s| !s.is_terminal())
        })
        .count();
    let live = u32::try_from(live).context("live instances")?;
    set_desired(cluster, &recorder, live + SCALE_TO).await?;
    let ours = ledger.provisioned.clone();
    wait_until(cluster, duplicates, "the pool's own instances", |db| {
        pool_created(db, &ours)
            .filter(|i| i.provider_machine_id.is_some() && i.state != "terminated")
            .count()
            >= SCALE_TO as usize
    })
    .await?;
    set_desired(cluster, &recorder, 0).await?;
    wait_until(cluster, duplicates, "the pool scaled down", |db| {
        pool_created(db, &ours).all(|i| i.state == "terminated")
    })
    .await?;
    report
        .phases
        .push(("scale up to 4 and down to 0".into(), started.elapsed()));

    // 4. Twenty more, with every scheduler killed right after the answer.
    let started = Instant::now();
    let second = provision(cluster, &recorder, "lifecycle-2").await?;
    for n in 1..=2 {
        cluster
            .supervisor
            .kill9(&format!("scheduler-{n}"), Duration::from_millis(500 * n));
    }
    ledger.provisioned.extend(second.iter().copied());
    let ids: BTreeSet<Uuid> = second.iter().copied().collect();
    wait_until(cluster, duplicates, "the second 20 have machines", |db| {
        with_machine(db, &ids) == ids.len()
    })
    .await?;
    report.phases.push((
        "provision 20 through kill -9 of the schedulers".into(),
        started.elapsed(),
    ));

    // 5. Twenty more with a scheduler paused (SIGSTOP, not killed) in the
    // middle of its creates for three leases, then resumed: it has lost its
    // claims, so it must create no second machine and overwrite nothing.
    let started = Instant::now();
    let third = provision(cluster, &recorder, "lifecycle-3").await?;
    let paused_for = Duration::from_secs(3 * crate::cluster::LEASE_SECONDS);
    cluster.supervisor.pause("scheduler-1", true);
    tokio::time::sleep(paused_for).await;
    cluster.supervisor.pause("scheduler-1", false);
    ledger.provisioned.extend(third.iter().copied());
    let ids: BTreeSet<Uuid> = third.iter().copied().collect();
    wait_until(cluster, duplicates, "the third 20 have machines", |db| {
        with_machine(db, &ids) == ids.len()
    })
    .await?;
    report.phases.push((
        "provision 20 through a scheduler paused for three leases".into(),
        started.elapsed(),
    ));

    // 6. Terminate everything, with a terminator paused in the middle of
    // its stops and deletes for three leases.
    let started = Instant::now();
    terminate(
        cluster,
        &recorder,
        v1::InstanceSelector {
            pool: POOL.into(),
            ..Default::default()
        },
    )
    .await?;
    cluster.supervisor.pause("terminator-1", true);
    tokio::time::sleep(paused_for).await;
    cluster.supervisor.pause("terminator-1", false);
    ledger.terminated.extend(ledger.provisioned.iter().copied());
    wait_until(cluster, duplicates, "every instance terminated", |db| {
        db.instances.iter().all(|i| i.state == "terminated")
    })
    .await?;
    report
        .phases
        .push(("terminate all".into(), started.elapsed()));
    Ok(())
}

async fn provision(cluster: &Cluster, recorder: &Recorder, key: &str) -> anyhow::Result<Vec<Uuid>> {
    let answer = with_retries(recorder, Duration::from_secs(60), || {
        cluster.fleet.provision(v1::ProvisionRequest {
            pool: POOL.into(),
            count: BATCH,
            idempotency_key: key.into(),
            ..Default::default()
        })
    })
    .await
    .context("Provision was not answered")?;
    answer
        .instances
        .iter()
        .map(|i| i.id.parse().context("instance id"))
        .collect()
}

async fn terminate(
    cluster: &Cluster,
    recorder: &Recorder,
    selector: v1::InstanceSelector,
) -> anyhow::Result<()> {
    with_retries(recorder, Duration::from_secs(60), || {
        cluster.fleet.terminate(v1::TerminateRequest {
            selector: Some(selector.clone()),
            force: false,
            reason: "lifecycle scenario".into(),
        })
    })
    .await
    .context("Terminate was not answered")?;
    Ok(())
}

async fn set_desired(cluster: &Cluster, recorder: &Recorder, desired: u32) -> anyhow::Result<()> {
    with_retries(recorder, Duration::from_secs(60), || {
        cluster.fleet.update_pool(v1::UpdatePoolRequest {
            name: POOL.into(),
            desired_capacity: Some(desired),
            ..Default::default()
        })
    })
    .await
    .context("UpdatePool was not answered")?;
    Ok(())
}

fn with_machine(db: &DbSnapshot, ids: &BTreeSet<Uuid>) -> usize {
    db.instances
        .iter()
        .filter(|i| ids.contains(&i.id) && i.provider_machine_id.is_some())
        .count()
}

fn in_state(db: &DbSnapshot, ids: &BTreeSet<Uuid>, state: &str) -> usize {
    db.instances
        .iter()
        .filter(|i| ids.contains(&i.id) && i.state == state)
        .count()
}

/// Instances no `Provision` of the scenario created: the pool's own.
fn pool_created<'a>(
    db: &'a DbSnapshot,
    ours: &'a BTreeSet<Uuid>,
) -> impl Iterator<Item = &'a invariants::DbInstance> {
    db.instances.iter().filter(|i| !ours.contains(&i.id))
}

/// Polls the database (and samples the provider for duplicates) until
/// `done` holds, or fails after [`PHASE_LIMIT`] naming `what` and the
/// states it saw last.
async fn wait_until(
    cluster: &Cluster,
    duplicates: &mut BTreeSet<Violation>,
    what: &str,
    done: impl Fn(&DbSnapshot) -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = BTreeMap::<String, usize>::new();
    loop {
        if let Ok(provider) = cluster.admin.snapshot().await {
            duplicates.extend(invariants::duplicates(&provider));
        }
        if let Ok(db) = truth::db_snapshot(&cluster.db).await {
            if done(&db) {
                return Ok(());
            }
            last.clear();
            for row in &db.instances {
                *last.entry(row.state.clone()).or_default() += 1;
            }
        }
        anyhow::ensure!(
            started.elapsed() < PHASE_LIMIT,
            "waiting for {what}: not done after {PHASE_LIMIT:?}; rows by state {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
