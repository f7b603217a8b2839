//! The audit log: one row per instance transition, written in the
//! transition's own transaction.

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
    pub to_state: String,
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
        Ok(v1::ActionLog {
            id: self.id as u64,
            instance_id: self.instance_id.to_string(),
            from_state: match &self.from_state {
                Some(s) => v1::InstanceState::from(parse(s)?) as i32,
                None => v1::InstanceState::Unspecified as i32,
            },
            to_state: v1::InstanceState::from(parse(&self.to_state)?) as i32,
            actor: self.actor.clone(),
            correlation_id: self.correlation_id.clone(),
            error: self.error.clone().unwrap_or_default(),
            reason: self.reason.clone().unwrap_or_default(),
            at: Some(to_timestamp(self.at)),
        })
    }
}

/// Every transition of one instance, oldest first.
pub async fn action_log_for_instance(
    conn: &mut PgConnection,
    instance_id: Uuid,
) -> Result<Vec<ActionLogRow>> {
    Ok(sqlx::query_as(
        "SELECT id, instance_id, from_state, to_state, actor, correlation_id, error, reason, at
         FROM action_logs WHERE instance_id = $1 ORDER BY id",
    )
    .bind(instance_id)
    .fetch_all(conn)
    .await?)
}
