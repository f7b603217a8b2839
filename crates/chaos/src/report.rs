//! What a storm run measured and found, and how it reads: the events of
//! the chaos, the processes, the provider's and the database's figures,
//! and the verdict on every invariant.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::invariants::{self, Violation};
use crate::storm::StormStats;
use crate::supervisor::ProcessStats;

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
    /// Verdicts (`lost`, `worker_dead`) the run's services wrote.
    pub verdicts: usize,
    /// `Some(true)` when the verdict planted on a running machine was
    /// reported by the checker as an instance replaced alive.
    pub planted_verdict_caught: Option<bool>,
    /// Connections each fault proxy carried (a link never used would make
    /// its partition test nothing).
    pub links: BTreeMap<String, u64>,
    pub work_dir: PathBuf,
}

impl ChaosReport {
    /// The run kept every promise (and caught what was planted, if asked).
    pub fn passed(&self) -> bool {
        self.convergence.is_some()
            && self.violations.is_empty()
            && self.planted_leak_caught != Some(false)
            && self.planted_verdict_caught != Some(false)
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
            "database: {} instance rows {:?}; {} lost/dead verdicts",
            self.instance_rows, self.rows_by_state, self.verdicts
        )?;
        writeln!(f, "connections through the fault proxies: {:?}", self.links)?;
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
        if let Some(caught) = self.planted_verdict_caught {
            writeln!(
                f,
                "planted verdict on a running machine caught by the checker: {caught}"
            )?;
        }
        write!(f, "work dir: {}", self.work_dir.display())
    }
}
