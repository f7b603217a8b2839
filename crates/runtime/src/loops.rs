//! The loop registry: every reconcile loop of a service is added here by
//! name, with its tick, an optional wake-up and its activation, and runs
//! until shutdown under [`flotilla_telemetry::loops::drive`] (one metric
//! set for every loop). The registry keeps each loop's status — when it
//! last ran, whether its last activation failed — which the service's
//! health answer and the `flotilla_loop_last_run_timestamp_seconds` gauge
//! are read from, the same way for every loop. Its clock is tokio's, so
//! tests on a paused clock see stalls without waiting.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use flotilla_core::ErrorClass;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::{ActivationStatus, drive};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// The shortest time without a finished activation that counts as a stall.
pub const STALL_FLOOR: Duration = Duration::from_secs(30);

/// What a loop's last activations said.
#[derive(Debug, Clone)]
pub struct LoopStatus {
    pub tick: Duration,
    pub runs: u64,
    /// When the last activation ended; `None` before the first.
    pub last_run: Option<Instant>,
    /// Activations in a row that had errors and moved nothing.
    pub failing_runs: u64,
    /// The last activation's first error, for the health answer and logs.
    pub last_error: Option<String>,
}

impl LoopStatus {
    /// A loop is stalled when it has not finished an activation for three
    /// ticks (at least `floor`, 30 s in services): a hung provider call or
    /// a lost task. Failing activations are not stalls: they are counted,
    /// and the loop goes on.
    pub fn stalled(&self, started: Instant, now: Instant, floor: Duration) -> bool {
        let allowed = (self.tick * 3).max(floor);
        now.duration_since(self.last_run.unwrap_or(started)) > allowed
    }
}

/// Every loop's status, shared between the loops and whoever reports on them.
#[derive(Debug, Clone)]
pub struct Statuses {
    started: Instant,
    floor: Duration,
    inner: Arc<Mutex<BTreeMap<&'static str, LoopStatus>>>,
}

impl Statuses {
    fn new() -> Self {
        Statuses {
            started: Instant::now(),
            floor: STALL_FLOOR,
            inner: Arc::default(),
        }
    }

    fn register(&self, name: &'static str, tick: Duration) {
        self.lock().insert(
            name,
            LoopStatus {
                tick,
                runs: 0,
                last_run: None,
                failing_runs: 0,
                last_error: None,
            },
        );
        // Every error class has a series from the start, so `rate()` and
        // `increase()` see the first failure.
        for class in ErrorClass::ALL {
            metrics::counter!("flotilla_loop_errors_total", "loop" => name, "class" => class.as_str())
                .increment(0);
        }
    }

    fn observe(&self, name: &'static str, status: &ActivationStatus) {
        let mut map = self.lock();
        let Some(s) = map.get_mut(name) else { return };
        s.runs += 1;
        s.last_run = Some(Instant::now());
        if !status.errors.is_empty() && status.acted == 0 {
            s.failing_runs += 1;
        } else {
            s.failing_runs = 0;
        }
        s.last_error = status
            .errors
            .first()
            .map(|e| format!("{}: {}", e.item, e.message));
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        metrics::gauge!("flotilla_loop_last_run_timestamp_seconds", "loop" => name).set(unix);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, LoopStatus>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every loop's status.
    pub fn snapshot(&self) -> BTreeMap<&'static str, LoopStatus> {
        self.lock().clone()
    }

    /// The loops that stalled (see [`LoopStatus::stalled`]).
    pub fn stalled(&self) -> Vec<&'static str> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, s)| s.stalled(self.started, now, self.floor))
            .map(|(n, _)| *n)
            .collect()
    }
}

/// The loops (and helper tasks, such as the consumers that wake them) of
/// one service replica.
pub struct Loops {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    statuses: Statuses,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops")
            .field("tasks", &self.tasks.len())
            .finish()
    }
}

impl Loops {
    pub fn new(shutdown: CancellationToken) -> Self {
        Loops {
            shutdown,
            tasks: JoinSet::new(),
            statuses: Statuses::new(),
        }
    }

