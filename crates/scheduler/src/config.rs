//! The scheduler's settings.

use std::time::Duration;

use clap::{Args, Parser};
use flotilla_core::backoff::{ErrorPolicy, RetryPolicy};
use flotilla_core::config::{
    AdapterClientArgs, DatabaseArgs, HealthArgs, HttpClientArgs, NatsArgs, PriceArgs, ShutdownArgs,
    TelemetryArgs,
};
use flotilla_store::instance::BootDeadlines;
use flotilla_store::pool_pause::PausePolicy;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "scheduler",
    version,
    about = "Flotilla scheduler: provisions instances, supervises boot, keeps pool capacity"
)]
pub struct SchedulerArgs {
    /// gRPC address of the provider-adapter.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_URL",
        default_value = "http://127.0.0.1:50061"
    )]
    pub provider_adapter_url: String,
    #[command(flatten)]
    pub adapter: AdapterClientArgs,
    /// Address workers use to reach the api (passed to each machine as
    /// FLOTILLA_API_URL).
    #[arg(long, env = "WORKER_API_URL", default_value = "http://127.0.0.1:50051")]
    pub worker_api_url: String,
    #[command(flatten)]
    pub tuning: SchedulerTuning,
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

/// Loop periods, batch sizes, limits and deadlines.
#[derive(Debug, Clone, Args)]
pub struct SchedulerTuning {
    /// Milliseconds between reconcile ticks (a CMD.provision wakes it early).
    #[arg(long, env = "SCHEDULER_TICK_MS", default_value_t = 1000)]
    pub scheduler_tick_ms: u64,
    /// Instances claimed per tick.
    #[arg(long, env = "SCHEDULER_BATCH", default_value_t = 256)]
    pub scheduler_batch: i64,
    /// Provider calls in flight at once per replica (shared by the lanes).
    #[arg(long, env = "SCHEDULER_PROVIDER_CONCURRENCY", default_value_t = 32)]
    pub scheduler_provider_concurrency: usize,
    /// Provisioning loops per replica. A loop waits for every step of its
    /// batch; with a second loop a new request is picked up while the
    /// first still waits on slow starts, instead of queueing behind them.
    #[arg(long, env = "SCHEDULER_PROVISION_LANES", default_value_t = 2)]
    pub scheduler_provision_lanes: usize,
    /// Seconds a claim is held before it must be renewed. The holder renews
    /// it every third of this while its step runs and stops acting once it
    /// could not; a killed replica's rows are taken over after this.
    #[arg(long, env = "SCHEDULER_LEASE_SECONDS", default_value_t = 15)]
    pub scheduler_lease_seconds: u64,
    /// Seconds one instance's step (its provider calls included) may run
    /// before it is dropped and its lease given back, so a call that hangs
    /// holds neither its row nor the rest of its batch.
    #[arg(long, env = "SCHEDULER_STEP_TIMEOUT_SECONDS", default_value_t = 300)]
    pub scheduler_step_timeout_seconds: u64,
    /// Failed provisioning attempts before an instance is `provisioning_failed`.
    #[arg(long, env = "PROVISION_MAX_ATTEMPTS", default_value_t = 5)]
    pub provision_max_attempts: i32,
    /// First retry delay in milliseconds after a failed step (doubles, jittered).
    #[arg(long, env = "PROVISION_RETRY_BASE_MS", default_value_t = 1000)]
    pub provision_retry_base_ms: u64,
    /// Longest retry delay in milliseconds.
    #[arg(long, env = "PROVISION_RETRY_MAX_MS", default_value_t = 60_000)]
    pub provision_retry_max_ms: u64,
    /// Seconds a provider's listing may lag behind a create. A retry that
    /// finds no machine with the instance's tag, after an attempt that may
    /// have created one, waits until that attempt is this old and asks the
    /// listing again before creating another (Fly documents no figure).
    #[arg(long, env = "PROVISION_LISTING_SETTLE_SECONDS", default_value_t = 10)]
    pub provision_listing_settle_seconds: u64,
    /// Failed attempts of a provisioning or restart step after which the
    /// instance is flagged for an operator (it is still retried, up to
    /// PROVISION_MAX_ATTEMPTS).
    #[arg(long, env = "SCHEDULER_ALERT_AFTER_ATTEMPTS", default_value_t = 3)]
    pub scheduler_alert_after_attempts: u32,
    /// Default seconds an instance may stay `booting` (pools may override).
    #[arg(long, env = "RECOVERY_BOOTING_TIMEOUT_SECONDS", default_value_t = 300)]
    pub recovery_booting_timeout_seconds: u64,
    /// Default seconds an instance may stay `installing`.
    #[arg(
        long,
        env = "RECOVERY_INSTALLING_TIMEOUT_SECONDS",
        default_value_t = 900
    )]
    pub recovery_installing_timeout_seconds: u64,
    /// Default seconds an instance may stay `starting`.
    #[arg(long, env = "RECOVERY_STARTING_TIMEOUT_SECONDS", default_value_t = 300)]
    pub recovery_starting_timeout_seconds: u64,
    /// Machine restarts after a startup failure before the instance is terminated.
    #[arg(long, env = "STARTUP_MAX_RETRIES", default_value_t = 2)]
    pub startup_max_retries: i64,
    /// Seconds a restart after a startup failure waits for the machine to
    /// stop (1-60, the Provider API's longest wait). A Scaleway poweroff
    /// takes about 36 s at the median.
    #[arg(
        long,
        env = "STARTUP_RESTART_STOP_TIMEOUT_SECONDS",
        default_value_t = 60
    )]
    pub startup_restart_stop_timeout_seconds: u64,
    /// Seconds a worker is given between SIGTERM and kill when its machine
    /// is stopped for a restart after a startup failure (0-60): the
    /// payload that failed to start may still want to flush its logs.
    #[arg(long, env = "STARTUP_RESTART_STOP_GRACE_SECONDS", default_value_t = 5)]
    pub startup_restart_stop_grace_seconds: u64,
    /// Milliseconds between the first failed health check of a booting
    /// instance and the next (doubles, jittered); pools without a health
    /// check URL are never probed.
    #[arg(long, env = "HEALTH_CHECK_INTERVAL_MS", default_value_t = 1000)]
    pub health_check_interval_ms: u64,
    /// Longest wait in milliseconds between two health checks of one instance.
    #[arg(long, env = "HEALTH_CHECK_MAX_INTERVAL_MS", default_value_t = 30_000)]
    pub health_check_max_interval_ms: u64,
    /// Milliseconds one health check may take before it counts as failed.
    #[arg(long, env = "HEALTH_CHECK_TIMEOUT_MS", default_value_t = 2000)]
    pub health_check_timeout_ms: u64,
    /// Milliseconds a health check answer is reused instead of asking again.
    #[arg(long, env = "HEALTH_CHECK_CACHE_MS", default_value_t = 1000)]
    pub health_check_cache_ms: u64,
    /// A worker that heartbeated within this many seconds is not probed:
    /// its own reports drive its boot.
    #[arg(
        long,
        env = "HEALTH_CHECK_HEARTBEAT_PRIORITY_SECONDS",
        default_value_t = 15
    )]
    pub health_check_heartbeat_priority_seconds: u64,
    /// Provisioning or startup failures (including failed boot restarts) of
    /// one pool's instances within POOL_PAUSE_WINDOW_SECONDS that pause the
    /// pool: no new machines until a probe reaches ready or an operator
    /// runs `flotilla pools resume`. 0 never pauses.
    #[arg(long, env = "POOL_PAUSE_FAILURES", default_value_t = 5)]
    pub pool_pause_failures: u32,
    /// The window in which POOL_PAUSE_FAILURES failures pause a pool.
    #[arg(long, env = "POOL_PAUSE_WINDOW_SECONDS", default_value_t = 600)]
    pub pool_pause_window_seconds: u64,
    /// Seconds a paused pool waits (after the pause, or after a failed
    /// probe) before one probe instance may get a machine.
    #[arg(long, env = "POOL_PAUSE_COOLOFF_SECONDS", default_value_t = 300)]
    pub pool_pause_cooloff_seconds: u64,
    /// CA bundle workers trust for an `https://` WORKER_API_URL (a PEM file,
    /// or the PEM itself): passed, as PEM, to every machine as
    /// FLOTILLA_API_CA. Unset: workers trust their system's roots.
    #[arg(long, env = "WORKER_API_CA")]
    pub worker_api_ca: Option<String>,
    // Machine prices (INSTANCE_PRICES), for spend caps and gauges.
    #[command(flatten)]
    pub prices: PriceArgs,
    // The health checks' connect timeout (HTTP_CONNECT_TIMEOUT_SECONDS).
    #[command(flatten)]
    pub http: HttpClientArgs,
}

