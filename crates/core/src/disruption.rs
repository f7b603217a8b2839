//! Voluntary disruption: why capacity takes a healthy instance away, how
//! many it may take at once (a pool's disruption budget), and the labels
//! and names of the instances it and the watchdog create in their place.
//!
//! Design notes: the budget follows Karpenter's `NodePool` disruption
//! budgets (a count, or a percentage of the pool's instances rounded up,
//! 10 % by default) so that a small pool can still make progress one
//! instance at a time, while `0` holds every voluntary disruption. Only
//! voluntary acts are budgeted — scale-down of serving instances, expiry
//! (max lifetime), idle stop. A dead worker's replacement is involuntary
//! and is never held by it (the watchdog's storm guard covers that), nor is
//! an operator's explicit `Terminate` or a forced pool deletion.

use std::fmt;
use std::str::FromStr;

/// Label (key, value) on the instances pool capacity created and manages.
pub const MANAGED_LABEL: (&str, &str) = ("flotilla.dev/managed-by", "capacity");

/// Label on a replacement, naming the instance it replaces.
pub const REPLACES_LABEL: &str = "flotilla.dev/replaces";

/// Why capacity is taking a healthy instance away (the instances'
/// `disruption` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disruption {
    /// Above the desired capacity: a serving instance is scaled down.
    ScaleDown,
    /// Past the pool's max lifetime, its replacement on the way (surge):
    /// it still serves until the replacement is `ready`.
    Expiring,
    /// Past the pool's max lifetime and replaced: being drained.
    Expired,
    /// Reported idle for the pool's idle timeout: being drained.
    Idle,
}

impl Disruption {
    pub const ALL: [Disruption; 4] = [
        Disruption::ScaleDown,
        Disruption::Expiring,
        Disruption::Expired,
        Disruption::Idle,
    ];

    /// The column's (and the metrics label's) spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Disruption::ScaleDown => "scale_down",
            Disruption::Expiring => "expiring",
            Disruption::Expired => "expired",
            Disruption::Idle => "idle",
        }
    }

    /// The terminate reason recorded in the instance's history.
    pub const fn reason(self) -> &'static str {
        match self {
            Disruption::ScaleDown => "scale down",
            Disruption::Expiring => "max lifetime reached; replacement requested",
            Disruption::Expired => "max lifetime reached; replacement ready",
            Disruption::Idle => "idle for the pool's idle timeout",
        }
    }
}

impl fmt::Display for Disruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Disruption {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Disruption::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| format!("unknown disruption {s:?}"))
    }
}

impl TryFrom<String> for Disruption {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What idle stop does with an idle instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdleAction {
    /// Drain and terminate it.
    #[default]
    Terminate,
    /// Drain it, stop its machine and return it to the pool's warm stock
    /// (a stopped machine is billed for its storage only, and starts
    /// again in about a second on Fly).
    Stop,
}

impl IdleAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            IdleAction::Terminate => "terminate",
            IdleAction::Stop => "stop",
        }
    }
}

impl FromStr for IdleAction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "terminate" => Ok(IdleAction::Terminate),
            "stop" => Ok(IdleAction::Stop),
            other => Err(format!(
                "{other:?} is not an idle action: give terminate or stop"
            )),
        }
    }
}

/// Most instances of a pool voluntarily disrupted at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// At most this many.
    Count(u32),
    /// At most this percentage of the pool's instances, rounded up.
    Percent(u8),
}

/// A budget that cannot be parsed; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a disruption budget: give a count (0-10000) or a percentage (0%-100%)")]
pub struct BadBudget(pub String);

impl Budget {
    /// Karpenter's default.
    pub const DEFAULT: Budget = Budget::Percent(10);

