//! Warm pools: keeps each pool's warm stock (machines created and not
//! started, see `flotilla_store::warm`) at its `warm_size`, in the
//! background, after `Provision` took some.
//!
//! Design notes: called from the capacity activation for each pool that is
//! not being deleted, after its balance, and kept out of capacity's own
//! transaction: warm stock does not serve, so it is not in capacity's
//! counted states, and a refill never delays a scale-up. Per pool, one
//! transaction holds an advisory lock keyed by the pool name (its own key,
//! `flotilla.warm.<pool>`, so capacity and refill do not wait on each
//! other), reads the setting and the stock under it, and either requests
//! the missing warm instances or lets the surplus go, so two replicas
//! cannot both fill one gap. What it requests goes through the
//! provisioning loop (create, record, no start), tagged like every
//! machine.
//!
//! - A paused pool is not refilled: its machines fail to start, more of
//!   them would only fail later (a trim still applies).
//! - A pool being deleted is neither refilled nor trimmed here: the
//!   deletion let its whole stock go.
//! - Spend: a warm machine costs nothing per hour (stopped: storage only,
//!   see `flotilla_store::spend`), so it never takes the pool over its
//!   cap; but the refill holds at most as many as the cap would let the
//!   pool start now, so warm stock is never a machine no `Provision` could
//!   take.
//! - Events: one `warm_refilled` (or `warm_trimmed`) row in the pool's
//!   audit log per batch, with the figures, never one per machine: a pool
//!   refilling after each take says so once per take batch, which is the
//!   act an operator wants to see; `flotilla_pool_warm_instances{pool}` is
//!   the gauge of the stock itself.

use flotilla_core::InstanceId;
use flotilla_store::instance::NewInstance;
use flotilla_store::pool::PoolRow;
use flotilla_store::spend::spend_room;
use flotilla_store::warm::{WARM_LABEL, warm_event, warm_let_go, warm_request, warm_stock};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::propagation::current_trace_headers;
use sqlx::Acquire;

use crate::Scheduler;
use crate::capacity::generated_name;

/// Most warm instances requested for one pool in one activation.
const MAX_STEP: i64 = 100;

impl Scheduler {
    /// Brings one pool's warm stock to its `warm_size`; how many warm
    /// instances were requested or let go.
    #[tracing::instrument(skip_all, name = "scheduler.warm", fields(pool = %pool.name))]
    pub async fn refill_warm(&self, pool: &PoolRow) -> Result<i64, StoreError> {
        if pool.warm_size == 0 && pool.warm_count == 0 {
            // The common case, decided from the listing alone. Stock still
            // coming when the size went to 0 is trimmed by a later tick,
            // once it is warm and the listing counts it.
            metrics::gauge!("flotilla_pool_warm_instances", "pool" => pool.name.clone()).set(0.0);
            return Ok(0);
        }
        let mut conn = self.db.acquire().await?;
        let mut tx = conn.begin().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('flotilla.warm.' || $1))",
        )
        .bind(&pool.name)
        .fetch_one(&mut *tx)
        .await?;
        if !locked {
            return Ok(0);
        }
        // Read under the lock: the setting, the pause and the deletion may
        // have changed since the list.
        let Some((size, paused, deleting)): Option<(i32, bool, bool)> = sqlx::query_as(
            "SELECT warm_size, paused_at IS NOT NULL, deleting_since IS NOT NULL
             FROM pools WHERE name = $1",
        )
        .bind(&pool.name)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(0);
        };
        let stock = warm_stock(&mut tx, &pool.name).await?;
        metrics::gauge!("flotilla_pool_warm_instances", "pool" => pool.name.clone())
            .set(stock.held as f64);
        if deleting {
            return Ok(0);
        }
        let size = i64::from(size);
        let ctx = WriteCtx::new("scheduler").with_trace_headers(current_trace_headers());
        if stock.total() > size {
            let surplus = stock.total() - size;
            let why = format!(
                "warm stock {} ({} warm, {} coming) above warm_size {size}",
                stock.total(),
                stock.held,
                stock.coming
            );
            let gone = warm_let_go(&mut tx, &ctx, &pool.name, surplus, &why).await?;
            if gone.is_empty() {
                return Ok(0);
            }
            let reason = format!("let {} warm machine(s) go: {why}", gone.len());
            warm_event(&mut tx, &ctx, &pool.name, "warm_trimmed", &reason).await?;
            tx.commit().await?;
            tracing::info!(pool = %pool.name, n = gone.len(), "warm stock trimmed");
            return Ok(gone.len() as i64);
        }
        if paused || stock.total() >= size {
            return Ok(0);
        }
        // Never more warm stock than the cap would let the pool start.
        let room = spend_room(&mut tx, &pool.name, &self.tuning.prices.instance_prices).await?;
        let target = room.fitting(size);
        let want = (target - stock.total()).min(MAX_STEP);
        if want <= 0 {
            return Ok(0);
        }
        let new: Vec<NewInstance> = (0..want)
            .map(|_| NewInstance {
                id: InstanceId::new(),
                pool: pool.name.clone(),
                name: generated_name(&pool.name),
                provider: pool.provider.clone(),
                labels: [(WARM_LABEL.0.to_owned(), WARM_LABEL.1.to_owned())].into(),
                idempotency_key: None,
                worker_token_hash: None,
            })
            .collect();
        warm_request(&mut tx, &ctx, &new).await?;
        let capped = if target < size {
            format!(" (the spend cap lets the pool start only {target} more)")
        } else {
            String::new()
        };
        let reason = format!(
            "requested {want} warm machine(s): stock {} ({} warm, {} coming) of warm_size {size}{capped}",
            stock.total(),
            stock.held,
            stock.coming
        );
        warm_event(&mut tx, &ctx, &pool.name, "warm_refilled", &reason).await?;
        tx.commit().await?;
        tracing::info!(pool = %pool.name, n = want, size, "warm stock refilling");
        Ok(want)
    }
}
