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
pub mod warm;

use std::sync::Arc;

use flotilla_bus::Bus;
use flotilla_proto::client::AdapterClient;
use flotilla_runtime::Loops;
use flotilla_runtime::service::{Runtime, Settings, provider_client};
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
pub use flotilla_telemetry::loops::replica_name;
use tokio::sync::Notify;

pub use config::{SchedulerArgs, SchedulerTuning};
pub use provision::{CrashPoint, Stepped};

/// Grace period of [`Scheduler::run`]; the binary takes `SHUTDOWN_GRACE_SECONDS`.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// One scheduler replica.
#[derive(Clone)]
pub struct Scheduler {
    pub db: PgPool,
    pub provider: AdapterClient,
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
    /// Gives back the lease of a row whose step ended in an error.
    pub(crate) async fn release_after_error(&self, id: flotilla_core::InstanceId) {
        flotilla_runtime::reconcile::release(&self.db, id, &self.owner).await
    }

    /// Registers every loop of this replica: provisioning (in lanes, all
    /// woken by `CMD.provision`), boot supervision, health checks and
    /// capacity (woken by `CMD.reconcile`, which the api sends when a
    /// pool's desired capacity changes). Without a bus the loops run on
    /// their ticks alone.
    pub fn register(&self, loops: &mut Loops, bus: Option<Bus>) {
        let tick = self.tuning.tick();
        let wake = Arc::new(Notify::new());
        // Every lane waits on the same wake-up: a command wakes one idle
        // lane while the others are busy with their batches.
        for _ in 0..self.tuning.scheduler_provision_lanes.max(1) {
            let s = self.clone();
            loops.add("scheduler_provision", tick, Some(wake.clone()), move || {
                let s = s.clone();
                async move { s.provision_once().await }
            });
        }
        let s = self.clone();
        loops.add("scheduler_boot", tick, None, move || {
            let s = s.clone();
            async move { s.boot_once().await }
        });
        let s = self.clone();
        let checker = Arc::new(health::HealthChecker::with_connect_timeout(
            self.tuning.health_check_timeout(),
            self.tuning.health_check_cache(),
            self.tuning.http.connect_timeout(),
        ));
        loops.add("scheduler_health", tick, None, move || {
            let (s, c) = (s.clone(), checker.clone());
            async move { s.health_once(&c).await }
        });
        let capacity_wake = Arc::new(Notify::new());
        let s = self.clone();
        loops.add(
            "scheduler_capacity",
            tick,
            Some(capacity_wake.clone()),
            move || {
                let s = s.clone();
                async move { s.capacity_once().await }
            },
        );
        if let Some(bus) = bus {
            // The command only says "look now": it wakes the loop early.
            // The loop continues each instance's trace from its row.
            loops.spawn(flotilla_bus::consumer::wake_on(
                bus.clone(),
                "scheduler",
                flotilla_bus::subjects::PROVISION,
                wake,
                loops.shutdown().clone(),
            ));
            loops.spawn(flotilla_bus::consumer::wake_on(
                bus,
                "scheduler-capacity",
                flotilla_bus::subjects::RECONCILE,
                capacity_wake,
                loops.shutdown().clone(),
            ));
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
        let mut loops = Loops::new(shutdown);
        self.register(&mut loops, bus);
        loops.run_then_release(grace, &self.db, &self.owner).await;
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

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: SchedulerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let rt = Runtime::start(
        "scheduler",
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
    let mut tuning = args.tuning.clone();
    // Read once: machines get the PEM itself.
    if let Some(ca) = tuning.worker_api_ca.as_deref().filter(|c| !c.is_empty()) {
        tuning.worker_api_ca = Some(flotilla_telemetry::tls::pem_setting("WORKER_API_CA", ca)?);
    }
    warn_plaintext_workers(&args.worker_api_url);
    let scheduler = Scheduler {
        db: rt.db.clone(),
        provider: provider_client(&args.provider_adapter_url, &args.adapter)?,
        tuning,
        owner: replica_name("scheduler"),
        worker_api_url: args.worker_api_url.clone(),
        crash_after: None,
    };
    let mut loops = rt.loops();
    scheduler.register(&mut loops, Some(rt.bus.clone()));
    rt.run(loops, &scheduler.owner).await
}

/// Agents refuse to send their token in plaintext beyond loopback, so an
/// `http://` WORKER_API_URL to another host gives workers that never
/// register: said once at startup rather than discovered as boot timeouts.
fn warn_plaintext_workers(url: &str) {
    let plain_remote = url
        .parse::<http::Uri>()
        .ok()
        .filter(|u| u.scheme_str() == Some("http"))
        .and_then(|u| u.host().map(|h| !flotilla_telemetry::tls::is_loopback(h)))
        .unwrap_or(false);
    if plain_remote {
        tracing::warn!(
            url,
            "WORKER_API_URL is plaintext to a non-loopback address: agents refuse it unless \
             their AGENT_ALLOW_PLAINTEXT is true; serve the api with TLS and give workers an \
             https:// URL (and WORKER_API_CA)"
        );
    }
}
