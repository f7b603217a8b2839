//! Lost machines: the database → provider direction of the orphan scan,
//! deciding when an instance whose machine a listing did not show is
//! `lost` (and so replaced and terminated).
//!
//! Design notes: nothing is destroyed on one signal, and listings lie — a
//! proxy answering `[]` on a hiccup, a page gone missing, an index lagging
//! behind creates. A live instance whose machine one listing leaves out is
//! a suspicion (`missing_since`, cleared when a listing shows it again),
//! not a verdict. The verdict needs, in this order:
//!
//! 1. a listing that is not empty while the database holds live machines
//!    at that provider and region: an empty one is counted
//!    (`flotilla_watchdog_empty_listings_total`), logged and ignored whole,
//!    without even a suspicion;
//! 2. the pool's storm guard: when more than `WATCHDOG_STORM_FRACTION` of
//!    a pool's live machines (pools of at least
//!    `WATCHDOG_STORM_MIN_INSTANCES`) are missing at once, every verdict of
//!    the pool is held — logged, shown by `flotilla_watchdog_lost_storm_hold`,
//!    written once per suspicion into each held instance's history — until
//!    the share drops;
//! 3. a row older than `WATCHDOG_LOST_MIN_AGE_SECONDS`;
//! 4. a direct `GET` of that machine answering NotFound, or the machine
//!    `destroyed`. Any other state or error leaves the instance alone: a
//!    404 means gone only for the machine it names (the provider layer
//!    answers FailedPrecondition when the app itself is missing).
//!
//! A machine really gone while the listing is empty or its pool is held is
//! still found by the dead-worker path: its heartbeats or health checks
//! stop, and the same `GET` confirms it.

use std::collections::{BTreeMap, HashSet};

use flotilla_core::{InstanceId, InstanceState, ProviderError};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_store::instance::instance_get;
use flotilla_store::watchdog::{
    HeldVerdict, LiveMachine, watchdog_log_held, watchdog_mark_missing, watchdog_set_lost_hold,
};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Watchdog;
use crate::orphans::{OrphanReport, ScanError};

/// Counts one outcome of looking at a machine a listing did not show.
fn suspect_outcome(outcome: &'static str, n: usize) {
    metrics::counter!("flotilla_watchdog_listing_suspects_total", "outcome" => outcome)
        .increment(n as u64);
}

impl Watchdog {
    /// Judges the live instances of `target` against one listing of its
    /// machines (`listed`, destroyed ones already left out).
    pub(crate) async fn scan_lost(
        &self,
        conn: &mut PgConnection,
        target: &v1::ProviderTarget,
        live: Vec<LiveMachine>,
        listed: &[v1::Machine],
        report: &mut OrphanReport,
        status: &mut ActivationStatus,
    ) -> Result<(), ScanError> {
        if live.is_empty() {
            return Ok(());
        }
        if listed.is_empty() {
            // A whole fleet does not vanish between two scans; a proxy
            // answering `[]` does. Nothing is suspected on it.
            report.empty_listings += 1;
            metrics::counter!(
                "flotilla_watchdog_empty_listings_total",
                "provider" => target.provider.clone(),
                "region" => target.region.clone()
            )
            .increment(1);
            tracing::warn!(
                provider = %target.provider,
                region = %target.region,
                live = live.len(),
                "the provider listed no machine while the database holds live ones; listing ignored"
            );
            return Ok(());
        }
        let present: HashSet<&str> = listed.iter().map(|m| m.id.as_str()).collect();
        let (missing, shown): (Vec<LiveMachine>, Vec<LiveMachine>) = live
            .into_iter()
            .partition(|k| !present.contains(k.provider_machine_id.as_str()));
        if !self.tuning.watchdog_dry_run {
            let ids = |v: &[LiveMachine]| v.iter().map(|k| k.id).collect::<Vec<Uuid>>();
            watchdog_mark_missing(conn, &ids(&missing), &ids(&shown)).await?;
        }
        report
            .missing_instances
            .extend(missing.iter().map(|k| InstanceId(k.id)));
        // Pool → (live machines, the missing ones).
        let mut pools: BTreeMap<String, (usize, Vec<LiveMachine>)> = BTreeMap::new();
        for k in &shown {
            pools.entry(k.pool.clone()).or_default().0 += 1;
        }
        for k in missing {
            let entry = pools.entry(k.pool.clone()).or_default();
            entry.0 += 1;
            entry.1.push(k);
        }
        for (pool, (live, missing)) in pools {
            if let Err(e) = self
                .judge_pool(conn, target, &pool, live, missing, report, status)
                .await
            {
                status.error(flotilla_core::Classify::class(&e), &pool, e);
            }
        }
        Ok(())
    }

