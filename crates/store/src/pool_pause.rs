//! Pool pauses: a pool whose instances keep failing to provision or to
//! start stops spending.
//!
//! Every `provisioning_failed`, `startup_failed` and failed boot restart of
//! an instance is recorded for its pool ([`pool_record_failure`]); the
//! failure that brings the pool to the policy's count within its window
//! pauses the pool in the same transaction. A paused pool gets no new
//! machines: the scheduler admits a `requested` instance only through
//! [`pool_admit`], which lets exactly one probe through once the cool-off
//! has passed. The probe reaching `ready` resumes the pool
//! ([`pool_settle_probe`]); the probe failing restarts the cool-off. An
//! operator may pause or resume at any time ([`pool_pause`],
//! [`pool_resume`]). Terminations never look at any of this.
//!
//! Design notes: the state lives on the pool row and in `pool_failures`,
//! so every scheduler replica sees the same pause. Decisions that read and
//! then write the pool's pause state lock its row (`FOR UPDATE`); the lock
//! is held for a few statements, never across a provider call. Every pause,
//! resume and probe writes a `pool_events` row, the pools' audit log
//! (`action_logs` is per instance).

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::{InstanceId, InstanceState};
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::pool::{PoolRow, pool_get};
use crate::{Result, StoreError, WriteCtx};

/// When a pool pauses itself, and how long it then waits before a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PausePolicy {
    /// Failures within `window` that pause the pool; 0 never pauses.
    pub failures: u32,
    pub window: Duration,
    /// Time after the pause (or after a failed probe) before one probe
    /// instance may go through.
    pub cooloff: Duration,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    ProvisioningFailed,
    StartupFailed,
    /// A restart after a startup failure failed at the provider.
    RestartFailed,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ProvisioningFailed => "provisioning_failed",
            FailureKind::StartupFailed => "startup_failed",
            FailureKind::RestartFailed => "restart_failed",
        }
    }
}

/// What a recorded failure did to its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Counted; the pool keeps running. `in_window` failures so far.
    Counted { in_window: i64 },
    /// This failure paused the pool, for this reason.
    Paused { reason: String },
    /// The pool's probe failed: the pool stays paused, its cool-off restarts.
    ProbeFailed,
    /// The pool was paused already.
    StillPaused,
}

/// Whether a `requested` instance of a pool may get a machine now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The pool is not paused.
    Open,
    /// The pool is paused and this instance is its probe.
    Probe,
    /// The pool is paused: the instance waits.
    Held(Hold),
}

/// Why an instance waits, and until when nothing changes by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub paused_at: DateTime<Utc>,
    pub reason: String,
    /// When a probe may go through; `None` for an operator's pause.
    pub probe_after: Option<DateTime<Utc>>,
    /// A probe already under way.
    pub probe_instance: Option<Uuid>,
}

impl Hold {
    /// The `last_error` of an instance that waits, saying how it ends.
    pub fn message(&self, pool: &str) -> String {
        let probe = match (self.probe_after, self.probe_instance) {
            (_, Some(id)) => format!("probe instance {id} is under way; a ready probe resumes it"),
            (Some(at), None) => format!(
                "one probe instance goes through after {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            (None, None) => "it stays paused until an operator resumes it".to_owned(),
        };
        format!(
            "pool {pool} is paused since {} ({}): no new machines are created for it; {probe}; \
             resume it now with `flotilla pools resume {pool}`",
            self.paused_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.reason
        )
    }
}

/// The pause columns of one pool, under its row lock.
#[derive(Debug, sqlx::FromRow)]
struct PauseState {
    paused_at: Option<DateTime<Utc>>,
    paused_reason: Option<String>,
    pause_probe_after: Option<DateTime<Utc>>,
    pause_probe_instance: Option<Uuid>,
}

async fn lock_pause_state(conn: &mut PgConnection, pool: &str) -> Result<PauseState> {
    sqlx::query_as(
        "SELECT paused_at, paused_reason, pause_probe_after, pause_probe_instance
         FROM pools WHERE name = $1 FOR UPDATE",
    )
    .bind(pool)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("pool {pool}")))
}

pub(crate) async fn pool_event(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    action: &str,
    instance: Option<Uuid>,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO pool_events (pool, action, actor, correlation_id, instance_id, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(pool)
    .bind(action)
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(instance)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

fn after(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1))
}

