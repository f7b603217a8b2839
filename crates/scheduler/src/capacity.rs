//! Pool capacity: keeps the number of live-or-coming instances of each pool
//! at its desired capacity.
//!
//! Desired capacity is the number of live-or-coming instances of the pool,
//! whoever asked for them (like a Deployment's replicas): instances asked
//! for explicitly through `Provision` count toward it, so 3 provisioned
//! instances and a desired capacity of 2 request nothing more. Scale-down
//! only terminates instances capacity created itself (label
//! [`MANAGED_LABEL`]): explicit ones are the caller's, and a pool's
//! capacity never terminates them, so a pool can stay above its desired
//! capacity while its callers hold more.
//!
//! Design notes: per pool, one transaction holds an advisory lock keyed by
//! the pool name, counts, and either requests new instances or marks
//! surplus ones for termination — never both at once — so two replicas
//! cannot both fill the same gap. Instances in failure states do not count:
//! they are on their way out and their replacements are requested now.
//! Surplus is taken from instances that are not serving yet first, then the
//! oldest ready ones, within the disruption budget.
//!
//! A paused pool (see `flotilla_store::pool_pause`) is not topped up: its
//! failing instances are on their way out and would only be replaced by
//! more failing ones. Once its cool-off has passed and nothing of it waits,
//! one instance is requested — the probe. Scale-down is never held. Each
//! activation also settles paused pools' probes (a ready probe resumes its
//! pool) and reports `flotilla_pools_paused`.
//!
//! A pool with a spend cap (see `flotilla_store::spend`) is topped up only
//! as far as the cap allows: the count that fits is read in the
//! transaction of the insert, under the pool's row lock, so capacity and
//! `Provision` racing on one pool cannot together pass it. While the cap
//! holds capacity below the desired count the pool is marked
//! (`spend_capped_since`, a `pool_events` row, one warning per episode
//! whichever replica sees it first) and `flotilla_pools_spend_capped`
//! counts it; the mark is cleared once capacity is no longer held back.
//! Scale-down is never held.
//!
//! Voluntary disruption (see `flotilla_core::disruption` and
//! `flotilla_store::disruption`) is spent from the pool's disruption
//! budget, read under the same lock: scale-down of serving instances (those
//! not serving yet are taken freely: no work is disrupted), max lifetime
//! and idle stop. Max lifetime surges: an instance past it gets its
//! replacement first (`expiring`, still serving, the replacement counting
//! in its place) and is drained only once the replacement is `ready`.
//! Idle stop drains instances whose worker reported idle for the pool's
//! idle timeout, never below the desired capacity — the pool's minimum,
//! kept busy or idle; what it reclaims are the instances above it. Each
//! activation exports `flotilla_pool_disrupted_instances`, and counts what
//! it disrupted and what the budget held
//! (`flotilla_disruptions_total`, `flotilla_disruptions_held_total`).
//!
//! A pool being deleted (see `flotilla_store::pool_delete`) keeps no
//! capacity: its instances were asked to terminate when the deletion was
//! accepted, and the activation deletes its row once the last of them is
//! terminal.

use std::collections::BTreeMap;

