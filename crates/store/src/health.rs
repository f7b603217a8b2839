//! Active health-check bookkeeping: which instances are due for a probe,
//! and what the last probes found. Booting instances are probed until they
//! are ready; a `ready` instance that never heartbeated (a worker without
//! the agent) is probed for as long as it is ready, because its probes are
//! its only sign of life (the watchdog reads them, see `crate::watchdog`).
//!
//! Design notes: a probe is a read, so two replicas probing the same
//! instance is harmless; claiming still pushes `next_check_at` forward in
//! the same statement so that normally only one does. Instances whose
//! worker heartbeated recently are never due: what the worker says about
//! itself takes priority over what a probe from outside can see.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::{InstanceId, InstanceState};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Result;

/// A booting instance due for a probe, with what the probe needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HealthDue {
    #[sqlx(try_from = "Uuid")]
    pub id: InstanceId,
    pub name: String,
    pub pool: String,
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    pub version: i64,
    pub provider_machine_id: String,
    pub provider: String,
    pub region: String,
    /// The pool's URL template.
    pub health_check_url: String,
    /// Failed probes in a row before this one.
    pub failures: i32,
    pub address: Option<String>,
}

/// Which instances a claim looks at.
#[derive(Debug, Clone, Copy)]
pub struct HealthClaim {
    /// An instance that heartbeated within this window is not probed.
    pub heartbeat_priority: Duration,
    /// How long a claimed instance is kept from other replicas; longer
    /// than one probe.
    pub hold: Duration,
    pub limit: i64,
}

/// Claims up to `limit` instances in pools with a health check URL whose
/// next probe is due: those in a boot phase whose worker has been silent,
/// and `ready` ones whose worker never heartbeated.
pub async fn health_claim_due(pool: &PgPool, c: &HealthClaim) -> Result<Vec<HealthDue>> {
    Ok(sqlx::query_as(
        "WITH due AS (
             SELECT i.id, i.name, i.pool, i.state, i.version, i.provider_machine_id,
                    p.provider, p.region, p.health_check_url,
                    COALESCE(h.failures, 0) AS failures, h.address
             FROM instances i
             JOIN pools p ON p.name = i.pool
             LEFT JOIN instance_health h ON h.instance_id = i.id
             WHERE ((i.state = ANY($1)
                     AND (i.last_heartbeat IS NULL
                          OR i.last_heartbeat < now() - make_interval(secs => $2)))
                    OR (i.state = 'ready' AND i.last_heartbeat IS NULL))
               AND i.desired_state = 'running'
               AND i.provider_machine_id IS NOT NULL
               AND p.health_check_url <> ''
               AND (h.next_check_at IS NULL OR h.next_check_at <= now())
             ORDER BY COALESCE(h.next_check_at, i.state_entered_at)
             LIMIT $3
             FOR UPDATE OF i SKIP LOCKED
         ), claimed AS (
             INSERT INTO instance_health (instance_id, next_check_at)
             SELECT id, now() + make_interval(secs => $4) FROM due
             ON CONFLICT (instance_id) DO UPDATE SET next_check_at = EXCLUDED.next_check_at
             RETURNING instance_id
         )
         SELECT due.* FROM due JOIN claimed ON claimed.instance_id = due.id",
    )
    .bind(InstanceState::strs(InstanceState::BOOT_PHASES))
    .bind(c.heartbeat_priority.as_secs_f64())
    .bind(c.limit)
    .bind(c.hold.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Records a failed probe: the failure count, when to probe next, and (on
/// the first failure of a run) when the run began.
pub async fn health_record_failure(
    conn: &mut PgConnection,
    id: InstanceId,
    failures: i32,
    next_check_at: DateTime<Utc>,
    error: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO instance_health
             (instance_id, failures, next_check_at, last_checked_at, last_error, failing_since)
         VALUES ($1, $2, $3, now(), $4, now())
         ON CONFLICT (instance_id) DO UPDATE SET failures = $2, next_check_at = $3,
             last_checked_at = now(), last_error = $4,
             failing_since = COALESCE(instance_health.failing_since, now())",
    )
    .bind(id.0)
    .bind(failures)
    .bind(next_check_at)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a probe that answered: the run of failures ends, and the next
/// probe is at `next_check_at`. The address is kept.
pub async fn health_record_ok(
    conn: &mut PgConnection,
    id: InstanceId,
    next_check_at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO instance_health (instance_id, failures, next_check_at, last_checked_at)
         VALUES ($1, 0, $2, now())
         ON CONFLICT (instance_id) DO UPDATE SET failures = 0, next_check_at = $2,
             last_checked_at = now(), last_error = NULL, failing_since = NULL",
    )
    .bind(id.0)
    .bind(next_check_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Remembers the machine's private address, so it is read from the
/// provider once per instance.
pub async fn health_record_address(
    conn: &mut PgConnection,
    id: InstanceId,
    address: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO instance_health (instance_id, address) VALUES ($1, $2)
         ON CONFLICT (instance_id) DO UPDATE SET address = $2",
    )
    .bind(id.0)
    .bind(address)
    .execute(conn)
    .await?;
    Ok(())
}

/// The probe state of one instance (tests and the CLI's detail view).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HealthRow {
    pub failures: i32,
    /// First failure of the current run of failures.
    pub failing_since: Option<DateTime<Utc>>,
    pub next_check_at: DateTime<Utc>,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub address: Option<String>,
}

pub async fn health_get(conn: &mut PgConnection, id: InstanceId) -> Result<Option<HealthRow>> {
    Ok(sqlx::query_as(
        "SELECT failures, failing_since, next_check_at, last_checked_at, last_error, address
         FROM instance_health WHERE instance_id = $1",
    )
    .bind(id.0)
    .fetch_optional(conn)
    .await?)
}

/// Drops the bookkeeping of an instance that no longer needs probing.
pub async fn health_forget(conn: &mut PgConnection, id: InstanceId) -> Result<()> {
    sqlx::query("DELETE FROM instance_health WHERE instance_id = $1")
        .bind(id.0)
        .execute(conn)
        .await?;
    Ok(())
}
