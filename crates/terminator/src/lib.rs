//! The `terminator` service: takes instances whose desired state is
//! `terminated` down — cordon, drain, stop, delete machine and volumes —
//! and writes `terminated` only when the provider confirmed it.
//!
//! Design notes: `CMD.terminate` only wakes the reconcile loop early; the
//! loop reads desired states from the database, so a lost message delays,
//! never loses, a termination. Work is claimed with leases: any number of
//! replicas can run.

pub mod config;
pub mod terminate;

use std::sync::Arc;

use flotilla_bus::{Bus, OutboxRelay};
use flotilla_proto::v1::provider_client::ProviderClient;
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::{drive, replica_name};
use tokio::sync::Notify;
use tonic::transport::Channel;

pub use config::{TerminatorArgs, TerminatorTuning};
pub use terminate::Outcome;

/// One terminator replica.
#[derive(Clone)]
pub struct Terminator {
    pub db: PgPool,
    pub provider: ProviderClient<Channel>,
    pub tuning: TerminatorTuning,
    pub owner: String,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Terminator {
    /// Runs the loop (and, with a bus, the `CMD.terminate` wake-up) until
    /// `shutdown`, then gives back the leases it still holds.
    pub async fn run(self, bus: Option<Bus>, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let mut tasks = tokio::task::JoinSet::new();
        {
            let s = self.clone();
            let (w, sd) = (wake.clone(), shutdown.clone());
            let tick = self.tuning.tick();
            tasks.spawn(
                async move { drive("terminator", tick, w, sd, || s.terminate_once()).await },
            );
        }
        if let Some(bus) = bus {
            // The command only says "look now": it wakes the loop early.
            tasks.spawn(flotilla_bus::consumer::wake_on(
                bus,
                "terminator",
                flotilla_bus::subjects::TERMINATE,
                wake.clone(),
                shutdown.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
        if let Ok(mut conn) = self.db.acquire().await {
            let _ = flotilla_store::instance::instance_release_owner(&mut conn, &self.owner).await;
        }
    }
}

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: TerminatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = flotilla_store::connect(&args.database).await?;
    let bus = Bus::connect(&args.nats).await?;
    bus.ensure_streams().await?;
    if let Some(addr) = args.telemetry.metrics_socket()? {
        flotilla_telemetry::metrics::serve(addr, shutdown.clone()).await?;
    }
    let channel = tonic::transport::Endpoint::from_shared(args.provider_adapter_url.clone())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let terminator = Terminator {
        db: db.clone(),
        provider: ProviderClient::new(channel),
        tuning: args.tuning.clone(),
        owner: replica_name("terminator"),
    };
    tracing::info!(owner = %terminator.owner, "terminator starting");
    let relay = OutboxRelay::new(db, bus.clone());
    let relay_shutdown = shutdown.clone();
    let relay_task = tokio::spawn(async move { relay.run(relay_shutdown).await });
    terminator.run(Some(bus), shutdown).await;
    let _ = relay_task.await;
    Ok(())
}
