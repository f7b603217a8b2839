//! The terminator's settings.

use std::time::Duration;

use clap::{Args, Parser};
use flotilla_core::backoff::{ErrorPolicy, RetryPolicy};
use flotilla_core::config::{
    AdapterClientArgs, DatabaseArgs, HealthArgs, NatsArgs, ShutdownArgs, TelemetryArgs,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "terminator",
    version,
    about = "Flotilla terminator: cordon, drain, stop, delete machines and volumes"
)]
pub struct TerminatorArgs {
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
    pub tuning: TerminatorTuning,
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
pub struct TerminatorTuning {
    /// Milliseconds between reconcile ticks (a CMD.terminate wakes it early).
    #[arg(long, env = "TERMINATOR_TICK_MS", default_value_t = 1000)]
    pub terminator_tick_ms: u64,
    /// Instances claimed per tick.
    #[arg(long, env = "TERMINATOR_BATCH", default_value_t = 256)]
    pub terminator_batch: i64,
    /// Provider calls in flight at once per replica.
    #[arg(long, env = "TERMINATOR_PROVIDER_CONCURRENCY", default_value_t = 32)]
    pub terminator_provider_concurrency: usize,
    /// Seconds a claim is held before it must be renewed. The holder renews
    /// it every third of this while its step runs and stops acting once it
    /// could not; a killed replica's rows are taken over after this.
    #[arg(long, env = "TERMINATOR_LEASE_SECONDS", default_value_t = 15)]
    pub terminator_lease_seconds: u64,
    /// Seconds one instance's take-down step (its provider calls included)
    /// may run before it is dropped and its lease given back, so a call
    /// that hangs holds neither its row nor the rest of its batch.
    #[arg(long, env = "TERMINATOR_STEP_TIMEOUT_SECONDS", default_value_t = 300)]
    pub terminator_step_timeout_seconds: u64,
    /// Default seconds a cordoned worker is waited for before it is stopped
    /// anyway (pools may override).
    #[arg(long, env = "DRAIN_TIMEOUT_SECONDS", default_value_t = 300)]
    pub drain_timeout_seconds: u64,
    /// Milliseconds between looks at a draining or stopping instance.
    #[arg(long, env = "TERMINATOR_POLL_MS", default_value_t = 1000)]
    pub terminator_poll_ms: u64,
    /// Grace in seconds between SIGTERM and kill when stopping a machine.
    #[arg(long, env = "STOP_GRACE_SECONDS", default_value_t = 10)]
    pub stop_grace_seconds: i64,
    /// Seconds one step waits for the provider to report stopped/destroyed
    /// before it requeues the instance.
    #[arg(long, env = "PROVIDER_WAIT_SECONDS", default_value_t = 10)]
    pub provider_wait_seconds: i64,
    /// First retry delay in milliseconds after a refused or failed step.
    #[arg(long, env = "TERMINATE_RETRY_BASE_MS", default_value_t = 1000)]
    pub terminate_retry_base_ms: u64,
    /// Longest retry delay in milliseconds; the terminator never gives up.
    #[arg(long, env = "TERMINATE_RETRY_MAX_MS", default_value_t = 60_000)]
    pub terminate_retry_max_ms: u64,
    /// Failed attempts after which an instance is flagged for an operator
    /// (still retried).
    #[arg(long, env = "TERMINATE_ALERT_AFTER_ATTEMPTS", default_value_t = 10)]
    pub terminate_alert_after_attempts: u32,
}

impl TerminatorTuning {
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.terminator_tick_ms.max(10))
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.terminator_lease_seconds.max(1))
    }

    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.terminator_step_timeout_seconds.max(1))
    }

    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.terminator_poll_ms.max(10))
    }

    /// When a failed termination step is tried again, and when an
    /// operator is asked to look.
    pub fn error_policy(&self) -> ErrorPolicy {
        ErrorPolicy {
            retry: RetryPolicy {
                base: Duration::from_millis(self.terminate_retry_base_ms.max(1)),
                max: Duration::from_millis(self.terminate_retry_max_ms.max(1)),
            },
            attention_after: self.terminate_alert_after_attempts.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn configuration_doc_lists_every_terminator_setting() {
        flotilla_core::config::check_doc_section(
            "terminator",
            &TerminatorArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }
}
