//! The `watchdog` service: notices what went wrong when nobody said so —
//! workers that stopped heartbeating, machines that vanished, machines and
//! volumes at the provider that the database does not own.
//!
//! Design notes: every loop claims its rows with `SKIP LOCKED` leases, so
//! replicas can run side by side without acting twice on one instance; the
//! orphan scan is idempotent (deleting an already deleted orphan is a 404,
//! which counts as done).

pub mod config;
pub mod dead;
pub mod orphans;
pub mod stuck;

use std::sync::Arc;

use flotilla_bus::{Bus, OutboxRelay};
use flotilla_proto::v1::provider_client::ProviderClient;
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::{drive, replica_name};
use tokio::sync::Notify;
use tonic::transport::Channel;

pub use config::{WatchdogArgs, WatchdogTuning};
pub use orphans::OrphanReport;

/// One watchdog replica.
#[derive(Clone)]
pub struct Watchdog {
    pub db: PgPool,
    pub provider: ProviderClient<Channel>,
    pub tuning: WatchdogTuning,
    pub owner: String,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Watchdog {
    /// Runs the dead-worker and orphan loops until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        {
            let s = self.clone();
            let sd = shutdown.clone();
            let tick = self.tuning.tick();
            tasks.spawn(async move {
                drive(
                    "watchdog_dead_workers",
                    tick,
                    Arc::new(Notify::new()),
                    sd,
                    || s.dead_workers_once(),
                )
                .await
            });
        }
        {
            let s = self.clone();
            let sd = shutdown.clone();
            let tick = self.tuning.tick();
            tasks.spawn(async move {
                drive("watchdog_stuck", tick, Arc::new(Notify::new()), sd, || {
                    s.stuck_once()
                })
                .await
            });
        }
        {
            let s = self.clone();
            let sd = shutdown.clone();
            let every = self.tuning.orphan_interval();
            tasks.spawn(async move {
                drive(
                    "watchdog_orphans",
                    every,
                    Arc::new(Notify::new()),
                    sd,
                    || async { s.orphans_once().await.0 },
                )
                .await
            });
        }
        while tasks.join_next().await.is_some() {}
        if let Ok(mut conn) = self.db.acquire().await {
            let _ = flotilla_store::instance::instance_release_owner(&mut conn, &self.owner).await;
        }
    }
}

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: WatchdogArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = flotilla_store::connect(&args.database).await?;
    let bus = Bus::connect(&args.nats).await?;
    bus.ensure_streams().await?;
    if let Some(addr) = args.telemetry.metrics_socket()? {
        flotilla_telemetry::metrics::serve(addr, shutdown.clone()).await?;
    }
    let channel = tonic::transport::Endpoint::from_shared(args.provider_adapter_url.clone())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let watchdog = Watchdog {
        db: db.clone(),
        provider: ProviderClient::new(channel),
        tuning: args.tuning.clone(),
        owner: replica_name("watchdog"),
    };
    tracing::info!(owner = %watchdog.owner, dry_run = args.tuning.watchdog_dry_run, "watchdog starting");
    // Replacements and terminations are queued through the outbox.
    let relay = OutboxRelay::new(db, bus);
    let relay_shutdown = shutdown.clone();
    let relay_task = tokio::spawn(async move { relay.run(relay_shutdown).await });
    watchdog.run(shutdown).await;
    let _ = relay_task.await;
    Ok(())
}
