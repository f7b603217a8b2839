//! Deleting pools: refused while a pool has live instances, or — forced —
//! a pool that first has its instances terminated and is deleted once none
//! of them is left; and every deletion's record (`pool_deletions`).
//!
//! An instance is *live* here while its state is not terminal: an instance
//! on its way out still needs its pool row (provider, region) for every
//! teardown call, so the row stays until the last one is `terminated` or
//! `abandoned`. Meanwhile the pool is *deleting* (`deleting_since`): it
//! takes no new instances ([`crate::instance::instance_insert_requested`]
//! refuses them) and keeps no capacity. [`pool_finish_deletion`], run by the
//! scheduler's capacity loop, deletes the row when the last instance is
//! done. Terminal instances keep the pool's name in their history; once the
//! row is gone a new pool may take the name. Warm stock (see
//! [`crate::warm`]) does not make a deletion need `force`: it is the
//! pool's own reserve, so it is let go with the pool like any instance,
//! through the terminator (a warm machine was never started, so Fly's
//! refusal to delete a started machine never applies to it).
//!
//! Design notes: deleting and creating instances serialize on the pool row.
//! Every writer of new instances holds `FOR KEY SHARE` on it until its
//! transaction ends; a deletion takes `FOR UPDATE`, so it waits for those
//! writers and then counts their instances, and a writer that comes after
//! finds the pool deleting (or gone). A deletion locks the pool's live
//! instances before the pool row, in the order the writers of a dead
//! worker's replacement lock them (instance first, then its pool), so the
//! two never wait on each other in a cycle. The record of a deletion also
//! keeps where the pool's machines lived: a pool deleted while it held
//! abandoned instances may have left machines there, and the orphan scan
//! goes on listing that provider and region
//! ([`crate::watchdog::watchdog_scan_targets`]).

use chrono::{DateTime, Utc};
use flotilla_core::{InstanceState, subjects};
use flotilla_proto::v1;
use prost::Message;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::outbox::outbox_insert_many;
use crate::pool::{PoolRow, pool_get};
use crate::{Result, StoreError, WriteCtx};

/// Most instance ids in one `CMD.terminate` (the contract's limit).
const IDS_PER_TERMINATE_COMMAND: usize = 1000;

/// What [`pool_delete`] did.
#[derive(Debug, Clone)]
pub enum PoolDeletion {
    /// The pool had no live instance: its row is gone.
    Deleted,
    /// The pool is being deleted and still has `live` instances that are
    /// not terminal; `requested` are those whose termination this call
    /// asked for (the others were on their way out already).
    Deleting {
        pool: Box<PoolRow>,
        live: i64,
        requested: Vec<Uuid>,
    },
}

/// What [`pool_finish_deletion`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionProgress {
    /// The pool is not being deleted (or is gone already).
    NotDeleting,
    /// This many of its instances are not terminal yet.
    Waiting(i64),
    /// Its last instance was done: the row is deleted now.
    Deleted,
}

/// The answer to new instances for a pool that is being deleted.
pub fn deleting_refusal(pool: &str) -> String {
    format!(
        "pool {pool} is being deleted: it takes no new instances; use another pool, \
         or create {pool} again once it is deleted (`flotilla pools get {pool}` shows it \
         while it is)"
    )
}

/// The instances of `pool` that are not terminal, with their desired state.
async fn live_instances(conn: &mut PgConnection, pool: &str) -> Result<Vec<(Uuid, String)>> {
    Ok(sqlx::query_as(
        "SELECT id, desired_state FROM instances WHERE pool = $1 AND state <> ALL($2) ORDER BY id",
    )
    .bind(pool)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(conn)
    .await?)
}

async fn lock_pool(conn: &mut PgConnection, name: &str) -> Result<Option<PoolRow>> {
    // `pool_get`'s columns, under the row lock.
    let locked: Option<String> =
        sqlx::query_scalar("SELECT name FROM pools WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
    match locked {
        Some(_) => pool_get(conn, name).await,
        None => Ok(None),
    }
}

/// Deletes pool `name`. A pool without live instances is deleted at once.
/// One with live instances is refused ([`StoreError::Refused`], naming
/// how many) unless `force`: then it becomes deleting, the termination of
/// each of them not already on its way out is requested (history row with
/// `reason`, `CMD.terminate` in the same transaction), and the row is
/// deleted once they are all terminal ([`pool_finish_deletion`]). A pool
/// already deleting answers how far it is, whatever `force` says.
/// [`StoreError::NotFound`] for an unknown pool. One (nested) transaction.
pub async fn pool_delete(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    name: &str,
    force: bool,
    reason: &str,
) -> Result<PoolDeletion> {
    let mut tx = conn.begin().await?;
    // Instances first, then the pool: see the module's design notes.
    sqlx::query(
        "SELECT id FROM instances WHERE pool = $1 AND state <> ALL($2) ORDER BY id FOR UPDATE",
    )
    .bind(name)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .execute(&mut *tx)
    .await?;
    let pool = lock_pool(&mut tx, name)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("pool {name}")))?;
    // Read again under the pool's lock: writers that held it before us
    // have committed their instances by now, and no one adds more.
    let live = live_instances(&mut tx, name).await?;
    if live.is_empty() {
        delete_row(&mut tx, ctx, &pool, force, reason).await?;
        tx.commit().await?;
        return Ok(PoolDeletion::Deleted);
    }
    if pool.deleting_since.is_none() {
        // Warm stock is the pool's own reserve, never a caller's worker:
        // it does not hold a deletion back, and goes with the pool.
        let warm = flotilla_core::DesiredState::Warm.as_str();
        if !force && live.iter().any(|(_, desired)| desired != warm) {
            let n = live.iter().filter(|(_, desired)| desired != warm).count();
            return Err(StoreError::Refused(format!(
                "pool {name} has {n} live instance{s}; terminate {them} first \
                 (`flotilla terminate --pool {name}`), or delete it with force \
                 (`flotilla pools delete {name} --force`), which terminates {them} and \
                 deletes the pool once {they} gone",
                s = if n == 1 { "" } else { "s" },
                them = if n == 1 { "it" } else { "them" },
                they = if n == 1 { "it is" } else { "they are" },
            )));
        }
        sqlx::query(
            "UPDATE pools SET deleting_since = now(), version = version + 1, updated_at = now()
             WHERE name = $1",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
        record_request(&mut tx, ctx, &pool, force, reason, live.len() as i64, None).await?;
    }
    // Running instances and warm stock alike: what is not already asked
    // to terminate.
    let terminated = flotilla_core::DesiredState::Terminated.as_str();
    let requested: Vec<Uuid> = live
        .iter()
        .filter(|(_, desired)| desired != terminated)
        .map(|(id, _)| *id)
        .collect();
    if !requested.is_empty() {
        let why = format!("pool {name} is being deleted: {reason}");
        crate::fleet::fleet_request_terminate(&mut tx, ctx, &requested, false, &why).await?;
        let commands: Vec<(String, Vec<u8>)> = requested
            .chunks(IDS_PER_TERMINATE_COMMAND)
            .map(|chunk| {
                let cmd = v1::TerminateCommand {
                    instance_ids: chunk.iter().map(Uuid::to_string).collect(),
                    force: false,
                    reason: why.clone(),
                };
                (subjects::TERMINATE.to_owned(), cmd.encode_to_vec())
            })
            .collect();
        outbox_insert_many(&mut tx, ctx, &commands).await?;
    }
    let pool = pool_get(&mut tx, name)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("pool {name} vanished under its lock")))?;
    tx.commit().await?;
    Ok(PoolDeletion::Deleting {
        pool: Box::new(pool),
        live: live.len() as i64,
        requested,
    })
}

