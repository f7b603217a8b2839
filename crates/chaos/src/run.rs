//! The storm scenario from start to verdict: on a [`Cluster`], a storm of
//! `Provision` and `Terminate` calls, the kills and restarts, then
//! convergence and the invariant checks.
//!
//! Design notes: the chaos follows a timeline computed up front (kills
//! spread over the storm, NATS restarted at 30 %, PostgreSQL at 60 %), so a
//! run is reproducible in shape while the choice of victims stays random.
//! Tunings are shortened (ticks, leases, retry caps, orphan grace) so that
//! convergence takes seconds rather than the production minutes; the code
//! paths are the production ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::cluster::{Cluster, POOL, SIM_APP, SIM_TOKEN};
use crate::infra::{PrivateNats, PrivatePostgres};
use crate::invariants::{self, Violation};
use crate::storm::{self, Recorder, StormPlan, StormStats};
use crate::supervisor::{ProcessStats, Supervisor};
use crate::truth;

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
    /// Longest wait for convergence after the storm.
    pub converge_timeout: Duration,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// Keep the work directory (logs, data) instead of deleting it.
    pub keep_dir: bool,
    /// After convergence, plant a machine behind Flotilla's back and require
    /// the checker to report it as leaked.
    pub plant_leak: bool,
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
            converge_timeout: Duration::from_secs(180),
            bin_dir,
            keep_dir: false,
            plant_leak: true,
            log_level: "warn".into(),
        }
    }
}

/// One thing the chaos did, and when (since the storm began).
#[derive(Debug, Clone)]
pub struct ChaosEvent {
    pub at: Duration,
    pub what: String,
}

/// What a run measured and found.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    pub storm: StormStats,
    pub storm_took: Duration,
    pub events: Vec<ChaosEvent>,
    pub processes: BTreeMap<String, ProcessStats>,
    /// Storm end to the first observation with no violation.
    pub convergence: Option<Duration>,
    /// Violations at the end (empty when converged), plus duplicates seen
    /// at any sample during the storm.
    pub violations: Vec<Violation>,
    pub duplicates_during_storm: usize,
    pub instance_rows: usize,
    pub rows_by_state: BTreeMap<String, usize>,
    pub acked_provisioned: usize,
    pub acked_terminated: usize,
    pub provider_live_machines: usize,
    pub provider_machines_ever: usize,
    pub provider_live_volumes: usize,
    pub provider_calls: u64,
    pub provider_error_answers: BTreeMap<u16, u64>,
    /// `Some(true)` when the planted leak was reported by the checker.
    pub planted_leak_caught: Option<bool>,
    pub work_dir: PathBuf,
}

impl ChaosReport {
    /// The run kept every promise (and caught the planted leak, if asked).
    pub fn passed(&self) -> bool {
        self.convergence.is_some()
            && self.violations.is_empty()
            && self.planted_leak_caught != Some(false)
    }
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.storm;
        writeln!(
            f,
            "== chaos report ({})",
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        writeln!(
            f,
            "storm: {:.1}s, Provision {} calls / {} acked ({} replayed), Terminate {} calls / {} acked, {} retried attempts, {} given up",
            self.storm_took.as_secs_f64(),
            s.provision_calls,
            s.provision_acked,
            s.replayed,
            s.terminate_calls,
            s.terminate_acked,
            s.retries,
            s.given_up
        )?;
        writeln!(
            f,
            "acknowledged: {} instances provisioned, {} terminated",
            self.acked_provisioned, self.acked_terminated
        )?;
        for e in &self.events {
            writeln!(f, "  t+{:>6.1}s {}", e.at.as_secs_f64(), e.what)?;
        }
        let (starts, kills, exits) = self.processes.values().fold((0, 0, 0), |a, p| {
            (a.0 + p.starts, a.1 + p.kills, a.2 + p.unexpected_exits)
        });
        writeln!(
            f,
            "processes: {} services, {starts} starts, {kills} kill -9, {exits} exits on their own",
            self.processes.len()
        )?;
        for (name, p) in &self.processes {
            if p.unexpected_exits > 0 {
                writeln!(f, "  {name} exited on its own {} times", p.unexpected_exits)?;
            }
        }
        writeln!(
            f,
            "provider: {} calls, injected/other error answers {:?}; machines ever {}, live {}; live volumes {}",
            self.provider_calls,
            self.provider_error_answers,
            self.provider_machines_ever,
            self.provider_live_machines,
            self.provider_live_volumes
        )?;
        writeln!(
            f,
            "database: {} instance rows {:?}",
            self.instance_rows, self.rows_by_state
        )?;
        match self.convergence {
            Some(t) => writeln!(f, "converged {:.1}s after the storm", t.as_secs_f64())?,
            None => writeln!(f, "DID NOT CONVERGE")?,
        }
        writeln!(
            f,
            "invariants: {} violations {:?} (duplicates seen during the storm: {})",
            self.violations.len(),
            invariants::tally(&self.violations),
            self.duplicates_during_storm
        )?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  {v}")?;
        }
        if let Some(caught) = self.planted_leak_caught {
            writeln!(f, "planted leak caught by the checker: {caught}")?;
        }
        write!(f, "work dir: {}", self.work_dir.display())
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