    /// Counts a loop as stalled after `floor` without a finished
    /// activation when three ticks are shorter (tests; services keep
    /// [`STALL_FLOOR`]).
    pub fn with_stall_floor(mut self, floor: Duration) -> Self {
        self.statuses.floor = floor;
        self
    }

    /// The token every loop stops on.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Every loop's status.
    pub fn statuses(&self) -> Statuses {
        self.statuses.clone()
    }

    /// Adds loop `name`: `activation` runs every `tick`, sooner when
    /// `wake` is notified or when the last activation left a backlog.
    pub fn add<F, Fut>(
        &mut self,
        name: &'static str,
        tick: Duration,
        wake: Option<Arc<Notify>>,
        activation: F,
    ) where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ActivationStatus> + Send + 'static,
    {
        self.statuses.register(name, tick);
        let statuses = self.statuses.clone();
        let shutdown = self.shutdown.clone();
        // A loop nobody wakes waits for its tick: a Notify that is never
        // notified.
        let wake = wake.unwrap_or_default();
        let activation = Arc::new(activation);
        self.tasks.spawn(async move {
            drive(name, tick, wake, shutdown, move || {
                let (activation, statuses) = (activation.clone(), statuses.clone());
                async move {
                    let status = activation().await;
                    statuses.observe(name, &status);
                    status
                }
            })
            .await
        });
    }

    /// Adds a task that is not a loop (a consumer waking one); it must end
    /// when [`Loops::shutdown`] is cancelled.
    pub fn spawn<Fut>(&mut self, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Runs every loop until shutdown; then in-flight activations have
    /// `grace` to finish before they are aborted. Returns how many were.
    pub async fn run(mut self, grace: Duration) -> usize {
        flotilla_telemetry::shutdown::join_within_grace(&mut self.tasks, &self.shutdown, grace)
            .await
    }

    /// [`Loops::run`], then gives back every lease `owner` still holds, so
    /// another replica takes those rows at once instead of after the lease.
    /// This is how every loop service stops.
    pub async fn run_then_release(self, grace: Duration, db: &sqlx::PgPool, owner: &str) {
        self.run(grace).await;
        crate::service::release_leases(db, owner).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_loop_keeps_its_status_and_a_silent_loop_is_stalled() {
        let shutdown = CancellationToken::new();
        let mut loops = Loops::new(shutdown.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        loops.add("counting", Duration::from_secs(1), None, move || {
            r.fetch_add(1, Ordering::SeqCst);
            let mut status = ActivationStatus::default();
            status.error(ErrorClass::Retryable, "x", "refused");
            std::future::ready(status)
        });
        // A loop whose activation never ends: it stops reporting.
        loops.add("hung", Duration::from_secs(1), None, || {
            std::future::pending::<ActivationStatus>()
        });
        let statuses = loops.statuses();
        let run = tokio::spawn(loops.run(Duration::from_secs(1)));

        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let snap = statuses.snapshot();
        let counting = &snap["counting"];
        assert_eq!(counting.runs, runs.load(Ordering::SeqCst));
        assert!(counting.runs >= 10, "{counting:?}");
        assert_eq!(counting.failing_runs, counting.runs, "every run failed");
        assert_eq!(counting.last_error.as_deref(), Some("x: refused"));
        assert_eq!(snap["hung"].runs, 0);
        assert!(statuses.stalled().is_empty(), "30 s have not passed");

        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(statuses.stalled(), ["hung"], "failing is not stalling");

        shutdown.cancel();
        assert_eq!(run.await.unwrap(), 1, "the hung activation is aborted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_woken_loop_runs_before_its_tick() {
        let shutdown = CancellationToken::new();
        let mut loops = Loops::new(shutdown.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let r = runs.clone();
        loops.add(
            "woken",
            Duration::from_secs(3600),
            Some(wake.clone()),
            move || {
                r.fetch_add(1, Ordering::SeqCst);
                std::future::ready(ActivationStatus::default())
            },
        );
        let run = tokio::spawn(loops.run(Duration::from_secs(1)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the startup run");
        wake.notify_one();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        assert_eq!(run.await.unwrap(), 0);
    }
}
