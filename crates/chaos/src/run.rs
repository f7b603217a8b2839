//! The storm scenario from start to verdict: on a [`Cluster`], a storm of
//! `Provision` and `Terminate` calls under the chaos of [`timeline`], then
//! convergence, the invariant checks, and the planted violations the
//! checker must catch.
//!
//! Design notes: the phases are functions of their own (the storm under
//! chaos, convergence, the plants) so each reads on one screen; what they
//! found goes into a [`ChaosReport`]. Tunings are shortened (ticks, leases,
//! retry caps, orphan grace, lost verdicts' minimum age) so that
//! convergence takes seconds rather than the production minutes; the code
//! paths are the production ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, POOL, POOL_BARE, SIM_APP, SIM_TOKEN};
use crate::invariants::{self, Ledger, Violation};
use crate::report::{ChaosEvent, ChaosReport};
use crate::storm::{self, Recorder, StormPlan};
use crate::timeline;
use crate::truth::{self, SimAdmin};

/// The size and shape of one run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Instances asked for during the storm.
    pub instances: u64,
    /// Length of the storm.
    pub duration: Duration,
    /// 1, or 3 for a NATS cluster (one node killed mid-storm).
    pub nats_nodes: usize,
    /// `kill -9`s of random service processes during the storm.
    pub kills: u32,
    /// Share of provider calls answered with an injected fault.
    pub fault_rate: f64,
    /// Per cent of Provision calls followed by a Terminate call.
    pub terminate_percent: u64,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Length of each partition, lying-provider window and connection
    /// exhaustion (the scheduler's partition and the pause last longer
    /// than a lease whatever this is).
    pub fault_window: Duration,
    /// Longest wait for convergence after the storm.
    pub converge_timeout: Duration,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Keep the work directory (logs, data) instead of deleting it.
    pub keep_dir: bool,
    /// After convergence, plant a machine and a false verdict behind
    /// Flotilla's back, and require the checker to report the first as
    /// leaked and the second as an instance replaced alive.
    pub plant_violations: bool,
    /// `LOG_LEVEL` of the services.
    pub log_level: String,
}

impl ChaosConfig {
    /// The reduced size CI runs.
    pub fn reduced(bin_dir: PathBuf) -> ChaosConfig {
        ChaosConfig {
            instances: 60,
            duration: Duration::from_secs(30),
            nats_nodes: 1,
            kills: 6,
            fault_rate: 0.10,
            terminate_percent: 50,
            concurrency: 4,
            fault_window: Duration::from_secs(4),
            converge_timeout: Duration::from_secs(180),
            bin_dir,
            keep_dir: false,
            plant_violations: true,
            log_level: "warn".into(),
        }
    }
}

/// Runs one chaos run and reports; `Err` only when the harness itself
/// could not run (a server that would not start), never for a violation.
pub async fn run(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    let work = tempfile::Builder::new()
        .prefix("flotilla-chaos-")
        .tempdir()?;
    let work_dir = work.path().to_path_buf();
    eprintln!("chaos: work dir {}", work_dir.display());
    let result = run_in(&config, &work_dir).await;
    if config.keep_dir || !result.as_ref().is_ok_and(ChaosReport::passed) {
        // Keep logs and data of a failed run for the post-mortem.
        let _ = work.keep();
    }
    result
}

async fn run_in(config: &ChaosConfig, work_dir: &Path) -> anyhow::Result<ChaosReport> {
    let mut cluster = Cluster::start(config, work_dir).await?;
    let storm = storm_under_chaos(config, &mut cluster).await?;

    // Convergence: every service up again, then poll until the checker
    // finds nothing.
    let ledger = storm.recorder.ledger();
    let (convergence, last) = cluster.converge(&ledger, config.converge_timeout).await;
    let mut violations = last;
    violations.extend(storm.duplicates.iter().cloned());
    violations.sort();
    violations.dedup();

    let final_db = truth::db_snapshot(&cluster.db).await.unwrap_or_default();
    let final_truth = cluster.admin.snapshot().await.unwrap_or_default();
    let mut rows_by_state = BTreeMap::new();
    for row in &final_db.instances {
        *rows_by_state.entry(row.state.clone()).or_default() += 1;
    }
    // Break "0 leaked" and "no instance replaced that was alive" on
    // purpose, and require the checker to say so.
    let (planted_leak_caught, planted_verdict_caught) =
        if config.plant_violations && convergence.is_some() {
            (
                Some(plant_leak(&cluster, &ledger).await?),
                plant_verdict(&cluster, &ledger).await?,
            )
        } else {
            (None, None)
        };

    let stats = cluster.admin.stats().await.unwrap_or_default();
    let report = ChaosReport {
        storm: storm.recorder.stats(),
        storm_took: storm.took,
        events: storm.events,
        processes: cluster.supervisor.stats(),
        convergence,
        violations,
        duplicates_during_storm: storm.duplicates.len(),
        instance_rows: final_db.instances.len(),
        rows_by_state,
        acked_provisioned: ledger.provisioned.len(),
        acked_terminated: ledger.terminated.len(),
        provider_live_machines: final_truth.machines.iter().filter(|m| m.is_live()).count(),
        provider_machines_ever: final_truth.machines.len(),
        provider_live_volumes: final_truth.volumes.iter().filter(|v| v.is_live()).count(),
        provider_calls: truth::total_calls(&stats),
        provider_error_answers: truth::error_answers(&stats),
        planted_leak_caught,
        verdicts: final_db.verdicts.len(),
        planted_verdict_caught,
        links: cluster.link_connections(),
        work_dir: work_dir.to_path_buf(),
    };
    cluster.shutdown().await;
    Ok(report)
}

