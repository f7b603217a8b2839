//! The fault knobs and state timings, and the per-request dice rolls that
//! turn them into injected failures.
//!
//! Every failure a real cloud produces that Flotilla must survive has a knob
//! here: slow answers, rate limiting, 5xx, answers that never come, effects
//! that happened although the answer said error ("created but never
//! recorded"), answers that said success although the effect failed, and
//! workers that die on their own. All of it can change while the sim runs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One class of API call, as counted in stats and targeted by `error_rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Create,
    Get,
    List,
    Start,
    Stop,
    Suspend,
    Wait,
    Delete,
    VolumeCreate,
    VolumeGet,
    VolumeList,
    VolumeDelete,
    /// `GET /v1/apps/{app}`.
    AppGet,
}

impl Operation {
    pub const ALL: &'static [Operation] = &[
        Operation::Create,
        Operation::Get,
        Operation::List,
        Operation::Start,
        Operation::Stop,
        Operation::Suspend,
        Operation::Wait,
        Operation::Delete,
        Operation::VolumeCreate,
        Operation::VolumeGet,
        Operation::VolumeList,
        Operation::VolumeDelete,
        Operation::AppGet,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Get => "get",
            Operation::List => "list",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Suspend => "suspend",
            Operation::Wait => "wait",
            Operation::Delete => "delete",
            Operation::VolumeCreate => "volume_create",
            Operation::VolumeGet => "volume_get",
            Operation::VolumeList => "volume_list",
            Operation::VolumeDelete => "volume_delete",
            Operation::AppGet => "app_get",
        }
    }
}

/// Probabilities (0.0..=1.0, summing to at most 1.0) that a call is answered
/// with an injected error instead of being served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErrorRates {
    /// 429 with `Retry-After`.
    pub rate_429: f64,
    pub rate_500: f64,
    pub rate_503: f64,
    /// No effect, and the answer (504) only comes after `timeout_ms`.
    pub rate_timeout: f64,
}

impl ErrorRates {
    fn rates(&self) -> [(&'static str, f64); 4] {
        [
            ("rate_429", self.rate_429),
            ("rate_500", self.rate_500),
            ("rate_503", self.rate_503),
            ("rate_timeout", self.rate_timeout),
        ]
    }
}

/// What a machine listing (`GET /v1/apps/{app}/machines`) answers. Only
/// listings lie: `GET` of one machine stays truthful, so a client that
/// looks a missing machine up directly learns the truth. The lies are the
/// ones a real control plane meets: a proxy or gateway answering `[]` on
/// a hiccup, a page that went missing, a listing index that lags behind
/// creates (Fly documents no consistency guarantee between the list and
/// get endpoints of the Machines API; OpenAPI `Machines_list` and
/// `Machines_show` describe each alone).
///
/// In JSON: `"normal"`, `"empty"`, `{"partial": {"hidden_fraction": 0.5}}`,
/// `{"stale": {"lag_ms": 60000}}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Listing {
    /// The truth.
    #[default]
    Normal,
    /// `[]`, whatever exists.
    Empty,
    /// Hides this share (0.0..=1.0) of the machines that match, spread
    /// evenly over creation order: the same machines on every call while
    /// the set does not change.
    Partial { hidden_fraction: f64 },
    /// A listing lagging behind creates: hides machines created in the
    /// last `lag_ms` milliseconds.
    Stale { lag_ms: u64 },
}

impl Listing {
    /// Whether the machine at `position` (0-based, creation order) of `count`
    /// listed machines, created at `created_at`, is left out.
    pub(crate) fn hides(
        &self,
        position: usize,
        created_at: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        match *self {
            Listing::Normal => false,
            Listing::Empty => true,
            // Position i is hidden when the running count of hidden ones,
            // floor(i * f), steps up at i + 1: exactly floor(n * f) of n
            // machines, evenly spread.
            Listing::Partial { hidden_fraction } => {
                let f = hidden_fraction.clamp(0.0, 1.0);
                ((position + 1) as f64 * f).floor() > (position as f64 * f).floor()
            }
            Listing::Stale { lag_ms } => {
                let lag = chrono::Duration::milliseconds(i64::try_from(lag_ms).unwrap_or(i64::MAX));
                now.signed_duration_since(created_at) < lag
            }
        }
    }
}

