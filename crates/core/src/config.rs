//! Configuration shared by every binary, from environment variables or flags.
//!
//! Each setting is declared once, here or in a service's own `Args`, with its
//! environment variable, default and help text; `--help` prints them and
//! `docs/configuration.md` is rendered from the same declarations (a test
//! keeps it current), so there is one place that says what can be set.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// A credential read from the environment: its `Debug` and `Display` never
/// show the value, so logging a config struct cannot leak it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// PostgreSQL connection.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (postgres://user@host:port/db).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/flotilla"
    )]
    pub database_url: String,
    /// Largest number of pooled connections per process.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
    /// Seconds to wait for a pooled connection before failing the call.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_SECONDS", default_value_t = 5)]
    pub database_acquire_timeout_seconds: u64,
}

impl DatabaseArgs {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.database_acquire_timeout_seconds)
    }
}

/// NATS JetStream connection and stream layout.
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL, or a comma-separated list of a cluster's nodes
    /// (seeds: the client learns the rest of the cluster from them, and
    /// reconnects to another node when its own goes away).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix for every stream name and subject, so several Flotilla
    /// installations (or tests) can share one NATS server. Letters, digits
    /// and `_` only; empty means none.
    #[arg(long, env = "NATS_NAMESPACE", default_value = "")]
    pub nats_namespace: String,
    /// Seconds during which a republished `Nats-Msg-Id` is dropped as a duplicate.
    #[arg(long, env = "NATS_DUPLICATE_WINDOW_SECONDS", default_value_t = 600)]
    pub nats_duplicate_window_seconds: u64,
    /// Deliveries of one command before it goes to the dead-letter stream.
    #[arg(long, env = "NATS_MAX_DELIVER", default_value_t = 8)]
    pub nats_max_deliver: i64,
    /// Seconds a consumer may hold a message before it is redelivered.
    #[arg(long, env = "NATS_ACK_WAIT_SECONDS", default_value_t = 30)]
    pub nats_ack_wait_seconds: u64,
    /// Copies JetStream keeps of each stream: 3 on a 3-node cluster, so
    /// losing one node loses no command; 1 on a single server.
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for collectors.
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// Logs, traces, metrics, health. The standard `OTEL_*` variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, …) are read by the
/// OpenTelemetry SDK itself; traces are exported only when the endpoint is set.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (also read from `RUST_LOG`).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Address of the Prometheus `/metrics` endpoint; empty disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: String,
}

impl TelemetryArgs {
    /// The metrics address, or `None` when disabled.
    pub fn metrics_socket(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        if self.metrics_addr.is_empty() {
            Ok(None)
        } else {
            self.metrics_addr.parse().map(Some)
        }
    }
}

/// The gRPC health endpoint of a service that runs reconcile loops (the
/// api and the provider-adapter answer health on their own port).
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Address of the gRPC health endpoint (`grpc.health.v1`): SERVING
    /// while every loop finishes activations, NOT_SERVING once one has
    /// stalled or shutdown began; empty disables it.
    #[arg(long, env = "GRPC_HEALTH_ADDR", default_value = "")]
    pub grpc_health_addr: String,
}

impl HealthArgs {
    /// The health address, or `None` when disabled.
    pub fn socket(&self) -> Result<Option<SocketAddr>, std::net::AddrParseError> {
        if self.grpc_health_addr.is_empty() {
            Ok(None)
        } else {
            self.grpc_health_addr.parse().map(Some)
        }
    }
}