/// Records a failure of `instance` for `pool` and applies the policy: the
/// failure that reaches `policy.failures` within the window pauses the
/// pool; a failure of a paused pool's probe restarts its cool-off. One
/// (nested) transaction: call it inside the transaction of the instance's
/// own failure, so both commit or neither does.
pub async fn pool_record_failure(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    instance: InstanceId,
    kind: FailureKind,
    error: &str,
    policy: &PausePolicy,
) -> Result<FailureOutcome> {
    let mut tx = conn.begin().await?;
    let state = lock_pause_state(&mut tx, pool).await?;
    sqlx::query(
        "INSERT INTO pool_failures (pool, instance_id, kind, error) VALUES ($1, $2, $3, $4)",
    )
    .bind(pool)
    .bind(instance.0)
    .bind(kind.as_str())
    .bind(error)
    .execute(&mut *tx)
    .await?;
    let window_start = Utc::now() - after(policy.window);
    sqlx::query("DELETE FROM pool_failures WHERE pool = $1 AND at < $2")
        .bind(pool)
        .bind(window_start)
        .execute(&mut *tx)
        .await?;
    let cooloff_end = Utc::now() + after(policy.cooloff);
    let outcome = if state.paused_at.is_some() {
        if state.pause_probe_instance == Some(instance.0) {
            sqlx::query(
                "UPDATE pools SET pause_probe_instance = NULL, pause_probe_after = $2,
                     updated_at = now()
                 WHERE name = $1",
            )
            .bind(pool)
            .bind(cooloff_end)
            .execute(&mut *tx)
            .await?;
            let why = format!("probe {}: {error}", kind.as_str());
            pool_event(&mut tx, ctx, pool, "probe_failed", Some(instance.0), &why).await?;
            FailureOutcome::ProbeFailed
        } else {
            // A failure while paused (an instance admitted before the
            // pause) says the pool is still bad: the cool-off starts again,
            // unless a probe is already deciding, or an operator paused it.
            sqlx::query(
                "UPDATE pools SET pause_probe_after = $2
                 WHERE name = $1 AND pause_probe_instance IS NULL
                   AND pause_probe_after IS NOT NULL",
            )
            .bind(pool)
            .bind(cooloff_end)
            .execute(&mut *tx)
            .await?;
            FailureOutcome::StillPaused
        }
    } else {
        let in_window: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pool_failures WHERE pool = $1 AND at >= $2")
                .bind(pool)
                .bind(window_start)
                .fetch_one(&mut *tx)
                .await?;
        if policy.failures > 0 && in_window >= i64::from(policy.failures) {
            let mut last: String = error.chars().take(1024).collect();
            if last.len() < error.len() {
                last.push('…');
            }
            let reason = format!(
                "{in_window} provisioning or startup failures within {}s; last: {} of instance {instance}: {last}",
                policy.window.as_secs(),
                kind.as_str(),
            );
            sqlx::query(
                "UPDATE pools SET paused_at = now(), paused_reason = $2, pause_probe_after = $3,
                     pause_probe_instance = NULL, updated_at = now()
                 WHERE name = $1",
            )
            .bind(pool)
            .bind(&reason)
            .bind(cooloff_end)
            .execute(&mut *tx)
            .await?;
            pool_event(&mut tx, ctx, pool, "paused", Some(instance.0), &reason).await?;
            FailureOutcome::Paused { reason }
        } else {
            FailureOutcome::Counted { in_window }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Whether `instance` (a `requested` instance of `pool`) may get a machine
/// now: always when the pool is not paused; when it is, only as the one
/// probe after the cool-off. Becoming the probe is one conditional write,
/// so two replicas never let two probes through.
pub async fn pool_admit(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    instance: InstanceId,
) -> Result<Admission> {
    let state: Option<PauseState> = sqlx::query_as(
        "SELECT paused_at, paused_reason, pause_probe_after, pause_probe_instance
         FROM pools WHERE name = $1",
    )
    .bind(pool)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(state) = state else {
        return Err(StoreError::NotFound(format!("pool {pool}")));
    };
    if state.paused_at.is_none() {
        return Ok(Admission::Open);
    }
    if state.pause_probe_instance == Some(instance.0) {
        // An earlier attempt of this step was admitted and did not finish.
        return Ok(Admission::Probe);
    }
    let mut tx = conn.begin().await?;
    let claimed = sqlx::query(
        "UPDATE pools SET pause_probe_instance = $2, updated_at = now()
         WHERE name = $1 AND paused_at IS NOT NULL AND pause_probe_instance IS NULL
           AND pause_probe_after <= now()",
    )
    .bind(pool)
    .bind(instance.0)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if claimed {
        pool_event(
            &mut tx,
            ctx,
            pool,
            "probe_started",
            Some(instance.0),
            "cool-off over: one instance goes through as a probe",
        )
        .await?;
        tx.commit().await?;
        return Ok(Admission::Probe);
    }
    drop(tx);
    // Read again: the probe slot may have been taken just now.
    let now: Option<PauseState> = sqlx::query_as(
        "SELECT paused_at, paused_reason, pause_probe_after, pause_probe_instance
         FROM pools WHERE name = $1",
    )
    .bind(pool)
    .fetch_optional(&mut *conn)
    .await?;
    let s = now.unwrap_or(state);
    Ok(match s.paused_at {
        None => Admission::Open,
        Some(at) => Admission::Held(Hold {
            paused_at: at,
            reason: s.paused_reason.unwrap_or_default(),
            probe_after: s.pause_probe_after,
            probe_instance: s.pause_probe_instance,
        }),
    })
}

/// Makes a `requested` instance wait for its paused pool: records why and
/// when to look again, gives back the lease, and leaves its attempts alone
/// (waiting is not failing). Conditional on `expected_version`.
pub async fn instance_hold_for_pause(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
    message: &str,
    retry_at: DateTime<Utc>,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE instances SET last_error = $3, next_attempt_at = $4, version = version + 1,
             lease_owner = NULL, lease_until = NULL, updated_at = now()
         WHERE id = $1 AND version = $2 AND state = 'requested'",
    )
    .bind(id.0)
    .bind(expected_version)
    .bind(message)
    .bind(retry_at)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// A pool's pause after [`pool_resume`] or [`pool_pause`]: the pool, whether
/// the call changed anything, and the waiting instances it woke.
#[derive(Debug, Clone)]
pub struct PauseChange {
    pub pool: PoolRow,
    pub changed: bool,
    pub woken: Vec<InstanceId>,
}

/// Resumes a paused pool: clears its pause and its failures, writes the
/// audit row, and makes its waiting `requested` instances due now (their
/// ids are returned so the caller can wake the scheduler). A pool that is
/// not paused is left alone. [`StoreError::NotFound`] for an unknown pool.
pub async fn pool_resume(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    reason: &str,
) -> Result<PauseChange> {
    let mut tx = conn.begin().await?;
    let state = lock_pause_state(&mut tx, pool).await?;
    let mut woken = Vec::new();
    if state.paused_at.is_some() {
        sqlx::query(
            "UPDATE pools SET paused_at = NULL, paused_reason = NULL, pause_probe_after = NULL,
                 pause_probe_instance = NULL, version = version + 1, updated_at = now()
             WHERE name = $1",
        )
        .bind(pool)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM pool_failures WHERE pool = $1")
            .bind(pool)
            .execute(&mut *tx)
            .await?;
        pool_event(&mut tx, ctx, pool, "resumed", None, reason).await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE instances SET next_attempt_at = now(), last_error = NULL, updated_at = now()
             WHERE pool = $1 AND state = 'requested' AND desired_state = 'running'
             RETURNING id",
        )
        .bind(pool)
        .fetch_all(&mut *tx)
        .await?;
        woken = ids.into_iter().map(InstanceId).collect();
    }
    let row = pool_get(&mut tx, pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("pool {pool}")))?;
    tx.commit().await?;
    Ok(PauseChange {
        pool: row,
        changed: state.paused_at.is_some(),
        woken,
    })
}

/// Pauses a pool by an operator's word: no probe, no cool-off; it stays
/// paused until [`pool_resume`]. A paused pool is left as it is.
pub async fn pool_pause(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    reason: &str,
) -> Result<PauseChange> {
    let mut tx = conn.begin().await?;
    let state = lock_pause_state(&mut tx, pool).await?;
    let changed = state.paused_at.is_none();
    if changed {
        sqlx::query(
            "UPDATE pools SET paused_at = now(), paused_reason = $2, pause_probe_after = NULL,
                 pause_probe_instance = NULL, version = version + 1, updated_at = now()
             WHERE name = $1",
        )
        .bind(pool)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        pool_event(&mut tx, ctx, pool, "paused", None, reason).await?;
    }
    let row = pool_get(&mut tx, pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("pool {pool}")))?;
    tx.commit().await?;
    Ok(PauseChange {
        pool: row,
        changed,
        woken: Vec::new(),
    })
}

