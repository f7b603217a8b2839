//! Voluntary disruption of a pool's healthy instances: marking an instance
//! for scale-down, expiry or idle stop (with its history row, its
//! `EVT.instance.disrupted` event and, when it is to go, its termination
//! request), and the queries pool capacity asks to respect the pool's
//! disruption budget (see `flotilla_core::disruption`).
//!
//! Design notes: an instance's `disruption` column is what makes it count
//! against its pool's budget, from the moment capacity decides to take it
//! until it is terminal, so every scheduler replica reads the same figure
//! under the pool's capacity lock. Expiry is two marks: `expiring` when the
//! replacement is requested (the old instance keeps serving; the
//! replacement counts in its place), `expired` once the replacement is
//! `ready` and the old one is asked to terminate. An `expiring` instance
//! whose replacement is gone before it was ready is unmarked, so the next
//! activation requests another: the old one is never drained without a
//! ready successor.

use chrono::{DateTime, Utc};
use flotilla_core::disruption::{Disruption, REPLACES_LABEL};
use flotilla_core::{DesiredState, InstanceState, subjects};
use flotilla_proto::v1;
use prost::Message;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::action_log::Request;
use crate::instance::{InstanceRow, RowOrigin, instance_columns, instance_event};
use crate::outbox::outbox_insert_many;
use crate::{Result, StoreError, WriteCtx};

/// The history reason of an idle instance sent back to warm stock.
pub const IDLE_TO_WARM_REASON: &str =
    "idle for the pool's idle timeout; drained, stopped and returned to warm stock";

/// The history action of an `expiring` mark: a replacement was requested
/// for the instance, which keeps serving until the replacement is ready.
pub const REPLACEMENT_REQUESTED: &str = "replacement_requested";

/// Marks these instances as disrupted for `why`, each with its history row
/// and its `EVT.instance.disrupted` event; for every `why` but
/// [`Disruption::Expiring`] also asks for their termination (desired state
/// `terminated`, a graceful drain, one `CMD.terminate`). One (nested)
/// transaction. Instances no longer wanted running, terminal ones, and —
/// for `Expiring` — ones already marked are left alone. Returns the ids
/// marked.
pub async fn disruption_mark(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    ids: &[Uuid],
    why: Disruption,
) -> Result<Vec<Uuid>> {
    disruption_mark_then(conn, ctx, ids, why, DesiredState::Terminated).await
}

/// [`disruption_mark`], with the desired state the instances are given
/// when they are to go: `terminated`, or `warm` for idle stop with the
/// `stop` action (drained, stopped, and returned to the pool's warm stock
/// by the terminator; its history row is then a `drain_requested`).
pub async fn disruption_mark_then(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    ids: &[Uuid],
    why: Disruption,
    then: DesiredState,
) -> Result<Vec<Uuid>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await?;
    let terminating = why != Disruption::Expiring;
    let rows: Vec<InstanceRow> = sqlx::query_as(concat!(
        "UPDATE instances SET disruption = $2, updated_at = now(), origin = $5,
             desired_state = CASE WHEN $3 THEN $6 ELSE desired_state END,
             terminate_requested_at = CASE WHEN $3 AND $6 = 'terminated'
                 THEN COALESCE(terminate_requested_at, now()) ELSE terminate_requested_at END,
             next_attempt_at = CASE WHEN $3 THEN now() ELSE next_attempt_at END,
             version = CASE WHEN $3 THEN version + 1 ELSE version END
         WHERE id = ANY($1) AND desired_state = 'running' AND state <> ALL($4)
           AND ($3 OR disruption IS NULL)
         RETURNING ",
        instance_columns!()
    ))
    .bind(ids)
    .bind(why.as_str())
    .bind(terminating)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .bind(sqlx::types::Json(RowOrigin::of(ctx)))
    .bind(then.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let marked: Vec<Uuid> = rows.iter().map(|r| r.id.0).collect();
    if marked.is_empty() {
        return Ok(marked);
    }
    let to_warm = terminating && then == DesiredState::Warm;
    let reason = if to_warm {
        IDLE_TO_WARM_REASON
    } else {
        why.reason()
    };
    let (action, force) = if to_warm {
        (Request::Drain.action(), None)
    } else if terminating {
        (Request::Terminate { force: false }.action(), Some(false))
    } else {
        (REPLACEMENT_REQUESTED, None)
    };
    let logs: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO action_logs (instance_id, action, force, actor, correlation_id, reason)
         SELECT id, $2, $3, $4, $5, $6 FROM UNNEST($1::uuid[]) AS t(id) ORDER BY id
         RETURNING id, instance_id, at",
    )
    .bind(&marked)
    .bind(action)
    .bind(force)
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(reason)
    .fetch_all(&mut *tx)
    .await?;
    let mut messages = Vec::with_capacity(rows.len() + 1);
    for row in &rows {
        let (log_id, _, at) = logs
            .iter()
            .find(|(_, id, _)| *id == row.id.0)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("no action log for {}", row.id)))?;
        let mut event = instance_event(row, Some(row.state), log_id, at, ctx, Some(reason));
        event.action = why.as_str().to_owned();
        messages.push((
            subjects::INSTANCE_DISRUPTED.to_owned(),
            event.encode_to_vec(),
        ));
    }
    if terminating {
        let cmd = v1::TerminateCommand {
            instance_ids: marked.iter().map(Uuid::to_string).collect(),
            force: false,
            reason: reason.to_owned(),
        };
        messages.push((subjects::TERMINATE.to_owned(), cmd.encode_to_vec()));
    }
    outbox_insert_many(&mut tx, ctx, &messages).await?;
    tx.commit().await?;
    Ok(marked)
}