use flotilla_core::disruption::{Disruption, IdleAction, REPLACES_LABEL, replacement_name};
use flotilla_core::{Classify, DesiredState, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_store::disruption::{
    disruption_expired, disruption_expiring, disruption_idle, disruption_in_progress,
    disruption_mark, disruption_mark_then, disruption_unmark_expiring,
};
use flotilla_store::instance::{
    InstanceRow, NewInstance, instance_insert_with_provision, instance_set_desired,
};
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::{PoolRow, pool_list};
use flotilla_store::pool_delete::{DeletionProgress, pool_finish_deletion};
use flotilla_store::pool_pause::{ProbeSettled, pool_settle_probe};
use flotilla_store::spend::{SpendRoom, spend_mark_capped, spend_room};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::propagation::current_trace_headers;
use prost::Message;
use sqlx::Acquire;

use crate::Scheduler;

/// States that count towards capacity.
const COUNTED: &[InstanceState] = &[
    InstanceState::Requested,
    InstanceState::Provisioning,
    InstanceState::Booting,
    InstanceState::Installing,
    InstanceState::Starting,
    InstanceState::Ready,
];

pub use flotilla_core::disruption::{MANAGED_LABEL, generated_name};

fn managed_filter() -> sqlx::types::Json<BTreeMap<&'static str, &'static str>> {
    sqlx::types::Json(BTreeMap::from([MANAGED_LABEL]))
}

/// Most instances requested for one pool in one activation.
const MAX_STEP: i64 = 1000;

impl Scheduler {
    #[tracing::instrument(skip_all, name = "scheduler.capacity")]
    pub async fn capacity_once(&self) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let pools = match self.db.acquire().await {
            Ok(mut conn) => pool_list(&mut conn).await,
            Err(e) => Err(e.into()),
        };
        let pools = match pools {
            Ok(p) => p,
            Err(e) => {
                status.error(e.class(), "pools", e);
                return status;
            }
        };
        let paused = pools.iter().filter(|p| p.paused_at.is_some()).count();
        metrics::gauge!("flotilla_pools_paused").set(paused as f64);
        let capped = pools
            .iter()
            .filter(|p| p.spend_capped_since.is_some())
            .count();
        metrics::gauge!("flotilla_pools_spend_capped").set(capped as f64);
        for pool in pools {
            status.found += 1;
            if pool.deleting_since.is_some() {
                match self.finish_deletion(&pool).await {
                    Ok(true) => status.acted += 1,
                    Ok(false) => status.already_done += 1,
                    Err(e) => status.error(e.class(), &pool.name, e),
                }
                continue;
            }
            if pool.pause_probe_instance.is_some()
                && let Err(e) = self.settle_probe(&pool).await
            {
                status.error(e.class(), &pool.name, e);
            }
            match self.balance(&pool).await {
                Ok(0) => status.already_done += 1,
                Ok(_) => status.acted += 1,
                Err(e) => status.error(e.class(), &pool.name, e),
            }
            // Warm stock: its own lock and module (crate::warm).
            if let Err(e) = self.refill_warm(&pool).await {
                status.error(e.class(), format!("{} warm", pool.name), e);
            }
        }
        status
    }

    /// Deletes a deleting pool once its last instance is terminal; returns
    /// whether it did.
    async fn finish_deletion(&self, pool: &PoolRow) -> Result<bool, StoreError> {
        let mut conn = self.db.acquire().await?;
        let ctx = WriteCtx::new("scheduler").with_trace_headers(current_trace_headers());
        Ok(
            match pool_finish_deletion(&mut conn, &ctx, &pool.name).await? {
                DeletionProgress::Deleted => {
                    tracing::warn!(pool = %pool.name, "last instance gone; pool deleted");
                    true
                }
                DeletionProgress::Waiting(live) => {
                    tracing::debug!(pool = %pool.name, live, "pool being deleted; waiting for its instances");
                    false
                }
                DeletionProgress::NotDeleting => false,
            },
        )
    }

    /// Resumes a paused pool whose probe reached `ready` (and wakes its
    /// waiting instances), or frees the slot of a probe that went away.
    async fn settle_probe(&self, pool: &PoolRow) -> Result<(), StoreError> {
        let mut conn = self.db.acquire().await?;
        let ctx = WriteCtx::new("scheduler").with_trace_headers(current_trace_headers());
        let settled =
            pool_settle_probe(&mut conn, &ctx, &pool.name, &self.tuning.pause_policy()).await?;
        match settled {
            ProbeSettled::Resumed(change) => {
                tracing::warn!(pool = %pool.name, woken = change.woken.len(), "probe reached ready; pool resumed");
                if !change.woken.is_empty() {
                    let cmd = v1::ProvisionCommand {
                        instance_ids: change.woken.iter().map(|id| id.to_string()).collect(),
                        pool: pool.name.clone(),
                    };
                    outbox_insert(
                        &mut conn,
                        &ctx,
                        flotilla_bus::subjects::PROVISION,
                        &cmd.encode_to_vec(),
                    )
                    .await?;
                }
            }
            ProbeSettled::Failed => {
                tracing::warn!(pool = %pool.name, "probe of the paused pool failed; the cool-off starts again")
            }
            ProbeSettled::Abandoned => {
                tracing::info!(pool = %pool.name, "probe went away before it was ready; the next instance may probe")
            }
            ProbeSettled::Nothing | ProbeSettled::Pending => {}
        }
        Ok(())
    }

    /// Brings one pool to its desired capacity, and spends its disruption
    /// budget on scale-down, expiry and idle stop; returns how many
    /// instances were requested or marked.
    async fn balance(&self, pool: &PoolRow) -> Result<i64, StoreError> {
        let mut conn = self.db.acquire().await?;
        let mut tx = conn.begin().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('flotilla.capacity.' || $1))",
        )
        .bind(&pool.name)
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            return Ok(0);
        }
        let ctx = WriteCtx::new("scheduler").with_trace_headers(current_trace_headers());
        // Before counting: an expiring instance whose replacement went
        // away counts again (it serves on), so it is not filled in twice —
        // once by scale-up, once by a second replacement.
        let mut changed = self.settle_expiring(&mut tx, &ctx, pool).await?;
        // Every live-or-coming instance counts, explicit ones too; an
        // expiring one's replacement counts in its place.
        let counted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM instances
             WHERE pool = $1 AND desired_state = 'running' AND state = ANY($2)
               AND disruption IS DISTINCT FROM 'expiring'",
        )
        .bind(&pool.name)
        .bind(InstanceState::strs(COUNTED))
        .fetch_one(&mut *tx)
        .await?;
        let desired = i64::from(pool.desired_capacity);
        // Read under the lock: the pause may have changed since the list,
        // and the pool may have become deleting (no capacity kept then).
        let (paused, probe_due, waiting, deleting): (bool, bool, i64, bool) = sqlx::query_as(
            "SELECT p.paused_at IS NOT NULL,
                    COALESCE(p.pause_probe_after <= now() AND p.pause_probe_instance IS NULL, false),
                    (SELECT count(*) FROM instances i
                      WHERE i.pool = p.name AND i.state = 'requested'
                        AND i.desired_state = 'running'),
                    p.deleting_since IS NOT NULL
             FROM pools p WHERE p.name = $1",
        )
        .bind(&pool.name)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or((false, false, 0, true));
        if deleting {
            return Ok(0);
        }
        let step = if !paused {
            MAX_STEP
        } else if probe_due && waiting == 0 {
            1
        } else {
            0
        };
        let wanted = if counted < desired && step > 0 {
            (desired - counted).min(step)
        } else {
            0
        };
        let n = if wanted > 0 {
            let room = spend_room(&mut tx, &pool.name, &self.tuning.prices.instance_prices).await?;
            let n = room.fitting(wanted);
            self.note_spend_cap(&mut tx, &ctx, pool, &room, wanted, n)
                .await?;
            n
        } else {
            self.note_spend_cap(&mut tx, &ctx, pool, &SpendRoom::UNCAPPED, 0, 0)
                .await?;
            0
        };
        let mut removed = 0;
        if n > 0 {
            let new: Vec<NewInstance> = (0..n).map(|_| managed_instance(pool)).collect();
            instance_insert_with_provision(&mut tx, &ctx, &new).await?;
            tracing::info!(pool = %pool.name, n, paused, "scaling up");
            changed += n;
        }
        let mut budget = Budget::open(&mut tx, pool, counted).await?;
        if n == 0 && counted > desired {
            removed = self
                .scale_down(&mut tx, &ctx, pool, counted - desired, &mut budget)
                .await?;
            changed += removed;
        }
        changed += self
            .expire(&mut tx, &ctx, pool, paused, &mut budget)
            .await?;
        if pool.idle_timeout_seconds > 0 {
            // Never below the desired capacity: that is the pool's minimum.
            let above = counted + n - removed - desired;
            changed += self
                .idle_stop(&mut tx, &ctx, pool, above, &mut budget)
                .await?;
        }
        metrics::gauge!("flotilla_pool_disrupted_instances", "pool" => pool.name.clone())
            .set(budget.disrupted as f64);
        tx.commit().await?;
        Ok(changed)
    }

    /// Takes up to `surplus` of capacity's own instances away: those not
    /// serving yet first (no work is disrupted: not budgeted), then the
    /// oldest ready ones as far as the budget allows; replacements last
    /// within each, so a surge is not undone. Returns how many.
    async fn scale_down(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &WriteCtx,
        pool: &PoolRow,
        surplus: i64,
        budget: &mut Budget,
    ) -> Result<i64, StoreError> {
        // Only capacity's own: there may be fewer than the surplus.
        let found: Vec<(uuid::Uuid, bool)> = sqlx::query_as(
            "SELECT id, state = 'ready' FROM instances
             WHERE pool = $1 AND desired_state = 'running' AND state = ANY($2)
               AND labels @> $4 AND disruption IS NULL
             ORDER BY (state = 'ready'), labels ? $5, created_at, id
             LIMIT $3",
        )
        .bind(&pool.name)
        .bind(InstanceState::strs(COUNTED))
        .bind(surplus)
        .bind(managed_filter())
        .bind(REPLACES_LABEL)
        .fetch_all(&mut *tx)
        .await?;
        let (serving, coming): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, r)| *r);
        let coming: Vec<uuid::Uuid> = coming.into_iter().map(|(id, _)| id).collect();
        if !coming.is_empty() {
            for id in &coming {
                instance_set_desired(&mut *tx, InstanceId(*id), DesiredState::Terminated, false)
                    .await?;
            }
            let cmd = v1::TerminateCommand {
                instance_ids: coming.iter().map(|u| u.to_string()).collect(),
                force: false,
                reason: Disruption::ScaleDown.reason().into(),
            };
            outbox_insert(
                &mut *tx,
                ctx,
                flotilla_bus::subjects::TERMINATE,
                &cmd.encode_to_vec(),
            )
            .await?;
        }
        let serving: Vec<uuid::Uuid> = serving.into_iter().map(|(id, _)| id).collect();
        let allowed = budget.take(pool, Disruption::ScaleDown, serving.len() as i64);
        let marked = disruption_mark(
            &mut *tx,
            ctx,
            &serving[..allowed as usize],
            Disruption::ScaleDown,
        )
        .await?;
        budget.spent(pool, Disruption::ScaleDown, marked.len());
        let n = (coming.len() + marked.len()) as i64;
        if n > 0 {
            tracing::info!(pool = %pool.name, n, serving = marked.len(), "scaling down");
        }
        Ok(n)
    }

    /// Max lifetime, first half: drains each expiring instance whose
    /// replacement is ready, and unmarks one whose replacement went away
    /// before it was ready. Returns how many it drained.
    async fn settle_expiring(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &WriteCtx,
        pool: &PoolRow,
    ) -> Result<i64, StoreError> {
        let mut changed = 0;
        let expiring = disruption_expiring(&mut *tx, &pool.name).await?;
        let replaced: Vec<uuid::Uuid> = expiring
            .iter()
            .filter(|e| e.replacement == Some(InstanceState::Ready))
            .map(|e| e.id)
            .collect();
        let orphaned: Vec<uuid::Uuid> = expiring
            .iter()
            .filter(|e| e.replacement.is_none())
            .map(|e| e.id)
            .collect();
        if !replaced.is_empty() {
            // Already counted against the budget since their expiry began.
            let marked = disruption_mark(&mut *tx, ctx, &replaced, Disruption::Expired).await?;
            metrics::counter!("flotilla_disruptions_total", "pool" => pool.name.clone(), "reason" => Disruption::Expired.as_str())
                .increment(marked.len() as u64);
            tracing::info!(pool = %pool.name, n = marked.len(), "replacements ready; draining the expired instances");
            changed += marked.len() as i64;
        }
        if !orphaned.is_empty() {
            let n = disruption_unmark_expiring(&mut *tx, &orphaned).await?;
            tracing::warn!(pool = %pool.name, n, "replacements of expired instances went away before they were ready; asking again");
        }
        Ok(changed)
    }

    /// Max lifetime, second half: unless the pool is paused, requests
    /// replacements for instances past the pool's max lifetime as far as
    /// the budget and the spend cap allow. Returns how many it marked.
    async fn expire(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &WriteCtx,
        pool: &PoolRow,
        paused: bool,
        budget: &mut Budget,
    ) -> Result<i64, StoreError> {
        let changed = 0;
        if pool.max_lifetime_seconds == 0 || paused {
            return Ok(changed);
        }
        let room = budget.room();
        if room == 0 {
            let held =
                disruption_expired(&mut *tx, &pool.name, pool.max_lifetime_seconds, MAX_STEP)
                    .await?
                    .len();
            budget.take(pool, Disruption::Expiring, held as i64);
            return Ok(changed);
        }
        let due = disruption_expired(&mut *tx, &pool.name, pool.max_lifetime_seconds, room).await?;
        if due.is_empty() {
            return Ok(changed);
        }
        let fit = spend_room(&mut *tx, &pool.name, &self.tuning.prices.instance_prices)
            .await?
            .fitting(due.len() as i64) as usize;
        let due = &due[..fit];
        let ids: Vec<uuid::Uuid> = due.iter().map(|r| r.id.0).collect();
        let allowed = budget.take(pool, Disruption::Expiring, ids.len() as i64) as usize;
        let marked = disruption_mark(&mut *tx, ctx, &ids[..allowed], Disruption::Expiring).await?;
        let new: Vec<NewInstance> = due
            .iter()
            .filter(|r| marked.contains(&r.id.0))
            .map(|old| replacement_of(pool, old))
            .collect();
        instance_insert_with_provision(&mut *tx, ctx, &new).await?;
        budget.spent(pool, Disruption::Expiring, marked.len());
        tracing::info!(pool = %pool.name, n = marked.len(), "instances past their max lifetime; replacements requested");
        Ok(changed + marked.len() as i64)
    }

    /// Idle stop: drains instances whose worker reported idle for the
    /// pool's idle timeout, at most `above` (the instances beyond the
    /// desired capacity) and as far as the budget allows. Returns how many.
    async fn idle_stop(
        &self,
        tx: &mut sqlx::PgConnection,
        ctx: &WriteCtx,
        pool: &PoolRow,
        above: i64,
        budget: &mut Budget,
    ) -> Result<i64, StoreError> {
        if above <= 0 {
            return Ok(0);
        }
        let idle = disruption_idle(&mut *tx, &pool.name, pool.idle_timeout_seconds, above).await?;
        let allowed = budget.take(pool, Disruption::Idle, idle.len() as i64) as usize;
        // `stop`: back to warm stock once drained and stopped.
        let then = match pool.idle_action() {
            IdleAction::Terminate => DesiredState::Terminated,
            IdleAction::Stop => DesiredState::Warm,
        };
        let marked =
            disruption_mark_then(&mut *tx, ctx, &idle[..allowed], Disruption::Idle, then).await?;
        budget.spent(pool, Disruption::Idle, marked.len());
        if !marked.is_empty() {
            tracing::info!(pool = %pool.name, n = marked.len(), "idle instances drained");
        }
        Ok(marked.len() as i64)
    }

    /// Marks or clears the pool's spend-cap episode: capped when fewer than
    /// the `wanted` instances fit (`fit`). Says so once per episode.
    async fn note_spend_cap(
        &self,
        conn: &mut sqlx::PgConnection,
        ctx: &WriteCtx,
        pool: &PoolRow,
        room: &SpendRoom,
        wanted: i64,
        fit: i64,
    ) -> Result<(), StoreError> {
        let capped = fit < wanted;
        if !capped && pool.spend_capped_since.is_none() {
            // Not marked when the activation listed the pools: nothing to
            // clear (a mark set since is cleared by the next activation).
            return Ok(());
        }
        // The figures as they are once the instances that fit are in.
        let after = SpendRoom {
            rate: room.rate + room.cost_of(fit),
            ..*room
        };
        let reason = if capped {
            format!(
                "capacity held {} instance(s) short of desired {}: {}",
                wanted - fit,
                pool.desired_capacity,
                after.refusal(&pool.name, wanted - fit)
            )
        } else {
            "capacity no longer held back by the spend cap".to_owned()
        };
        if !spend_mark_capped(conn, ctx, &pool.name, capped, &reason).await? {
            return Ok(());
        }
        if capped {
            tracing::warn!(
                pool = %pool.name,
                desired = pool.desired_capacity,
                short = wanted - fit,
                rate_micros = after.rate,
                cap_micros = after.cap.unwrap_or_default(),
                "pool capacity stopped at its spend cap: {reason}"
            );
        } else {
            tracing::info!(pool = %pool.name, "pool capacity no longer held back by its spend cap");
        }
        Ok(())
    }
}

