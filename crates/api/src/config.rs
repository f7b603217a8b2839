//! The api's settings: where it listens (and with which certificate),
//! which API tokens it accepts, how it reaches the provider-adapter, and
//! the limits and intervals it hands out.

use std::time::Duration;

use clap::Parser;
use flotilla_core::config::{
    AdapterClientArgs, DatabaseArgs, NatsArgs, PriceArgs, ShutdownArgs, TelemetryArgs,
};
use flotilla_core::price::PriceTable;

use crate::auth::ApiToken;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "api",
    version,
    about = "Flotilla api: the public fleet gRPC API and the worker API"
)]
pub struct ApiArgs {
    /// Address the gRPC FleetService and WorkerService listen on.
    #[arg(long, env = "API_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// TLS certificate (chain) of the gRPC listener: a PEM file, or the PEM
    /// itself. With API_TLS_KEY the api speaks only TLS; unset, plaintext
    /// (fit for loopback only: agents and the CLI refuse to send a token in
    /// plaintext to any other address).
    #[arg(long, env = "API_TLS_CERT")]
    pub api_tls_cert: Option<String>,
    /// Private key of API_TLS_CERT: a PEM file (mode 0600), or the PEM itself.
    #[arg(long, env = "API_TLS_KEY", hide_env_values = true)]
    pub api_tls_key: Option<String>,
    /// Address of a plaintext listener answering gRPC health only
    /// (`grpc.health.v1`), for probes that cannot speak TLS (the kubelet's
    /// gRPC probe); empty: none. Health carries no secret and needs no token.
    #[arg(long, env = "API_HEALTH_LISTEN", default_value = "")]
    pub api_health_listen: String,
    /// Accepted API tokens, comma-separated `name:sha256hex[:scope]`
    /// entries; scope `admin` (the default) may call everything, `read`
    /// only GetInstance, ListInstances, GetInstanceHistory, WatchEvents,
    /// GetPool and ListPools. Several may be valid at once (rotation: add
    /// the new one, move callers, remove the old). Only the SHA-256 of each
    /// token is configured, never the token; make one with `printf %s
    /// "$TOKEN" | sha256sum`. The name is recorded as the actor
    /// (`api:<name>`) of every change made with the token.
    #[arg(
        long,
        env = "API_TOKENS",
        value_delimiter = ',',
        value_parser = ApiToken::parse,
        hide_env_values = true
    )]
    pub api_tokens: Vec<ApiToken>,
    /// Most instances one Provision call may create (by count or by names).
    #[arg(long, env = "API_MAX_PROVISION_COUNT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub api_max_provision_count: u32,
    /// Seconds a Provision idempotency key is remembered.
    #[arg(long, env = "IDEMPOTENCY_TTL_SECONDS", default_value_t = 86_400)]
    pub idempotency_ttl_seconds: u64,
    /// Milliseconds between worker heartbeats, told to every agent.
    #[arg(long, env = "WORKER_HEARTBEAT_INTERVAL_MS", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(100..))]
    pub worker_heartbeat_interval_ms: u32,
    /// Seconds a verified worker token is trusted without hashing it again
    /// (each heartbeat would otherwise cost a SHA-256 and a database read).
    /// A revoked token (its instance terminated) can go on heartbeating,
    /// to no effect, for at most this long; 0 checks every call.
    #[arg(long, env = "WORKER_TOKEN_CACHE_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub worker_token_cache_seconds: u64,
    /// Seconds a worker's heartbeat mark (the indexed copy of its last
    /// heartbeat that the watchdog's silent-worker scan reads) may age
    /// before a heartbeat moves it (1-300). Longer: fewer heartbeats
    /// rewrite the index; keep it plus WORKER_HEARTBEAT_INTERVAL_MS well
    /// under the watchdog's WORKER_HEARTBEAT_TIMEOUT_SECONDS, or healthy
    /// workers become scan candidates.
    #[arg(long, env = "WORKER_HEARTBEAT_MARK_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub worker_heartbeat_mark_seconds: u64,
    /// gRPC address of the provider-adapter. When set, CreatePool asks it
    /// whether the pool's provider, region and machine shape exist and are
    /// valid (CheckSpec) before anything is written; when unset, pools are
    /// checked by the api's own rules only (logged once at startup).
    #[arg(long, env = "PROVIDER_ADAPTER_URL")]
    pub provider_adapter_url: Option<String>,
    #[command(flatten)]
    pub adapter: AdapterClientArgs,
    #[command(flatten)]
    pub prices: PriceArgs,
    /// Apply the database migrations and exit without serving: the
    /// migration step of a deployment (a Kubernetes Job, a compose service).
    /// Needs only the database settings.
    #[arg(
        long,
        env = "MIGRATE_ONLY",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub migrate_only: bool,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// The limits handlers enforce, separate from the connection settings so
