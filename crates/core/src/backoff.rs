//! How long a failed step waits before the next tick retries it.
//!
//! Loops never sleep-and-retry inside a tick; they write `next_attempt_at`
//! from this policy and move on, so the schedule survives restarts.

use std::time::Duration;

/// Exponential backoff with a cap and "equal jitter": half the delay is
/// fixed, half is spread by `jitter` in `[0, 1)`, so replicas that failed
/// together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    /// The delay after the `attempt`-th failure (1-based; 0 is treated as 1).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self.base.saturating_mul(1u32 << exp.min(31)).min(self.max);
        let half = full / 2;
        let jitter = jitter.clamp(0.0, 1.0);
        half + half.mul_f64(jitter)
    }
}

/// The one policy from a failed attempt to what happens next, shared by
/// every loop: when the step is tried again (backoff, never sooner than a
/// provider's `Retry-After`) and from which attempt an operator is asked
/// to look (`needs_attention`; the step keeps being retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPolicy {
    pub retry: RetryPolicy,
    /// Failed attempts after which the instance needs attention.
    pub attention_after: u32,
}

/// What [`ErrorPolicy::after_failure`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextAttempt {
    /// How long until the next attempt.
    pub delay: Duration,
    pub needs_attention: bool,
}

impl ErrorPolicy {
    /// After the `attempts`-th failed attempt (1-based) of a step.
    pub fn after_failure(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> NextAttempt {
        let delay = self
            .retry
            .delay(attempts, jitter)
            .max(retry_after.unwrap_or(Duration::ZERO));
        NextAttempt {
            delay,
            needs_attention: attempts >= self.attention_after,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.delay(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.delay(4, 1.0), Duration::from_millis(800));
        assert_eq!(p.delay(40, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(u32::MAX, 0.0), Duration::from_secs(1));
        assert_eq!(p.delay(0, 0.0), Duration::from_millis(50));
    }

    #[test]
    fn a_failure_waits_its_backoff_or_the_providers_retry_after_and_asks_for_attention_late() {
        let p = ErrorPolicy {
            retry: RetryPolicy {
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            attention_after: 3,
        };
        let first = p.after_failure(1, None, 1.0);
        assert_eq!(first.delay, Duration::from_secs(1));
        assert!(!first.needs_attention);
        let limited = p.after_failure(2, Some(Duration::from_secs(30)), 1.0);
        assert_eq!(limited.delay, Duration::from_secs(30), "Retry-After wins");
        assert_eq!(
            p.after_failure(2, Some(Duration::from_millis(1)), 1.0)
                .delay,
            Duration::from_secs(2),
            "a short Retry-After does not shorten the backoff"
        );
        assert!(!p.after_failure(2, None, 0.0).needs_attention);
        assert!(p.after_failure(3, None, 0.0).needs_attention);
        assert!(p.after_failure(40, None, 0.0).needs_attention);
    }
}
