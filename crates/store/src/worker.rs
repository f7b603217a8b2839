//! What the worker API reads and writes on an instance row: the agent's
//! credential (the hash of its worker token) and its proof of life.
//!
//! Design notes: a heartbeat is one plain `UPDATE` of `last_heartbeat` for
//! now; it touches no indexed column, so PostgreSQL can apply it as a HOT
//! update in the page room the table's fillfactor leaves. It neither bumps
//! the version nor writes an action log: a heartbeat is not a transition,
//! and bumping the version would make every heartbeat conflict with the
//! loops' guarded writes.
//!
//! The watchdog finds silent workers through an index on `heartbeat_mark`,
//! a coarse copy of `last_heartbeat` (migration `..._silent_scan_index`).
//! A heartbeat moves the mark only when it is older than
//! the api's `WORKER_HEARTBEAT_MARK_SECONDS` (default
//! [`HEARTBEAT_MARK_EVERY`]), so most heartbeats change no indexed column
//! and stay HOT, while a healthy worker's mark is never older than that plus
//! one heartbeat interval (15 s with the defaults, well inside the 30 s
//! timeout), so the scan's candidates are the silent workers only. Both
//! writes below keep `heartbeat_mark <= last_heartbeat` (both set together).

use flotilla_core::{DesiredState, InstanceId, InstanceState};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// Columns of [`WorkerView`], shared by its `SELECT` and `RETURNING`.
macro_rules! worker_columns {
    () => {
        "id, state, desired_state, version, cordoned, worker_token_hash"
    };
}

/// How long a heartbeat mark may age before a heartbeat moves it, by
/// default; see the module notes. Shorter: more non-HOT heartbeats; longer:
/// healthy workers become scan candidates under short heartbeat timeouts.
pub const HEARTBEAT_MARK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// `SET` clause for `heartbeat_mark`, the mark interval in seconds being
/// the bind parameter `$p`; unchanged value = HOT update.
macro_rules! heartbeat_mark_set {
    ($p:literal) => {
        concat!(
            "heartbeat_mark = CASE WHEN heartbeat_mark > now() - make_interval(secs => ",
            $p,
            "::float8) THEN heartbeat_mark ELSE now() END"
        )
    };
}

/// The part of an instance row its agent is told about or authenticated by.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerView {
    #[sqlx(try_from = "Uuid")]
    pub id: InstanceId,
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    #[sqlx(try_from = "String")]
    pub desired_state: DesiredState,
    pub version: i64,
    pub cordoned: bool,
    /// SHA-256 of the worker token issued for the instance; `None` until issued.
    pub worker_token_hash: Option<Vec<u8>>,
}

pub async fn worker_get(conn: &mut PgConnection, id: InstanceId) -> Result<Option<WorkerView>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        worker_columns!(),
        " FROM instances WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(conn)
    .await?)
}

/// Whether any instance was issued the token with this hash. Only asked
/// after a token failed for the instance it was sent for, to tell a token
/// of another instance (refused) from no valid token at all.
///
/// The column has no index, so this scans; it runs only on that failure path.
pub async fn worker_token_hash_exists(conn: &mut PgConnection, hash: &[u8]) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM instances WHERE worker_token_hash = $1)")
            .bind(hash)
            .fetch_one(conn)
            .await?,
    )
}

/// Records a heartbeat now, moving the mark once older than `mark_every`;
/// `None` when the instance does not exist.
pub async fn worker_heartbeat(
    conn: &mut PgConnection,
    id: InstanceId,
    idle: Option<bool>,
    mark_every: std::time::Duration,
) -> Result<Option<WorkerView>> {
    // `idle` is what drain waits for; a phase report (None) leaves it as is.
    Ok(sqlx::query_as(concat!(
        "UPDATE instances SET last_heartbeat = now(), worker_idle = COALESCE($2, worker_idle),
             idle_since = CASE WHEN COALESCE($2, worker_idle)
                 THEN COALESCE(idle_since, now()) END, ",
        heartbeat_mark_set!("$3"),
        " WHERE id = $1 RETURNING ",
        worker_columns!()
    ))
    .bind(id.0)
    .bind(idle)
    .bind(mark_every.as_secs_f64())
    .fetch_optional(conn)
    .await?)
}

/// Records many heartbeats with one statement; returns the view of every
/// instance that exists (missing ids are simply absent).
///
/// `sequence` is each agent's heartbeat counter: a heartbeat whose sequence
/// is not above the one last written arrived out of order and writes
/// nothing (its instance is still answered, from the row as it is). 0 means
/// an agent that sends no sequence: always written, and not remembered.
/// The mark moves once older than `mark_every`.
pub async fn worker_heartbeat_batch(
    conn: &mut PgConnection,
    ids: &[Uuid],
    idle: &[bool],
    sequence: &[i64],
    mark_every: std::time::Duration,
) -> Result<Vec<WorkerView>> {
    Ok(sqlx::query_as(concat!(
        "WITH v AS (SELECT * FROM UNNEST($1::uuid[], $2::bool[], $3::int8[]) AS v(id, idle, seq)),
         fresh AS (
           UPDATE instances i SET last_heartbeat = now(), worker_idle = v.idle,
                  idle_since = CASE WHEN v.idle THEN COALESCE(i.idle_since, now()) END,
                  heartbeat_sequence = GREATEST(i.heartbeat_sequence, v.seq), ",
        heartbeat_mark_set!("$4"),
        " FROM v
           WHERE i.id = v.id AND (v.seq = 0 OR v.seq > i.heartbeat_sequence)
           RETURNING i.id, i.state, i.desired_state, i.version, i.cordoned, i.worker_token_hash)
         SELECT * FROM fresh
         UNION ALL
         SELECT i.id, i.state, i.desired_state, i.version, i.cordoned, i.worker_token_hash
           FROM instances i JOIN v ON i.id = v.id
          WHERE NOT EXISTS (SELECT 1 FROM fresh WHERE fresh.id = i.id)",
    ))
    .bind(ids)
    .bind(idle)
    .bind(sequence)
    .bind(mark_every.as_secs_f64())
    .fetch_all(conn)
    .await?)
}

/// A (re)started agent counts its heartbeats anew: forget the sequence of
/// the process before it. Keeps the heartbeat interval the agent is told
/// (`heartbeat_interval_ms`), from which the watchdog knows how many
/// heartbeats the fleet should send.
pub async fn worker_registered(
    conn: &mut PgConnection,
    id: InstanceId,
    heartbeat_interval_ms: u32,
) -> Result<()> {
    let interval = i32::try_from(heartbeat_interval_ms.max(1)).unwrap_or(i32::MAX);
    sqlx::query(
        "UPDATE instances SET heartbeat_sequence = 0, heartbeat_interval_ms = $2
         WHERE id = $1
           AND (heartbeat_sequence <> 0 OR heartbeat_interval_ms IS DISTINCT FROM $2)",
    )
    .bind(id.0)
    .bind(interval)
    .execute(conn)
    .await?;
    Ok(())
}
