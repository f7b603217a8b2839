//! Protection of the provider account: rate limiting, retries of safe calls,
//! and a circuit breaker, wrapped around any [`MachineProvider`].
//!
//! Design notes: [`Guarded`] wraps one provider for one scope (provider and
//! region), so a failing region opens its own breaker without stopping the
//! others. The breaker counts only answers that say the provider is unwell
//! (`Unavailable`, `DeadlineExceeded`); a 404 or a 412 is a healthy answer.
//! While open it rejects calls at once with `Unavailable`, then lets one
//! probe through after the reset timeout (half-open). Retries use `backon`
//! and only for calls that are safe to repeat (reads, stop, delete): a
//! create or a start is never repeated here, because repeating it could
//! create a second machine; the reconcile loops retry those with the
//! instance row as the guard. A rate limit answer's `Retry-After` is
//! honoured as the least delay.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use governor::{Jitter, Quota, RateLimiter};

use crate::types::*;
use crate::{MachineProvider, ProviderError, ProviderResult};

/// Guard settings (environment variables in `provider-adapter`).
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long the breaker stays open before a probe.
    pub reset_timeout: Duration,
    /// Sustained calls per second to one scope.
    pub rate_per_second: u32,
    /// Calls allowed in a burst above the rate.
    pub burst: u32,
    /// Retries of a safe call after its first attempt.
    pub max_retries: usize,
    pub retry_min_delay: Duration,
    pub retry_max_delay: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            failure_threshold: 5,
            reset_timeout: Duration::from_secs(30),
            rate_per_second: 20,
            burst: 40,
            max_retries: 3,
            retry_min_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(5),
        }
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A consecutive-failure circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    threshold: u32,
    reset: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, reset: Duration) -> Self {
        Breaker {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            threshold: threshold.max(1),
            reset,
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the state is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go through now? The answer, when yes, is the admission
    /// the call reports its outcome on.
    fn admit(&self) -> Option<Admission<'_>> {
        let mut inner = self.lock();
        let probe = match *inner {
            Inner::Closed { .. } => false,
            Inner::Open { until } if Instant::now() < until => return None,
            Inner::HalfOpen { probing: true } => return None,
            Inner::Open { .. } | Inner::HalfOpen { probing: false } => {
                *inner = Inner::HalfOpen { probing: true };
                true
            }
        };
        Some(Admission {
            breaker: self,
            probe,
            settled: false,
        })
    }

    /// A probe that ended without an outcome gives its slot back, so the
    /// next call probes instead of the breaker refusing every call forever.
    fn abandon_probe(&self) {
        let mut inner = self.lock();
        if let Inner::HalfOpen { probing: true } = *inner {
            *inner = Inner::HalfOpen { probing: false };
        }
    }

    fn record(&self, unwell: bool) {
        let mut inner = self.lock();
        let next = match (&*inner, unwell) {
            (_, false) => Inner::Closed { failures: 0 },
            (Inner::Closed { failures }, true) if failures + 1 < self.threshold => Inner::Closed {
                failures: failures + 1,
            },
            (_, true) => Inner::Open {
                until: Instant::now() + self.reset,
            },
        };
        *inner = next;
    }
}

/// One call the breaker let through. Its outcome is recorded with
/// [`Admission::record`]; dropped without one (the caller's future was
/// cancelled: a client gone, a server timeout), a half-open probe hands its
/// slot back instead of leaving the breaker `probing` for good.
struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    settled: bool,
}

impl Admission<'_> {
    fn record(mut self, unwell: bool) {
        self.settled = true;
        self.breaker.record(unwell);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.settled {
            self.breaker.abandon_probe();
        }
    }
}

/// A provider behind a rate limiter, a breaker and retries.
pub struct Guarded<P> {
    inner: P,
    scope: String,
    limiter: Arc<Limiter>,
    breaker: Arc<Breaker>,
    config: GuardConfig,
}

impl<P: std::fmt::Debug> std::fmt::Debug for Guarded<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("scope", &self.scope)
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

/// An attempt's failure: the provider's answer, or the breaker's refusal
/// (which is never retried — failing fast is the point).
enum Failure {
    Provider(ProviderError),
    Open(ProviderError),
}

fn unwell(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::Unavailable(_) | ProviderError::DeadlineExceeded(_)
    )
}

fn transient(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::Unavailable(_)
            | ProviderError::DeadlineExceeded(_)
            | ProviderError::ResourceExhausted { .. }
    )
}