/// How a service reaches the provider-adapter beyond its URL: the service
/// token it authenticates with and whom it trusts for TLS. The adapter
/// serves no anonymous call.
#[derive(Debug, Clone, Default, Args)]
pub struct AdapterClientArgs {
    /// Service token sent to the provider-adapter on every call
    /// (`authorization: Bearer …`); its SHA-256 must be one of the
    /// adapter's PROVIDER_ADAPTER_TOKENS. Prefer PROVIDER_ADAPTER_TOKEN_FILE.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_TOKEN",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub provider_adapter_token: Secret,
    /// File holding the service token (e.g. a mounted Secret); when set it
    /// wins over PROVIDER_ADAPTER_TOKEN. Surrounding whitespace is ignored.
    #[arg(long, env = "PROVIDER_ADAPTER_TOKEN_FILE")]
    pub provider_adapter_token_file: Option<PathBuf>,
    /// CA bundle trusted for an `https://` PROVIDER_ADAPTER_URL: a PEM
    /// file, or the PEM itself; unset, the system's roots.
    #[arg(long, env = "PROVIDER_ADAPTER_CA")]
    pub provider_adapter_ca: Option<String>,
    /// Allow an `http://` PROVIDER_ADAPTER_URL to an address other than
    /// loopback: the service token then crosses the network in plaintext.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_ALLOW_PLAINTEXT",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub provider_adapter_allow_plaintext: bool,
    /// Seconds one call to the provider-adapter may take before it fails
    /// as a timeout and is retried by its step (the adapter's own provider
    /// timeouts and retries fit inside it; a create whose answer was lost
    /// this way is adopted by its tag, never made twice).
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_CALL_TIMEOUT_SECONDS",
        default_value_t = 120,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub provider_adapter_call_timeout_seconds: u64,
    /// Seconds between HTTP/2 pings on the connection to the
    /// provider-adapter; a ping unanswered for as long again drops the
    /// connection, so a call on a connection that a partition killed
    /// fails within seconds instead of waiting for TCP to give up.
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_KEEPALIVE_SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub provider_adapter_keepalive_seconds: u64,
    /// Seconds opening a connection to the provider-adapter (TCP and TLS)
    /// may take before the call fails as unavailable and is retried by its
    /// step (1-300).
    #[arg(
        long,
        env = "PROVIDER_ADAPTER_CONNECT_TIMEOUT_SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub provider_adapter_connect_timeout_seconds: u64,
}

impl AdapterClientArgs {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.provider_adapter_connect_timeout_seconds.max(1))
    }
}

/// Outgoing HTTP: the provider-adapter's calls to cloud APIs and the
/// scheduler's worker health checks.
#[derive(Debug, Clone, Args)]
pub struct HttpClientArgs {
    /// Seconds opening an HTTP connection (TCP and TLS) may take before the
    /// call fails as unreachable (1-300; never longer than the call's own
    /// timeout), so a host that drops packets fails fast instead of holding
    /// the call for its whole timeout.
    #[arg(
        long,
        env = "HTTP_CONNECT_TIMEOUT_SECONDS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub http_connect_timeout_seconds: u64,
}

impl HttpClientArgs {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.http_connect_timeout_seconds)
    }
}

/// What machines cost, for every service that counts money (the api's
/// and the scheduler's spend caps, the watchdog's spend and orphan-cost
/// gauges); see [`crate::price`].
#[derive(Debug, Clone, Default, Args)]
pub struct PriceArgs {
    /// Price per hour of one machine of each instance type, in units of
    /// the billing currency (at most 6 decimals): comma-separated
    /// `type=amount` entries, e.g. `shared-cpu-1x=0.0028,a10=1.10`. A
    /// pool's own non-zero `price_per_hour_micros` overrides it for that
    /// pool; an instance type priced by neither costs 0 (it counts as free
    /// towards spend rates, spend caps and the orphan-cost estimate).
    #[arg(
        long,
        env = "INSTANCE_PRICES",
        default_value = "",
        value_parser = crate::price::PriceTable::parse
    )]
    pub instance_prices: crate::price::PriceTable,
}

/// Shutdown behaviour shared by every service.
#[derive(Debug, Clone, Args)]
pub struct ShutdownArgs {
    /// Seconds in-flight work may take to finish after SIGTERM before it is
    /// released for another replica.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
}

impl ShutdownArgs {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}

/// Checks (or, with `UPDATE_DOCS=1`, rewrites) the table of `section` in
/// `docs/configuration.md` against `command`'s declarations, so the doc
/// cannot drift from the code. Only variables not in `skip` are listed
/// (the shared ones have their own section).
pub fn check_doc_section(section: &str, command: &clap::Command, skip: &clap::Command) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let shared: Vec<String> = skip
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let mut own = command.clone();
    for a in command.get_arguments() {
        if a.get_env()
            .is_some_and(|e| shared.contains(&e.to_string_lossy().into_owned()))
        {
            own = own.mut_arg(a.get_id().clone(), |a| a.env(None::<&str>));
        }
    }
    let table = env_table(&own);
    let begin = format!("<!-- {section}:begin -->\n");
    let end = format!("<!-- {section}:end -->");
    let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{doc}\n## {section}\n\n{begin}{table}{end}\n");
            std::fs::write(path, updated).expect("write docs/configuration.md");
            return;
        }
        panic!("docs/configuration.md has no {section} section: run UPDATE_DOCS=1 cargo test");
    };
    let start = b + begin.len();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let updated = format!("{}{}{}", &doc[..start], table, &doc[e..]);
        std::fs::write(path, updated).expect("write docs/configuration.md");
        return;
    }
    assert_eq!(
        &doc[start..e],
        table,
        "docs/configuration.md section {section} is stale: run UPDATE_DOCS=1 cargo test"
    );
}

