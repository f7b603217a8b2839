//! The api's settings: where it listens, which API tokens it accepts, and
//! the limits and intervals it hands out.

use std::time::Duration;

use clap::Parser;
use flotilla_core::config::{DatabaseArgs, NatsArgs, ShutdownArgs, TelemetryArgs};

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
    /// Accepted API tokens, comma-separated `name:sha256hex` pairs. Only the
    /// SHA-256 of each token is configured, never the token; make one with
    /// `printf %s "$TOKEN" | sha256sum`. The name is recorded as the actor
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
    /// gRPC address of the provider-adapter. When set, CreatePool asks it
    /// whether the pool's provider, region and machine shape exist and are
    /// valid (CheckSpec) before anything is written; when unset, pools are
    /// checked by the api's own rules only (logged once at startup).
    #[arg(long, env = "PROVIDER_ADAPTER_URL")]
    pub provider_adapter_url: Option<String>,
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_provision_count: 1000,
            idempotency_ttl: Duration::from_secs(86_400),
            heartbeat_interval_ms: 5000,
        }
    }
}

impl ApiArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_provision_count: self.api_max_provision_count,
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_seconds),
            heartbeat_interval_ms: self.worker_heartbeat_interval_ms,
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
    }

    #[test]
    fn tokens_are_comma_separated_name_hash_pairs() {
        let list = format!("ci:{HASH},ops:{}", HASH.to_uppercase());
        let args = ApiArgs::try_parse_from(["api", "--api-tokens", &list]).expect("parse");
        let names: Vec<_> = args.api_tokens.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["ci", "ops"]);
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
        ] {
            let parsed = ApiArgs::try_parse_from(["api", "--api-tokens", &bad]);
            assert!(parsed.is_err(), "{bad} was accepted");
        }
    }
}
