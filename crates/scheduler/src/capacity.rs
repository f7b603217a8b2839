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
//! oldest ready ones.
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
//! A pool being deleted (see `flotilla_store::pool_delete`) keeps no
//! capacity: its instances were asked to terminate when the deletion was
//! accepted, and the activation deletes its row once the last of them is
//! terminal.

use std::collections::BTreeMap;

use flotilla_core::{Classify, DesiredState, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_store::instance::{NewInstance, instance_insert_with_provision, instance_set_desired};
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

/// Label (key, value) on the instances capacity created and manages.
pub const MANAGED_LABEL: (&str, &str) = ("flotilla.dev/managed-by", "capacity");

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

    /// Brings one pool to its desired capacity; returns how many instances
    /// were requested or marked for termination.
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
        // Every live-or-coming instance counts, explicit ones too.
        let counted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM instances
             WHERE pool = $1 AND desired_state = 'running' AND state = ANY($2)",
        )
        .bind(&pool.name)
        .bind(InstanceState::strs(COUNTED))
        .fetch_one(&mut *tx)
        .await?;
        let desired = i64::from(pool.desired_capacity);
        let ctx = WriteCtx::new("scheduler").with_trace_headers(current_trace_headers());
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
        let changed = if n > 0 {
            let new: Vec<NewInstance> = (0..n)
                .map(|_| NewInstance {
                    id: InstanceId::new(),
                    pool: pool.name.clone(),
                    name: generated_name(&pool.name),
                    provider: pool.provider.clone(),
                    labels: BTreeMap::from([(
                        MANAGED_LABEL.0.to_owned(),
                        MANAGED_LABEL.1.to_owned(),
                    )]),
                    idempotency_key: None,
                    worker_token_hash: None,
                })
                .collect();
            instance_insert_with_provision(&mut tx, &ctx, &new).await?;
            tracing::info!(pool = %pool.name, n, paused, "scaling up");
            n
        } else if counted > desired {
            // Only capacity's own: there may be fewer than the surplus.
            let surplus: Vec<uuid::Uuid> = sqlx::query_scalar(
                "SELECT id FROM instances
                 WHERE pool = $1 AND desired_state = 'running' AND state = ANY($2)
                   AND labels @> $4
                 ORDER BY (state = 'ready'), created_at
                 LIMIT $3",
            )
            .bind(&pool.name)
            .bind(InstanceState::strs(COUNTED))
            .bind(counted - desired)
            .bind(managed_filter())
            .fetch_all(&mut *tx)
            .await?;
            if surplus.is_empty() {
                // The surplus is all explicitly provisioned: not ours to
                // take, and nothing to say about it every tick. (Committed:
                // a spend-cap mark cleared above must stay cleared.)
                tx.commit().await?;
                return Ok(0);
            }
            for id in &surplus {
                instance_set_desired(&mut tx, InstanceId(*id), DesiredState::Terminated, false)
                    .await?;
            }
            let cmd = v1::TerminateCommand {
                instance_ids: surplus.iter().map(|u| u.to_string()).collect(),
                force: false,
                reason: "scale down".into(),
            };
            outbox_insert(
                &mut tx,
                &ctx,
                flotilla_bus::subjects::TERMINATE,
                &cmd.encode_to_vec(),
            )
            .await?;
            tracing::info!(pool = %pool.name, n = surplus.len(), "scaling down");
            surplus.len() as i64
        } else {
            0
        };
        tx.commit().await?;
        Ok(changed)
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

/// `<pool>-<8 lowercase alphanumerics>`, within the 63-char name limit.
pub fn generated_name(pool: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..8)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    let prefix: String = pool.chars().take(54).collect();
    format!("{prefix}-{suffix}")
}
