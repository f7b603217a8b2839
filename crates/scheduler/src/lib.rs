//! The `scheduler` service: provisioning (`CMD.provision` and a reconcile
//! loop over instances that should run), boot supervision to `ready`, and
//! pool capacity.
//!
//! Design notes: loops take no input. Each activation reads the database and
//! acts; a `CMD.provision` message only wakes the provisioning loop early, so
//! a lost message delays work by one tick at most and never loses it. Every
//! activation reports the same metrics (`flotilla_telemetry::loops`). Work is
//! claimed with leases, so any number of replicas can run.

pub mod boot;
pub mod capacity;
pub mod config;
pub mod health;
pub mod provision;

use std::sync::Arc;

use flotilla_bus::{Bus, OutboxRelay};
use flotilla_proto::v1::provider_client::ProviderClient;
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::drive;
pub use flotilla_telemetry::loops::replica_name;
use tokio::sync::Notify;
use tonic::transport::Channel;

pub use config::{SchedulerArgs, SchedulerTuning};
pub use provision::{CrashPoint, Stepped};

/// Grace period of [`Scheduler::run`]; the binary takes `SHUTDOWN_GRACE_SECONDS`.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// One scheduler replica.
#[derive(Clone)]
pub struct Scheduler {
    pub db: PgPool,
    pub provider: ProviderClient<Channel>,
    pub tuning: SchedulerTuning,
    /// This replica's lease owner name.
    pub owner: String,
    pub worker_api_url: String,
    /// Test fault: stop provisioning steps at this boundary, as a crash would.
    pub crash_after: Option<CrashPoint>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Scheduler {
    /// Gives back the lease of a row whose step ended in an error. The
    /// usual cause is a lost version race (the worker's own report moved
    /// the instance first); keeping the lease until it expires would hide a
    /// `ready` instance from the watchdog for the whole lease.
    pub(crate) async fn release_after_error(&self, id: flotilla_core::InstanceId) {
        let released = match self.db.acquire().await {
            Ok(mut conn) => flotilla_store::instance::instance_release(&mut conn, id, &self.owner)
                .await
                .map(|_| ()),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = released {
            tracing::warn!(instance_id = %id, error = %e, "could not release a lease; it will expire");
        }
    }

    /// Runs every loop of this replica until `shutdown`, then gives back
    /// the leases it still holds.
    pub async fn run(self, bus: Option<Bus>, shutdown: CancellationToken) {
        self.run_with_grace(bus, shutdown, DEFAULT_GRACE).await
    }

    /// [`Scheduler::run`], letting in-flight steps finish for at most
    /// `grace` after `shutdown` before they are abandoned. An abandoned
    /// step is safe to resume: its intent is committed, and a machine it
    /// may have created is adopted by its tag on the next attempt.
    pub async fn run_with_grace(
        self,
        bus: Option<Bus>,
        shutdown: CancellationToken,
        grace: std::time::Duration,
    ) {
        let wake = Arc::new(Notify::new());
        let tick = self.tuning.tick();
        let mut tasks = tokio::task::JoinSet::new();
        // Every lane waits on the same wake-up: a command wakes one idle
        // lane while the others are busy with their batches.
        for _ in 0..self.tuning.scheduler_provision_lanes.max(1) {
            let s = self.clone();
            let (w, sd) = (wake.clone(), shutdown.clone());
            tasks.spawn(async move {
                drive("scheduler_provision", tick, w, sd, || s.provision_once()).await
            });
        }
        {
            let s = self.clone();
            let sd = shutdown.clone();
            tasks.spawn(async move {
                drive("scheduler_boot", tick, Arc::new(Notify::new()), sd, || {
                    s.boot_once()
                })
                .await
            });
        }
        {
            let s = self.clone();
            let sd = shutdown.clone();
            let checker = Arc::new(health::HealthChecker::new(
                self.tuning.health_check_timeout(),
                self.tuning.health_check_cache(),
            ));
            tasks.spawn(async move {
                drive(
                    "scheduler_health",
                    tick,
                    Arc::new(Notify::new()),
                    sd,
                    || {
                        let (s, c) = (s.clone(), checker.clone());
                        async move { s.health_once(&c).await }
                    },
                )
                .await
            });
        }
        // Woken by `CMD.reconcile`, which the api sends when a pool's
        // desired capacity changes.
        let capacity_wake = Arc::new(Notify::new());
        {
            let s = self.clone();
            let sd = shutdown.clone();
            let wake = capacity_wake.clone();
            tasks.spawn(async move {
                drive("scheduler_capacity", tick, wake, sd, || s.capacity_once()).await
            });
        }
        if let Some(bus) = bus {
            // The command only says "look now": it wakes the loop early.
            // It also remembers each instance's trace and correlation id,
            // so the loop's work on it continues the caller's trace.
            tasks.spawn(flotilla_bus::consumer::wake_on_with(
                bus.clone(),
                "scheduler",
                flotilla_bus::subjects::PROVISION,
                wake.clone(),
                shutdown.clone(),
                remember_origins,
            ));
            tasks.spawn(flotilla_bus::consumer::wake_on(
                bus,
                "scheduler-capacity",
                flotilla_bus::subjects::RECONCILE,
                capacity_wake,
                shutdown.clone(),
            ));
        }
        flotilla_telemetry::shutdown::join_within_grace(&mut tasks, &shutdown, grace).await;
        if let Ok(mut conn) = self.db.acquire().await {
            match flotilla_store::instance::instance_release_owner(&mut conn, &self.owner).await {
                Ok(n) if n > 0 => tracing::info!(released = n, "leases released on shutdown"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not release leases; they will expire"),
            }
        }
    }
}

/// Says what a recorded failure did to its pool. The pools' own audit log
/// is the `pool_events` table; the bus has no pool event subject, so the
/// pause is announced here, in the log.
pub(crate) fn report_pool_failure(
    pool: &str,
    outcome: &flotilla_store::pool_pause::FailureOutcome,
) {
    use flotilla_store::pool_pause::FailureOutcome;
    match outcome {
        FailureOutcome::Counted { in_window } => {
            tracing::info!(pool, in_window, "pool failure recorded")
        }
        FailureOutcome::Paused { reason } => tracing::error!(
            pool,
            %reason,
            "pool paused: no new machines until a probe reaches ready or `flotilla pools resume {pool}`"
        ),
        FailureOutcome::ProbeFailed => {
            tracing::warn!(
                pool,
                "probe of the paused pool failed; the cool-off starts again"
            )
        }
        FailureOutcome::StillPaused => {}
    }
}

/// Remembers the origin of every instance a `CMD.provision` names.
fn remember_origins(d: &flotilla_bus::Delivery) {
    use prost::Message;
    if let Ok(cmd) = flotilla_proto::v1::ProvisionCommand::decode(d.payload.clone()) {
        let origin = flotilla_telemetry::origin::Origin::current(&d.headers);
        for id in cmd.instance_ids {
            flotilla_telemetry::origin::remember(id, origin.clone());
        }
    }
}

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: SchedulerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let db = flotilla_store::connect(&args.database).await?;
    let bus = Bus::connect(&args.nats).await?;
    bus.ensure_streams().await?;
    if let Some(addr) = args.telemetry.metrics_socket()? {
        flotilla_telemetry::metrics::serve(addr, shutdown.clone()).await?;
    }
    let channel = tonic::transport::Endpoint::from_shared(args.provider_adapter_url.clone())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    let scheduler = Scheduler {
        db: db.clone(),
        provider: ProviderClient::new(channel),
        tuning: args.tuning.clone(),
        owner: replica_name("scheduler"),
        worker_api_url: args.worker_api_url.clone(),
        crash_after: None,
    };
    tracing::info!(owner = %scheduler.owner, "scheduler starting");
    // Relays the outbox rows this service writes (capacity changes); any
    // number of relays may run, one publishes at a time.
    let relay = OutboxRelay::new(db, bus.clone());
    let relay_shutdown = shutdown.clone();
    let relay_task = tokio::spawn(async move { relay.run(relay_shutdown).await });
    let grace = args.shutdown.grace();
    scheduler.run_with_grace(Some(bus), shutdown, grace).await;
    // Unsent rows stay in the outbox for the next relay.
    if tokio::time::timeout(grace, relay_task).await.is_err() {
        tracing::warn!("outbox relay did not stop within the grace period");
    }
    Ok(())
}
