//! Heartbeat ingest, batched: each heartbeat waits while a flusher writes
//! up to `MAX_BATCH` of them with one statement, and worker tokens are
//! checked against a short-lived cache, so ingest scales to tens of
//! thousands of heartbeats per second without a database round trip each.
//!
//! Design notes: a heartbeat is answered only after its write committed, so
//! the worker is never told "alive" on a write that was lost. The flusher
//! takes whatever is queued (at most `MAX_BATCH`), so at low rates a batch
//! is one heartbeat and adds no latency; under load batches grow by
//! themselves. A token cache entry is trusted for `WORKER_TOKEN_CACHE_SECONDS`
//! (default [`TOKEN_CACHE_TTL`]); a new
//! token for an instance (a re-created machine) misses the cache and is
//! checked against the database like the first time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_core::InstanceId;
use flotilla_store::PgPool;
use flotilla_store::worker::{HEARTBEAT_MARK_EVERY, WorkerView, worker_heartbeat_batch};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use uuid::Uuid;

use crate::error::store_status;

/// Heartbeats written by one statement at most.
pub const MAX_BATCH: usize = 1000;
/// How long a verified worker token is trusted without asking the
/// database, by default.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);

type Reply = oneshot::Sender<Result<Option<WorkerView>, Status>>;

/// Verified token hashes by instance, with when they were verified.
type TokenCache = Mutex<HashMap<InstanceId, ([u8; 32], Instant)>>;

