//! Read-only aggregates for the fleet gauges: instances by pool and state
//! (with those needing attention and the oldest one's time in the state),
//! heartbeat ages of ready workers, the heartbeats the fleet should send,
//! and the backlogs of the instance loops. One query each, so sampling a
//! large fleet stays cheap. (Spend rates are derived from the per-pool
//! counts: see `crate::spend`.)

use flotilla_core::InstanceState;
use sqlx::PgConnection;

use crate::Result;

/// One `(pool, state)` group of instances in a state that is not terminal
/// (terminated and abandoned rows accumulate forever and are not fleet
/// state).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PoolStateCount {
    pub pool: String,
    pub state: String,
    pub count: i64,
    /// Of them, flagged `needs_attention` (a step that keeps failing).
    pub needing_attention: i64,
    /// Seconds the oldest of them has been in this state: a state that
    /// should pass in seconds (provisioning, booting, stopping, deleting)
    /// with a large age is an instance stuck there.
    pub oldest_seconds: f64,
}

pub async fn metrics_instances_by_pool_state(
    conn: &mut PgConnection,
) -> Result<Vec<PoolStateCount>> {
    Ok(sqlx::query_as(
        "SELECT pool, state, count(*) AS count,
                count(*) FILTER (WHERE needs_attention) AS needing_attention,
                GREATEST(EXTRACT(EPOCH FROM now() - min(state_entered_at)), 0)::float8
                    AS oldest_seconds
         FROM instances
         WHERE state <> ALL($1) GROUP BY pool, state ORDER BY pool, state",
    )
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(conn)
    .await?)
}

/// Seconds since the last sign of life (heartbeat, or entering `ready`) of
/// every `ready` instance.
pub async fn metrics_ready_heartbeat_ages(conn: &mut PgConnection) -> Result<Vec<f64>> {
    Ok(sqlx::query_scalar(
        "SELECT GREATEST(EXTRACT(EPOCH FROM now() - COALESCE(last_heartbeat, state_entered_at)), 0)::float8
         FROM instances WHERE state = 'ready'",
    )
    .fetch_all(conn)
    .await?)
}

/// Heartbeats per second the api should be receiving: the sum of
/// 1/interval over the workers that heartbeat now (`ready` or `draining`,
/// their agent registered and told its interval). Beside the rate of
/// `flotilla_api_heartbeats_total` it shows heartbeats going missing
/// before any single worker reaches its timeout.
pub async fn metrics_heartbeats_expected_per_second(conn: &mut PgConnection) -> Result<f64> {
    Ok(sqlx::query_scalar(
        "SELECT COALESCE(sum(1000.0 / heartbeat_interval_ms), 0)::float8 FROM instances
         WHERE state = ANY($1) AND heartbeat_interval_ms IS NOT NULL",
    )
    .bind(InstanceState::strs(&[
        InstanceState::Ready,
        InstanceState::Draining,
    ]))
    .fetch_one(conn)
    .await?)
}

/// Work waiting for the instance loops, by loop name: due rows to
/// provision, instances in a boot phase, and due instances to take down.
/// One scan of the live rows; leases are ignored (claimed work is backlog
/// until it is done).
pub async fn metrics_loop_backlogs(conn: &mut PgConnection) -> Result<Vec<(&'static str, i64)>> {
    let (provision, boot, terminate): (i64, i64, i64) = sqlx::query_as(
        "SELECT
             count(*) FILTER (WHERE state = ANY($1)
                                AND desired_state = 'running' AND next_attempt_at <= now()),
             count(*) FILTER (WHERE state = ANY($2)
                                AND desired_state = 'running'),
             count(*) FILTER (WHERE desired_state = 'terminated' AND next_attempt_at <= now())
         FROM instances WHERE state <> ALL($3)",
    )
    .bind(InstanceState::strs(InstanceState::PROVISION_PHASES))
    .bind(InstanceState::strs(InstanceState::BOOT_PHASES))
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_one(conn)
    .await?;
    Ok(vec![
        ("scheduler_provision", provision),
        ("scheduler_boot", boot),
        ("terminator", terminate),
    ])
}