impl<P: MachineProvider> Guarded<P> {
    /// `scope` names the provider and region, e.g. `fly/ams`.
    pub fn new(inner: P, scope: impl Into<String>, config: GuardConfig) -> Self {
        let limiter = limiter(&config);
        Self::with_limiter(inner, scope, config, limiter)
    }

    /// Like [`Guarded::new`], sharing a rate limiter with other scopes of
    /// the same provider account (the provider limits the account, not a region).
    pub fn with_limiter(
        inner: P,
        scope: impl Into<String>,
        config: GuardConfig,
        limiter: Arc<Limiter>,
    ) -> Self {
        Guarded {
            inner,
            scope: scope.into(),
            limiter,
            breaker: Arc::new(Breaker::new(config.failure_threshold, config.reset_timeout)),
            config,
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }

    async fn attempt<T, Fut>(&self, op: &'static str, fut: Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = ProviderResult<T>>,
    {
        let Some(admission) = self.breaker.admit() else {
            self.report_breaker();
            metrics::counter!(
                "flotilla_provider_calls_total",
                "provider" => self.inner.kind(), "op" => op, "outcome" => "circuit_open"
            )
            .increment(1);
            return Err(Failure::Open(ProviderError::Unavailable(format!(
                "circuit open for {}: provider failing, calls paused",
                self.scope
            ))));
        };
        self.limiter
            .until_ready_with_jitter(Jitter::up_to(Duration::from_millis(50)))
            .await;
        let started = Instant::now();
        let result = fut.await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        admission.record(result.as_ref().err().is_some_and(unwell));
        self.report_breaker();
        metrics::counter!(
            "flotilla_provider_calls_total",
            "provider" => self.inner.kind(), "op" => op, "outcome" => outcome
        )
        .increment(1);
        metrics::histogram!(
            "flotilla_provider_call_duration_seconds",
            "provider" => self.inner.kind(), "op" => op
        )
        .record(started.elapsed().as_secs_f64());
        result.map_err(Failure::Provider)
    }

    fn report_breaker(&self) {
        let v = match self.breaker.state() {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!(
            "flotilla_provider_breaker_state",
            "provider" => self.inner.kind(), "scope" => self.scope.clone()
        )
        .set(v);
    }

    /// One attempt; for calls that must not be repeated here.
    async fn once<T, Fut>(&self, op: &'static str, fut: Fut) -> ProviderResult<T>
    where
        Fut: Future<Output = ProviderResult<T>>,
    {
        self.attempt(op, fut).await.map_err(|f| match f {
            Failure::Provider(e) | Failure::Open(e) => e,
        })
    }

    /// Attempts with backoff while the failure is transient.
    async fn retried<T, F, Fut>(&self, op: &'static str, mut f: F) -> ProviderResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ProviderResult<T>>,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.retry_min_delay)
            .with_max_delay(self.config.retry_max_delay)
            .with_max_times(self.config.max_retries)
            .with_jitter();
        (|| self.attempt(op, f()))
            .retry(backoff)
            .when(|f| matches!(f, Failure::Provider(e) if transient(e)))
            .adjust(|f, delay| match f {
                Failure::Provider(e) => match (e.retry_after(), delay) {
                    (Some(after), Some(d)) => Some(d.max(after)),
                    (_, d) => d,
                },
                Failure::Open(_) => None,
            })
            .notify(|f, delay| {
                if let Failure::Provider(e) = f {
                    tracing::debug!(op, error = %e, ?delay, "retrying provider call");
                }
            })
            .await
            .map_err(|f| match f {
                Failure::Provider(e) | Failure::Open(e) => e,
            })
    }
}

/// A token bucket for one provider account.
pub type Limiter = governor::DefaultDirectRateLimiter;

/// The token bucket `config` describes.
pub fn limiter(config: &GuardConfig) -> Arc<Limiter> {
    let rate =
        std::num::NonZeroU32::new(config.rate_per_second).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(config.burst).unwrap_or(std::num::NonZeroU32::MIN);
    Arc::new(RateLimiter::direct(
        Quota::per_second(rate).allow_burst(burst),
    ))
}

impl<P: MachineProvider> MachineProvider for Guarded<P> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// No call to the provider: nothing to limit or break.
    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        self.inner.check_spec(spec)
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        self.once("create_machine", self.inner.create_machine(spec))
            .await
    }

    /// Setting the environment again is safe to repeat.
    async fn prepare_machine(
        &self,
        id: &str,
        env: &std::collections::BTreeMap<String, String>,
    ) -> ProviderResult<bool> {
        self.retried("prepare_machine", || self.inner.prepare_machine(id, env))
            .await
    }

    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.once("start_machine", self.inner.start_machine(id))
            .await
    }

    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        self.retried("stop_machine", || self.inner.stop_machine(id, grace))
            .await
    }

