//! A service's start and stop, the same for every loop service: connect to
//! PostgreSQL and NATS (creating the streams), serve `/metrics`, relay the
//! outbox rows the service writes, answer gRPC health from its loops'
//! status, and on shutdown give in-flight work its grace, give back the
//! leases this replica holds and let the relay finish within the grace.

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_bus::{Bus, OutboxRelay};
use flotilla_core::config::{
    AdapterClientArgs, DatabaseArgs, HealthArgs, NatsArgs, Secret, ShutdownArgs, TelemetryArgs,
};
use flotilla_proto::client::{AdapterClient, ServiceToken, adapter_client};
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use tokio::task::JoinHandle;

use crate::loops::{Loops, Statuses};

/// The settings every loop service has.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    pub database: &'a DatabaseArgs,
    pub nats: &'a NatsArgs,
    pub telemetry: &'a TelemetryArgs,
    pub health: &'a HealthArgs,
    pub shutdown: &'a ShutdownArgs,
}

/// A started loop service: its connections, its relay, its shutdown.
#[derive(Debug)]
pub struct Runtime {
    pub name: &'static str,
    pub db: PgPool,
    pub bus: Bus,
    pub shutdown: CancellationToken,
    pub grace: Duration,
    health: Option<SocketAddr>,
    relay: JoinHandle<()>,
}

impl Runtime {
    /// Connects, serves metrics and starts the outbox relay. Any number of
    /// relays may run; one publishes at a time.
    pub async fn start(
        name: &'static str,
        settings: Settings<'_>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Runtime> {
        let db = flotilla_store::connect(settings.database).await?;
        let bus = Bus::connect(settings.nats).await?;
        bus.ensure_streams().await?;
        if let Some(addr) = settings.telemetry.metrics_socket()? {
            flotilla_telemetry::metrics::serve(addr, shutdown.clone()).await?;
        }
        let health = settings.health.socket()?;
        let relay = OutboxRelay::new(db.clone(), bus.clone());
        let relay_shutdown = shutdown.clone();
        let relay = tokio::spawn(async move { relay.run(relay_shutdown).await });
        Ok(Runtime {
            name,
            db,
            bus,
            shutdown,
            grace: settings.shutdown.grace(),
            health,
            relay,
        })
    }

    /// A new, empty loop registry stopping on this service's shutdown.
    pub fn loops(&self) -> Loops {
        Loops::new(self.shutdown.clone())
    }

    /// Runs `loops` until shutdown (answering health from their status when
    /// an address is set), gives back `owner`'s leases, and waits for the
    /// relay within the grace. Unsent outbox rows stay for the next relay.
    pub async fn run(self, loops: Loops, owner: &str) -> anyhow::Result<()> {
        if let Some(addr) = self.health {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tokio::spawn(serve_health(
                self.name,
                loops.statuses(),
                listener,
                self.shutdown.clone(),
            ));
        }
        tracing::info!(service = self.name, owner, "service running");
        loops.run_then_release(self.grace, &self.db, owner).await;
        if tokio::time::timeout(self.grace, self.relay).await.is_err() {
            tracing::warn!("outbox relay did not stop within the grace period");
        }
        Ok(())
    }
}

