//! Instance queries over a pool as a whole that the public fleet API asks
//! before it writes (name checks), kept apart from the per-row lifecycle
//! statements in [`crate::instance`], and the operator's requests that
//! only change desired state or the cordon (terminate, drain, uncordon).

use chrono::{DateTime, Utc};
use flotilla_core::{DesiredState, InstanceId, InstanceState, subjects};
use prost::Message;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::action_log::{Request, action_log_request};
use crate::instance::{InstanceRow, instance_columns, instance_event};
use crate::outbox::outbox_insert_many;
use crate::{Result, StoreError};

/// Which of `names` a non-terminated instance of `pool` already uses.
/// The partial unique index `instances_pool_name_live` enforces the same
/// rule at insert time; this lets the API name the offending entry first.
pub async fn fleet_names_in_use(
    conn: &mut PgConnection,
    pool: &str,
    names: &[String],
) -> Result<Vec<String>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "SELECT name FROM instances WHERE pool = $1 AND name = ANY($2) AND state <> ALL($3)",
    )
    .bind(pool)
    .bind(names)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(conn)
    .await?)
}

/// An instance a selector matched.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Selected {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub state: flotilla_core::InstanceState,
    #[sqlx(try_from = "String")]
    pub desired_state: flotilla_core::DesiredState,
    pub force_terminate: bool,
    pub cordoned: bool,
}

/// The instances with these ids (unknown ids are simply absent).
pub async fn fleet_select_ids(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Selected>> {
    Ok(sqlx::query_as(
        "SELECT id, state, desired_state, force_terminate, cordoned FROM instances
         WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

/// Instances of a pool (or of every pool) carrying every label, in states
/// that are not terminal.
pub async fn fleet_select(
    conn: &mut PgConnection,
    pool: Option<&str>,
    labels: &std::collections::BTreeMap<String, String>,
    limit: i64,
) -> Result<Vec<Selected>> {
    Ok(sqlx::query_as(
        "SELECT id, state, desired_state, force_terminate, cordoned FROM instances
         WHERE ($1::text IS NULL OR pool = $1) AND labels @> $2 AND state <> ALL($4)
         ORDER BY id LIMIT $3",
    )
    .bind(pool)
    .bind(sqlx::types::Json(labels))
    .bind(limit)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(conn)
    .await?)
}

/// Sets the desired state of these instances to terminated (and `force`),
/// logging the request (`terminate_requested`) with its reason. The time
/// of the first request is kept (`terminate_requested_at`).
pub async fn fleet_request_terminate(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    force: bool,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET desired_state = 'terminated', force_terminate = force_terminate OR $2,
             terminate_requested_at = COALESCE(terminate_requested_at, now()),
             next_attempt_at = now(), version = version + 1, updated_at = now(), origin = $3
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(force)
    .bind(sqlx::types::Json(crate::instance::RowOrigin::of(ctx)))
    .execute(&mut *conn)
    .await?;
    action_log_request(conn, ctx, ids, Request::Terminate { force }, reason).await
}

/// Cordons those of these instances that are not cordoned yet, each with
/// its history row (`drain_requested`, with the reason) and its
/// `EVT.instance.cordoned` event, in one (nested) transaction. Returns the
/// ids it cordoned. The instances keep their state: a cordon is an act,
/// not a transition.
pub async fn fleet_cordon(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    reason: &str,
) -> Result<Vec<Uuid>> {
    let mut tx = conn.begin().await?;
    let rows: Vec<InstanceRow> = sqlx::query_as(concat!(
        "UPDATE instances SET cordoned = true, updated_at = now()
         WHERE id = ANY($1) AND NOT cordoned RETURNING ",
        instance_columns!()
    ))
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let changed: Vec<Uuid> = rows.iter().map(|r| r.id.0).collect();
    let logs: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO action_logs (instance_id, action, actor, correlation_id, reason)
         SELECT id, $2, $3, $4, $5 FROM UNNEST($1::uuid[]) AS t(id) ORDER BY id
         RETURNING id, instance_id, at",
    )
    .bind(&changed)
    .bind(Request::Drain.action())
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(reason)
    .fetch_all(&mut *tx)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let (log_id, _, at) = logs
            .iter()
            .find(|(_, id, _)| *id == row.id.0)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("no action log for {}", row.id)))?;
        events.push(cordon_event(row, true, log_id, at, ctx, reason));
    }
    outbox_insert_many(&mut tx, ctx, &events).await?;
    tx.commit().await?;
    Ok(changed)
}

/// The `(subject, payload)` of a cordon (`cordoned`) or uncordon event.
fn cordon_event(
    row: &InstanceRow,
    cordoned: bool,
    log_id: i64,
    at: DateTime<Utc>,
    ctx: &crate::WriteCtx,
    reason: &str,
) -> (String, Vec<u8>) {
    let mut event = instance_event(row, Some(row.state), log_id, at, ctx, Some(reason));
    event.action = if cordoned { "cordoned" } else { "uncordoned" }.to_owned();
    (
        subjects::instance_cordon_event(cordoned).to_owned(),
        event.encode_to_vec(),
    )
}

/// Undoes a drain: the instance takes work again. Written with its history
/// row (`uncordoned`, with the reason) and its `EVT.instance.uncordoned`
/// event in one (nested) transaction, and returned as it is now.
/// [`StoreError::Refused`], with nothing written, when the instance is not
/// cordoned, is terminal, or is being terminated (its cordon is then part
/// of the termination); [`StoreError::NotFound`] when there is none.
pub async fn fleet_uncordon(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    id: InstanceId,
    reason: &str,
) -> Result<InstanceRow> {
    let mut tx = conn.begin().await?;
    let row = crate::instance::instance_lock(&mut tx, id).await?;
    if row.state.is_terminal() {
        return Err(StoreError::Refused(format!(
            "instance {id} is {}: there is nothing to uncordon",
            row.state
        )));
    }
    if row.desired_state == DesiredState::Terminated {
        return Err(StoreError::Refused(format!(
            "instance {id} is being terminated (desired state terminated, now {}): its drain is \
             part of the termination and cannot be undone",
            row.state
        )));
    }
    if !row.cordoned {
        return Err(StoreError::Refused(format!(
            "instance {id} is not cordoned: nothing to undo"
        )));
    }
    let row: InstanceRow = sqlx::query_as(concat!(
        "UPDATE instances SET cordoned = false, updated_at = now() WHERE id = $1 RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .fetch_one(&mut *tx)
    .await?;
    let (log_id, at): (i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO action_logs (instance_id, action, actor, correlation_id, reason)
         VALUES ($1, $2, $3, $4, $5) RETURNING id, at",
    )
    .bind(id.0)
    .bind(Request::Uncordon.action())
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(reason)
    .fetch_one(&mut *tx)
    .await?;
    outbox_insert_many(
        &mut tx,
        ctx,
        &[cordon_event(&row, false, log_id, at, ctx, reason)],
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}