struct Pending {
    id: InstanceId,
    idle: bool,
    /// The agent's heartbeat counter (0: none sent).
    sequence: u64,
    reply: Reply,
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct BatchStats {
    pub heartbeats: AtomicU64,
    pub statements: AtomicU64,
    /// Batches whose write failed (every heartbeat of it was answered with
    /// the error, and the agents retry).
    pub failures: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct HeartbeatBatcher {
    tx: mpsc::Sender<Pending>,
    stats: Arc<BatchStats>,
    tokens: Arc<TokenCache>,
    token_ttl: Duration,
}

impl HeartbeatBatcher {
    /// Starts the flusher on the current runtime, trusting a verified
    /// worker token for [`TOKEN_CACHE_TTL`] and moving heartbeat marks
    /// every [`HEARTBEAT_MARK_EVERY`].
    pub fn spawn(pool: PgPool) -> Self {
        Self::spawn_with(pool, TOKEN_CACHE_TTL, HEARTBEAT_MARK_EVERY)
    }

    /// As [`spawn`](Self::spawn), trusting a verified token for
    /// `token_ttl` (zero: never cached) and moving a heartbeat mark once
    /// older than `mark_every` (`WORKER_HEARTBEAT_MARK_SECONDS`).
    pub fn spawn_with(pool: PgPool, token_ttl: Duration, mark_every: Duration) -> Self {
        let (tx, rx) = mpsc::channel(64 * 1024);
        let stats = Arc::new(BatchStats::default());
        tokio::spawn(flush(pool, rx, stats.clone(), mark_every));
        HeartbeatBatcher {
            tx,
            stats,
            tokens: Arc::new(Mutex::new(HashMap::new())),
            token_ttl,
        }
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Records a heartbeat; answers once it is written (or, for one older
    /// than the last written, once it is known to be stale). `None` when
    /// the instance does not exist.
    pub async fn beat(
        &self,
        id: InstanceId,
        idle: bool,
        sequence: u64,
    ) -> Result<Option<WorkerView>, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending {
                id,
                idle,
                sequence,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("heartbeat ingest is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("heartbeat ingest is shutting down"))?
    }

    /// Whether `hash` was verified for `id` recently.
    pub fn token_known(&self, id: InstanceId, hash: &[u8; 32]) -> bool {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens.get(&id).is_some_and(|(h, at)| {
            at.elapsed() < self.token_ttl
                && bool::from(subtle::ConstantTimeEq::ct_eq(&h[..], &hash[..]))
        })
    }

    pub fn remember_token(&self, id: InstanceId, hash: [u8; 32]) {
        if self.token_ttl.is_zero() {
            return;
        }
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() > 500_000 {
            // Bounded memory: drop stale entries rather than grow forever.
            let ttl = self.token_ttl;
            tokens.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        tokens.insert(id, (hash, Instant::now()));
    }
}

async fn flush(
    pool: PgPool,
    mut rx: mpsc::Receiver<Pending>,
    stats: Arc<BatchStats>,
    mark_every: Duration,
) {
    // A series from the start, so the first failure shows in `increase()`.
    metrics::counter!("flotilla_api_heartbeat_flush_failures_total").increment(0);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let pending = std::mem::take(&mut batch);
        // One row per instance: the newest heartbeat of a batch wins, by
        // the agent's sequence (arrival order is not send order), and by
        // arrival for agents that send none.
        let mut latest: HashMap<InstanceId, (bool, u64)> = HashMap::with_capacity(pending.len());
        for p in &pending {
            let entry = latest.entry(p.id).or_insert((p.idle, p.sequence));
            if p.sequence == 0 || p.sequence >= entry.1 {
                *entry = (p.idle, p.sequence);
            }
        }
        let ids: Vec<Uuid> = latest.keys().map(|i| i.0).collect();
        let idle: Vec<bool> = ids.iter().map(|i| latest[&InstanceId(*i)].0).collect();
        // A counter past i64::MAX cannot be stored; such an agent is
        // treated as sending none.
        let sequence: Vec<i64> = ids
            .iter()
            .map(|i| i64::try_from(latest[&InstanceId(*i)].1).unwrap_or(0))
            .collect();
        let written = match pool.acquire().await {
            Ok(mut conn) => worker_heartbeat_batch(&mut conn, &ids, &idle, &sequence, mark_every)
                .await
                .map_err(store_status),
            Err(e) => Err(store_status(e.into())),
        };
        stats.statements.fetch_add(1, Ordering::Relaxed);
        stats
            .heartbeats
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        metrics::counter!("flotilla_api_heartbeats_total").increment(pending.len() as u64);
        metrics::histogram!("flotilla_api_heartbeat_batch_size").record(pending.len() as f64);
        metrics::histogram!("flotilla_api_heartbeat_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Err(status) = &written {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("flotilla_api_heartbeat_flush_failures_total").increment(1);
            tracing::warn!(
                heartbeats = pending.len(),
                code = ?status.code(),
                error = status.message(),
                "heartbeat batch not written; its workers are answered with the error and retry"
            );
        }
        match written {
            Ok(views) => {
                let by_id: HashMap<InstanceId, WorkerView> =
                    views.into_iter().map(|v| (v.id, v)).collect();
                for p in pending {
                    let _ = p.reply.send(Ok(by_id.get(&p.id).cloned()));
                }
            }
            Err(status) => {
                for p in pending {
                    let _ = p.reply.send(Err(status.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that cannot be written (here: no database at all) is
    /// answered with an error, counted, and does not stop the flusher.
    #[tokio::test]
    async fn a_failed_batch_is_answered_with_the_error_and_counted() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(200))
            .connect_lazy("postgres://flotilla@127.0.0.1:1/none")
            .expect("lazy pool");
        let batcher = HeartbeatBatcher::spawn(pool);
        for sequence in 1..=2 {
            let err = batcher
                .beat(InstanceId::new(), false, sequence)
                .await
                .expect_err("no database");
            assert_ne!(err.code(), tonic::Code::Ok);
        }
        assert_eq!(batcher.stats().failures.load(Ordering::Relaxed), 2);
        assert_eq!(batcher.stats().heartbeats.load(Ordering::Relaxed), 2);
    }

    /// `WORKER_TOKEN_CACHE_SECONDS`: a token is trusted only as long as
    /// configured, and 0 caches nothing.
    #[tokio::test]
    async fn the_token_cache_keeps_a_token_only_as_long_as_configured() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://flotilla@127.0.0.1:1/none")
            .expect("lazy pool");
        let (id, hash) = (InstanceId::new(), [7u8; 32]);
        let cached = HeartbeatBatcher::spawn_with(
            pool.clone(),
            Duration::from_millis(100),
            HEARTBEAT_MARK_EVERY,
        );
        cached.remember_token(id, hash);
        assert!(cached.token_known(id, &hash));
        assert!(!cached.token_known(id, &[8u8; 32]), "another token");
        let start = Instant::now();
        while cached.token_known(id, &hash) {
            assert!(start.elapsed() < Duration::from_secs(5), "never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(80));
        let uncached = HeartbeatBatcher::spawn_with(pool, Duration::ZERO, HEARTBEAT_MARK_EVERY);
        uncached.remember_token(id, hash);
        assert!(!uncached.token_known(id, &hash));
    }
}
