//! Warm stock: the machines a pool keeps created at the provider and not
//! started (`Pool.warm_size`), so that `Provision` starts one (about a
//! second on Fly) instead of creating one (seconds).
//!
//! A warm instance is an ordinary instance row with desired state `warm`:
//! the provisioning loop creates and records its machine as for any other
//! (ownership tags, adoption by tag after a crash, volume first) and, where
//! it would start it, moves it to `warm` instead. So the orphan scan knows
//! it (its tag names a live instance), a listing that does not show it
//! makes it suspected lost like any machine, and letting it go is the
//! terminator's ordinary teardown (`warm` → `deleting`: it never ran).
//!
//! Design notes: [`warm_take`] runs in the transaction of `Provision`'s
//! insert, so a batch takes warm instances and creates the rest cold
//! atomically. Rows are taken with `FOR UPDATE SKIP LOCKED` (two batches
//! never take the same machine, and neither waits for the other), only if
//! no loop holds a lease on them, and each is moved by the guarded
//! transition `warm` → `provisioning` (version-checked): what is left of
//! its provisioning is the start, which the provisioning loop does, fenced
//! and retried, as it does for a cold instance whose create returned. The
//! row keeps its id (the machine's tags and its worker's environment name
//! it) and its worker token (issued at create, only its hash stored); it
//! takes the caller's name, labels and idempotency key, and `warm_taken_at`
//! records the request time, from which its time to ready counts. Its
//! history says `warm` → `provisioning` "taken from warm stock". The
//! machine's own provider-side name stays the one it was created with.
//!
//! The refill and the trim ([`warm_request`], [`warm_let_go`]) are called
//! by the scheduler under its per-pool advisory lock.

use std::collections::BTreeMap;

use flotilla_core::{DesiredState, InstanceId, InstanceState, subjects};
use flotilla_proto::v1;
use prost::Message;
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::instance::{
    InstanceRow, NewInstance, RowOrigin, Transition, instance_insert_with_provision,
    instance_set_desired, instance_transition,
};
use crate::outbox::{outbox_insert, outbox_insert_many};
use crate::{Result, WriteCtx};

/// Label (key, value) on the instances the warm refill requested; a taken
/// instance gets its caller's labels instead.
pub const WARM_LABEL: (&str, &str) = ("flotilla.dev/managed-by", "warm");

/// The history reason of a take.
pub const TAKEN_REASON: &str = "taken from warm stock by Provision: start instead of create";

/// A pool's warm stock as one reader saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStock {
    /// Instances in state `warm` kept as stock (desired state `warm`).
    pub held: i64,
    /// Instances on their way to `warm` (requested or provisioning).
    pub coming: i64,
}

impl WarmStock {
    pub fn total(&self) -> i64 {
        self.held + self.coming
    }
}

/// States of an instance on its way to warm stock: being made (wanted
/// warm from its request), or an idle one being drained and stopped to be
/// returned to it (idle action `stop`).
const COMING_WARM: &[InstanceState] = &[
    InstanceState::Requested,
    InstanceState::Provisioning,
    InstanceState::Ready,
    InstanceState::Draining,
    InstanceState::Stopping,
    InstanceState::Stopped,
];

/// `pool`'s warm stock.
pub async fn warm_stock(conn: &mut PgConnection, pool: &str) -> Result<WarmStock> {
    let (held, coming): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'warm'),
                count(*) FILTER (WHERE state = ANY($2))
         FROM instances WHERE pool = $1 AND desired_state = 'warm'",
    )
    .bind(pool)
    .bind(InstanceState::strs(COMING_WARM))
    .fetch_one(conn)
    .await?;
    Ok(WarmStock { held, coming })
}

/// Inserts `new` as warm stock (desired state `warm`) with their
/// `CMD.provision` commands, in one (nested) transaction.
pub async fn warm_request(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    new: &[NewInstance],
) -> Result<Vec<InstanceRow>> {
    let mut tx = conn.begin().await?;
    let mut rows = instance_insert_with_provision(&mut tx, ctx, new).await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id.0).collect();
    sqlx::query("UPDATE instances SET desired_state = 'warm' WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    for r in &mut rows {
        r.desired_state = DesiredState::Warm;
    }
    Ok(rows)
}