/// Everything the sim can be told to do wrong, and how long state changes
/// take. Unknown fields are refused so a typo does not silently disable a
/// fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every `/v1` answer.
    pub latency_ms: u64,
    /// A uniformly random extra `0..=latency_jitter_ms` on top of `latency_ms`.
    pub latency_jitter_ms: u64,
    /// Injected errors for the operations listed here.
    pub error_rate: BTreeMap<Operation, ErrorRates>,
    /// Injected errors for every operation not listed in `error_rate`.
    pub error_rate_all: ErrorRates,
    /// `Retry-After` seconds on an injected 429.
    pub retry_after_secs: u64,
    /// How long an injected timeout holds the request before its 504.
    pub timeout_ms: u64,
    /// Create does create (and launch) the machine but answers 500.
    pub create_succeeds_but_errors_rate: f64,
    /// A launch (start, or create without `skip_launch`) is accepted but the
    /// machine ends `failed` instead of `started`.
    pub start_fails_rate: f64,
    /// Chance that a machine reaching `started` later stops by itself.
    pub die_rate: f64,
    /// `[min, max]` milliseconds after `started` at which a dying machine stops.
    pub die_after_ms: [u64; 2],
    /// How long a create takes before it answers (the machine exists
    /// from the answer on). 0 by default, so tests of Flotilla's own logic
    /// are fast; [`Faults::published_typical`] sets the providers' figure.
    pub create_delay_ms: u64,
    /// `starting` → `started`.
    pub start_delay_ms: u64,
    /// `stopping` → `stopped`, and `suspending` → `suspended`.
    pub stop_delay_ms: u64,
    /// `destroying` → `destroyed`.
    pub destroy_delay_ms: u64,
    /// How long `GET` still shows a destroyed machine before answering 404.
    pub destroyed_linger_ms: u64,
    /// How long a volume stays bound to its machine after the machine
    /// reached `destroyed`; a volume delete meanwhile is Fly's 412 "volume
    /// is currently bound to machine". Fly documents no figure: the default
    /// (1.5 s) is our estimate of the lag users report.
    pub volume_release_delay_ms: u64,
    /// Fly's published per-machine rate limits (1 request/s per action per
    /// machine, burst 3; `GET` of a machine 5/s, burst 10), answered with
    /// 429 and `Retry-After`. On by default, as on Fly.
    pub rate_limits: bool,
    /// Chance that a machine on its way to `started` passes through one of
    /// Fly's transient states (`replacing`, `updating`, `restarting`) first.
    pub transient_state_rate: f64,
    /// How long such a transient state lasts.
    pub transient_state_ms: u64,
    /// What machine listings answer (see [`Listing`]); `GET` of a machine
    /// is never affected by it.
    pub listing: Listing,
    /// Share of `GET`s of a machine that exists answered 404 all the same,
    /// as a gateway that cannot route to the app's backend or an
    /// application-level error in front of the API would. The answer is
    /// exactly the one a missing machine gets (status and body): a client
    /// cannot tell them apart, and Flotilla's classification never reads
    /// bodies, so only a second, independent look (a listing, a later
    /// read) can. Fly documents 404 for unknown machines only (OpenAPI
    /// `Machines_show`); this is the fault on top.
    pub get_not_found_rate: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            latency_jitter_ms: 0,
            error_rate: BTreeMap::new(),
            error_rate_all: ErrorRates::default(),
            retry_after_secs: 1,
            timeout_ms: 10_000,
            create_succeeds_but_errors_rate: 0.0,
            start_fails_rate: 0.0,
            die_rate: 0.0,
            die_after_ms: [1_000, 10_000],
            create_delay_ms: 0,
            start_delay_ms: 50,
            stop_delay_ms: 50,
            destroy_delay_ms: 20,
            destroyed_linger_ms: 2_000,
            volume_release_delay_ms: 1_500,
            rate_limits: true,
            transient_state_rate: 0.0,
            transient_state_ms: 100,
            listing: Listing::Normal,
            get_not_found_rate: 0.0,
        }
    }
}

/// A fault set that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid faults: {0}")]
pub struct InvalidFaults(pub String);

/// What the dice decided for one request before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    RateLimited {
        retry_after_secs: u64,
    },
    Internal,
    Unavailable,
    /// Hold the request this long, then answer 504 without acting.
    Timeout(Duration),
}