/// How many of the pool's instances are being voluntarily disrupted now
/// (marked and not terminal): what its budget is spent on.
pub async fn disruption_in_progress(conn: &mut PgConnection, pool: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM instances
         WHERE pool = $1 AND disruption IS NOT NULL AND state <> ALL($2)",
    )
    .bind(pool)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_one(conn)
    .await?)
}

/// How many instances of each pool (or of `only`) are being voluntarily
/// disrupted now; pools with none are absent.
pub async fn disruption_counts(
    conn: &mut PgConnection,
    only: Option<&str>,
) -> Result<std::collections::HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT pool, count(*) FROM instances
         WHERE disruption IS NOT NULL AND state <> ALL($1)
           AND ($2::text IS NULL OR pool = $2) GROUP BY pool",
    )
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .bind(only)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Ready instances of the pool, wanted running and not marked, requested
/// at least `max_lifetime_seconds` ago — an instance taken from warm stock
/// from its take, not from when its machine was made: oldest first, at
/// most `limit`.
pub async fn disruption_expired(
    conn: &mut PgConnection,
    pool: &str,
    max_lifetime_seconds: i32,
    limit: i64,
) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances
         WHERE pool = $1 AND state = 'ready' AND desired_state = 'running'
           AND disruption IS NULL
           AND COALESCE(warm_taken_at, created_at) <= now() - make_interval(secs => $2)
         ORDER BY COALESCE(warm_taken_at, created_at), id LIMIT $3"
    ))
    .bind(pool)
    .bind(f64::from(max_lifetime_seconds))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// Ready instances of the pool, wanted running, not marked and not
/// cordoned, whose worker has reported idle for at least
/// `idle_timeout_seconds` without a break: longest idle first, at most
/// `limit`.
pub async fn disruption_idle(
    conn: &mut PgConnection,
    pool: &str,
    idle_timeout_seconds: i32,
    limit: i64,
) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM instances
         WHERE pool = $1 AND state = 'ready' AND desired_state = 'running'
           AND disruption IS NULL AND NOT cordoned AND worker_idle
           AND idle_since <= now() - make_interval(secs => $2)
         ORDER BY idle_since, id LIMIT $3",
    )
    .bind(pool)
    .bind(f64::from(idle_timeout_seconds))
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

/// An `expiring` instance and how far its replacement has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiring {
    pub id: Uuid,
    /// The most advanced live-or-coming replacement's state (`ready` when
    /// one is), `None` when none is on its way.
    pub replacement: Option<InstanceState>,
}

/// The pool's `expiring` instances that are not terminal, each with its
/// replacement's progress.
pub async fn disruption_expiring(conn: &mut PgConnection, pool: &str) -> Result<Vec<Expiring>> {
    let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(
        "SELECT o.id, r.state FROM instances o
         LEFT JOIN LATERAL (
             SELECT r.state FROM instances r
             WHERE r.pool = o.pool AND r.labels ->> $3 = o.id::text
               AND r.desired_state = 'running' AND r.state = ANY($4)
             ORDER BY (r.state = 'ready') DESC LIMIT 1) r ON true
         WHERE o.pool = $1 AND o.disruption = 'expiring' AND o.state <> ALL($2)
         ORDER BY o.created_at, o.id",
    )
    .bind(pool)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .bind(REPLACES_LABEL)
    .bind(InstanceState::strs(COMING))
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, state)| {
            let replacement = state
                .map(|s| {
                    s.parse().map_err(|e: flotilla_core::state::UnknownState| {
                        StoreError::Corrupt(e.to_string())
                    })
                })
                .transpose()?;
            Ok(Expiring { id, replacement })
        })
        .collect()
}

/// States of an instance that is live or on its way to `ready`.
const COMING: &[InstanceState] = &[
    InstanceState::Requested,
    InstanceState::Provisioning,
    InstanceState::Booting,
    InstanceState::Installing,
    InstanceState::Starting,
    InstanceState::Ready,
];

/// Unmarks `expiring` instances whose replacement went away before it was
/// ready (they serve on, and the next activation requests another).
/// Returns how many it unmarked.
pub async fn disruption_unmark_expiring(conn: &mut PgConnection, ids: &[Uuid]) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE instances SET disruption = NULL, updated_at = now()
         WHERE id = ANY($1) AND disruption = 'expiring'",
    )
    .bind(ids)
    .execute(conn)
    .await?
    .rows_affected())
}