/// Gives back every lease `owner` still holds, so another replica takes
/// its rows at once instead of after the lease.
pub async fn release_leases(db: &PgPool, owner: &str) {
    let released = match db.acquire().await {
        Ok(mut conn) => flotilla_store::instance::instance_release_owner(&mut conn, owner)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match released {
        Ok(n) if n > 0 => tracing::info!(released = n, "leases released on shutdown"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not release leases; they will expire"),
    }
}

/// A client of the provider-adapter at `url`, connecting on first use (a
/// service starts, and answers health, while the adapter is still down):
/// TLS for `https://` (trusting PROVIDER_ADAPTER_CA or the system roots),
/// plaintext only to loopback unless PROVIDER_ADAPTER_ALLOW_PLAINTEXT, and
/// the service token on every call. Fails at startup, naming the setting,
/// when the token is missing or the TLS settings are unusable.
pub fn provider_client(url: &str, args: &AdapterClientArgs) -> anyhow::Result<AdapterClient> {
    let token = adapter_token(args)?;
    let tls = flotilla_telemetry::tls::ClientTls::new(
        "PROVIDER_ADAPTER_URL",
        "PROVIDER_ADAPTER_CA",
        "PROVIDER_ADAPTER_ALLOW_PLAINTEXT",
    )
    .with_ca(args.provider_adapter_ca.as_deref())?
    .allow_plaintext(args.provider_adapter_allow_plaintext);
    let keepalive = Duration::from_secs(args.provider_adapter_keepalive_seconds.max(1));
    let channel = tls
        .endpoint(url)?
        .connect_timeout(args.connect_timeout())
        // A connection cut by a partition answers nothing and resets
        // nothing: without pings a call on it waits for TCP's own timeout
        // (minutes), holding its step, its lease renewals and the batch.
        .http2_keep_alive_interval(keepalive)
        .keep_alive_timeout(keepalive)
        .keep_alive_while_idle(true)
        .timeout(Duration::from_secs(
            args.provider_adapter_call_timeout_seconds.max(1),
        ))
        .connect_lazy();
    let token = ServiceToken::new(token.expose())
        .map_err(|e| anyhow::anyhow!("PROVIDER_ADAPTER_TOKEN: {e}"))?;
    Ok(adapter_client(channel, token))
}

/// The service token: the file's when PROVIDER_ADAPTER_TOKEN_FILE is set,
/// else PROVIDER_ADAPTER_TOKEN. Errors name the setting, never the value.
pub fn adapter_token(args: &AdapterClientArgs) -> anyhow::Result<Secret> {
    let token: String = match &args.provider_adapter_token_file {
        Some(path) if !path.as_os_str().is_empty() => std::fs::read_to_string(path)
            .map_err(|e| {
                anyhow::anyhow!(
                    "PROVIDER_ADAPTER_TOKEN_FILE: cannot read {}: {e}",
                    path.display()
                )
            })?
            .trim()
            .to_owned(),
        _ => args.provider_adapter_token.expose().trim().to_owned(),
    };
    anyhow::ensure!(
        !token.is_empty(),
        "PROVIDER_ADAPTER_TOKEN (or PROVIDER_ADAPTER_TOKEN_FILE) is empty: the provider-adapter \
         refuses anonymous calls; set the service token whose SHA-256 is in its \
         PROVIDER_ADAPTER_TOKENS"
    );
    Ok(token.parse::<Secret>()?)
}

/// gRPC health of a loop service: the overall service (`""`) is SERVING
/// while no loop has stalled; each loop is also a service of its own,
/// `flotilla.loop.<name>`. Everything turns NOT_SERVING at shutdown.
pub async fn serve_health(
    name: &'static str,
    statuses: Statuses,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    // The one server setup every Flotilla gRPC endpoint has; it serves
    // health (and reflection of it) only. An empty descriptor set: no
    // service of our own.
    let server = flotilla_telemetry::grpc_server::GrpcServer::new(name, &[]);
    let reporter = server.health();
    let loops: Vec<&'static str> = statuses.snapshot().keys().copied().collect();
    let update = {
        let (reporter, shutdown) = (reporter.clone(), shutdown.clone());
        async move {
            loop {
                let stalled = statuses.stalled();
                let overall = if stalled.is_empty() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", overall).await;
                for l in &loops {
                    let s = if stalled.contains(l) {
                        ServingStatus::NotServing
                    } else {
                        ServingStatus::Serving
                    };
                    reporter
                        .set_service_status(format!("flotilla.loop.{l}"), s)
                        .await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            for l in &loops {
                reporter
                    .set_service_status(format!("flotilla.loop.{l}"), ServingStatus::NotServing)
                    .await;
            }
        }
    };
    tokio::spawn(update);
    let served = server
        .serve(listener, async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(service = name, error = %e, "health endpoint stopped");
    }
}