impl Faults {
    /// The same rules with no faults and no delays at all: what benchmarks
    /// of Flotilla's own overhead run against. Every refusal (a wait for
    /// `stopped` without `instance_id`, unknown fields, rate limits, unknown
    /// apps) still applies.
    pub fn instant() -> Self {
        Faults {
            start_delay_ms: 0,
            stop_delay_ms: 0,
            destroy_delay_ms: 0,
            destroyed_linger_ms: 0,
            volume_release_delay_ms: 0,
            transient_state_ms: 0,
            ..Faults::default()
        }
    }

    /// The providers' published typical latencies, for benchmarks that
    /// compare paths whose cost is the provider's (a warm start against a
    /// cold create), with no fault injected:
    /// - start of a created or stopped machine, 300 ms: Fly documents
    ///   Machines as started and stopped "at subsecond speeds"
    ///   (fly.io/docs/machines) and booting "in about 300ms"
    ///   (fly.io/docs/app-guides/functions-with-machines);
    /// - create, 2 s: neither provider publishes a figure for a create
    ///   (Fly's flyctl reference says a Machine is "created, and then
    ///   quickly started", fly.io/docs/flyctl/machine; Scaleway says
    ///   Instances deploy "in seconds"); 2 s is our estimate of "seconds"
    ///   for an image already in the region, so the bench's cold figure is
    ///   a lower bound of what a real create costs;
    /// - stop 300 ms and destroy 300 ms, as for a start (the same
    ///   "subsecond" page).
    pub fn published_typical() -> Self {
        Faults {
            create_delay_ms: 2_000,
            start_delay_ms: 300,
            stop_delay_ms: 300,
            destroy_delay_ms: 300,
            ..Faults::default()
        }
    }

    pub fn validate(&self) -> Result<(), InvalidFaults> {
        let singles = [
            (
                "create_succeeds_but_errors_rate",
                self.create_succeeds_but_errors_rate,
            ),
            ("start_fails_rate", self.start_fails_rate),
            ("die_rate", self.die_rate),
            ("transient_state_rate", self.transient_state_rate),
            ("get_not_found_rate", self.get_not_found_rate),
        ];
        for (name, rate) in singles {
            check_rate(name, rate)?;
        }
        if let Listing::Partial { hidden_fraction } = self.listing {
            check_rate("listing.partial.hidden_fraction", hidden_fraction)?;
        }
        let tables = std::iter::once(("error_rate_all", &self.error_rate_all))
            .chain(self.error_rate.iter().map(|(op, r)| (op.as_str(), r)));
        for (scope, rates) in tables {
            let mut sum = 0.0;
            for (name, rate) in rates.rates() {
                check_rate(&format!("{scope}.{name}"), rate)?;
                sum += rate;
            }
            if sum > 1.0 {
                return Err(InvalidFaults(format!(
                    "{scope}: rates add up to {sum}, more than 1.0"
                )));
            }
        }
        let [min, max] = self.die_after_ms;
        if min > max {
            return Err(InvalidFaults(format!(
                "die_after_ms: min {min} is above max {max}"
            )));
        }
        Ok(())
    }

    pub(crate) fn error_rates(&self, op: Operation) -> &ErrorRates {
        self.error_rate.get(&op).unwrap_or(&self.error_rate_all)
    }

    /// The extra delay this request gets before anything else happens.
    pub(crate) fn roll_latency(&self) -> Duration {
        let jitter = if self.latency_jitter_ms == 0 {
            0
        } else {
            rand::random_range(0..=self.latency_jitter_ms)
        };
        Duration::from_millis(self.latency_ms.saturating_add(jitter))
    }

    /// One roll decides among the error kinds, so their rates add up.
    pub(crate) fn roll_error(&self, op: Operation) -> Option<Injected> {
        let rates = self.error_rates(op);
        let roll: f64 = rand::random();
        let outcomes = [
            (
                rates.rate_429,
                Injected::RateLimited {
                    retry_after_secs: self.retry_after_secs,
                },
            ),
            (rates.rate_500, Injected::Internal),
            (rates.rate_503, Injected::Unavailable),
            (
                rates.rate_timeout,
                Injected::Timeout(Duration::from_millis(self.timeout_ms)),
            ),
        ];
        let mut threshold = 0.0;
        for (rate, outcome) in outcomes {
            threshold += rate;
            if roll < threshold {
                return Some(outcome);
            }
        }
        None
    }