/// What the storm phase left for the verdict.
struct StormOutcome {
    recorder: Arc<Recorder>,
    took: Duration,
    events: Vec<ChaosEvent>,
    /// Duplicates seen at any sample while the storm ran.
    duplicates: BTreeSet<Violation>,
}

/// The storm, the chaos timeline and a sampler for duplicates, all at once.
async fn storm_under_chaos(
    config: &ChaosConfig,
    cluster: &mut Cluster,
) -> anyhow::Result<StormOutcome> {
    let recorder = Arc::new(Recorder::default());
    let plan = StormPlan {
        pools: vec![POOL.into(), POOL_BARE.into()],
        instances: config.instances,
        terminate_percent: config.terminate_percent,
        duration: config.duration,
        concurrency: config.concurrency,
        patience: Duration::from_secs(60),
    };
    let steps = timeline::plan(config);
    let started = Instant::now();
    let storm_task = tokio::spawn(storm::run(cluster.fleet.clone(), plan, recorder.clone()));
    let sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_duplicates(cluster.admin.clone(), sampling.clone()));
    let events = timeline::run(cluster, steps, started).await;
    storm_task.await.context("storm task")?;
    let took = started.elapsed();
    sampling.cancel();
    let duplicates = sampler.await.context("sampler task")?;
    Ok(StormOutcome {
        recorder,
        took,
        events,
        duplicates,
    })
}

/// Every duplicate seen at the provider, once a second until `stop`.
async fn sample_duplicates(admin: SimAdmin, stop: CancellationToken) -> BTreeSet<Violation> {
    let mut seen = BTreeSet::new();
    while !stop.is_cancelled() {
        if let Ok(truth) = admin.snapshot().await {
            seen.extend(invariants::duplicates(&truth));
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
    }
    seen
}

/// Breaks "0 leaked" on purpose, behind Flotilla's back, and tells whether
/// the checker says so.
async fn plant_leak(cluster: &Cluster, ledger: &Ledger) -> anyhow::Result<bool> {
    let owner = uuid::Uuid::new_v4();
    let machine = cluster
        .admin
        .plant_machine(SIM_APP, SIM_TOKEN, owner)
        .await?;
    let found = invariants::check(
        &truth::db_snapshot(&cluster.db).await?,
        &cluster.admin.snapshot().await?,
        ledger,
    );
    Ok(found.iter().any(|v| {
        matches!(v, Violation::Leaked { resource, .. } if *resource == format!("machine {machine}"))
    }))
}

/// Breaks "no instance replaced that was alive" on purpose: a `lost`
/// verdict written for a running instance, read back through the same
/// queries the run is judged by. `None` when no instance is running.
async fn plant_verdict(cluster: &Cluster, ledger: &Ledger) -> anyhow::Result<Option<bool>> {
    let db = truth::db_snapshot(&cluster.db).await?;
    let Some(victim) = db.instances.iter().find(|i| {
        ledger.provisioned.contains(&i.id)
            && !ledger.terminated.contains(&i.id)
            && i.provider_machine_id.is_some()
    }) else {
        return Ok(None);
    };
    truth::plant_verdict(&cluster.db, victim.id, &victim.state).await?;
    let found = invariants::check(
        &truth::db_snapshot(&cluster.db).await?,
        &cluster.admin.snapshot().await?,
        ledger,
    );
    Ok(Some(found.iter().any(
        |v| matches!(v, Violation::ReplacedAlive { instance, .. } if *instance == victim.id),
    )))
}