/// Lets `n` of `pool`'s warm stock go: those not created yet first, then
/// the youngest (the oldest have waited longest for a take, and none is
/// better than another). Their termination is requested (`CMD.terminate`
/// in the same transaction); the terminator deletes their machines. The
/// ids let go.
pub async fn warm_let_go(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    n: i64,
    reason: &str,
) -> Result<Vec<Uuid>> {
    if n <= 0 {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM instances
         WHERE pool = $1 AND desired_state = 'warm' AND state <> ALL($3)
         ORDER BY (state = 'warm'), created_at DESC
         LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(pool)
    .bind(n)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(&mut *tx)
    .await?;
    for id in &ids {
        instance_set_desired(&mut tx, InstanceId(*id), DesiredState::Terminated, false).await?;
    }
    if !ids.is_empty() {
        let cmd = v1::TerminateCommand {
            instance_ids: ids.iter().map(Uuid::to_string).collect(),
            force: false,
            reason: reason.to_owned(),
        };
        outbox_insert(&mut tx, ctx, subjects::TERMINATE, &cmd.encode_to_vec()).await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// What a take gives a warm instance: what a fresh instance of the same
/// request would have had.
#[derive(Debug, Clone)]
pub struct WarmTake {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

/// Takes up to `takes.len()` warm instances of `pool` (oldest first), in
/// the caller's transaction, giving the i-th the i-th [`WarmTake`]: each
/// moves `warm` → `provisioning` with its `CMD.provision`. A pool that is
/// paused gives none (its machines fail to start; a take would only hand
/// the caller one more failure). The rows taken, fewer when the stock is
/// short; the caller creates the rest cold.
pub async fn warm_take(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    takes: &[WarmTake],
) -> Result<Vec<InstanceRow>> {
    if takes.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await?;
    let found: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT i.id, i.version FROM instances i
         WHERE i.pool = $1 AND i.state = 'warm' AND i.desired_state = 'warm'
           AND (i.lease_until IS NULL OR i.lease_until < now())
           AND NOT EXISTS (SELECT 1 FROM pools p WHERE p.name = i.pool AND p.paused_at IS NOT NULL)
         ORDER BY i.created_at, i.id
         LIMIT $2 FOR UPDATE OF i SKIP LOCKED",
    )
    .bind(pool)
    .bind(takes.len() as i64)
    .fetch_all(&mut *tx)
    .await?;
    let mut rows = Vec::with_capacity(found.len());
    for ((id, version), take) in found.into_iter().zip(takes) {
        let given: i64 = sqlx::query_scalar(
            "UPDATE instances SET name = $3, labels = $4, idempotency_key = $5,
                 desired_state = 'running', warm_taken_at = now(), origin = $6,
                 version = version + 1, updated_at = now()
             WHERE id = $1 AND version = $2 RETURNING version",
        )
        .bind(id)
        .bind(version)
        .bind(&take.name)
        .bind(Json(&take.labels))
        .bind(take.idempotency_key.as_deref())
        .bind(Json(RowOrigin::of(ctx)))
        .fetch_one(&mut *tx)
        .await?;
        let row = instance_transition(
            &mut tx,
            ctx,
            &Transition {
                id: InstanceId(id),
                from: InstanceState::Warm,
                to: InstanceState::Provisioning,
                expected_version: given,
                error: None,
                reason: Some(TAKEN_REASON),
            },
        )
        .await?;
        rows.push(row);
    }
    if !rows.is_empty() {
        let cmd = v1::ProvisionCommand {
            instance_ids: rows.iter().map(|r| r.id.to_string()).collect(),
            pool: pool.to_owned(),
        };
        outbox_insert_many(
            &mut tx,
            ctx,
            &[(subjects::PROVISION.to_owned(), cmd.encode_to_vec())],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rows)
}

/// Records a refill or trim batch in the pool's audit log (`warm_refilled`
/// / `warm_trimmed`): one row per batch, not per machine.
pub async fn warm_event(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    action: &str,
    reason: &str,
) -> Result<()> {
    crate::pool_pause::pool_event(conn, ctx, pool, action, None, reason).await
}

/// Returns an idle instance whose machine the provider confirmed stopped
/// to its pool's warm stock: `stopped` → `warm`, with what its last run
/// left on the row cleared (cordon, disruption mark, idle and heartbeat
/// bookkeeping, so the worker's next run starts afresh: its agent counts
/// heartbeat sequences from 1 again). One (nested) transaction; a stale
/// version is [`crate::StoreError::Conflict`], nothing written.
pub async fn warm_return(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    row: &InstanceRow,
) -> Result<InstanceRow> {
    let mut tx = conn.begin().await?;
    let moved = instance_transition(
        &mut tx,
        ctx,
        &Transition {
            id: row.id,
            from: row.state,
            to: InstanceState::Warm,
            expected_version: row.version,
            error: None,
            reason: Some("machine stopped; returned to warm stock"),
        },
    )
    .await?;
    let reset: InstanceRow = sqlx::query_as(concat!(
        "UPDATE instances SET cordoned = false, disruption = NULL, idle_since = NULL,
             worker_idle = false, suspect_since = NULL, missing_since = NULL,
             last_heartbeat = NULL, heartbeat_mark = NULL, heartbeat_sequence = 0,
             needs_attention = false, updated_at = now()
         WHERE id = $1 AND version = $2 RETURNING ",
        crate::instance_columns!()
    ))
    .bind(moved.id.0)
    .bind(moved.version)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(reset)
}