    /// The storm guard of one pool, then the verdict on each missing machine.
    #[allow(clippy::too_many_arguments)]
    async fn judge_pool(
        &self,
        conn: &mut PgConnection,
        target: &v1::ProviderTarget,
        pool: &str,
        live: usize,
        missing: Vec<LiveMachine>,
        report: &mut OrphanReport,
        status: &mut ActivationStatus,
    ) -> Result<(), ScanError> {
        let share = missing.len() as f64 / live.max(1) as f64;
        let storm = live as i64 >= self.tuning.watchdog_storm_min_instances
            && share > self.tuning.watchdog_storm_fraction;
        let gauge = metrics::gauge!("flotilla_watchdog_lost_storm_hold", "pool" => pool.to_owned());
        if storm {
            gauge.set(1.0);
            suspect_outcome("held", missing.len());
            report.held_pools.push(pool.to_owned());
            status.already_done += missing.len() as u64;
            if self.tuning.watchdog_dry_run {
                tracing::warn!(
                    pool,
                    missing = missing.len(),
                    live,
                    "dry run: storm guard would hold lost verdicts"
                );
                return Ok(());
            }
            let began = watchdog_set_lost_hold(conn, pool, true).await?;
            if began {
                tracing::error!(
                    pool,
                    missing = missing.len(),
                    live,
                    "storm guard: too many machines of the pool missing from the listing at once; holding lost verdicts"
                );
            }
            // Into the history of each instance once per suspicion: all of
            // them when the hold begins, later only the newly missing.
            let newly: Vec<Uuid> = missing
                .iter()
                .filter(|k| began || k.missing_since.is_none())
                .map(|k| k.id)
                .collect();
            if !newly.is_empty() {
                let reason = format!(
                    "storm guard: {} of {live} live machines of pool {pool} missing from the provider's listing at once; lost verdict held",
                    missing.len()
                );
                watchdog_log_held(conn, &self.ctx(), &newly, HeldVerdict::Lost, &reason).await?;
            }
            return Ok(());
        }
        gauge.set(0.0);
        if !self.tuning.watchdog_dry_run && watchdog_set_lost_hold(conn, pool, false).await? {
            tracing::warn!(
                pool,
                missing = missing.len(),
                live,
                "storm guard of lost verdicts released"
            );
        }
        for k in missing {
            let id = InstanceId(k.id);
            match self.judge_missing(conn, target, &k, report).await {
                Ok(true) => status.acted += 1,
                Ok(false) => {}
                Err(e) => status.error(flotilla_core::Classify::class(&e), id, e),
            }
        }
        Ok(())
    }

    /// The verdict on one instance whose machine the listing did not show:
    /// `true` when it was declared `lost`.
    async fn judge_missing(
        &self,
        conn: &mut PgConnection,
        target: &v1::ProviderTarget,
        k: &LiveMachine,
        report: &mut OrphanReport,
    ) -> Result<bool, ScanError> {
        let id = InstanceId(k.id);
        let machine_id = k.provider_machine_id.as_str();
        if k.age_seconds < self.tuning.lost_min_age().as_secs_f64() {
            suspect_outcome("too_young", 1);
            return Ok(false);
        }
        let got = self
            .provider
            .clone()
            .get_machine(outgoing(
                v1::MachineRef {
                    target: Some(v1::ProviderTarget {
                        provider: target.provider.clone(),
                        pool: k.pool.clone(),
                        region: target.region.clone(),
                    }),
                    machine_id: machine_id.to_owned(),
                },
                &self.ctx().correlation_id,
            ))
            .await
            .map(|m| m.into_inner())
            .map_err(|s| status_to_provider_error(&s));
        let reason = match got {
            Ok(m) if m.state == v1::MachineState::Destroyed as i32 => {
                "machine absent from the provider's listing and destroyed by a direct look"
            }
            Ok(m) => {
                suspect_outcome("present", 1);
                tracing::info!(
                    instance_id = %id,
                    machine_id,
                    state = v1::MachineState::try_from(m.state).map_or("undocumented", |s| s.as_str_name()),
                    "machine absent from the listing but there by a direct look: the listing is behind"
                );
                return Ok(false);
            }
            Err(ProviderError::NotFound(_)) => {
                "machine absent from the provider's listing and not found by a direct look"
            }
            Err(e) => {
                suspect_outcome("error", 1);
                return Err(e.into());
            }
        };
        suspect_outcome("gone", 1);
        report.lost_instances.push(id);
        if self.tuning.watchdog_dry_run {
            tracing::warn!(instance_id = %id, machine_id, "dry run: would mark lost");
            return Ok(false);
        }
        let Some(row) = instance_get(conn, id).await? else {
            return Ok(false);
        };
        if row.provider_machine_id.as_deref() != Some(machine_id) || row.state != k.state {
            return Ok(false); // moved on since the snapshot
        }
        self.declare(conn, &row, InstanceState::Lost, reason)
            .await?;
        Ok(true)
    }
}
