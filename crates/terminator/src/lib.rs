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

use flotilla_bus::Bus;
use flotilla_proto::client::AdapterClient;
use flotilla_runtime::Loops;
use flotilla_runtime::service::{Runtime, Settings, provider_client};
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::replica_name;
use tokio::sync::Notify;

pub use config::{TerminatorArgs, TerminatorTuning};
pub use terminate::Outcome;

/// The `service` label of the metrics this service shares with others.
pub const SERVICE: &str = "terminator";

/// Grace period of [`Terminator::run`]; the binary takes `SHUTDOWN_GRACE_SECONDS`.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// One terminator replica.
#[derive(Clone)]
pub struct Terminator {
    pub db: PgPool,
    pub provider: AdapterClient,
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
    /// Registers the take-down loop and, with a bus, the `CMD.terminate`
    /// consumer that wakes it.
    pub fn register(&self, loops: &mut Loops, bus: Option<Bus>) {
        flotilla_telemetry::metrics::VolumeDelete::register(SERVICE);
        let wake = Arc::new(Notify::new());
        let s = self.clone();
        loops.add(
            "terminator",
            self.tuning.tick(),
            Some(wake.clone()),
            move || {
                let s = s.clone();
                async move { s.terminate_once().await }
            },
        );
        if let Some(bus) = bus {
            // The command only says "look now": it wakes the loop early.
            // The loop continues each instance's trace from its row.
            loops.spawn(flotilla_bus::consumer::wake_on(
                bus,
                "terminator",
                flotilla_bus::subjects::TERMINATE,
                wake,
                loops.shutdown().clone(),
            ));
        }
    }

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
        let mut loops = Loops::new(shutdown);
        self.register(&mut loops, bus);
        loops.run_then_release(grace, &self.db, &self.owner).await;
    }
}

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: TerminatorArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let rt = Runtime::start(
        "terminator",
        Settings {
            database: &args.database,
            nats: &args.nats,
            telemetry: &args.telemetry,
            health: &args.health,
            shutdown: &args.shutdown,
        },
        shutdown,
    )
    .await?;
    let terminator = Terminator {
        db: rt.db.clone(),
        provider: provider_client(&args.provider_adapter_url, &args.adapter)?,
        tuning: args.tuning.clone(),
        owner: replica_name("terminator"),
    };
    let mut loops = rt.loops();
    terminator.register(&mut loops, Some(rt.bus.clone()));
    rt.run(loops, &terminator.owner).await
}
