//! The watchdog's settings.

use std::time::Duration;

use clap::{Args, Parser};
use flotilla_core::config::{
    AdapterClientArgs, DatabaseArgs, HealthArgs, NatsArgs, PriceArgs, ShutdownArgs, TelemetryArgs,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "watchdog",
    version,
    about = "Flotilla watchdog: dead workers, storm guard, lost and orphan machines and volumes"
)]
pub struct WatchdogArgs {
    /// gRPC address of the provider-adapter.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_URL",
        default_value = "http://127.0.0.1:50061"
    )]
    pub provider_adapter_url: String,
    #[command(flatten)]
    pub adapter: AdapterClientArgs,
    #[command(flatten)]
    pub tuning: WatchdogTuning,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub health: HealthArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WatchdogTuning {
    /// Milliseconds between dead-worker scans.
    #[arg(long, env = "WATCHDOG_TICK_MS", default_value_t = 1000)]
    pub watchdog_tick_ms: u64,
    /// Seconds without a heartbeat after which a ready worker is suspect.
    #[arg(long, env = "WORKER_HEARTBEAT_TIMEOUT_SECONDS", default_value_t = 30)]
    pub worker_heartbeat_timeout_seconds: u64,
    /// Seconds a suspect whose machine still runs at the provider (a hung
    /// or paused worker) is given before it is declared dead anyway.
    #[arg(long, env = "WORKER_DEAD_CONFIRM_SECONDS", default_value_t = 30)]
    pub worker_dead_confirm_seconds: u64,
    /// Seconds a suspect whose machine is in passing (creating,
    /// restarting, updating, replacing, migrated, an undocumented state…)
    /// is waited out, looked at again every tick, before its machine counts
    /// as not running. Such a state is never evidence of death by itself.
    #[arg(long, env = "WATCHDOG_TRANSIENT_GRACE_SECONDS", default_value_t = 120)]
    pub watchdog_transient_grace_seconds: u64,
    /// Failed health checks in a row after which a worker without the
    /// agent (ready by its health check, never heartbeated) is suspect,
    /// once they also span WORKER_PROBE_FAILURE_WINDOW_SECONDS.
    #[arg(long, env = "WORKER_PROBE_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..))]
    pub worker_probe_failures: i32,
    /// Seconds a run of failed health checks must span (from its first
    /// failure) before a worker without the agent is suspect.
    #[arg(
        long,
        env = "WORKER_PROBE_FAILURE_WINDOW_SECONDS",
        default_value_t = 30
    )]
    pub worker_probe_failure_window_seconds: u64,
    /// Replace and terminate dead workers (false: only mark them).
    #[arg(long, env = "WORKER_DEAD_RECOVERY_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub worker_dead_recovery_enabled: bool,
    /// Share of a pool's ready workers that may be suspect at once (or of
    /// its live machines missing from one listing) before remediation is
    /// held (a network blip or a lying listing must not replace the fleet).
    #[arg(long, env = "WATCHDOG_STORM_FRACTION", default_value_t = 0.5)]
    pub watchdog_storm_fraction: f64,
    /// Pools smaller than this are never held by the storm guard.
    #[arg(long, env = "WATCHDOG_STORM_MIN_INSTANCES", default_value_t = 4)]
    pub watchdog_storm_min_instances: i64,
    /// Age in seconds an instance row must reach before its machine, missing
    /// from a listing and answering 404 to a direct look, makes it `lost`
    /// (a listing may lag behind creates).
    #[arg(long, env = "WATCHDOG_LOST_MIN_AGE_SECONDS", default_value_t = 30)]
    pub watchdog_lost_min_age_seconds: u64,
    /// Seconds an instance row must have been unchanged before an orphan
    /// scan's listing starts for its machine's absence from that listing to
    /// count (0-300): the margin covers the clock skew between this host and
    /// the database, which stamps the rows, so a machine recorded just
    /// before the listing, and missing from it for that reason only, is
    /// never a suspect.
    #[arg(
        long,
        env = "ORPHAN_SCAN_CLOCK_SKEW_SECONDS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u64).range(0..=300)
    )]
    pub orphan_scan_clock_skew_seconds: u64,
    /// Seconds between orphan scans (paginated provider listings).
    #[arg(long, env = "ORPHAN_SCAN_INTERVAL_SECONDS", default_value_t = 60)]
    pub orphan_scan_interval_seconds: u64,
    /// Age in seconds before a tagged machine or volume the database does
    /// not own is deleted (young ones may be mid-provisioning).
    #[arg(long, env = "ORPHAN_GRACE_SECONDS", default_value_t = 300)]
    pub orphan_grace_seconds: u64,
    /// Report what the orphan scan would do, change nothing.
    #[arg(long, env = "WATCHDOG_DRY_RUN", default_value_t = false, action = clap::ArgAction::Set)]
    pub watchdog_dry_run: bool,
    /// Reconcile volumes against the provider (delete orphan volumes).
    #[arg(long, env = "VOLUME_RECONCILIATION_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub volume_reconciliation_enabled: bool,
    /// Seconds a claim is held.
    #[arg(long, env = "WATCHDOG_LEASE_SECONDS", default_value_t = 30)]
    pub watchdog_lease_seconds: u64,
    /// Seconds an instance may stay `provisioning` before it counts as stuck.
    #[arg(
        long,
        env = "RECOVERY_PROVISIONING_TIMEOUT_SECONDS",
        default_value_t = 600
    )]
    pub recovery_provisioning_timeout_seconds: u64,
    /// Seconds an instance may stay `draining` (beyond its pool's drain
    /// deadline) before it counts as stuck.
    #[arg(long, env = "RECOVERY_DRAINING_TIMEOUT_SECONDS", default_value_t = 900)]
    pub recovery_draining_timeout_seconds: u64,
    /// Seconds an instance may stay `stopping` before it counts as stuck.
    #[arg(long, env = "RECOVERY_STOPPING_TIMEOUT_SECONDS", default_value_t = 600)]
    pub recovery_stopping_timeout_seconds: u64,
    /// Seconds an instance may stay `deleting` before it counts as stuck.
    #[arg(long, env = "RECOVERY_DELETING_TIMEOUT_SECONDS", default_value_t = 900)]
    pub recovery_deleting_timeout_seconds: u64,
    /// Times a stuck instance is nudged (retried now) before the watchdog
    /// escalates: provisioning fails and is cleaned up, draining stops,
    /// stopping is forced, deleting is flagged for an operator.
    #[arg(long, env = "STUCK_MAX_RETRIES", default_value_t = 3)]
    pub stuck_max_retries: i32,
    /// Silent workers examined per scan.
    #[arg(long, env = "WATCHDOG_BATCH", default_value_t = 500)]
    pub watchdog_batch: i64,
    // Machine prices (INSTANCE_PRICES), for spend caps and gauges.
    #[command(flatten)]
    pub prices: PriceArgs,
}

