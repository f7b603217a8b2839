//! What the watchdog reads and writes: silent workers, workers without the
//! agent whose health checks fail, suspicion, storm holds, and the
//! database's side of the orphan scan (live machines, the suspicion of a
//! machine a listing did not show, the hold of a pool's lost verdicts).
//!
//! A `ready` instance is *agentless* when its worker never heartbeated
//! (`last_heartbeat IS NULL`) and its pool has a health check URL: it
//! reached `ready` by probe, and the scheduler keeps probing it. Its
//! liveness is its probes, not heartbeats, so the silent scan skips it and
//! [`watchdog_claim_probe_failing`] looks at it instead. Its first
//! heartbeat makes it an ordinary worker again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::{InstanceId, InstanceState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Result;
use crate::instance::InstanceRow;

/// Leases `ready` instances whose last sign of life (heartbeat, or entering
/// `ready`) is older than `timeout`. Agentless instances (see the module
/// docs) are not silent: they never heartbeat, their probes speak for them.
///
/// The first time condition is what the `instances_silent` index answers:
/// `heartbeat_mark` is never later than `last_heartbeat` (see
/// `crate::worker`), so it yields every silent worker plus, at most, a few
/// that beat within the mark interval; the second, exact condition drops
/// those. Without it the scan read every ready row. Oldest first is by the
/// mark (within the mark interval of the exact order), which the index
/// returns in order, so a scan stops after `limit` rows instead of sorting
/// every silent one.
pub async fn watchdog_claim_silent(
    pool: &PgPool,
    timeout: Duration,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "WITH due AS (
             SELECT id AS due_id FROM instances
             WHERE state = 'ready'
               AND COALESCE(heartbeat_mark, state_entered_at) < now() - make_interval(secs => $1)
               AND COALESCE(last_heartbeat, state_entered_at) < now() - make_interval(secs => $1)
               AND (lease_until IS NULL OR lease_until < now())
               AND (last_heartbeat IS NOT NULL OR NOT EXISTS (
                     SELECT 1 FROM pools p
                     WHERE p.name = instances.pool AND p.health_check_url <> ''))
             ORDER BY COALESCE(heartbeat_mark, state_entered_at)
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE instances
         SET lease_owner = $3, lease_until = now() + make_interval(secs => $4)
         FROM due WHERE id = due.due_id
         RETURNING ",
        crate::instance::instance_columns!()
    ))
    .bind(timeout.as_secs_f64())
    .bind(limit)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// When an agentless worker's failing health checks make it suspect:
/// `failures` failed probes in a row, the first at least `window` ago.
#[derive(Debug, Clone, Copy)]
pub struct ProbeDeath {
    pub failures: i32,
    pub window: Duration,
}

impl Default for ProbeDeath {
    fn default() -> Self {
        ProbeDeath {
            failures: 3,
            window: Duration::from_secs(30),
        }
    }
}

/// Leases agentless `ready` instances (see the module docs) whose health
/// checks have failed as `probe` says, first failing first.
pub async fn watchdog_claim_probe_failing(
    pool: &PgPool,
    probe: ProbeDeath,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "WITH due AS (
             SELECT i.id AS due_id FROM instances i
             JOIN pools p ON p.name = i.pool
             JOIN instance_health h ON h.instance_id = i.id
             WHERE i.state = 'ready' AND i.last_heartbeat IS NULL
               AND p.health_check_url <> ''
               AND h.failures >= $1
               AND h.failing_since < now() - make_interval(secs => $2)
               AND (i.lease_until IS NULL OR i.lease_until < now())
             ORDER BY h.failing_since
             LIMIT $3
             FOR UPDATE OF i SKIP LOCKED
         )
         UPDATE instances
         SET lease_owner = $4, lease_until = now() + make_interval(secs => $5)
         FROM due WHERE id = due.due_id
         RETURNING ",
        crate::instance::instance_columns!()
    ))
    .bind(probe.failures.max(1))
    .bind(probe.window.as_secs_f64())
    .bind(limit)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Marks a silent worker suspect (keeps the first time it was found so).
pub async fn watchdog_mark_suspect(
    conn: &mut PgConnection,
    id: InstanceId,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "UPDATE instances SET suspect_since = COALESCE(suspect_since, now())
         WHERE id = $1 RETURNING suspect_since",
    )
    .bind(id.0)
    .fetch_one(conn)
    .await?)
}

