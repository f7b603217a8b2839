//! The audit log of each instance: one row per transition, written in the
//! transition's own transaction, and one row per act that changed no
//! state (a terminate or drain request, a verdict the watchdog held, a
//! machine or volume adopted, an orphan deleted), written with it. Such an act is named by its action, never disguised as a
//! transition to the same state.

use chrono::{DateTime, Utc};
use flotilla_core::InstanceState;
use flotilla_proto::v1;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{Result, StoreError, to_timestamp};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActionLogRow {
    pub id: i64,
    pub instance_id: Uuid,
    pub from_state: Option<String>,
    /// `None` exactly when the row is a request ([`Self::action`]).
    pub to_state: Option<String>,
    /// What was asked for, when the row is a request, not a transition.
    pub action: Option<String>,
    /// Whether a `terminate_requested` was forced.
    pub force: Option<bool>,
    pub actor: String,
    pub correlation_id: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

impl ActionLogRow {
    pub fn to_proto(&self) -> Result<v1::ActionLog> {
        let parse = |s: &str| {
            s.parse::<InstanceState>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        let state = |s: &Option<String>| -> Result<i32> {
            Ok(match s {
                Some(s) => v1::InstanceState::from(parse(s)?) as i32,
                None => v1::InstanceState::Unspecified as i32,
            })
        };
        Ok(v1::ActionLog {
            id: self.id as u64,
            instance_id: self.instance_id.to_string(),
            from_state: state(&self.from_state)?,
            to_state: state(&self.to_state)?,
            actor: self.actor.clone(),
            correlation_id: self.correlation_id.clone(),
            error: self.error.clone().unwrap_or_default(),
            reason: self.reason.clone().unwrap_or_default(),
            at: Some(to_timestamp(self.at)),
            action: self.action.clone().unwrap_or_default(),
            force: self.force.unwrap_or(false),
        })
    }
}

/// An act about an instance that changes no state by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Terminate asked for (`force`: skip the drain and any stop).
    Terminate { force: bool },
    /// Drain asked for: the worker takes no new work.
    Drain,
    /// A drain undone: the worker takes work again.
    Uncordon,
    /// The watchdog held its verdict that the machine is lost (the storm
    /// guard): a decision not to act, kept in the history with its reason.
    LostVerdictHeld,
    /// The watchdog held its verdict that the worker is dead (the storm
    /// guard of silent workers), likewise.
    DeadVerdictHeld,
    /// A machine an earlier attempt created was found by its ownership tag
    /// and recorded for the instance instead of creating another.
    MachineAdopted,
    /// A data volume likewise.
    VolumeAdopted,
    /// The orphan scan deleted a machine or volume tagged with the
    /// instance that the instance does not (or no longer) own.
    OrphanDeleted,
}

impl Request {
    /// The `action` column's value.
    pub fn action(self) -> &'static str {
        match self {
            Request::Terminate { .. } => "terminate_requested",
            Request::Drain => "drain_requested",
            Request::Uncordon => "uncordoned",
            Request::LostVerdictHeld => "lost_verdict_held",
            Request::DeadVerdictHeld => "dead_verdict_held",
            Request::MachineAdopted => "machine_adopted",
            Request::VolumeAdopted => "volume_adopted",
            Request::OrphanDeleted => "orphan_deleted",
        }
    }

    fn force(self) -> Option<bool> {
        match self {
            Request::Terminate { force } => Some(force),
            Request::Drain
            | Request::Uncordon
            | Request::LostVerdictHeld
            | Request::DeadVerdictHeld
            | Request::MachineAdopted
            | Request::VolumeAdopted
            | Request::OrphanDeleted => None,
        }
    }
}

/// Records `request` in the history of each of `ids`, with who asked or
/// decided (`ctx`) and why.
pub async fn action_log_request(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    ids: &[Uuid],
    request: Request,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO action_logs (instance_id, action, force, actor, correlation_id, reason)
         SELECT id, $2, $3, $4, $5, $6 FROM instances WHERE id = ANY($1) ORDER BY id",
    )
    .bind(ids)
    .bind(request.action())
    .bind(request.force())
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every transition and request of one instance, oldest first.
pub async fn action_log_for_instance(
    conn: &mut PgConnection,
    instance_id: Uuid,
) -> Result<Vec<ActionLogRow>> {
    Ok(sqlx::query_as(
        "SELECT id, instance_id, from_state, to_state, action, force, actor, correlation_id,
                error, reason, at
         FROM action_logs WHERE instance_id = $1 ORDER BY id",
    )
    .bind(instance_id)
    .fetch_all(conn)
    .await?)
}