    async fn suspend_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.retried("suspend_machine", || self.inner.suspend_machine(id))
            .await
    }

    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        // A wait that timed out is an answer, not a failure to repeat here.
        self.once("wait_machine", self.inner.wait_machine(id, state, timeout))
            .await
    }

    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        self.retried("delete_machine", || self.inner.delete_machine(id, force))
            .await
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.retried("get_machine", || self.inner.get_machine(id))
            .await
    }

    async fn list_machines(&self, page: &PageRequest) -> ProviderResult<Page<Machine>> {
        self.retried("list_machines", || self.inner.list_machines(page))
            .await
    }

    async fn find_machines(
        &self,
        instance: flotilla_core::InstanceId,
    ) -> ProviderResult<Vec<Machine>> {
        self.retried("find_machines", || self.inner.find_machines(instance))
            .await
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        self.once("create_volume", self.inner.create_volume(spec))
            .await
    }

    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        self.retried("delete_volume", || self.inner.delete_volume(id))
            .await
    }

    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        self.retried("list_volumes", || self.inner.list_volumes(page))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_probes_once_after_the_reset() {
        let b = Breaker::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            b.admit().expect("closed").record(true);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().expect("closed").record(true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_none());
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.admit().expect("one probe after the reset timeout");
        assert!(b.admit().is_none(), "only one probe at a time");
        probe.record(true);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(60));
        b.admit().expect("probe").record(false);
        assert_eq!(b.state(), BreakerState::Closed, "a good probe closes");
    }

    #[test]
    fn a_probe_dropped_without_an_outcome_lets_the_next_call_probe() {
        let b = Breaker::new(1, Duration::ZERO);
        b.admit().expect("closed").record(true);
        let probe = b.admit().expect("half-open: one probe");
        assert!(b.admit().is_none(), "only one probe at a time");
        // The probe's future is dropped (client cancel, server timeout).
        drop(probe);
        let next = b.admit();
        assert!(
            next.is_some(),
            "the breaker stayed probing with no probe in flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_guarded_call_cancelled_mid_probe_does_not_wedge_the_breaker() {
        let provider = Guarded::new(
            Hanging,
            "test/one",
            GuardConfig {
                failure_threshold: 1,
                // The breaker's clock is the wall clock: with no reset
                // timeout every call after a failure is a probe.
                reset_timeout: Duration::ZERO,
                ..GuardConfig::default()
            },
        );
        let failed = provider.get_machine("fails").await;
        assert!(matches!(failed, Err(ProviderError::Unavailable(_))));
        // The probe hangs and its caller gives up.
        let cancelled =
            tokio::time::timeout(Duration::from_secs(5), provider.get_machine("hangs")).await;
        assert!(cancelled.is_err(), "the probe was expected to hang");
        let next = provider.get_machine("fails").await;
        assert!(
            !matches!(&next, Err(e) if e.to_string().contains("circuit open")),
            "every call refused after a cancelled probe: {next:?}"
        );
    }

    /// A provider whose `get_machine` fails as unavailable, or never
    /// answers for the id `hangs`; nothing else is called.
    #[derive(Debug, Clone)]
    struct Hanging;

    impl MachineProvider for Hanging {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn create_machine(&self, _: &MachineSpec) -> ProviderResult<Machine> {
            unreachable!()
        }
        async fn start_machine(&self, _: &str) -> ProviderResult<Machine> {
            unreachable!()
        }
        async fn stop_machine(&self, _: &str, _: Duration) -> ProviderResult<Machine> {
            unreachable!()
        }
        async fn wait_machine(
            &self,
            _: &str,
            _: MachineState,
            _: Duration,
        ) -> ProviderResult<Machine> {
            unreachable!()
        }
        async fn delete_machine(&self, _: &str, _: bool) -> ProviderResult<()> {
            unreachable!()
        }
        async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
            if id == "hangs" {
                std::future::pending::<()>().await;
            }
            Err(ProviderError::Unavailable("down".into()))
        }
        async fn list_machines(&self, _: &PageRequest) -> ProviderResult<Page<Machine>> {
            unreachable!()
        }
        async fn create_volume(&self, _: &VolumeSpec) -> ProviderResult<Volume> {
            unreachable!()
        }
        async fn delete_volume(&self, _: &str) -> ProviderResult<()> {
            unreachable!()
        }
        async fn list_volumes(&self, _: &PageRequest) -> ProviderResult<Page<Volume>> {
            unreachable!()
        }
    }

    #[test]
    fn a_healthy_answer_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.record(true);
        b.record(false);
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