/// Clears suspicion of instances that are no longer silent (a heartbeat
/// arrived) or no longer ready, with the default [`ProbeDeath`].
pub async fn watchdog_clear_recovered(conn: &mut PgConnection, timeout: Duration) -> Result<u64> {
    watchdog_clear_recovered_probed(conn, timeout, ProbeDeath::default()).await
}

/// Clears suspicion of instances that recovered: no longer ready, a
/// heartbeat arrived, or — for agentless ones — their health checks no
/// longer fail as `probe` says (a probe answered). Runs every tick; the
/// partial index `instances_suspect` keeps it to the suspect rows.
pub async fn watchdog_clear_recovered_probed(
    conn: &mut PgConnection,
    timeout: Duration,
    probe: ProbeDeath,
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE instances i SET suspect_since = NULL
         WHERE suspect_since IS NOT NULL
           AND (state <> 'ready' OR last_heartbeat >= suspect_since
                OR CASE WHEN last_heartbeat IS NULL AND EXISTS (
                            SELECT 1 FROM pools p
                            WHERE p.name = i.pool AND p.health_check_url <> '')
                     THEN NOT EXISTS (
                            SELECT 1 FROM instance_health h
                            WHERE h.instance_id = i.id AND h.failures >= $2
                              AND h.failing_since < now() - make_interval(secs => $3))
                     ELSE COALESCE(last_heartbeat, state_entered_at)
                            >= now() - make_interval(secs => $1)
                END)",
    )
    .bind(timeout.as_secs_f64())
    .bind(probe.failures.max(1))
    .bind(probe.window.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected())
}

/// Ready instances of a pool and how many of them are suspect.
pub async fn watchdog_pool_suspicion(conn: &mut PgConnection, pool: &str) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE suspect_since IS NOT NULL), count(*)
         FROM instances WHERE pool = $1 AND state = 'ready'",
    )
    .bind(pool)
    .fetch_one(conn)
    .await?)
}

/// Sets or clears a pool's storm hold; returns whether it changed.
pub async fn watchdog_set_storm_hold(
    conn: &mut PgConnection,
    pool: &str,
    hold: bool,
) -> Result<bool> {
    let sql = if hold {
        "UPDATE pools SET storm_hold_since = now() WHERE name = $1 AND storm_hold_since IS NULL"
    } else {
        "UPDATE pools SET storm_hold_since = NULL WHERE name = $1 AND storm_hold_since IS NOT NULL"
    };
    Ok(sqlx::query(sql)
        .bind(pool)
        .execute(conn)
        .await?
        .rows_affected()
        == 1)
}

pub async fn watchdog_storm_held(conn: &mut PgConnection, pool: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT storm_hold_since IS NOT NULL FROM pools WHERE name = $1")
            .bind(pool)
            .fetch_optional(conn)
            .await?
            .unwrap_or(false),
    )
}

/// What the database knows of one instance, for the orphan scan.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Known {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    pub provider_machine_id: Option<String>,
    pub state_entered_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub version: i64,
}