/// States in which a probe has failed.
const FAILED: &[InstanceState] = &[
    InstanceState::ProvisioningFailed,
    InstanceState::StartupFailed,
    InstanceState::WorkerDead,
    InstanceState::Lost,
];

/// What became of a paused pool's probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSettled {
    /// No probe under way (or the pool is not paused).
    Nothing,
    /// Still on its way.
    Pending,
    /// It reached `ready`: the pool is resumed.
    Resumed(Box<PauseChange>),
    /// It ended in a failure state that was not recorded as a pool failure
    /// (e.g. escalated by the watchdog): the cool-off restarts.
    Failed,
    /// It is being taken down without having failed (cancelled, scaled
    /// down): the slot is free for the next instance, the cool-off kept.
    Abandoned,
}

impl PartialEq for PauseChange {
    fn eq(&self, other: &Self) -> bool {
        self.pool.name == other.pool.name
            && self.changed == other.changed
            && self.woken == other.woken
    }
}
impl Eq for PauseChange {}

/// Settles the probe of a paused pool from its instance's state: `ready`
/// resumes the pool; a failure state restarts the cool-off; an instance on
/// its way out otherwise frees the slot. A probe whose failure the
/// scheduler recorded was settled then (see [`pool_record_failure`]).
pub async fn pool_settle_probe(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    policy: &PausePolicy,
) -> Result<ProbeSettled> {
    let mut tx = conn.begin().await?;
    let state = lock_pause_state(&mut tx, pool).await?;
    let (Some(_), Some(probe)) = (state.paused_at, state.pause_probe_instance) else {
        return Ok(ProbeSettled::Nothing);
    };
    let found: Option<(String, String)> =
        sqlx::query_as("SELECT state, desired_state FROM instances WHERE id = $1")
            .bind(probe)
            .fetch_optional(&mut *tx)
            .await?;
    let ready = InstanceState::Ready.as_str();
    match found {
        Some((state, _)) if state == ready => {
            drop(tx);
            let reason = format!("probe instance {probe} reached ready");
            let change = pool_resume(conn, ctx, pool, &reason).await?;
            Ok(ProbeSettled::Resumed(Box::new(change)))
        }
        Some((state, _)) if FAILED.iter().any(|f| f.as_str() == state) => {
            sqlx::query(
                "UPDATE pools SET pause_probe_instance = NULL, pause_probe_after = $2,
                     updated_at = now()
                 WHERE name = $1",
            )
            .bind(pool)
            .bind(Utc::now() + after(policy.cooloff))
            .execute(&mut *tx)
            .await?;
            let why = format!("probe instance ended {state}");
            pool_event(&mut tx, ctx, pool, "probe_failed", Some(probe), &why).await?;
            tx.commit().await?;
            Ok(ProbeSettled::Failed)
        }
        Some((state, desired)) if state != "terminated" && desired == "running" => {
            Ok(ProbeSettled::Pending)
        }
        _ => {
            sqlx::query(
                "UPDATE pools SET pause_probe_instance = NULL, updated_at = now()
                 WHERE name = $1 AND pause_probe_instance = $2",
            )
            .bind(pool)
            .bind(probe)
            .execute(&mut *tx)
            .await?;
            pool_event(
                &mut tx,
                ctx,
                pool,
                "probe_abandoned",
                Some(probe),
                "the probe instance is being taken down before it was ready",
            )
            .await?;
            tx.commit().await?;
            Ok(ProbeSettled::Abandoned)
        }
    }
}

