//! The `watchdog` service: notices what went wrong when nobody said so —
//! workers that stopped heartbeating, machines that vanished (confirmed
//! by a direct look, never by one listing), machines and
//! volumes at the provider that the database does not own.
//!
//! Design notes: every loop claims its rows with `SKIP LOCKED` leases, so
//! replicas can run side by side without acting twice on one instance; the
//! orphan scan is idempotent (deleting an already deleted orphan is a 404,
//! which counts as done).

pub mod config;
pub mod dead;
pub mod lost;
pub mod orphans;
pub mod stuck;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use flotilla_core::price::PriceTable;
use flotilla_core::{Classify, InstanceState};
use flotilla_proto::client::AdapterClient;
use flotilla_runtime::Loops;
use flotilla_runtime::service::{Runtime, Settings, provider_client};
use flotilla_store::PgPool;
use flotilla_store::metrics::{
    PoolStateCount, metrics_heartbeats_expected_per_second, metrics_instances_by_pool_state,
    metrics_loop_backlogs, metrics_ready_heartbeat_ages,
};
use flotilla_store::pool::PoolRow;
use flotilla_store::spend::spend_rate;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::{ActivationStatus, replica_name};

pub use config::{WatchdogArgs, WatchdogTuning};
pub use orphans::OrphanReport;

/// The `service` label of the metrics this service shares with others.
pub const SERVICE: &str = "watchdog";

/// Grace period of [`Watchdog::run`]; the binary takes `SHUTDOWN_GRACE_SECONDS`.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// One watchdog replica.
#[derive(Clone)]
pub struct Watchdog {
    pub db: PgPool,
    pub provider: AdapterClient,
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
    /// Registers the dead-worker, stuck-instance, orphan and fleet-metrics
    /// loops. None is woken by a message: each reads the database on its tick.
    pub fn register(&self, loops: &mut Loops) {
        flotilla_telemetry::metrics::VolumeDelete::register(SERVICE);
        let tick = self.tuning.tick();
        let s = self.clone();
        loops.add("watchdog_dead_workers", tick, None, move || {
            let s = s.clone();
            async move { s.dead_workers_once().await }
        });
        let s = self.clone();
        loops.add("watchdog_stuck", tick, None, move || {
            let s = s.clone();
            async move { s.stuck_once().await }
        });
        let s = self.clone();
        loops.add(
            "watchdog_orphans",
            self.tuning.orphan_interval(),
            None,
            move || {
                let s = s.clone();
                async move {
                    let (status, report) = s.orphans_once().await;
                    s.record_orphan_cost(&report).await;
                    status
                }
            },
        );
        let s = self.clone();
        let seen = Arc::new(std::sync::Mutex::new(HashSet::new()));
        loops.add("watchdog_fleet_metrics", tick, None, move || {
            let (s, seen) = (s.clone(), seen.clone());
            async move { s.fleet_metrics_once(&seen).await }
        });
    }

    /// Runs the dead-worker and orphan loops until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_with_grace(shutdown, DEFAULT_GRACE).await
    }

    /// [`Watchdog::run`], letting in-flight activations finish for at most
    /// `grace` after `shutdown` before they are abandoned, then giving back
    /// the leases this replica still holds.
    pub async fn run_with_grace(self, shutdown: CancellationToken, grace: std::time::Duration) {
        let mut loops = Loops::new(shutdown);
        self.register(&mut loops);
        loops.run_then_release(grace, &self.db, &self.owner).await;
    }
}

/// A pool's spend gauges (currency units per hour; a cap of 0 is no cap).
fn set_spend_gauges(pool: &str, spend_micros: i64, cap_micros: i64) {
    let labels = [("pool", pool.to_owned())];
    metrics::gauge!("flotilla_pool_spend_per_hour", &labels).set(spend_micros as f64 / 1e6);
    metrics::gauge!("flotilla_pool_spend_cap_per_hour", &labels).set(cap_micros as f64 / 1e6);
}