impl WatchdogTuning {
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.watchdog_tick_ms.max(10))
    }
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.worker_heartbeat_timeout_seconds.max(1))
    }
    pub fn confirm_grace(&self) -> Duration {
        Duration::from_secs(self.worker_dead_confirm_seconds)
    }
    pub fn transient_grace(&self) -> Duration {
        Duration::from_secs(self.watchdog_transient_grace_seconds)
    }
    pub fn probe_death(&self) -> flotilla_store::watchdog::ProbeDeath {
        flotilla_store::watchdog::ProbeDeath {
            failures: self.worker_probe_failures,
            window: Duration::from_secs(self.worker_probe_failure_window_seconds),
        }
    }
    pub fn orphan_grace(&self) -> Duration {
        Duration::from_secs(self.orphan_grace_seconds)
    }
    pub fn lost_min_age(&self) -> Duration {
        Duration::from_secs(self.watchdog_lost_min_age_seconds)
    }
    pub fn orphan_clock_skew(&self) -> Duration {
        Duration::from_secs(self.orphan_scan_clock_skew_seconds)
    }
    pub fn orphan_interval(&self) -> Duration {
        Duration::from_secs(self.orphan_scan_interval_seconds.max(1))
    }
    pub fn stuck_timeouts(&self) -> flotilla_store::watchdog::StuckTimeouts {
        flotilla_store::watchdog::StuckTimeouts {
            provisioning: Duration::from_secs(self.recovery_provisioning_timeout_seconds),
            draining: Duration::from_secs(self.recovery_draining_timeout_seconds),
            stopping: Duration::from_secs(self.recovery_stopping_timeout_seconds),
            deleting: Duration::from_secs(self.recovery_deleting_timeout_seconds),
        }
    }
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.watchdog_lease_seconds.max(1))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_orphan_scan_clock_skew_is_a_setting_refused_out_of_range() {
        let parse = |argv: &[&str]| WatchdogArgs::try_parse_from(argv).map(|a| a.tuning);
        assert_eq!(
            parse(&["watchdog"]).expect("defaults").orphan_clock_skew(),
            Duration::from_secs(2)
        );
        let set = parse(&["watchdog", "--orphan-scan-clock-skew-seconds", "30"]).expect("parse");
        assert_eq!(set.orphan_clock_skew(), Duration::from_secs(30));
        for bad in ["301", "1.5", "soon"] {
            let err = parse(&["watchdog", "--orphan-scan-clock-skew-seconds", bad])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("--orphan-scan-clock-skew-seconds"), "{err}");
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn configuration_doc_lists_every_watchdog_setting() {
        flotilla_core::config::check_doc_section(
            "watchdog",
            &WatchdogArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }
}