/// One pool's audit log of pauses, resumes and probes, oldest first:
/// `(action, actor, instance, reason, at)`.
pub async fn pool_events_of(
    conn: &mut PgConnection,
    pool: &str,
) -> Result<Vec<(String, String, Option<Uuid>, Option<String>, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT action, actor, instance_id, reason, at FROM pool_events
         WHERE pool = $1 ORDER BY id",
    )
    .bind(pool)
    .fetch_all(conn)
    .await?)
}

/// One row of a pool's audit log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PoolEventRow {
    pub id: i64,
    pub action: String,
    pub actor: String,
    pub correlation_id: String,
    pub instance_id: Option<Uuid>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

impl PoolEventRow {
    pub fn to_proto(&self) -> flotilla_proto::v1::PoolEvent {
        flotilla_proto::v1::PoolEvent {
            id: self.id.max(0) as u64,
            action: self.action.clone(),
            actor: self.actor.clone(),
            correlation_id: self.correlation_id.clone(),
            instance_id: self.instance_id.map(|u| u.to_string()).unwrap_or_default(),
            reason: self.reason.clone().unwrap_or_default(),
            at: Some(crate::to_timestamp(self.at)),
        }
    }
}

/// The `limit` most recent rows of one pool's audit log, oldest first.
pub async fn pool_events_recent(
    conn: &mut PgConnection,
    pool: &str,
    limit: i64,
) -> Result<Vec<PoolEventRow>> {
    Ok(sqlx::query_as(
        "SELECT * FROM (
             SELECT id, action, actor, correlation_id, instance_id, reason, at
             FROM pool_events WHERE pool = $1 ORDER BY id DESC LIMIT $2
         ) recent ORDER BY id",
    )
    .bind(pool)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
