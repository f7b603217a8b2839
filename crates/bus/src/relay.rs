//! The outbox relay: moves committed outbox rows to JetStream, in order,
//! exactly once into the stream.
//!
//! Design notes: one activation takes the relay's advisory lock, locks the
//! oldest unsent rows, publishes them pipelined with `Nats-Msg-Id` = the
//! row's `msg_id`, marks the acked ones sent and commits. If the process
//! dies after publishing but before the commit, the rows stay unsent and are
//! published again; JetStream drops the repeats inside its duplicate window,
//! so each row reaches the stream once. Several relays may run: the lock
//! lets one publish at a time, which also keeps commit order. The relay is
//! woken by `LISTEN flotilla_outbox` and also polls, so a lost notification
//! only delays a message.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_store::PgPool;
use flotilla_store::outbox::{
    OutboxMessage, outbox_backlog, outbox_claim_unsent, outbox_mark_sent, outbox_record_failure,
    outbox_try_lock_relay,
};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::BusError;
use crate::streams::{Bus, Outgoing};

/// Notification channel the outbox trigger signals.
pub const CHANNEL: &str = "flotilla_outbox";

/// What one activation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub sent: u64,
    /// Of those, rows the server already had (a republish after a crash).
    pub duplicates: u64,
    /// Rows whose publish failed; retried next activation.
    pub failed: u64,
    /// Another relay held the lock; this one did nothing.
    pub locked_out: bool,
}

#[derive(Debug, Clone)]
pub struct OutboxRelay {
    pool: PgPool,
    bus: Bus,
    /// Rows per activation.
    pub batch: i64,
    /// Poll period when no notification arrives.
    pub poll: Duration,
}

/// The message a row becomes.
pub fn outgoing(row: &OutboxMessage) -> Outgoing {
    Outgoing {
        subject: row.subject.clone(),
        payload: Bytes::from(row.payload.clone()),
        msg_id: row.msg_id.to_string(),
        headers: row
            .headers
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

impl OutboxRelay {
    pub fn new(pool: PgPool, bus: Bus) -> Self {
        OutboxRelay {
            pool,
            bus,
            batch: 500,
            poll: Duration::from_millis(500),
        }
    }

    /// Relays one batch.
    #[tracing::instrument(skip_all, name = "outbox.relay")]
    pub async fn run_once(&self) -> Result<RelayStats, BusError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        if !outbox_try_lock_relay(&mut tx).await? {
            return Ok(RelayStats {
                locked_out: true,
                ..Default::default()
            });
        }
        let rows = outbox_claim_unsent(&mut tx, self.batch).await?;
        if rows.is_empty() {
            return Ok(RelayStats::default());
        }
        let msgs: Vec<Outgoing> = rows.iter().map(outgoing).collect();
        let results = self.bus.publish_batch(&msgs).await;
        let mut stats = RelayStats::default();
        let mut sent = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        let mut last_error = None;
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(p) => {
                    sent.push(row.id);
                    stats.duplicates += p.duplicate as u64;
                }
                Err(e) => {
                    failed.push(row.id);
                    last_error = Some(e.to_string());
                }
            }
        }
        outbox_mark_sent(&mut tx, &sent).await?;
        if let Some(err) = &last_error {
            outbox_record_failure(&mut tx, &failed, err).await?;
            tracing::warn!(failed = failed.len(), error = %err, "outbox publish failed; will retry");
        }
        tx.commit().await?;
        stats.sent = sent.len() as u64;
        stats.failed = failed.len() as u64;
        metrics::counter!("flotilla_outbox_relayed_total").increment(stats.sent);
        metrics::counter!("flotilla_outbox_publish_failures_total").increment(stats.failed);
        metrics::histogram!("flotilla_outbox_relay_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(stats)
    }

    /// Relays until `shutdown`, woken by notifications or the poll period.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN; relay will poll only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN; relay will poll only");
                None
            }
        };
        // The backlog gauge is a count over the unsent rows: read it at
        // most once a second, not once per batch relayed.
        let mut backlog_read: Option<Instant> = None;
        loop {
            let full = match self.run_once().await {
                Ok(s) => s.sent + s.failed >= self.batch as u64 && s.failed == 0,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay activation failed");
                    false
                }
            };
            if backlog_read.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                backlog_read = Some(Instant::now());
                if let Ok(mut conn) = self.pool.acquire().await
                    && let Ok(n) = outbox_backlog(&mut conn).await
                {
                    flotilla_telemetry::loops::backlog("outbox_relay", n.max(0) as u64);
                }
            }
            if full {
                // More is waiting: go again at once.
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.poll) => {}
                n = async {
                    match listener.as_mut() {
                        Some(l) => l.try_recv().await.map(|_| ()),
                        None => std::future::pending().await,
                    }
                } => {
                    if n.is_err() {
                        // The listener reconnects by itself on the next recv.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}