    /// How long after reaching `started` this machine dies, if it does.
    pub(crate) fn roll_death(&self) -> Option<Duration> {
        if !chance(self.die_rate) {
            return None;
        }
        let [min, max] = self.die_after_ms;
        let ms = if min >= max {
            min
        } else {
            rand::random_range(min..=max)
        };
        Some(Duration::from_millis(ms))
    }
}

/// True with probability `p`; never panics on a rate outside 0..=1.
pub(crate) fn chance(p: f64) -> bool {
    p > 0.0 && rand::random::<f64>() < p
}

fn check_rate(name: &str, rate: f64) -> Result<(), InvalidFaults> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(InvalidFaults(format!(
            "{name} must be between 0.0 and 1.0, got {rate}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_above_one_in_total_are_refused() {
        let mut faults = Faults::default();
        faults.error_rate.insert(
            Operation::Create,
            ErrorRates {
                rate_500: 0.6,
                rate_503: 0.6,
                ..ErrorRates::default()
            },
        );
        assert!(faults.validate().is_err());
    }

    #[test]
    fn an_operation_entry_overrides_the_all_rates() {
        let mut faults = Faults {
            error_rate_all: ErrorRates {
                rate_500: 1.0,
                ..ErrorRates::default()
            },
            ..Faults::default()
        };
        faults
            .error_rate
            .insert(Operation::Get, ErrorRates::default());
        assert_eq!(faults.roll_error(Operation::Get), None);
        assert_eq!(faults.roll_error(Operation::List), Some(Injected::Internal));
    }

    #[test]
    fn listing_lies_parse_from_json_and_a_bad_one_is_refused() {
        let parsed: Faults =
            serde_json::from_str(r#"{"listing": {"partial": {"hidden_fraction": 0.25}}}"#).unwrap();
        assert_eq!(
            parsed.listing,
            Listing::Partial {
                hidden_fraction: 0.25
            }
        );
        let parsed: Faults = serde_json::from_str(r#"{"listing": "empty"}"#).unwrap();
        assert_eq!(parsed.listing, Listing::Empty);
        let parsed: Faults =
            serde_json::from_str(r#"{"listing": {"stale": {"lag_ms": 500}}}"#).unwrap();
        assert_eq!(parsed.listing, Listing::Stale { lag_ms: 500 });
        assert!(
            serde_json::from_str::<Faults>(r#"{"listing": {"partial": {"hidden": 0.5}}}"#).is_err(),
            "a misspelled field of a lie is refused"
        );
        assert!(serde_json::from_str::<Faults>(r#"{"listing": "lying"}"#).is_err());
        let out_of_range = Faults {
            listing: Listing::Partial {
                hidden_fraction: 1.5,
            },
            ..Faults::default()
        };
        let err = out_of_range.validate().unwrap_err();
        assert!(err.0.contains("listing.partial.hidden_fraction"), "{err}");
    }

    #[test]
    fn a_partial_listing_hides_its_share_evenly_and_a_stale_one_hides_the_young() {
        let now = chrono::Utc::now();
        let hidden = |l: Listing, n: usize| (0..n).filter(|i| l.hides(*i, now, now)).count();
        let partial = |f| Listing::Partial { hidden_fraction: f };
        assert_eq!(hidden(partial(0.5), 4), 2);
        assert_eq!(hidden(partial(0.4), 5), 2);
        assert_eq!(hidden(partial(0.0), 7), 0);
        assert_eq!(hidden(partial(1.0), 7), 7);
        assert_eq!(hidden(Listing::Empty, 3), 3);
        assert_eq!(hidden(Listing::Normal, 3), 0);
        let stale = Listing::Stale { lag_ms: 1_000 };
        assert!(stale.hides(0, now - chrono::Duration::milliseconds(999), now));
        assert!(!stale.hides(0, now - chrono::Duration::milliseconds(1_000), now));
    }

    #[test]
    fn a_misspelled_knob_is_refused() {
        let parsed = serde_json::from_str::<Faults>(r#"{"start_fail_rate": 1.0}"#);
        assert!(parsed.is_err());
    }
}
