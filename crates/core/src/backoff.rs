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
}
