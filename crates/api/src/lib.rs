//! The `api` service: the public fleet gRPC API (provision, inspect, watch,
//! pools) and the worker API agents call (register, boot phases,
//! heartbeats), with the authentication of both.
//!
//! It owns turning an accepted request into durable intent: instance rows
//! and the commands for them are committed in one transaction, and the
//! outbox relay this process runs carries the commands to JetStream.

pub mod auth;
pub mod config;
pub mod error;
pub mod fleet;
pub mod heartbeat;
pub mod lifecycle;
pub mod provision;
pub mod validate;
pub mod watch;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::{Bus, OutboxRelay};
use flotilla_proto::client::AdapterClient;
use flotilla_proto::v1::fleet_service_server::FleetServiceServer;
use flotilla_proto::v1::worker_service_server::WorkerServiceServer;
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::grpc_server::GrpcServer;
use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;

pub use auth::{ApiToken, Caller, FleetAuth, Scope};
pub use config::{ApiArgs, Limits};
pub use fleet::FleetApi;
pub use worker::WorkerApi;

/// Longest a unary call may take before the server answers DEADLINE_EXCEEDED.
/// Watch streams are not cut by it: it bounds the call, not its stream.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub bus: Bus,
    pub tokens: Arc<[ApiToken]>,
    pub limits: Limits,
    /// The provider-adapter pools are checked against when they are
    /// created; `None`: the api's own rules only.
    pub provider: Option<AdapterClient>,
}

/// How the api's listener is secured: TLS when a certificate is given,
/// and an optional plaintext listener that answers health only.
#[derive(Debug, Default)]
pub struct Listeners {
    pub tls: Option<ServerTlsConfig>,
    pub health: Option<TcpListener>,
}

/// Serves FleetService and WorkerService (with health and reflection) on
/// `listener`, in plaintext, until `shutdown`; health turns NOT_SERVING
/// first so load balancers drain, and open watch streams end.
pub async fn serve(
    state: ApiState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(state, listener, Listeners::default(), shutdown).await
}

/// [`serve`], with TLS and a health-only listener when `extra` has them.
pub async fn serve_with(
    state: ApiState,
    listener: TcpListener,
    extra: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let fleet = FleetAuth::new(
        FleetServiceServer::new(FleetApi::new(state.clone(), shutdown.clone())),
        state.tokens.clone(),
    );
    let worker = WorkerServiceServer::new(WorkerApi::new(state));
    let server = GrpcServer::new("api", flotilla_proto::v1::FILE_DESCRIPTOR_SET)
        .timeout(CALL_TIMEOUT)
        .tls(extra.tls)
        .health_listener(extra.health)
        .add_service(fleet)
        .add_service(worker);
    let reporter = server.health();
    reporter.set_serving::<FleetServiceServer<FleetApi>>().await;
    reporter
        .set_serving::<WorkerServiceServer<WorkerApi>>()
        .await;
    server
        .serve(listener, async move {
            shutdown.cancelled().await;
            reporter
                .set_not_serving::<FleetServiceServer<FleetApi>>()
                .await;
            reporter
                .set_not_serving::<WorkerServiceServer<WorkerApi>>()
                .await;
        })
        .await?;
    Ok(())
}

/// Runs the service as the binary does (telemetry already initialised):
/// store and bus, the outbox relay, metrics, then the gRPC server until
/// `shutdown` plus the grace period. With `--migrate-only` it migrates the
/// database and returns, without NATS, API tokens or any listener.
pub async fn run(args: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.migrate_only {
        let pool = flotilla_store::connect(&args.database).await?;
        flotilla_store::migrate(&pool).await?;
        pool.close().await;
        tracing::info!("database migrated; exiting (--migrate-only)");
        return Ok(());
    }
    anyhow::ensure!(
        !args.api_tokens.is_empty(),
        "API_TOKENS is empty, so every FleetService call would be refused: \
         set at least one name:sha256hex (printf %s \"$TOKEN\" | sha256sum)"
    );
    // Settings first: a bad certificate or adapter setting stops the api
    // before it connects to anything.
    let tls = args.tls()?;
    if tls.is_none() {
        tracing::warn!(
            "API_TLS_CERT/API_TLS_KEY are not set: the api serves plaintext, fit for loopback only"
        );
    }
    let provider = match args
        .provider_adapter_url
        .as_deref()
        .filter(|u| !u.is_empty())
    {
        Some(url) => Some(flotilla_runtime::service::provider_client(
            url,
            &args.adapter,
        )?),
        None => {
            tracing::warn!(
                "PROVIDER_ADAPTER_URL is not set: new pools are checked by the api's own \
                 rules only, not against the provider-adapter"
            );
            None
        }
    };
    let pool = flotilla_store::connect(&args.database).await?;
    flotilla_store::migrate(&pool).await?;
    let bus = Bus::connect(&args.nats).await?;
    bus.ensure_streams().await?;

    // A child token: a server that fails also stops the relay and metrics,
    // without cancelling the caller's token.
    let stop = shutdown.child_token();
    if let Some(addr) = args.telemetry.metrics_socket()? {
        flotilla_telemetry::metrics::serve(addr, stop.clone()).await?;
    }
    let relay = OutboxRelay::new(pool.clone(), bus.clone());
    let relay_task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });

    let listener = TcpListener::bind(&args.listen).await?;
    let health = match args.api_health_listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await?),
    };
    let grace = args.shutdown.grace();
    let state = ApiState {
        pool,
        bus,
        tokens: args.api_tokens.clone().into(),
        limits: args.limits(),
        provider,
    };
    let served = tokio::select! {
        served = serve_with(state, listener, Listeners { tls, health }, stop.clone()) => served,
        _ = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "calls still open after the grace period; stopping anyway");
            Ok(())
        }
    };
    stop.cancel();
    // Committed rows the relay has not sent stay in the outbox for the next relay.
    if tokio::time::timeout(grace, relay_task).await.is_err() {
        tracing::warn!("outbox relay did not stop within the grace period");
    }
    served
}

#[cfg(test)]
mod config_doc {
    use clap::CommandFactory;

    #[test]
    fn configuration_doc_lists_every_api_setting() {
        flotilla_core::config::check_doc_section(
            "api",
            &crate::ApiArgs::command(),
            &flotilla_core::config::shared_command(),
        );
    }
}

#[cfg(test)]
mod migrate_only {
    use clap::Parser;

    use super::*;

    #[tokio::test]
    async fn migrate_only_migrates_and_returns_without_nats_or_tokens() {
        let db = flotilla_test_utils::TestDb::new().await;
        let args = ApiArgs::try_parse_from([
            "api",
            "--migrate-only",
            "--database-url",
            &db.url,
            "--nats-url",
            "nats://127.0.0.1:1",
        ])
        .expect("parse");
        let ran =
            tokio::time::timeout(Duration::from_secs(30), run(args, CancellationToken::new()))
                .await
                .expect("returns without serving");
        ran.expect("migrates an already migrated database again");
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&db.pool)
            .await
            .expect("migrations table");
        assert!(applied > 0);
    }
}
