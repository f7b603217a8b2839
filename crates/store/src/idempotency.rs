//! First answers to idempotent requests, so a retried request with the same
//! key replays the answer instead of acting twice.
//!
//! Design notes: the record is inserted in the same transaction as the
//! effect. Two concurrent requests with one key race on the primary key:
//! the loser's insert reports `false`, it rolls back its effect and replays
//! the winner's answer.

use std::time::Duration;

use sqlx::PgConnection;

use crate::Result;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct IdempotencyRecord {
    pub request_hash: Vec<u8>,
    pub response: Vec<u8>,
}

/// The stored answer for `(scope, key)`, if it has not expired.
pub async fn idempotency_get(
    conn: &mut PgConnection,
    scope: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>> {
    Ok(sqlx::query_as(
        "SELECT request_hash, response FROM idempotency_records
         WHERE scope = $1 AND key = $2 AND expires_at > now()",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

/// Stores the first answer; `false` when the key already has one (the
/// caller lost a race and must roll back).
pub async fn idempotency_put(
    conn: &mut PgConnection,
    scope: &str,
    key: &str,
    request_hash: &[u8],
    response: &[u8],
    ttl: Duration,
) -> Result<bool> {
    // An expired record is replaced, so a key can be reused after its TTL.
    let inserted = sqlx::query(
        "INSERT INTO idempotency_records (scope, key, request_hash, response, expires_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
         ON CONFLICT (scope, key) DO UPDATE
           SET request_hash = EXCLUDED.request_hash, response = EXCLUDED.response,
               created_at = now(), expires_at = EXCLUDED.expires_at
           WHERE idempotency_records.expires_at <= now()",
    )
    .bind(scope)
    .bind(key)
    .bind(request_hash)
    .bind(response)
    .bind(ttl.as_secs_f64())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Deletes expired records.
pub async fn idempotency_purge_expired(conn: &mut PgConnection) -> Result<u64> {
    Ok(
        sqlx::query("DELETE FROM idempotency_records WHERE expires_at <= now()")
            .execute(conn)
            .await?
            .rows_affected(),
    )
}