    /// How many of `total` instances may be disrupted at once.
    pub fn allowed(self, total: i64) -> i64 {
        let total = total.max(0);
        match self {
            Budget::Count(n) => i64::from(n),
            Budget::Percent(p) => (total * i64::from(p) + 99) / 100,
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::DEFAULT
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Count(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Budget {
    type Err = BadBudget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadBudget(s.to_owned());
        let digits =
            |d: &str| !d.is_empty() && d.len() <= 5 && d.bytes().all(|b| b.is_ascii_digit());
        match s.strip_suffix('%') {
            Some(p) if digits(p) => match p.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Budget::Percent(p)),
                _ => Err(bad()),
            },
            Some(_) => Err(bad()),
            None if digits(s) => match s.parse::<u32>() {
                Ok(n) if n <= 10_000 => Ok(Budget::Count(n)),
                _ => Err(bad()),
            },
            None => Err(bad()),
        }
    }
}

const SUFFIX_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_suffix(len: usize) -> String {
    (0..len)
        .map(|_| SUFFIX_ALPHABET[rand::random_range(0..SUFFIX_ALPHABET.len())] as char)
        .collect()
}

/// `<pool>-<8 lowercase alphanumerics>`, within the 63-char name limit:
/// the name of an instance capacity asks for.
pub fn generated_name(pool: &str) -> String {
    let prefix: String = pool.chars().take(54).collect();
    format!("{prefix}-{}", random_suffix(8))
}

/// `<name>-r<4 random>`, within the 63-char limit; see [`replacement_name_with`].
pub fn replacement_name(name: &str, is_replacement: bool) -> String {
    replacement_name_with(name, is_replacement, &random_suffix(4))
}

/// The name of the replacement of `name` with `suffix`: `<base>-r<suffix>`.
/// A replacement's own `-r<4>` suffix is dropped first, so names stay one
/// suffix long whatever the generation (`web-rab12` → `web-rcd34`, never
/// `web-rab12-rcd34`). Only when the instance is itself a replacement
/// (`is_replacement`): an operator's `app-rails` keeps its name whole. The
/// base is cut to fit 63 characters and never ends with `-` (no `--`).
pub fn replacement_name_with(name: &str, is_replacement: bool, suffix: &str) -> String {
    let base = match name.rsplit_once("-r") {
        Some((base, tail))
            if is_replacement
                && !base.is_empty()
                && tail.len() == 4
                && tail.bytes().all(|b| SUFFIX_ALPHABET.contains(&b)) =>
        {
            base
        }
        _ => name,
    };
    let limit = 63 - 2 - suffix.chars().count();
    let cut: String = base.chars().take(limit).collect();
    let cut = cut.trim_end_matches('-');
    format!("{cut}-r{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_karpenter_spells_them_and_nothing_else() {
        assert_eq!("10%".parse(), Ok(Budget::Percent(10)));
        assert_eq!("0%".parse(), Ok(Budget::Percent(0)));
        assert_eq!("100%".parse(), Ok(Budget::Percent(100)));
        assert_eq!("3".parse(), Ok(Budget::Count(3)));
        assert_eq!("0".parse(), Ok(Budget::Count(0)));
        for bad in [
            "", "%", "101%", "-1", "1.5", "10 %", "ten", "10001", "+3", "3%%",
        ] {
            assert!(bad.parse::<Budget>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Budget::default().to_string(), "10%");
        assert_eq!(Budget::Count(4).to_string(), "4");
    }

    #[test]
    fn a_percentage_rounds_up_so_a_small_pool_still_moves() {
        assert_eq!(Budget::Percent(10).allowed(3), 1);
        assert_eq!(Budget::Percent(10).allowed(10), 1);
        assert_eq!(Budget::Percent(10).allowed(11), 2);
        assert_eq!(Budget::Percent(10).allowed(0), 0);
        assert_eq!(Budget::Percent(0).allowed(50), 0);
        assert_eq!(Budget::Percent(100).allowed(7), 7);
        assert_eq!(Budget::Count(2).allowed(100), 2);
        assert_eq!(Budget::Count(0).allowed(100), 0);
    }

    #[test]
    fn disruptions_round_trip_their_spelling() {
        for d in Disruption::ALL {
            assert_eq!(d.as_str().parse::<Disruption>(), Ok(d));
        }
        assert!("expiry".parse::<Disruption>().is_err());
    }

    #[test]
    fn a_replacement_of_a_replacement_keeps_one_short_suffix() {
        assert_eq!(replacement_name_with("web", false, "ab12"), "web-rab12");
        assert_eq!(
            replacement_name_with("web-rab12", true, "cd34"),
            "web-rcd34"
        );
        // An operator's name that merely looks like one is kept whole.
        assert_eq!(
            replacement_name_with("app-rails", false, "cd34"),
            "app-rails-rcd34"
        );
        // Ten generations stay as short as the first.
        let mut name = "gpu-worker-1".to_owned();
        for generation in 0..10 {
            name = replacement_name(&name, generation > 0);
            assert_eq!(name.len(), "gpu-worker-1-rxxxx".len(), "{name}");
            assert!(name.starts_with("gpu-worker-1-r"), "{name}");
        }
        // At the length limit the base is cut, never leaving `--`.
        let long = format!("{}-{}", "a".repeat(56), "b".repeat(6));
        let replaced = replacement_name_with(&long, false, "ef56");
        assert_eq!(replaced.len(), 62, "{replaced}");
        assert!(!replaced.contains("--"), "{replaced}");
        let max = "a".repeat(63);
        assert_eq!(replacement_name_with(&max, false, "ef56").len(), 63);
    }

    #[test]
    fn generated_names_fit_the_limit() {
        assert!(generated_name("gpu").starts_with("gpu-"));
        assert_eq!(generated_name(&"p".repeat(63)).len(), 63);
    }
}
