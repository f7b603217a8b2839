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

/// Grace period of [`Terminator::run`]; the binary takes `SHUTDOWN_GRACE_SECONDS`.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

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
        self.run_with_grace(bus, shutdown, DEFAULT_GRACE).await
    }

    /// [`Terminator::run`], letting in-flight steps finish for at most
    /// `grace` after `shutdown` before they are abandoned (each step only
    /// moves a row after the provider confirmed it, so the next replica
    /// resumes from what is recorded).
    pub async fn run_with_grace(
        self,
        bus: Option<Bus>,
        shutdown: CancellationToken,
        grace: std::time::Duration,
    ) {
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
            // It also remembers each instance's trace and correlation id,
            // so the loop's work on it continues the caller's trace.
            tasks.spawn(flotilla_bus::consumer::wake_on_with(
                bus,
                "terminator",
                flotilla_bus::subjects::TERMINATE,
                wake.clone(),
                shutdown.clone(),
                remember_origins,
            ));
        }
        flotilla_telemetry::shutdown::join_within_grace(&mut tasks, &shutdown, grace).await;
        if let Ok(mut conn) = self.db.acquire().await {
            let _ = flotilla_store::instance::instance_release_owner(&mut conn, &self.owner).await;
        }
    }
}

/// Remembers the origin of every instance a `CMD.terminate` names.
fn remember_origins(d: &flotilla_bus::Delivery) {
    use prost::Message;
    if let Ok(cmd) = flotilla_proto::v1::TerminateCommand::decode(d.payload.clone()) {
        let origin = flotilla_telemetry::origin::Origin::current(&d.headers);
        for id in cmd.instance_ids {
            flotilla_telemetry::origin::remember(id, origin.clone());
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
    let grace = args.shutdown.grace();
    terminator.run_with_grace(Some(bus), shutdown, grace).await;
    // Unsent rows stay in the outbox for the next relay.
    if tokio::time::timeout(grace, relay_task).await.is_err() {
        tracing::warn!("outbox relay did not stop within the grace period");
    }
    Ok(())
}
