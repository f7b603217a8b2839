//! The adapter's settings: where it listens (and with which certificate),
//! whom it serves (service tokens), which providers it holds credentials
//! for, and how it protects them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use flotilla_core::config::{HttpClientArgs, Secret, ShutdownArgs, TelemetryArgs};
use flotilla_core::token::{HashedToken, split_token_list};
use flotilla_provider::guard::GuardConfig;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "provider-adapter",
    version,
    about = "Flotilla provider adapter: the gRPC Provider API over Fly, Scaleway, local processes, Docker containers and the simulated cloud"
)]
pub struct AdapterArgs {
    /// Address the gRPC Provider API listens on.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_LISTEN",
        default_value = "127.0.0.1:50061"
    )]
    pub listen: String,
    /// Service tokens accepted from callers (scheduler, terminator,
    /// watchdog, api): comma-separated `name:sha256hex` entries, hashes
    /// only (`printf %s "$TOKEN" | sha256sum`). Several may be valid at
    /// once, for rotation. A call without one of them is UNAUTHENTICATED.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_TOKENS",
        value_delimiter = ',',
        value_parser = parse_service_token
    )]
    pub provider_adapter_tokens: Vec<HashedToken>,
    /// File of further service token entries (a mounted Secret): one
    /// `name:sha256hex` per line or comma-separated, `#` comments allowed.
    #[arg(long, env = "PROVIDER_ADAPTER_TOKENS_FILE")]
    pub provider_adapter_tokens_file: Option<PathBuf>,
    /// TLS certificate (chain) of the gRPC listener: a PEM file, or the
    /// PEM itself. With PROVIDER_ADAPTER_TLS_KEY the adapter speaks only
    /// TLS; unset, plaintext (fit for loopback only).
    #[arg(long, env = "PROVIDER_ADAPTER_TLS_CERT")]
    pub provider_adapter_tls_cert: Option<String>,
    /// Private key of PROVIDER_ADAPTER_TLS_CERT: a PEM file (mode 0600),
    /// or the PEM itself.
    #[arg(long, env = "PROVIDER_ADAPTER_TLS_KEY", hide_env_values = true)]
    pub provider_adapter_tls_key: Option<String>,
    /// Address of a plaintext listener answering gRPC health only, for
    /// probes that cannot speak TLS (the kubelet's gRPC probe); empty: none.
    #[arg(long, env = "PROVIDER_ADAPTER_HEALTH_LISTEN", default_value = "")]
    pub provider_adapter_health_listen: String,
    /// Written into every machine's tags; listings only return machines
    /// carrying it, so installations sharing an account stay apart.
    #[arg(long, env = "FLOTILLA_CONTROL_PLANE_ID", default_value = "flotilla")]
    pub control_plane_id: String,
    #[command(flatten)]
    pub guard: GuardArgs,
    #[command(flatten)]
    pub http: HttpClientArgs,
    #[command(flatten)]
    pub fly: FlyArgs,
    #[command(flatten)]
    pub sim: SimArgs,
    #[command(flatten)]
    pub scaleway: ScalewayArgs,
    #[command(flatten)]
    pub local: LocalArgs,
    #[command(flatten)]
    pub docker: DockerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

fn parse_service_token(entry: &str) -> Result<HashedToken, String> {
    match HashedToken::parse(entry)? {
        (token, None) => Ok(token),
        (token, Some(_)) => Err(format!(
            "service token {}: expected name:sha256hex (service tokens have no scope)",
            token.name()
        )),
    }
}

impl AdapterArgs {
    /// Every accepted service token: PROVIDER_ADAPTER_TOKENS and the
    /// entries of PROVIDER_ADAPTER_TOKENS_FILE. Errors name the setting.
    pub fn service_tokens(&self) -> anyhow::Result<Vec<HashedToken>> {
        let mut tokens = self.provider_adapter_tokens.clone();
        if let Some(path) = self
            .provider_adapter_tokens_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "PROVIDER_ADAPTER_TOKENS_FILE: cannot read {}: {e}",
                    path.display()
                )
            })?;
            for entry in split_token_list(&text) {
                tokens.push(parse_service_token(entry).map_err(|e| {
                    anyhow::anyhow!("PROVIDER_ADAPTER_TOKENS_FILE {}: {e}", path.display())
                })?);
            }
        }
        anyhow::ensure!(
            !tokens.is_empty(),
            "PROVIDER_ADAPTER_TOKENS (or PROVIDER_ADAPTER_TOKENS_FILE) is empty, so every call \
             would be refused: set at least one name:sha256hex (printf %s \"$TOKEN\" | sha256sum) \
             and give the token to the callers as PROVIDER_ADAPTER_TOKEN"
        );
        Ok(tokens)
    }

    /// The listener's TLS, or `None` for plaintext.
    pub fn tls(
        &self,
    ) -> Result<Option<tonic::transport::ServerTlsConfig>, flotilla_telemetry::tls::TlsError> {
        flotilla_telemetry::tls::server_tls(
            (
                "PROVIDER_ADAPTER_TLS_CERT",
                self.provider_adapter_tls_cert.as_deref(),
            ),
            (
                "PROVIDER_ADAPTER_TLS_KEY",
                self.provider_adapter_tls_key.as_deref(),
            ),
        )
    }
}

