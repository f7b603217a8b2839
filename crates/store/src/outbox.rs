//! The transactional outbox: messages committed with the change that caused
//! them, and the queries the relay uses to move them to JetStream.
//!
//! Design notes: the relay holds a transaction-scoped advisory lock while it
//! publishes a batch, so several relay replicas may run but only one
//! publishes at a time and messages leave in commit (id) order. A relay that
//! dies after publishing but before marking rolls back; the rows are
//! published again with the same `msg_id`, which JetStream de-duplicates.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::{Result, WriteCtx};
use flotilla_core::ids::CORRELATION_HEADER;

/// Advisory lock key of the relay ("Flot" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x466c_6f74;

/// A message waiting in (or relayed from) the outbox.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxMessage {
    pub id: i64,
    pub msg_id: Uuid,
    /// Logical subject, without namespace (`CMD.provision`, `EVT.instance.ready`).
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: Json<BTreeMap<String, String>>,
    pub attempts: i32,
}

/// Header map written with every message of a write context.
pub fn ctx_headers(ctx: &WriteCtx) -> BTreeMap<String, String> {
    let mut h: BTreeMap<String, String> = ctx.trace_headers.iter().cloned().collect();
    h.insert(
        CORRELATION_HEADER.to_owned(),
        ctx.correlation_id.as_str().to_owned(),
    );
    h
}

/// Queues one message in the caller's transaction; returns its `msg_id`.
pub async fn outbox_insert(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    subject: &str,
    payload: &[u8],
) -> Result<Uuid> {
    let msg_id = Uuid::now_v7();
    sqlx::query("INSERT INTO outbox (msg_id, subject, payload, headers) VALUES ($1, $2, $3, $4)")
        .bind(msg_id)
        .bind(subject)
        .bind(payload)
        .bind(Json(ctx_headers(ctx)))
        .execute(conn)
        .await?;
    Ok(msg_id)
}

/// Queues many messages with one statement, in order.
pub async fn outbox_insert_many(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    messages: &[(String, Vec<u8>)],
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = messages.iter().map(|_| Uuid::now_v7()).collect();
    let subjects: Vec<&str> = messages.iter().map(|(s, _)| s.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|(_, p)| p.as_slice()).collect();
    sqlx::query(
        "INSERT INTO outbox (msg_id, subject, payload, headers)
         SELECT m, s, p, $4 FROM UNNEST($1::uuid[], $2::text[], $3::bytea[]) WITH ORDINALITY AS t(m, s, p, n)
         ORDER BY n",
    )
    .bind(&ids)
    .bind(&subjects)
    .bind(&payloads)
    .bind(Json(ctx_headers(ctx)))
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the relay lock for this transaction; false when another relay holds it.
pub async fn outbox_try_lock_relay(tx: &mut Transaction<'_, Postgres>) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(RELAY_LOCK_KEY)
        .fetch_one(&mut **tx)
        .await?)
}

/// The oldest unsent messages, locked until the transaction ends.
pub async fn outbox_claim_unsent(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
) -> Result<Vec<OutboxMessage>> {
    Ok(sqlx::query_as(
        "SELECT id, msg_id, subject, payload, headers, attempts FROM outbox
         WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?)
}

pub async fn outbox_mark_sent(conn: &mut PgConnection, ids: &[i64]) -> Result<u64> {
    Ok(
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(ids)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

pub async fn outbox_record_failure(
    conn: &mut PgConnection,
    ids: &[i64],
    error: &str,
) -> Result<()> {
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)")
        .bind(ids)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// Number of messages not yet relayed (the relay's backlog).
pub async fn outbox_backlog(conn: &mut PgConnection) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            .fetch_one(conn)
            .await?,
    )
}

/// Deletes relayed messages older than `keep`; they are in JetStream now.
pub async fn outbox_delete_sent_before(
    conn: &mut PgConnection,
    cutoff: chrono::DateTime<chrono::Utc>,
) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1")
            .bind(cutoff)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}