/// Instances of the given ids (missing ids are simply absent).
pub async fn watchdog_known(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Known>> {
    Ok(sqlx::query_as(
        "SELECT id, state, provider_machine_id, state_entered_at, lease_until, version
         FROM instances WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

/// An instance that should have a machine running at the provider now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LiveMachine {
    pub id: Uuid,
    pub pool: String,
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    pub provider_machine_id: String,
    pub version: i64,
    /// Seconds since the row was created, by the database's clock.
    pub age_seconds: f64,
    /// Since when listings have not shown its machine.
    pub missing_since: Option<DateTime<Utc>>,
}

/// Instances of a provider/region that should have a machine there now
/// (running, or held warm and stopped), recorded before `before` (so a listing taken afterwards must show it).
pub async fn watchdog_live_with_machine(
    conn: &mut PgConnection,
    provider: &str,
    region: &str,
    before: DateTime<Utc>,
) -> Result<Vec<LiveMachine>> {
    Ok(sqlx::query_as(
        "SELECT i.id, i.pool, i.state, i.provider_machine_id, i.version,
                extract(epoch FROM now() - i.created_at)::float8 AS age_seconds,
                i.missing_since
         FROM instances i JOIN pools p ON p.name = i.pool
         WHERE p.provider = $1 AND p.region = $2
           AND i.provider_machine_id IS NOT NULL
           AND i.state = ANY($4)
           AND i.updated_at < $3
         ORDER BY i.pool, i.id",
    )
    .bind(provider)
    .bind(region)
    .bind(before)
    .bind(InstanceState::strs(InstanceState::MACHINE_EXPECTED))
    .fetch_all(conn)
    .await?)
}

/// Records that a listing did not show these instances' machines (keeps
/// the first time), and clears it for `shown`, whose machines it did show.
pub async fn watchdog_mark_missing(
    conn: &mut PgConnection,
    missing: &[Uuid],
    shown: &[Uuid],
) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET missing_since = CASE WHEN id = ANY($1)
                 THEN COALESCE(missing_since, now()) ELSE NULL END
         WHERE id = ANY($1) OR (id = ANY($2) AND missing_since IS NOT NULL)",
    )
    .bind(missing)
    .bind(shown)
    .execute(conn)
    .await?;
    Ok(())
}

/// Sets or clears the hold of a pool's lost verdicts; returns whether it
/// changed.
pub async fn watchdog_set_lost_hold(
    conn: &mut PgConnection,
    pool: &str,
    hold: bool,
) -> Result<bool> {
    let sql = if hold {
        "UPDATE pools SET lost_hold_since = now() WHERE name = $1 AND lost_hold_since IS NULL"
    } else {
        "UPDATE pools SET lost_hold_since = NULL WHERE name = $1 AND lost_hold_since IS NOT NULL"
    };
    Ok(sqlx::query(sql)
        .bind(pool)
        .execute(conn)
        .await?
        .rows_affected()
        == 1)
}

/// A verdict the storm guard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldVerdict {
    /// The machine is lost (missing from a listing).
    Lost,
    /// The worker is dead (silent, or its health checks failing).
    Dead,
}

/// Writes an audit row that is not a transition (`lost_verdict_held` or
/// `dead_verdict_held`) for each of these instances: a decision not to
/// act, with its reason, in the instance's history.
pub async fn watchdog_log_held(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    verdict: HeldVerdict,
    reason: &str,
) -> Result<()> {
    let request = match verdict {
        HeldVerdict::Lost => crate::action_log::Request::LostVerdictHeld,
        HeldVerdict::Dead => crate::action_log::Request::DeadVerdictHeld,
    };
    crate::action_log::action_log_request(conn, ctx, ids, request, reason).await
}

/// Writes `orphan_deleted` with `reason` (which names the resource) in
/// the instance's history, unless it holds that row already: a machine
/// still `destroying` is listed, and deleted, again by the next scan, and
/// its history says so once.
pub async fn watchdog_log_orphan_deleted(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    instance: Uuid,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO action_logs (instance_id, action, actor, correlation_id, reason)
         SELECT id, $2, $3, $4, $5 FROM instances i WHERE id = $1
           AND NOT EXISTS (SELECT 1 FROM action_logs a
                           WHERE a.instance_id = i.id AND a.action = $2 AND a.reason = $5)",
    )
    .bind(instance)
    .bind(crate::action_log::Request::OrphanDeleted.action())
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// A volume the database tracks for an instance, for the orphan scan.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KnownVolume {
    pub provider_volume_id: String,
    /// The instance it is recorded for.
    pub instance_id: Uuid,
    /// Its instance's state.
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    /// Since when its instance is in that state.
    pub state_entered_at: DateTime<Utc>,
    /// Deleted with its instance (else kept on purpose, never an orphan).
    pub delete_on_terminate: bool,
}

/// Volumes the database tracks for instances (not deleted), of these
/// provider volume ids.
pub async fn watchdog_known_volumes(
    conn: &mut PgConnection,
    ids: &[String],
) -> Result<Vec<KnownVolume>> {
    Ok(sqlx::query_as(
        "SELECT v.provider_volume_id, v.instance_id, i.state, i.state_entered_at,
                v.delete_on_terminate
         FROM instance_volumes v
         JOIN instances i ON i.id = v.instance_id
         WHERE v.provider_volume_id = ANY($1) AND v.state <> 'deleted'",
    )
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

/// Where the orphan scan lists machines and volumes: one `(provider,
/// region, pool)` per provider and region of a pool, and of a deleted pool
/// that held abandoned instances when it was deleted (their machines may
/// still be there, with no pool left to name the place). The pool only
/// names the call's rate limit and breaker at the adapter.
pub async fn watchdog_scan_targets(
    conn: &mut PgConnection,
) -> Result<Vec<(String, String, String)>> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (provider, region) provider, region, name FROM (
             SELECT provider, region, name, 0 AS rank FROM pools
             UNION ALL
             SELECT provider, region, pool, 1 FROM pool_deletions WHERE abandoned_instances > 0
         ) t
         ORDER BY provider, region, rank, name",
    )
    .fetch_all(conn)
    .await?)
}