/// Rate limits, retries, circuit breaker and timeouts of provider calls.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Seconds one provider HTTP request may take.
    #[arg(long, env = "PROVIDER_REQUEST_TIMEOUT_SECONDS", default_value_t = 30)]
    pub provider_request_timeout_seconds: u64,
    /// Seconds a started machine may take to report `started` before the
    /// start counts as failed.
    #[arg(long, env = "PROVIDER_START_TIMEOUT_SECONDS", default_value_t = 60)]
    pub provider_start_timeout_seconds: u64,
    /// Consecutive failed calls (5xx, timeouts) that open a provider/region breaker.
    #[arg(long, env = "CIRCUIT_BREAKER_FAILURE_THRESHOLD", default_value_t = 5)]
    pub circuit_breaker_failure_threshold: u32,
    /// Seconds an open breaker rejects calls before letting a probe through.
    #[arg(
        long,
        env = "CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub circuit_breaker_reset_timeout_seconds: u64,
    /// Sustained calls per second to one provider account.
    #[arg(long, env = "PROVIDER_RATE_LIMIT_PER_SECOND", default_value_t = 20)]
    pub provider_rate_limit_per_second: u32,
    /// Calls one provider account may take in a burst.
    #[arg(long, env = "PROVIDER_RATE_LIMIT_BURST", default_value_t = 40)]
    pub provider_rate_limit_burst: u32,
    /// Retries after the first attempt of a call that is safe to repeat
    /// (reads, stop, delete): 3 means at most 4 attempts; 0 never retries.
    #[arg(long, env = "PROVIDER_RETRY_MAX_ATTEMPTS", default_value_t = 3)]
    pub provider_retry_max_attempts: usize,
}

impl GuardArgs {
    pub fn guard(&self) -> GuardConfig {
        GuardConfig {
            failure_threshold: self.circuit_breaker_failure_threshold,
            reset_timeout: Duration::from_secs(self.circuit_breaker_reset_timeout_seconds),
            rate_per_second: self.provider_rate_limit_per_second,
            burst: self.provider_rate_limit_burst,
            max_retries: self.provider_retry_max_attempts,
            ..GuardConfig::default()
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.provider_request_timeout_seconds.max(1))
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.provider_start_timeout_seconds.max(1))
    }
}

/// Fly.io Machines. Enabled when a token and an app are set.
#[derive(Debug, Clone, Args)]
pub struct FlyArgs {
    /// Fly Machines API base URL.
    #[arg(
        long,
        env = "FLY_API_BASE_URL",
        default_value = "https://api.machines.dev"
    )]
    pub fly_api_base_url: String,
    /// Fly API token (secret).
    #[arg(
        long,
        env = "FLY_API_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub fly_api_token: Secret,
    /// The Fly app machines are created in.
    #[arg(long, env = "FLY_APP_NAME", default_value = "")]
    pub fly_app_name: String,
}

/// The simulated cloud (speaks the Fly API). Enabled when its URL is set.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Base URL of a running `flotilla-sim`, e.g. http://127.0.0.1:4280.
    #[arg(long, env = "SIM_API_BASE_URL", default_value = "")]
    pub sim_api_base_url: String,
    /// Token the simulator expects.
    #[arg(
        long,
        env = "SIM_API_TOKEN",
        hide_env_values = true,
        default_value = "sim-token"
    )]
    pub sim_api_token: Secret,
    /// App name used at the simulator.
    #[arg(long, env = "SIM_APP_NAME", default_value = "flotilla")]
    pub sim_app_name: String,
}

/// Scaleway Instances. Enabled when a secret key and a project are set.
#[derive(Debug, Clone, Args)]
pub struct ScalewayArgs {
    /// Scaleway API base URL.
    #[arg(long, env = "SCW_API_URL", default_value = "https://api.scaleway.com")]
    pub scw_api_url: String,
    /// Availability zone servers and volumes are created in.
    #[arg(long, env = "SCW_ZONE", default_value = "fr-par-1")]
    pub scw_zone: String,
    /// Project that owns (and pays for) what Flotilla creates.
    #[arg(long, env = "SCW_PROJECT_ID", default_value = "")]
    pub scw_project_id: String,
    /// IAM API key secret (secret).
    #[arg(
        long,
        env = "SCW_SECRET_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub scw_secret_key: Secret,
    /// Private Network every server joins; its IPAM address is the
    /// machine's private_ip ({private_ip} in health checks). Empty: servers
    /// get no address Flotilla can reach.
    #[arg(long, env = "SCW_PRIVATE_NETWORK_ID", default_value = "")]
    pub scw_private_network_id: String,
    /// Seconds a server delete waits for the server's root volume to detach
    /// before deleting it (a later delete finishes the job).
    #[arg(long, env = "SCW_ROOT_DETACH_TIMEOUT_SECONDS", default_value_t = 30)]
    pub scw_root_detach_timeout_seconds: u64,
}