/// A new instance capacity asks for and manages.
fn managed_instance(pool: &PoolRow) -> NewInstance {
    NewInstance {
        id: InstanceId::new(),
        pool: pool.name.clone(),
        name: generated_name(&pool.name),
        provider: pool.provider.clone(),
        labels: BTreeMap::from([(MANAGED_LABEL.0.to_owned(), MANAGED_LABEL.1.to_owned())]),
        idempotency_key: None,
        worker_token_hash: None,
    }
}

/// The replacement of an expired instance: capacity's own for capacity's
/// own, else one with the same labels (as the watchdog replaces a dead
/// explicit instance); either way labelled with the instance it replaces.
fn replacement_of(pool: &PoolRow, old: &InstanceRow) -> NewInstance {
    let managed = old.labels.0.get(MANAGED_LABEL.0).map(String::as_str) == Some(MANAGED_LABEL.1);
    let mut new = if managed {
        managed_instance(pool)
    } else {
        NewInstance {
            name: replacement_name(&old.name, old.labels.0.contains_key(REPLACES_LABEL)),
            labels: old.labels.0.clone(),
            ..managed_instance(pool)
        }
    };
    new.labels
        .insert(REPLACES_LABEL.to_owned(), old.id.to_string());
    new
}

/// A pool's disruption budget during one activation: how many of its
/// instances are being disrupted, how many may be, and the metrics of what
/// it allowed and held.
struct Budget {
    allowed: i64,
    disrupted: i64,
}

