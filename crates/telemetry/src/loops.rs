//! What every reconcile loop reports, recorded the same way for all loops.
//!
//! An activation returns an [`ActivationStatus`]: what it found, what it did,
//! what was already done, and each item's error (one item's error never ends
//! the activation early). The driver records it with the wake-up reason and
//! the duration under the same metric names for every loop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use flotilla_core::ErrorClass;

/// Why a loop ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The periodic tick.
    Tick,
    /// A message asked for an early run.
    Message,
    /// The first run after start.
    Startup,
    /// The previous activation stopped at its batch limit with work left.
    Backlog,
}

impl Wake {
    pub const fn as_str(self) -> &'static str {
        match self {
            Wake::Tick => "tick",
            Wake::Message => "message",
            Wake::Startup => "startup",
            Wake::Backlog => "backlog",
        }
    }
}

/// One item's failure inside an activation.
#[derive(Debug, Clone)]
pub struct ItemError {
    pub class: ErrorClass,
    pub item: String,
    pub message: String,
}

/// What one activation of a loop saw and did.
#[derive(Debug, Clone, Default)]
pub struct ActivationStatus {
    pub found: u64,
    pub acted: u64,
    pub already_done: u64,
    pub errors: Vec<ItemError>,
    /// The activation filled its batch and moved work forward, so more is
    /// probably due now: the driver runs it again at once instead of
    /// waiting for the tick or a message. Without this a backlog drains
    /// one batch per tick.
    pub more: bool,
}

impl ActivationStatus {
    /// Marks [`ActivationStatus::more`] when `claimed` reached `limit` and
    /// something moved; a full batch of failures waits for the tick, so an
    /// outage never turns into a hot loop.
    pub fn more_if_full(&mut self, claimed: usize, limit: i64) {
        self.more = limit > 0 && claimed as i64 >= limit && self.acted > 0;
    }

    pub fn error(&mut self, class: ErrorClass, item: impl ToString, message: impl ToString) {
        self.errors.push(ItemError {
            class,
            item: item.to_string(),
            message: message.to_string(),
        });
    }
}

/// Records one activation: `flotilla_loop_runs_total`,
/// `flotilla_loop_duration_seconds`, `flotilla_loop_items_total` and
/// `flotilla_loop_errors_total` (by class).
pub fn record(loop_name: &'static str, wake: Wake, elapsed: Duration, status: &ActivationStatus) {
    metrics::counter!("flotilla_loop_runs_total", "loop" => loop_name, "reason" => wake.as_str())
        .increment(1);
    metrics::histogram!("flotilla_loop_duration_seconds", "loop" => loop_name)
        .record(elapsed.as_secs_f64());
    for (outcome, n) in [
        ("found", status.found),
        ("acted", status.acted),
        ("already_done", status.already_done),
    ] {
        metrics::counter!("flotilla_loop_items_total", "loop" => loop_name, "outcome" => outcome)
            .increment(n);
    }
    for e in &status.errors {
        metrics::counter!("flotilla_loop_errors_total", "loop" => loop_name, "class" => e.class.as_str())
            .increment(1);
        tracing::warn!(loop_name, item = %e.item, class = e.class.as_str(), error = %e.message, "item failed");
    }
}

/// Sets the loop's backlog gauge (`flotilla_loop_backlog`).
pub fn backlog(loop_name: &'static str, n: u64) {
    metrics::gauge!("flotilla_loop_backlog", "loop" => loop_name).set(n as f64);
}

/// A replica name unique enough for leases: host, pid and a random tag.
pub fn replica_name(service: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let tag: u32 = rand::random();
    format!("{service}/{host}/{}/{tag:08x}", std::process::id())
}

/// Runs `activation` every `tick`, or sooner when `wake` is notified,
/// until `shutdown`; records each activation.
pub async fn drive<F, Fut>(
    name: &'static str,
    tick: Duration,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    activation: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ActivationStatus>,
{
    let mut reason = Wake::Startup;
    loop {
        let started = Instant::now();
        let status = activation().await;
        record(name, reason, started.elapsed(), &status);
        if status.more {
            if shutdown.is_cancelled() {
                return;
            }
            reason = Wake::Backlog;
            // Other tasks of the runtime get their turn between batches.
            tokio::task::yield_now().await;
            continue;
        }
        reason = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => Wake::Tick,
            _ = wake.notified() => Wake::Message,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// An activation that reports a full batch `full` times, then an empty one.
    fn backlog_of(
        full: u64,
        runs: Arc<AtomicU64>,
    ) -> impl Fn() -> std::future::Ready<ActivationStatus> {
        move || {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let mut status = ActivationStatus {
                acted: 10,
                ..Default::default()
            };
            status.more_if_full(if n < full { 10 } else { 3 }, 10);
            std::future::ready(status)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_runs_again_at_once_and_an_empty_one_waits_for_the_tick() {
        let runs = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let driver = tokio::spawn(drive(
            "test",
            Duration::from_secs(3600),
            Arc::new(Notify::new()),
            shutdown.clone(),
            backlog_of(4, runs.clone()),
        ));
        // Paused time moves only when every task waits: the four full
        // batches and the short one ran without any time passing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 5);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 6, "then once per tick");
        shutdown.cancel();
        driver.await.unwrap();
    }

    #[test]
    fn a_full_batch_of_failures_waits_for_the_tick() {
        let mut status = ActivationStatus::default();
        status.more_if_full(10, 10);
        assert!(!status.more, "nothing moved: an outage must not spin");
        status.acted = 1;
        status.more_if_full(9, 10);
        assert!(!status.more, "a short batch means the backlog is drained");
        status.more_if_full(10, 10);
        assert!(status.more);
        status.more_if_full(10, 0);
        assert!(!status.more, "no limit, no backlog");
    }
}