    // The storm, the chaos and a sampler for duplicates, all at once.
    let recorder = Arc::new(Recorder::default());
    let plan = StormPlan {
        pool: POOL.into(),
        instances: config.instances,
        terminate_percent: config.terminate_percent,
        duration: config.duration,
        concurrency: config.concurrency,
        patience: Duration::from_secs(60),
    };
    let storm_started = Instant::now();
    let storm_task = tokio::spawn(storm::run(cluster.fleet.clone(), plan, recorder.clone()));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (admin, sampling) = (cluster.admin.clone(), sampling.clone());
        async move {
            let mut seen = std::collections::BTreeSet::new();
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(truth) = admin.snapshot().await {
                    for v in invariants::duplicates(&truth) {
                        seen.insert(v);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            seen
        }
    });
    let events = chaos(
        config,
        &cluster.supervisor,
        &mut cluster.nats,
        &mut cluster.pg,
        storm_started,
    )
    .await;
    storm_task.await.context("storm task")?;
    let storm_took = storm_started.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let during_storm = sampler.await.context("sampler task")?;

    // Convergence: every service up again, then poll until the checker
    // finds nothing.
    let ledger = recorder.ledger();
    let (convergence, last) = cluster.converge(&ledger, config.converge_timeout).await;
    let mut violations = last;
    violations.extend(during_storm.iter().cloned());
    violations.sort();
    violations.dedup();

    let final_db = truth::db_snapshot(&cluster.db).await.unwrap_or_default();
    let final_truth = cluster.admin.snapshot().await.unwrap_or_default();
    let mut rows_by_state = BTreeMap::new();
    for row in &final_db.instances {
        *rows_by_state.entry(row.state.clone()).or_default() += 1;
    }

    // Break "0 leaked" on purpose, behind Flotilla's back, and require the
    // checker to say so.
    let planted_leak_caught = if config.plant_leak && convergence.is_some() {
        let owner = uuid::Uuid::new_v4();
        let machine = cluster
            .admin
            .plant_machine(SIM_APP, SIM_TOKEN, owner)
            .await?;
        let found = invariants::check(
            &truth::db_snapshot(&cluster.db).await?,
            &cluster.admin.snapshot().await?,
            &ledger,
        );
        Some(found.iter().any(|v| {
            matches!(v, Violation::Leaked { resource, .. } if *resource == format!("machine {machine}"))
        }))
    } else {
        None
    };

    let stats = cluster.admin.stats().await.unwrap_or_default();
    let report = ChaosReport {
        storm: recorder.stats(),
        storm_took,
        events,
        processes: cluster.supervisor.stats(),
        convergence,
        violations,
        duplicates_during_storm: during_storm.len(),
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
        work_dir: work_dir.to_path_buf(),
    };
    cluster.shutdown().await;
    Ok(report)
}

enum Blow {
    Kill,
    Nats,
    Postgres,
}

/// The timeline: kills spread over the storm, NATS at 30 %, PostgreSQL at
/// 60 %. Returns what it did.
async fn chaos(
    config: &ChaosConfig,
    supervisor: &Supervisor,
    nats: &mut PrivateNats,
    pg: &mut PrivatePostgres,
    started: Instant,
) -> Vec<ChaosEvent> {
    let d = config.duration.as_secs_f64();
    let mut timeline: Vec<(f64, Blow)> = (0..config.kills)
        .map(|k| {
            let slot = d / f64::from(config.kills);
            let at = slot * f64::from(k) + rand::rng().random_range(0.0..slot);
            (at, Blow::Kill)
        })
        .collect();
    timeline.push((d * 0.3, Blow::Nats));
    timeline.push((d * 0.6, Blow::Postgres));
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut events = Vec::new();
    let mut log = |what: String| {
        eprintln!("chaos: t+{:.1}s {what}", started.elapsed().as_secs_f64());
        events.push(ChaosEvent {
            at: started.elapsed(),
            what,
        });
    };
    let victims = supervisor.killable();
    for (at, blow) in timeline {
        tokio::time::sleep_until((started + Duration::from_secs_f64(at)).into()).await;
        match blow {
            Blow::Kill => {
                let Some(victim) = victims.choose(&mut rand::rng()) else {
                    continue;
                };
                let down = Duration::from_millis(rand::rng().random_range(200..2500));
                supervisor.kill9(victim, down);
                log(format!("kill -9 {victim} (restarted after {down:?})"));
            }
            Blow::Nats => {
                let i = rand::rng().random_range(0..nats.len());
                nats.kill(i).await;
                let name = nats.node_name(i).to_owned();
                // A cluster keeps serving on two nodes for a while; a single
                // node is simply down.
                let down = if nats.len() > 1 {
                    Duration::from_secs_f64((d * 0.2).max(5.0))
                } else {
                    Duration::from_secs(2)
                };
                log(format!("kill -9 nats-server {name} (down for {down:?})"));
                tokio::time::sleep(down).await;
                match nats.restart(i) {
                    Ok(()) => log(format!("nats-server {name} started again")),
                    Err(e) => log(format!("nats-server {name} restart FAILED: {e:#}")),
                }
            }
            Blow::Postgres => {
                match pg.crash().await {
                    Ok(()) => log("PostgreSQL stopped in immediate mode (crash)".into()),
                    Err(e) => log(format!("PostgreSQL crash FAILED: {e:#}")),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                match pg.start_server().await {
                    Ok(()) => log("PostgreSQL started again (WAL recovery)".into()),
                    Err(e) => log(format!("PostgreSQL restart FAILED: {e:#}")),
                }
            }
        }
    }
    events
}