impl Budget {
    /// Reads what the pool spends of its budget now; `counted` is its
    /// live-or-coming instances that are not disrupted.
    async fn open(
        conn: &mut sqlx::PgConnection,
        pool: &PoolRow,
        counted: i64,
    ) -> Result<Budget, StoreError> {
        let disrupted = disruption_in_progress(conn, &pool.name).await?;
        // The percentage is of every instance of the pool, the disrupted
        // ones included, so a budget does not shrink as it is spent.
        let allowed = pool.budget().allowed(counted + disrupted);
        Ok(Budget { allowed, disrupted })
    }

    /// How many more may be disrupted now.
    fn room(&self) -> i64 {
        (self.allowed - self.disrupted).max(0)
    }

    /// Of `wanted` disruptions for `why`, how many the budget lets
    /// through; the rest are counted as held.
    fn take(&self, pool: &PoolRow, why: Disruption, wanted: i64) -> i64 {
        let allowed = wanted.min(self.room()).max(0);
        if wanted > allowed {
            metrics::counter!("flotilla_disruptions_held_total", "pool" => pool.name.clone(), "reason" => why.as_str())
                .increment((wanted - allowed) as u64);
            tracing::debug!(pool = %pool.name, reason = %why, held = wanted - allowed, budget = %pool.disruption_budget, disrupted = self.disrupted, "voluntary disruption held by the disruption budget");
        }
        allowed
    }

    /// Records `n` disruptions for `why` made.
    fn spent(&mut self, pool: &PoolRow, why: Disruption, n: usize) {
        self.disrupted += n as i64;
        metrics::counter!("flotilla_disruptions_total", "pool" => pool.name.clone(), "reason" => why.as_str())
            .increment(n as u64);
    }
}
