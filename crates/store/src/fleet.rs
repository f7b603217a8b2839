//! Instance queries over a pool as a whole that the public fleet API asks
//! before it writes (name checks), kept apart from the per-row lifecycle
//! statements in [`crate::instance`], and the selector-driven requests
//! (terminate, drain) that only change desired state or the cordon.

use flotilla_core::InstanceState;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;
use crate::action_log::{Request, action_log_request};

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
/// logging the request (`terminate_requested`) with its reason.
pub async fn fleet_request_terminate(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    force: bool,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET desired_state = 'terminated', force_terminate = force_terminate OR $2,
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

/// Cordons these instances, logging the request (`drain_requested`) with
/// its reason.
pub async fn fleet_cordon(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    reason: &str,
) -> Result<()> {
    sqlx::query("UPDATE instances SET cordoned = true, updated_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    action_log_request(conn, ctx, ids, Request::Drain, reason).await
}