/// The per-`(pool, state)` fleet gauges, set together so they never
/// disagree about which pairs exist.
fn fleet_gauges(pool: &str, state: &str, count: f64, needing_attention: f64, oldest: f64) {
    let labels = [("pool", pool.to_owned()), ("state", state.to_owned())];
    metrics::gauge!("flotilla_instances", &labels).set(count);
    metrics::gauge!("flotilla_instances_needing_attention", &labels).set(needing_attention);
    metrics::gauge!("flotilla_instances_oldest_in_state_seconds", &labels).set(oldest);
}

impl Watchdog {
    /// Samples the fleet gauges: `flotilla_instances{pool,state}`,
    /// `flotilla_instances_needing_attention` and
    /// `flotilla_instances_oldest_in_state_seconds` (one GROUP BY), each
    /// pool's spend rate and cap (from the same counts), the
    /// backlog of the instance loops of the other services
    /// (`flotilla_loop_backlog{loop}`: they share this database, so one
    /// sampler serves all of them), `flotilla_heartbeat_age_seconds` of
    /// ready instances and `flotilla_heartbeats_expected_per_second`.
    /// Every replica samples; the values are the same database's, so
    /// dashboards take `max` across replicas. `seen` holds the label pairs
    /// reported before, so a pair that emptied drops to 0 instead of
    /// keeping its last count.
    #[tracing::instrument(skip_all, name = "watchdog.fleet_metrics")]
    pub async fn fleet_metrics_once(
        &self,
        seen: &std::sync::Mutex<HashSet<(String, String)>>,
    ) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let mut conn = match self.db.acquire().await {
            Ok(c) => c,
            Err(e) => {
                let e = flotilla_store::StoreError::from(e);
                status.error(e.class(), "fleet", e);
                return status;
            }
        };
        // Every state of every pool has a series from the start, at 0 when
        // empty, so `rate()`, `increase()` and alerts see the first
        // instance and an absent series never reads as "no problem".
        let pools = match flotilla_store::pool::pool_list(&mut conn).await {
            Ok(pools) => {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for pool in &pools {
                    for state in InstanceState::ALL {
                        if !state.is_terminal() {
                            seen.insert((pool.name.clone(), state.as_str().to_owned()));
                        }
                    }
                }
                Some(pools)
            }
            Err(e) => {
                status.error(e.class(), "pools", e);
                None
            }
        };
        match metrics_instances_by_pool_state(&mut conn).await {
            Ok(rows) => {
                if let Some(pools) = &pools {
                    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    self.spend_gauges(pools, &rows, &seen);
                }
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                let now: HashSet<(String, String)> = rows
                    .iter()
                    .map(|r| (r.pool.clone(), r.state.clone()))
                    .collect();
                // A pair that emptied drops to 0 rather than keeping its
                // last value (an alert on it must be able to resolve).
                for (pool, state) in seen.difference(&now) {
                    fleet_gauges(pool, state, 0.0, 0.0, 0.0);
                }
                for r in rows {
                    status.found += r.count.max(0) as u64;
                    fleet_gauges(
                        &r.pool,
                        &r.state,
                        r.count as f64,
                        r.needing_attention as f64,
                        r.oldest_seconds,
                    );
                }
                seen.extend(now);
            }
            Err(e) => status.error(e.class(), "instances", e),
        }
        match metrics_loop_backlogs(&mut conn).await {
            Ok(backlogs) => {
                for (name, n) in backlogs {
                    flotilla_telemetry::loops::backlog(name, n.max(0) as u64);
                }
            }
            Err(e) => status.error(e.class(), "backlogs", e),
        }
        match metrics_heartbeats_expected_per_second(&mut conn).await {
            Ok(rate) => metrics::gauge!("flotilla_heartbeats_expected_per_second").set(rate),
            Err(e) => status.error(e.class(), "heartbeats expected", e),
        }
        match metrics_ready_heartbeat_ages(&mut conn).await {
            Ok(ages) => {
                let h = metrics::histogram!("flotilla_heartbeat_age_seconds");
                for age in ages {
                    h.record(age);
                }
            }
            Err(e) => status.error(e.class(), "heartbeats", e),
        }
        status
    }

    /// Sets `flotilla_pool_spend_per_hour{pool}` (its live instances
    /// times the price of one of its machines) and
    /// `flotilla_pool_spend_cap_per_hour{pool}` from the same sample as the
    /// fleet gauges; a pool gone since an earlier sample drops to 0.
    fn spend_gauges(
        &self,
        pools: &[PoolRow],
        rows: &[PoolStateCount],
        seen: &HashSet<(String, String)>,
    ) {
        let mut live: HashMap<&str, i64> = HashMap::new();
        for r in rows {
            *live.entry(r.pool.as_str()).or_default() += r.count;
        }
        let prices = &self.tuning.prices.instance_prices;
        for pool in pools {
            let n = live.get(pool.name.as_str()).copied().unwrap_or(0);
            set_spend_gauges(
                &pool.name,
                spend_rate(pool, prices, n),
                pool.spend_cap_per_hour_micros,
            );
        }
        let current: HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        let gone: HashSet<&str> = seen
            .iter()
            .map(|(pool, _)| pool.as_str())
            .filter(|p| !current.contains(p))
            .collect();
        for pool in gone {
            set_spend_gauges(pool, 0, 0);
        }
    }

    /// Sets `flotilla_watchdog_orphan_cost_per_hour` from the orphan
    /// machines of the last scan (see [`orphan_cost_micros`]).
    pub async fn record_orphan_cost(&self, report: &OrphanReport) {
        let pools = match self.db.acquire().await {
            Ok(mut conn) => flotilla_store::pool::pool_list(&mut conn)
                .await
                .unwrap_or_default(),
            Err(_) => return,
        };
        let micros = orphan_cost_micros(report, &pools, &self.tuning.prices.instance_prices);
        metrics::gauge!("flotilla_watchdog_orphan_cost_per_hour").set(micros as f64 / 1e6);
    }
}