/// Per-state timeouts of the stuck scan.
#[derive(Debug, Clone, Copy)]
pub struct StuckTimeouts {
    pub provisioning: Duration,
    pub draining: Duration,
    pub stopping: Duration,
    pub deleting: Duration,
}

/// The timeout of each state of [`InstanceState::STUCK_WATCHED`], `$1` to
/// `$4` as in [`StuckTimeouts`]'s order. A state without an arm would be
/// NULL, never due: a test holds the arms to the group.
macro_rules! stuck_timeout {
    () => {
        "CASE state
                     WHEN 'provisioning' THEN $1
                     WHEN 'draining' THEN $2
                     WHEN 'stopping' THEN $3
                     WHEN 'deleting' THEN $4 END"
    };
}

/// Leases instances that stayed in a transitional state past its timeout,
/// counting one more recovery for each. The k-th recovery of a state comes
/// k + 1 timeouts after it was entered, so retries are spaced by the timeout.
pub async fn watchdog_claim_stuck(
    pool: &PgPool,
    t: StuckTimeouts,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<(InstanceRow, i32)>> {
    let rows: Vec<InstanceRow> = sqlx::query_as(concat!(
        "WITH due AS (
             SELECT id AS due_id FROM instances
             WHERE (lease_until IS NULL OR lease_until < now())
               AND state_entered_at + make_interval(secs => ",
        stuck_timeout!(),
        ") * (stuck_recoveries + 1) < now()
               AND state = ANY($8)
             ORDER BY state_entered_at
             LIMIT $5
             FOR UPDATE SKIP LOCKED
         )
         UPDATE instances
         SET lease_owner = $6, lease_until = now() + make_interval(secs => $7),
             stuck_recoveries = stuck_recoveries + 1
         FROM due WHERE id = due.due_id
         RETURNING ",
        crate::instance::instance_columns!()
    ))
    .bind(t.provisioning.as_secs_f64())
    .bind(t.draining.as_secs_f64())
    .bind(t.stopping.as_secs_f64())
    .bind(t.deleting.as_secs_f64())
    .bind(limit)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(InstanceState::strs(InstanceState::STUCK_WATCHED))
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id.0).collect();
    let counts: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT id, stuck_recoveries FROM instances WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let n = counts
                .iter()
                .find(|(id, _)| *id == r.id.0)
                .map_or(1, |(_, n)| *n);
            (r, n)
        })
        .collect())
}

/// Lets the owning loop retry now (and gives the watchdog's lease back).
pub async fn watchdog_nudge(conn: &mut PgConnection, id: InstanceId, owner: &str) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET next_attempt_at = now(), lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id.0)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(())
}

/// Flags an instance for an operator (the breaker is open: no more nudges).
pub async fn watchdog_flag(conn: &mut PgConnection, id: InstanceId, error: &str) -> Result<()> {
    sqlx::query("UPDATE instances SET needs_attention = true, last_error = $2 WHERE id = $1")
        .bind(id.0)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// Asks for a forced delete (a stop that never settles).
pub async fn watchdog_force(conn: &mut PgConnection, id: InstanceId) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET force_terminate = true, next_attempt_at = now() WHERE id = $1",
    )
    .bind(id.0)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stuck_timeouts_have_an_arm_for_each_watched_state_and_no_other() {
        let arms = stuck_timeout!().matches("WHEN '").count();
        assert_eq!(arms, InstanceState::STUCK_WATCHED.len());
        for s in InstanceState::STUCK_WATCHED {
            let arm = format!("WHEN '{}' THEN", s.as_str());
            assert!(stuck_timeout!().contains(&arm), "no timeout for {s}");
        }
    }
}
