//! Flotilla's PostgreSQL store: the migrations and every SQL statement.
//!
//! One module per entity; functions are named `<entity>_<verb>`. Every state
//! change of an instance goes through [`instance::instance_transition`],
//! which checks the transition table, applies optimistic concurrency on the
//! version column, and writes the action log and the outbox event in the
//! same transaction — so a crash leaves either all of it or none of it.

pub mod action_log;
pub mod disruption;
pub mod error;
pub mod fleet;
pub mod health;
pub mod idempotency;
pub mod instance;
pub mod metrics;
pub mod outbox;
pub mod pool;
pub mod pool_delete;
pub mod pool_pause;
pub mod spend;
pub mod volume;
pub mod warm;
pub mod watchdog;
pub mod worker;

use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::CorrelationId;
use flotilla_core::config::DatabaseArgs;
pub use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use error::{Result, StoreError};

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens a pool. Does not migrate: that is a deploy step (`migrate`).
pub async fn connect(args: &DatabaseArgs) -> Result<PgPool> {
    connect_url(
        &args.database_url,
        args.database_max_connections,
        args.acquire_timeout(),
    )
    .await
}

pub async fn connect_url(url: &str, max_connections: u32, acquire: Duration) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire)
        .connect(url)
        .await?)
}

/// Applies pending migrations. Safe to run from several replicas at once
/// (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .map_err(|e| StoreError::Database(sqlx::Error::Migrate(Box::new(e))))
}

/// Who is writing, and on whose behalf: recorded in action logs and copied
/// into the headers of every outbox message the write produces.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// "api:<token name>", "scheduler", "terminator", …
    pub actor: String,
    pub correlation_id: CorrelationId,
    /// W3C trace context (`traceparent`, `tracestate`) of the current span.
    pub trace_headers: Vec<(String, String)>,
}

impl WriteCtx {
    pub fn new(actor: impl Into<String>) -> Self {
        WriteCtx {
            actor: actor.into(),
            correlation_id: CorrelationId::new(),
            trace_headers: Vec::new(),
        }
    }

    pub fn with_correlation(mut self, id: CorrelationId) -> Self {
        self.correlation_id = id;
        self
    }

    pub fn with_trace_headers(mut self, headers: Vec<(String, String)>) -> Self {
        self.trace_headers = headers;
        self
    }
}

/// A timestamp for protobuf messages.
pub fn to_timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}