/// What the orphan machines of a scan cost per hour (micros). Each is
/// priced as its pool prices its machines when its tag names a pool that
/// has its own price; else by the price table (INSTANCE_PRICES) for its
/// instance type; else by the highest price a pool gives that type (how
/// orphans were priced before the table); else 0 (unpriced: an
/// underestimate the orphan count next to it makes visible).
pub fn orphan_cost_micros(report: &OrphanReport, pools: &[PoolRow], prices: &PriceTable) -> i64 {
    let own: HashMap<&str, i64> = pools
        .iter()
        .filter(|p| p.price_per_hour_micros > 0)
        .map(|p| (p.name.as_str(), p.price_per_hour_micros))
        .collect();
    let mut by_type: HashMap<&str, i64> = HashMap::new();
    for p in pools {
        let e = by_type.entry(p.instance_type.as_str()).or_default();
        *e = (*e).max(p.price_per_hour_micros);
    }
    report
        .orphan_machine_types
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            let pool = report.orphan_machine_pools.get(i).map(String::as_str);
            pool.and_then(|p| own.get(p).copied())
                .or_else(|| prices.get(ty))
                .or_else(|| by_type.get(ty.as_str()).copied())
                .unwrap_or(0)
        })
        .sum()
}

/// Runs the service as the binary does: telemetry already initialised.
/// Replacements and terminations it decides are queued through the
/// outbox, which the runtime's relay carries to the bus.
pub async fn run(args: WatchdogArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let rt = Runtime::start(
        "watchdog",
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
    let watchdog = Watchdog {
        db: rt.db.clone(),
        provider: provider_client(&args.provider_adapter_url, &args.adapter)?,
        tuning: args.tuning.clone(),
        owner: replica_name("watchdog"),
    };
    tracing::info!(dry_run = args.tuning.watchdog_dry_run, "watchdog starting");
    let mut loops = rt.loops();
    watchdog.register(&mut loops);
    rt.run(loops, &watchdog.owner).await
}