/// Local processes (the quickstart's provider).
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Run workers as processes on this machine.
    #[arg(long, env = "LOCAL_PROVIDER_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub local_provider_enabled: bool,
    /// Where the local provider keeps its bookkeeping, logs and volumes
    /// (survives adapter restarts).
    #[arg(long, env = "LOCAL_STATE_DIR", default_value = ".flotilla/local")]
    pub local_state_dir: PathBuf,
}

/// Containers of a Docker Engine (workers as containers).
#[derive(Debug, Clone, Args)]
pub struct DockerArgs {
    /// Run workers as containers of the Docker Engine at DOCKER_HOST.
    #[arg(long, env = "DOCKER_PROVIDER_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub docker_provider_enabled: bool,
    /// The engine's Unix socket (unix:///path or /path); only this
    /// adapter should have it mounted.
    #[arg(
        long,
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,
    /// Docker network every worker container joins, so workers reach the
    /// api (in compose: the project's network). Empty: the default bridge.
    #[arg(long, env = "DOCKER_NETWORK", default_value = "")]
    pub docker_network: String,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn configuration_doc_lists_every_adapter_setting() {
        flotilla_core::config::check_doc_section(
            "provider-adapter",
            &AdapterArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let args = AdapterArgs::try_parse_from([
            "provider-adapter",
            "--fly-api-token",
            "fly-secret-123",
            "--scw-secret-key",
            "scw-secret-456",
        ])
        .expect("parses");
        let shown = format!("{args:?}");
        assert!(!shown.contains("fly-secret-123"));
        assert!(!shown.contains("scw-secret-456"));
    }

    #[test]
    fn service_tokens_come_from_the_setting_and_the_file_and_none_is_refused() {
        let hash = flotilla_core::token::token_hash_hex("test");
        let none = AdapterArgs::try_parse_from(["provider-adapter"]).expect("parses");
        let err = none.service_tokens().expect_err("refused");
        assert!(err.to_string().contains("PROVIDER_ADAPTER_TOKENS"), "{err}");
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("# rotated\nwatchdog:{hash}\n")).expect("write");
        let args = AdapterArgs::try_parse_from([
            "provider-adapter",
            "--provider-adapter-tokens",
            &format!("scheduler:{hash},api:{hash}"),
            "--provider-adapter-tokens-file",
            file.to_str().expect("utf-8"),
        ])
        .expect("parses");
        let names: Vec<String> = args
            .service_tokens()
            .expect("tokens")
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        assert_eq!(names, ["scheduler", "api", "watchdog"]);
        assert!(
            AdapterArgs::try_parse_from([
                "provider-adapter",
                "--provider-adapter-tokens",
                &format!("x:{hash}:read"),
            ])
            .is_err()
        );
    }

    #[test]
    fn half_configured_providers_are_refused_with_what_is_missing() {
        let args = AdapterArgs::try_parse_from(["provider-adapter", "--fly-api-token", "t"])
            .expect("parses");
        let err = crate::registry(&args).expect_err("refused");
        assert!(err.to_string().contains("FLY_APP_NAME"), "{err}");
        let args = AdapterArgs::try_parse_from(["provider-adapter", "--scw-project-id", "p"])
            .expect("parses");
        let err = crate::registry(&args).expect_err("refused");
        assert!(err.to_string().contains("SCW_SECRET_KEY"), "{err}");
        let args = AdapterArgs::try_parse_from(["provider-adapter"]).expect("parses");
        let err = crate::registry(&args).expect_err("nothing configured");
        assert!(err.to_string().contains("no provider configured"), "{err}");
        let args = AdapterArgs::try_parse_from([
            "provider-adapter",
            "--scw-project-id",
            "p",
            "--scw-secret-key",
            "k",
            "--sim-api-base-url",
            "http://127.0.0.1:1",
        ])
        .expect("parses");
        assert_eq!(
            crate::registry(&args).expect("ok").kinds(),
            ["scaleway", "sim"]
        );
    }

    #[test]
    fn the_docker_provider_is_enabled_by_its_flag_and_names_a_bad_host() {
        let args = AdapterArgs::try_parse_from([
            "provider-adapter",
            "--docker-provider-enabled",
            "true",
            "--docker-host",
            "tcp://127.0.0.1:2375",
        ])
        .expect("parses");
        let err = crate::registry(&args).expect_err("refused");
        assert!(err.to_string().contains("DOCKER_HOST"), "{err}");
        let args = AdapterArgs::try_parse_from(["provider-adapter"]).expect("parses");
        assert_eq!(args.docker.docker_host, "unix:///var/run/docker.sock");
        assert!(!args.docker.docker_provider_enabled);
    }
}
