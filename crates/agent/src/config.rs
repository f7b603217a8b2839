//! The agent's settings, read from the environment the provider gives the
//! machine (`FLOTILLA_*` are written at provision time) or from flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flotilla_core::InstanceId;
use flotilla_core::config::{Secret, TelemetryArgs};
use flotilla_telemetry::tls::{ClientTls, TlsError};

/// Heartbeat period when neither the api nor the configuration names one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(5000);

/// The agent serves no `/metrics` (`METRICS_ADDR` is ignored): what it
/// knows travels to the control plane in its heartbeats.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "agent",
    version,
    about = "Flotilla agent: registers this worker, reports its boot phases and heartbeats"
)]
pub struct AgentArgs {
    /// Required: this machine's instance id (a UUID), given at provision time.
    #[arg(long, env = "FLOTILLA_INSTANCE_ID")]
    pub instance_id: InstanceId,
    /// Required: this instance's worker token, given at provision time; sent as
    /// `authorization: Bearer …` and never logged.
    #[arg(long, env = "FLOTILLA_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Secret,
    /// gRPC address of the api's worker service.
    #[arg(
        long,
        env = "FLOTILLA_API_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub api_url: String,
    /// CA bundle trusted for an `https://` FLOTILLA_API_URL: the PEM itself
    /// (as the scheduler passes it from WORKER_API_CA) or a PEM file;
    /// unset, the system's roots.
    #[arg(long, env = "FLOTILLA_API_CA")]
    pub api_ca: Option<String>,
    /// Allow an `http://` FLOTILLA_API_URL to an address other than
    /// loopback: the worker token then crosses the network in plaintext.
    #[arg(
        long,
        env = "AGENT_ALLOW_PLAINTEXT",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub allow_plaintext: bool,
    /// Milliseconds between heartbeats when the api names no interval
    /// (a non-zero interval from the api always wins); 0 means 5000.
    #[arg(long, env = "AGENT_HEARTBEAT_INTERVAL_MS", default_value_t = 0)]
    pub heartbeat_interval_ms: u64,
    /// Seconds without any successful call to the control plane after which
    /// an idle worker exits, so that its machine stops and stops costing.
    /// A busy worker keeps trying.
    #[arg(long, env = "AGENT_DEAD_MAN_SECONDS", default_value_t = 60)]
    pub dead_man_seconds: u64,
    /// Seconds spent in the installing phase (stands in for the payload's setup).
    #[arg(long, env = "AGENT_INSTALL_SECONDS", default_value_t = 0)]
    pub install_seconds: u64,
    /// Seconds spent in the starting phase (stands in for the payload's start).
    #[arg(long, env = "AGENT_START_SECONDS", default_value_t = 0)]
    pub start_seconds: u64,
    /// While this file exists the worker reports itself busy (not idle) and
    /// the dead-man exit is held off; unset or empty means always idle.
    #[arg(long, env = "AGENT_BUSY_FILE")]
    pub busy_file: Option<PathBuf>,
    /// Milliseconds one call to the api (connecting included) may take.
    #[arg(long, env = "AGENT_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// Seconds between keepalive pings on the connection to the api, and
    /// how long one may go unanswered before the connection is dropped and
    /// made afresh (a connection left dead by a network change otherwise
    /// fails every call until TCP gives up); at least 1.
    #[arg(long, env = "AGENT_KEEPALIVE_SECONDS", default_value_t = 5)]
    pub keepalive_seconds: u64,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl AgentArgs {
    /// The interval to use when the api answers `0`.
    pub fn fallback_heartbeat_interval(&self) -> Duration {
        match self.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT_INTERVAL,
            ms => Duration::from_millis(ms),
        }
    }

    /// The busy file, if one is configured (an empty value counts as none).
    pub fn busy_file(&self) -> Option<&std::path::Path> {
        self.busy_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }

    pub fn dead_man(&self) -> Duration {
        Duration::from_secs(self.dead_man_seconds)
    }

    pub fn install_time(&self) -> Duration {
        Duration::from_secs(self.install_seconds)
    }

    pub fn start_time(&self) -> Duration {
        Duration::from_secs(self.start_seconds)
    }

    /// How the api is reached: its CA, and whether plaintext beyond
    /// loopback is allowed. An error names the setting.
    pub fn tls(&self) -> Result<ClientTls, TlsError> {
        Ok(ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "AGENT_ALLOW_PLAINTEXT",
        )
        .with_ca(self.api_ca.as_deref())?
        .allow_plaintext(self.allow_plaintext))
    }

    /// At least 1 ms: a zero timeout would fail every call.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    /// At least 1 s: pings more often would be noise on a healthy link.
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_seconds.max(1))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    const ID: &str = "0190b5a8-7c1e-7000-8000-000000000001";

    #[test]
    fn configuration_doc_lists_every_agent_setting() {
        flotilla_core::config::check_doc_section(
            "agent",
            &AgentArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }

    #[test]
    fn only_the_instance_id_and_token_are_required() {
        let args = AgentArgs::try_parse_from(["agent", "--instance-id", ID, "--worker-token", "t"])
            .expect("parses");
        assert_eq!(args.api_url, "http://127.0.0.1:50051");
        assert_eq!(args.fallback_heartbeat_interval(), Duration::from_secs(5));
        assert_eq!(args.dead_man(), Duration::from_secs(60));
        assert_eq!(args.request_timeout(), Duration::from_secs(5));
        assert_eq!(args.keepalive(), Duration::from_secs(5));
        assert!(args.busy_file.is_none());
        assert!(AgentArgs::try_parse_from(["agent", "--worker-token", "t"]).is_err());
    }

    #[test]
    fn an_instance_id_that_is_not_a_uuid_is_refused() {
        let err = AgentArgs::try_parse_from([
            "agent",
            "--instance-id",
            "worker-7",
            "--worker-token",
            "t",
        ])
        .expect_err("refused");
        assert!(err.to_string().contains("--instance-id"));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let args =
            AgentArgs::try_parse_from(["agent", "--instance-id", ID, "--worker-token", "hunter2"])
                .expect("parses");
        assert!(!format!("{args:?}").contains("hunter2"));
    }
}
