//! The process-wide Prometheus recorder and the `/metrics` endpoint.
//!
//! Every crate records through the `metrics` facade; this module installs
//! the one recorder (once per process, so tests that run several services
//! in one process share it) and serves its rendering.

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::Router;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Histogram buckets for `_seconds` metrics: 1 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of the lifecycle histograms (an instance's time to ready, to
/// terminated): 1 s to 1 h, since a boot or a drain takes minutes.
const LIFECYCLE_BUCKETS: &[f64] = &[
    1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0,
    3600.0,
];

/// The histograms measured with [`LIFECYCLE_BUCKETS`].
const LIFECYCLE_HISTOGRAMS: &[&str] = &[
    "flotilla_instance_ready_seconds",
    "flotilla_instance_termination_seconds",
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first call; returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = LIFECYCLE_HISTOGRAMS
                .iter()
                .fold(
                    PrometheusBuilder::new().set_buckets(SECONDS_BUCKETS),
                    |b, name| {
                        b.and_then(|b| {
                            b.set_buckets_for_metric(
                                Matcher::Full((*name).to_owned()),
                                LIFECYCLE_BUCKETS,
                            )
                        })
                    },
                )
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be set (a test harness); then
            // this handle renders an empty registry, which is harmless.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Every metric Flotilla records, by kind, with its `# HELP` text.
/// Prometheus tooling (`promtool check metrics`) wants help on each; a test
/// checks that every name recorded anywhere in the workspace is listed.
pub const DESCRIPTIONS: &[(Kind, &str, &str)] = &[
    // Loops (every reconcile loop, through `loops::record`).
    (
        Kind::Counter,
        "flotilla_loop_runs_total",
        "Activations of a reconcile loop, by loop and wake-up reason.",
    ),
    (
        Kind::Histogram,
        "flotilla_loop_duration_seconds",
        "Duration of one loop activation (tick), by loop.",
    ),
    (
        Kind::Counter,
        "flotilla_loop_items_total",
        "Items a loop handled, by loop and outcome (found, acted, already_done).",
    ),
    (
        Kind::Counter,
        "flotilla_loop_errors_total",
        "Items a loop failed on, by loop and error class.",
    ),
    (
        Kind::Gauge,
        "flotilla_loop_backlog",
        "Items waiting for a loop (due work), by loop; sampled by the loop itself or, for the instance loops, by the watchdog.",
    ),
    (
        Kind::Gauge,
        "flotilla_loop_last_run_timestamp_seconds",
        "Unix time at which a loop last finished an activation, by loop: a loop that stopped running stops moving it.",
    ),
    (
        Kind::Counter,
        "flotilla_lease_lost_total",
        "Fence checks that found a step's lease lost (the replica paused, partitioned or slow): the step stopped without writing or calling a provider.",
    ),
    // gRPC servers.
    (
        Kind::Counter,
        "flotilla_grpc_server_requests_total",
        "gRPC calls served, by service, method and status code.",
    ),
    (
        Kind::Histogram,
        "flotilla_grpc_server_request_duration_seconds",
        "Time to answer a gRPC call (until response headers), by service and method.",
    ),
    // Bus and outbox.
    (
        Kind::Counter,
        "flotilla_bus_published_total",
        "Messages published to JetStream, by stream and whether the server already had them.",
    ),
    (
        Kind::Counter,
        "flotilla_bus_consumed_total",
        "Messages handled by a durable consumer, by consumer and outcome.",
    ),
    (
        Kind::Counter,
        "flotilla_bus_dead_letters_total",
        "Messages moved to the dead-letter stream, by consumer.",
    ),
    (
        Kind::Counter,
        "flotilla_outbox_relayed_total",
        "Outbox rows published and marked sent.",
    ),
    (
        Kind::Counter,
        "flotilla_outbox_publish_failures_total",
        "Outbox rows whose publish failed (retried later).",
    ),
    (
        Kind::Histogram,
        "flotilla_outbox_relay_duration_seconds",
        "Duration of one outbox relay batch.",
    ),
    // Provider layer.
    (
        Kind::Counter,
        "flotilla_provider_calls_total",
        "Provider API calls, by provider, operation and outcome (ok or error class).",
    ),
    (
        Kind::Histogram,
        "flotilla_provider_call_duration_seconds",
        "Duration of one provider API call, by provider and operation.",
    ),
    (
        Kind::Gauge,
        "flotilla_provider_breaker_state",
        "Circuit breaker per provider scope: 0 closed, 1 half-open, 2 open.",
    ),
    (
        Kind::Gauge,
        "flotilla_pools_paused",
        "Pools paused after repeated provisioning or startup failures (or by an operator); sampled by the scheduler's capacity loop.",
    ),
    (
        Kind::Gauge,
        "flotilla_pools_spend_capped",
        "Pools whose capacity is held below the desired count by their spend cap; sampled by the scheduler's capacity loop.",
    ),
    (
        Kind::Gauge,
        "flotilla_pool_disrupted_instances",
        "Instances of each pool being voluntarily disrupted now (scale-down, max lifetime, idle stop): what its disruption budget is spent on; set by the scheduler's capacity loop.",
    ),
    (
        Kind::Counter,
        "flotilla_disruptions_total",
        "Healthy instances pool capacity took away, by pool and reason (scale_down, expiring, expired, idle).",
    ),
    (
        Kind::Counter,
        "flotilla_terminator_returned_to_warm_total",
        "Idle instances (idle action stop) the terminator drained, stopped and returned to their pool's warm stock instead of deleting them.",
    ),
    (
        Kind::Counter,
        "flotilla_disruptions_held_total",
        "Voluntary disruptions the pool's disruption budget held back, by pool and reason; counted each activation they stay held.",
    ),
    // Fleet state (sampled by the watchdog).
    (
        Kind::Gauge,
        "flotilla_instances",
        "Instances not yet terminated, by pool and state.",
    ),
    (
        Kind::Gauge,
        "flotilla_instances_needing_attention",
        "Instances whose step keeps failing (needs_attention: retried, but an operator should look), by pool and state.",
    ),
    (
        Kind::Gauge,
        "flotilla_instances_oldest_in_state_seconds",
        "Seconds the oldest instance of a pool has been in its state, by pool and state: large in a passing state means stuck.",
    ),
    (
        Kind::Gauge,
        "flotilla_pool_spend_per_hour",
        "What a pool's live (not terminated or abandoned) instances cost per hour, from the pool's price or INSTANCE_PRICES (currency units), by pool.",
    ),
    (
        Kind::Gauge,
        "flotilla_pool_spend_cap_per_hour",
        "A pool's spend cap per hour (currency units; 0: no cap), by pool.",
    ),
    (
        Kind::Histogram,
        "flotilla_instance_ready_seconds",
        "Time from an instance's request (its row's creation) to ready, by pool: recorded where it becomes ready (the api on the agent's report, the scheduler on a health check).",
    ),
    (
        Kind::Histogram,
        "flotilla_instance_termination_seconds",
        "Time from an instance's first terminate request to terminated (the provider confirmed machine and volumes gone), by pool; recorded by the terminator.",
    ),
    (
        Kind::Gauge,
        "flotilla_heartbeats_expected_per_second",
        "Heartbeats per second the api should receive: the sum of 1/interval over ready and draining workers whose agent registered; sampled by the watchdog. Compare with rate(flotilla_api_heartbeats_total).",
    ),
    (
        Kind::Histogram,
        "flotilla_heartbeat_age_seconds",
        "Age of the last sign of life of each ready instance, sampled every watchdog tick.",
    ),
    // api.
    (
        Kind::Counter,
        "flotilla_api_instances_requested_total",
        "Instances accepted by Provision.",
    ),
    (
        Kind::Counter,
        "flotilla_api_instances_provisioned_total",
        "Instances accepted by Provision by where their machine comes from: source=warm (a warm machine of the pool, started instead of created) or source=cold (created).",
    ),
    (
        Kind::Gauge,
        "flotilla_pool_warm_instances",
        "Warm machines (created, never started, held in reserve for Provision) each pool holds now; set by the scheduler's warm refill.",
    ),
    (
        Kind::Counter,
        "flotilla_scheduler_warm_machines_created_total",
        "Machines the scheduler created for warm stock (created and recorded, not started).",
    ),
    (
        Kind::Counter,
        "flotilla_api_spend_cap_refusals_total",
        "Provision calls refused because they would take a pool's spend over its cap, by pool.",
    ),
    (
        Kind::Counter,
        "flotilla_api_heartbeats_total",
        "Worker heartbeats ingested.",
    ),
    (
        Kind::Histogram,
        "flotilla_api_heartbeat_batch_size",
        "Heartbeats written per database batch.",
    ),
    (
        Kind::Histogram,
        "flotilla_api_heartbeat_flush_duration_seconds",
        "Time to write one heartbeat batch (one statement), failed or not.",
    ),
    (
        Kind::Counter,
        "flotilla_api_heartbeat_flush_failures_total",
        "Heartbeat batches whose write failed (their workers got the error and retry).",
    ),
    // scheduler.
    (
        Kind::Counter,
        "flotilla_scheduler_machines_created_total",
        "Machines created at a provider by the scheduler.",
    ),
    (
        Kind::Counter,
        "flotilla_scheduler_machines_started_total",
        "Machines started and moved to booting.",
    ),
    (
        Kind::Counter,
        "flotilla_scheduler_health_checks_total",
        "Worker health probes made by the scheduler, by outcome (up, down).",
    ),
    (
        Kind::Histogram,
        "flotilla_scheduler_health_check_duration_seconds",
        "Duration of one worker health probe made by the scheduler (answers from its short cache are not probes), by outcome (up, down).",
    ),
    (
        Kind::Counter,
        "flotilla_scheduler_retries_total",
        "Provisioning steps that failed and will be retried, by error class.",
    ),
    (
        Kind::Counter,
        "flotilla_scheduler_adoption_deferred_total",
        "Retries that waited for the provider's listing to settle before creating another machine.",
    ),
    // Volume deletes (terminator and the watchdog's orphan scan).
    (
        Kind::Counter,
        "flotilla_volume_deletes_total",
        "Volume delete calls, by service (terminator, watchdog) and outcome (deleted, already_gone: the provider answered NotFound, failed: retried later).",
    ),
    (
        Kind::Histogram,
        "flotilla_volume_delete_duration_seconds",
        "Duration of one volume delete call, by service and outcome.",
    ),
    // terminator.
    (
        Kind::Counter,
        "flotilla_terminator_terminated_total",
        "Instances the terminator brought to terminated.",
    ),
    (
        Kind::Counter,
        "flotilla_terminator_attempts_total",
        "Termination steps attempted, by step and outcome.",
    ),
    (
        Kind::Counter,
        "flotilla_terminator_volume_delete_failures_total",
        "Volume deletions that failed (retried later).",
    ),
    // watchdog.
    (
        Kind::Counter,
        "flotilla_watchdog_declared_total",
        "Instances the watchdog declared gone, by the state it moved them to.",
    ),
    (
        Kind::Counter,
        "flotilla_watchdog_stuck_total",
        "Instances found stuck in a state past its deadline, by state.",
    ),
    (
        Kind::Counter,
        "flotilla_watchdog_volume_delete_failures_total",
        "Orphan volume deletions that failed.",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_orphan_machines",
        "Machines at the provider that no live instance owns, at the last scan.",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_orphan_volumes",
        "Volumes at the provider that no live instance owns, at the last scan.",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_orphan_cost_per_hour",
        "Estimated cost per hour of the orphan machines of the last scan, from pool prices and INSTANCE_PRICES (currency units).",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_storm_hold",
        "1 while remediation of a pool is held because too much of it went silent at once.",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_suspect_share",
        "Share of a pool's ready instances currently suspected silent.",
    ),
    (
        Kind::Counter,
        "flotilla_watchdog_empty_listings_total",
        "Machine listings that were empty while the database held live machines (ignored), by provider and region.",
    ),
    (
        Kind::Counter,
        "flotilla_watchdog_listing_suspects_total",
        "Live instances whose machine a listing did not show, by outcome (gone, present, too_young, held, error).",
    ),
    (
        Kind::Gauge,
        "flotilla_watchdog_lost_storm_hold",
        "1 while lost verdicts of a pool are held because too much of it is missing from a listing at once.",
    ),
    (
        Kind::Histogram,
        "flotilla_watchdog_detection_seconds",
        "Time from a worker's last heartbeat to the watchdog declaring it dead.",
    ),
];

/// A metric's kind, for [`DESCRIPTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Registers the `# HELP` text of every metric with the global recorder.
pub fn describe() {
    for (kind, name, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// Records that an instance of `pool` became ready `seconds` after it was
/// requested (`flotilla_instance_ready_seconds`): by the api on the
/// agent's report, by the scheduler on a health check.
pub fn instance_ready(pool: &str, seconds: f64) {
    metrics::histogram!("flotilla_instance_ready_seconds", "pool" => pool.to_owned())
        .record(seconds);
}

/// What one volume delete call came to (`flotilla_volume_deletes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeDelete {
    /// The provider deleted it.
    Deleted,
    /// The provider answered NotFound: it was gone already.
    AlreadyGone,
    /// Any other error: retried later.
    Failed,
}

impl VolumeDelete {
    pub const ALL: [VolumeDelete; 3] = [
        VolumeDelete::Deleted,
        VolumeDelete::AlreadyGone,
        VolumeDelete::Failed,
    ];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeDelete::Deleted => "deleted",
            VolumeDelete::AlreadyGone => "already_gone",
            VolumeDelete::Failed => "failed",
        }
    }

    /// Records one delete call of `service` that took `took`.
    pub fn record(self, service: &'static str, took: std::time::Duration) {
        let labels = [("service", service), ("outcome", self.as_str())];
        metrics::counter!("flotilla_volume_deletes_total", &labels).increment(1);
        metrics::histogram!("flotilla_volume_delete_duration_seconds", &labels)
            .record(took.as_secs_f64());
    }

    /// Exports every series of `service`'s volume deletes from the start
    /// (counters at 0, histograms without observations), so `increase()`
    /// and alerts see the first failure.
    pub fn register(service: &'static str) {
        for outcome in VolumeDelete::ALL {
            let labels = [("service", service), ("outcome", outcome.as_str())];
            metrics::counter!("flotilla_volume_deletes_total", &labels).increment(0);
            let _ = metrics::histogram!("flotilla_volume_delete_duration_seconds", &labels);
        }
    }
}

/// Serves `GET /metrics` on `addr` (port 0 picks one) until `shutdown`.
/// Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let handle = install();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let h = handle.clone();
                async move {
                    h.run_upkeep();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        h.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((local, task))
}