/// Deletes a deleting pool's row once none of its instances is live; the
/// scheduler's capacity loop calls it for every deleting pool.
pub async fn pool_finish_deletion(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    name: &str,
) -> Result<DeletionProgress> {
    let mut tx = conn.begin().await?;
    let Some(pool) = lock_pool(&mut tx, name).await? else {
        return Ok(DeletionProgress::NotDeleting);
    };
    if pool.deleting_since.is_none() {
        return Ok(DeletionProgress::NotDeleting);
    }
    let live = live_instances(&mut tx, name).await?;
    if !live.is_empty() {
        return Ok(DeletionProgress::Waiting(live.len() as i64));
    }
    // Completes the record of the request (who asked, when, why).
    delete_row(&mut tx, ctx, &pool, true, "").await?;
    tx.commit().await?;
    Ok(DeletionProgress::Deleted)
}

/// Inserts the record of a deletion (`deleted_at` set when the row goes
/// in the same transaction).
async fn record_request(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &PoolRow,
    force: bool,
    reason: &str,
    live: i64,
    deleted: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO pool_deletions (pool, provider, region, actor, correlation_id, forced,
             reason, live_instances, deleted_at, abandoned_instances)
         VALUES ($1, $2, $3, $4, $5, $6, NULLIF($7, ''), $8,
                 CASE WHEN $9::int IS NULL THEN NULL ELSE now() END, $9)",
    )
    .bind(&pool.name)
    .bind(&pool.provider)
    .bind(&pool.region)
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(force)
    .bind(reason)
    .bind(i32::try_from(live).unwrap_or(i32::MAX))
    .bind(deleted.map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the pool row (the caller holds its lock and saw no live
/// instance) and completes its deletion record, or writes one.
async fn delete_row(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &PoolRow,
    force: bool,
    reason: &str,
) -> Result<()> {
    // Only this pool's own instances: an earlier pool of the same name
    // had its own deletion record.
    let abandoned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE pool = $1 AND state = $2 AND created_at >= $3",
    )
    .bind(&pool.name)
    .bind(InstanceState::Abandoned.as_str())
    .bind(pool.created_at)
    .fetch_one(&mut *conn)
    .await?;
    // Failures count towards a pause of this pool only; a new pool of the
    // same name starts with none.
    sqlx::query("DELETE FROM pool_failures WHERE pool = $1")
        .bind(&pool.name)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM pools WHERE name = $1")
        .bind(&pool.name)
        .execute(&mut *conn)
        .await?;
    let completed = sqlx::query(
        "UPDATE pool_deletions SET deleted_at = now(), abandoned_instances = $2
         WHERE pool = $1 AND deleted_at IS NULL",
    )
    .bind(&pool.name)
    .bind(i32::try_from(abandoned).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if completed == 0 {
        record_request(conn, ctx, pool, force, reason, 0, Some(abandoned)).await?;
    }
    Ok(())
}

/// One deletion record, as `pool_deletions` keeps it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PoolDeletionRecord {
    pub pool: String,
    pub provider: String,
    pub region: String,
    pub actor: String,
    pub correlation_id: String,
    pub forced: bool,
    pub reason: Option<String>,
    pub live_instances: i32,
    pub requested_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub abandoned_instances: Option<i32>,
}

/// Every deletion of pools named `pool`, oldest first.
pub async fn pool_deletions_of(
    conn: &mut PgConnection,
    pool: &str,
) -> Result<Vec<PoolDeletionRecord>> {
    Ok(sqlx::query_as(
        "SELECT pool, provider, region, actor, correlation_id, forced, reason, live_instances,
                requested_at, deleted_at, abandoned_instances
         FROM pool_deletions WHERE pool = $1 ORDER BY id",
    )
    .bind(pool)
    .fetch_all(conn)
    .await?)
}