/// tests can build a server without parsing arguments.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_provision_count: u32,
    pub idempotency_ttl: Duration,
    pub heartbeat_interval_ms: u32,
    /// How long a verified worker token is trusted (`WORKER_TOKEN_CACHE_SECONDS`).
    pub worker_token_cache: Duration,
    /// How old a heartbeat mark may get before a heartbeat moves it
    /// (`WORKER_HEARTBEAT_MARK_SECONDS`).
    pub heartbeat_mark_every: Duration,
    /// Machine prices (`INSTANCE_PRICES`), for spend rates and caps.
    pub prices: PriceTable,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_provision_count: 1000,
            idempotency_ttl: Duration::from_secs(86_400),
            heartbeat_interval_ms: 5000,
            worker_token_cache: crate::heartbeat::TOKEN_CACHE_TTL,
            heartbeat_mark_every: flotilla_store::worker::HEARTBEAT_MARK_EVERY,
            prices: PriceTable::default(),
        }
    }
}

impl ApiArgs {
    /// The listener's TLS, or `None` for plaintext; an error names the setting.
    pub fn tls(
        &self,
    ) -> Result<Option<tonic::transport::ServerTlsConfig>, flotilla_telemetry::tls::TlsError> {
        flotilla_telemetry::tls::server_tls(
            ("API_TLS_CERT", self.api_tls_cert.as_deref()),
            ("API_TLS_KEY", self.api_tls_key.as_deref()),
        )
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_provision_count: self.api_max_provision_count,
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_seconds),
            heartbeat_interval_ms: self.worker_heartbeat_interval_ms,
            worker_token_cache: Duration::from_secs(self.worker_token_cache_seconds),
            heartbeat_mark_every: Duration::from_secs(self.worker_heartbeat_mark_seconds),
            prices: self.prices.instance_prices.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn defaults_parse_without_any_environment() {
        let args = ApiArgs::try_parse_from(["api"]).expect("defaults parse");
        assert_eq!(args.listen, "127.0.0.1:50051");
        assert!(args.api_tokens.is_empty());
        assert!(!args.migrate_only);
        let limits = args.limits();
        assert_eq!(limits.max_provision_count, 1000);
        assert_eq!(limits.idempotency_ttl, Duration::from_secs(86_400));
        assert_eq!(limits.heartbeat_interval_ms, 5000);
        assert_eq!(
            limits.heartbeat_mark_every,
            flotilla_store::worker::HEARTBEAT_MARK_EVERY
        );
        assert_eq!(
            Limits::default().heartbeat_mark_every,
            limits.heartbeat_mark_every
        );
    }

    #[test]
    fn the_heartbeat_mark_interval_is_a_setting_refused_out_of_range() {
        let args = ApiArgs::try_parse_from(["api", "--worker-heartbeat-mark-seconds", "25"])
            .expect("parse");
        assert_eq!(args.limits().heartbeat_mark_every, Duration::from_secs(25));
        for bad in ["0", "301", "ten"] {
            let err = ApiArgs::try_parse_from(["api", "--worker-heartbeat-mark-seconds", bad])
                .expect_err(bad)
                .to_string();
            assert!(err.contains("--worker-heartbeat-mark-seconds"), "{err}");
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn tokens_are_comma_separated_name_hash_pairs() {
        let list = format!(
            "ci:{HASH},ops:{}:admin,dash:{HASH}:read",
            HASH.to_uppercase()
        );
        let args = ApiArgs::try_parse_from(["api", "--api-tokens", &list]).expect("parse");
        let names: Vec<_> = args
            .api_tokens
            .iter()
            .map(|t| (t.name(), t.scope().as_str()))
            .collect();
        assert_eq!(names, [("ci", "admin"), ("ops", "admin"), ("dash", "read")]);
    }

    #[test]
    fn a_bad_price_entry_is_refused_at_startup_naming_the_setting_and_entry() {
        let ok = ApiArgs::try_parse_from(["api", "--instance-prices", "a10=1.5"]).expect("parse");
        assert_eq!(ok.limits().prices.get("a10"), Some(1_500_000));
        let err = ApiArgs::try_parse_from(["api", "--instance-prices", "a10=1.5,gpu=lots"])
            .expect_err("refused")
            .to_string();
        assert!(err.contains("INSTANCE_PRICES entry 2"), "{err}");
        assert!(err.contains("gpu=lots"), "{err}");
    }

    #[test]
    fn migrate_only_is_a_bare_flag_or_a_boolean() {
        let bare = ApiArgs::try_parse_from(["api", "--migrate-only"]).expect("parse");
        assert!(bare.migrate_only);
        let off = ApiArgs::try_parse_from(["api", "--migrate-only", "false"]).expect("parse");
        assert!(!off.migrate_only);
    }

    #[test]
    fn a_malformed_token_entry_is_refused_at_startup() {
        for bad in [
            "ci".to_owned(),
            format!(":{HASH}"),
            "ci:abc".to_owned(),
            format!("c i:{HASH}"),
            format!("ci:{}", &HASH[..62]),
            format!("ci:{HASH}:root"),
        ] {
            let parsed = ApiArgs::try_parse_from(["api", "--api-tokens", &bad]);
            assert!(parsed.is_err(), "{bad} was accepted");
        }
    }
}