/// Every shared setting, for [`check_doc_section`]'s `skip`.
pub fn shared_command() -> clap::Command {
    use clap::Args as _;
    let cmd = clap::Command::new("shared");
    let cmd = DatabaseArgs::augment_args(cmd);
    let cmd = NatsArgs::augment_args(cmd);
    let cmd = TelemetryArgs::augment_args(cmd);
    ShutdownArgs::augment_args(cmd)
}

/// Renders the environment variables of a clap command as a Markdown table
/// (variable, default, meaning). Used to keep `docs/configuration.md` true.
pub fn env_table(cmd: &clap::Command) -> String {
    let mut out = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let default = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(",");
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string().replace('\n', " "))
            .unwrap_or_default();
        let default = if default.is_empty() {
            "(empty)".to_owned()
        } else {
            format!("`{default}`")
        };
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            env.to_string_lossy(),
            default,
            help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct All {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        telemetry: TelemetryArgs,
        #[command(flatten)]
        shutdown: ShutdownArgs,
    }

    #[test]
    fn defaults_parse_without_any_environment() {
        let all = All::try_parse_from(["x"]).expect("defaults parse");
        assert_eq!(all.nats.nats_namespace, "");
        assert_eq!(all.shutdown.grace(), Duration::from_secs(20));
        assert!(all.telemetry.metrics_socket().expect("addr").is_some());
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_name() {
        let err = All::try_parse_from(["x", "--database-max-connections", "many"])
            .err()
            .expect("refused");
        assert!(err.to_string().contains("--database-max-connections"));
    }

    /// `docs/configuration.md` carries the rendered table between markers;
    /// run with `UPDATE_DOCS=1` to rewrite it after changing a setting.
    #[test]
    fn configuration_doc_matches_the_declarations() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let doc = std::fs::read_to_string(path).expect("docs/configuration.md exists");
        let (begin, end) = ("<!-- shared:begin -->\n", "<!-- shared:end -->");
        let start = doc.find(begin).expect("begin marker") + begin.len();
        let stop = doc.find(end).expect("end marker");
        let table = env_table(&All::command());
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{}{}", &doc[..start], table, &doc[stop..]);
            std::fs::write(path, updated).expect("write doc");
            return;
        }
        assert_eq!(
            &doc[start..stop],
            table,
            "docs/configuration.md is stale: run UPDATE_DOCS=1 cargo test -p flotilla-core"
        );
    }

    #[derive(Parser)]
    struct Outgoing {
        #[command(flatten)]
        http: HttpClientArgs,
        #[command(flatten)]
        adapter: AdapterClientArgs,
    }

    #[test]
    fn connect_timeouts_are_settings_refused_out_of_range() {
        let defaults = Outgoing::try_parse_from(["x"]).expect("defaults");
        assert_eq!(defaults.http.connect_timeout(), Duration::from_secs(5));
        assert_eq!(defaults.adapter.connect_timeout(), Duration::from_secs(5));
        let set = Outgoing::try_parse_from([
            "x",
            "--http-connect-timeout-seconds",
            "2",
            "--provider-adapter-connect-timeout-seconds",
            "9",
        ])
        .expect("parse");
        assert_eq!(set.http.connect_timeout(), Duration::from_secs(2));
        assert_eq!(set.adapter.connect_timeout(), Duration::from_secs(9));
        for flag in [
            "--http-connect-timeout-seconds",
            "--provider-adapter-connect-timeout-seconds",
        ] {
            for bad in ["0", "301", "fast"] {
                let err = Outgoing::try_parse_from(["x", flag, bad])
                    .err()
                    .expect("refused")
                    .to_string();
                assert!(err.contains(flag) && err.contains(bad), "{err}");
            }
        }
    }

    #[test]
    fn secrets_never_print() {
        let s: Secret = "hunter2".parse().expect("infallible");
        assert_eq!(s.expose(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn env_table_lists_every_variable() {
        let table = env_table(&All::command());
        for var in [
            "DATABASE_URL",
            "NATS_URL",
            "LOG_FORMAT",
            "SHUTDOWN_GRACE_SECONDS",
        ] {
            assert!(table.contains(var), "{var} missing");
        }
    }
}