impl SchedulerTuning {
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.scheduler_tick_ms.max(10))
    }

    /// Provider calls one provisioning lane keeps in flight.
    pub fn provision_concurrency_per_lane(&self) -> usize {
        self.scheduler_provider_concurrency
            .div_ceil(self.scheduler_provision_lanes.max(1))
            .max(1)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.scheduler_lease_seconds.max(1))
    }

    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.scheduler_step_timeout_seconds.max(1))
    }

    pub fn listing_settle(&self) -> Duration {
        Duration::from_secs(self.provision_listing_settle_seconds)
    }

    /// When a failed provisioning or restart step is tried again, and when
    /// an operator is asked to look.
    pub fn error_policy(&self) -> ErrorPolicy {
        ErrorPolicy {
            retry: RetryPolicy {
                base: Duration::from_millis(self.provision_retry_base_ms.max(1)),
                max: Duration::from_millis(self.provision_retry_max_ms.max(1)),
            },
            attention_after: self.scheduler_alert_after_attempts.max(1),
        }
    }

    pub fn health_backoff(&self) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(self.health_check_interval_ms.max(1)),
            max: Duration::from_millis(
                self.health_check_max_interval_ms
                    .max(self.health_check_interval_ms.max(1)),
            ),
        }
    }

    pub fn health_check_timeout(&self) -> Duration {
        Duration::from_millis(self.health_check_timeout_ms.max(1))
    }

    pub fn health_check_cache(&self) -> Duration {
        Duration::from_millis(self.health_check_cache_ms)
    }

    pub fn heartbeat_priority(&self) -> Duration {
        Duration::from_secs(self.health_check_heartbeat_priority_seconds)
    }

    pub fn pause_policy(&self) -> PausePolicy {
        PausePolicy {
            failures: self.pool_pause_failures,
            window: Duration::from_secs(self.pool_pause_window_seconds.max(1)),
            cooloff: Duration::from_secs(self.pool_pause_cooloff_seconds),
        }
    }

    /// How long an instance held by a paused pool waits before it looks
    /// again when nothing wakes it (a resume makes it due at once).
    pub fn pause_recheck(&self) -> Duration {
        Duration::from_secs(self.pool_pause_cooloff_seconds.clamp(1, 30))
    }

    pub fn boot_deadlines(&self) -> BootDeadlines {
        BootDeadlines {
            booting: Duration::from_secs(self.recovery_booting_timeout_seconds),
            installing: Duration::from_secs(self.recovery_installing_timeout_seconds),
            starting: Duration::from_secs(self.recovery_starting_timeout_seconds),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn configuration_doc_lists_every_scheduler_setting() {
        flotilla_core::config::check_doc_section(
            "scheduler",
            &SchedulerArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }
}
