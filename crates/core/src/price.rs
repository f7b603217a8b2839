//! What machines cost: the price table by instance type (the
//! `INSTANCE_PRICES` setting), and how a pool's own price overrides it.
//!
//! Every service that counts money reads the same table through
//! [`crate::config::PriceArgs`]: the api (spend caps of `Provision`), the
//! scheduler (spend caps of pool capacity) and the watchdog (spend gauges,
//! orphan cost). Prices are whole millionths of the billing currency per
//! hour (micros), as `Pool.price_per_hour_micros` is, so sums are exact.

use std::collections::BTreeMap;

/// Millionths in one currency unit.
const MICROS_PER_UNIT: i64 = 1_000_000;

/// Price per hour of one machine, by instance type, in micros. An instance
/// type the table does not name has no price here (see [`PriceTable::unit_price`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable(BTreeMap<String, i64>);

/// Why an `INSTANCE_PRICES` value was refused: names the setting, the
/// entry (1-based) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("INSTANCE_PRICES entry {position} ({entry:?}): {why}")]
pub struct PriceError {
    pub position: usize,
    pub entry: String,
    pub why: String,
}

impl PriceTable {
    /// Parses `type=amount,type=amount,…` (amounts in currency units per
    /// hour, at most 6 decimals, e.g. `shared-cpu-1x=0.0028,a10=1.10`).
    /// Empty means no prices. A type named twice is refused rather than
    /// one of its prices silently winning.
    pub fn parse(s: &str) -> Result<PriceTable, PriceError> {
        let mut table = BTreeMap::new();
        if s.trim().is_empty() {
            return Ok(PriceTable(table));
        }
        for (i, entry) in s.split(',').enumerate() {
            let bad = |why: String| PriceError {
                position: i + 1,
                entry: entry.to_owned(),
                why,
            };
            let Some((ty, amount)) = entry.split_once('=') else {
                return Err(bad("expected type=amount".into()));
            };
            let ty = ty.trim();
            if ty.is_empty() || ty.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    "the instance type must be a word (no spaces), e.g. a10".into(),
                ));
            }
            let micros = parse_amount(amount.trim()).map_err(bad)?;
            if table.insert(ty.to_owned(), micros).is_some() {
                return Err(bad(format!("instance type {ty} is priced twice")));
            }
        }
        Ok(PriceTable(table))
    }

    /// The table's price of `instance_type`, if it has one.
    pub fn get(&self, instance_type: &str) -> Option<i64> {
        self.0.get(instance_type).copied()
    }

    /// What one machine of a pool costs per hour: the pool's own price when
    /// it has one (non-zero: pools created before the table keep theirs),
    /// else the table's price of its instance type, else 0 (unpriced).
    pub fn unit_price(&self, pool_price_micros: i64, instance_type: &str) -> i64 {
        if pool_price_micros > 0 {
            pool_price_micros
        } else {
            self.get(instance_type).unwrap_or(0)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `1.25` → 1 250 000 micros: digits, optionally a point and at most six
/// more digits. Exact (no floating point), and bounded so that sums of
/// many machines' prices cannot overflow.
pub fn parse_amount(s: &str) -> Result<i64, String> {
    let not_amount = || format!("{s:?} is not an amount such as 1.25 (at most 6 decimals)");
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
        || frac.len() > 6
        || (s.contains('.') && frac.is_empty())
    {
        return Err(not_amount());
    }
    // A billion an hour is more than any machine costs; beyond it is a typo.
    const MAX_UNITS: i64 = 1_000_000_000;
    let units: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| not_amount())?
    };
    if units > MAX_UNITS {
        return Err(format!("{s:?} is more than {MAX_UNITS} an hour"));
    }
    let frac_micros: i64 = format!("{frac:0<6}").parse().map_err(|_| not_amount())?;
    Ok(units * MICROS_PER_UNIT + frac_micros)
}

/// Micros as currency units, without trailing zeros: 1 250 000 → `1.25`,
/// 3 000 000 → `3`.
pub fn format_amount(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let (units, frac) = (m / 1_000_000, m % 1_000_000);
    if frac == 0 {
        format!("{sign}{units}")
    } else {
        let frac = format!("{frac:06}");
        format!("{sign}{units}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_parses_types_and_exact_amounts() {
        let t = PriceTable::parse(" shared-cpu-1x=0.0028, a10 = 1.10,free=0,big=12").expect("ok");
        assert_eq!(t.get("shared-cpu-1x"), Some(2_800));
        assert_eq!(t.get("a10"), Some(1_100_000));
        assert_eq!(t.get("free"), Some(0));
        assert_eq!(t.get("big"), Some(12_000_000));
        assert_eq!(t.get("GP1-XS"), None);
        assert!(PriceTable::parse("").expect("empty").is_empty());
    }

    #[test]
    fn a_bad_entry_is_named_with_its_position_and_the_setting() {
        for (value, position, why) in [
            ("a10=1,gpu", 2, "type=amount"),
            ("a10=1.1234567", 1, "6 decimals"),
            ("a10=-1", 1, "not an amount"),
            ("a10=1e3", 1, "not an amount"),
            ("a10=", 1, "not an amount"),
            ("a10=1.", 1, "not an amount"),
            ("=1", 1, "instance type"),
            ("a 10=1", 1, "instance type"),
            ("a10=1,a10=2", 2, "priced twice"),
            ("a10=1,,b=2", 2, "type=amount"),
            ("a10=99999999999", 1, "more than"),
        ] {
            let e = PriceTable::parse(value).expect_err(value);
            assert_eq!(e.position, position, "{value}: {e}");
            let text = e.to_string();
            assert!(text.starts_with("INSTANCE_PRICES entry"), "{text}");
            assert!(text.contains(why), "{value}: {text}");
        }
    }

    #[test]
    fn a_pools_own_price_overrides_the_table_and_unknown_types_are_free() {
        let t = PriceTable::parse("a10=1.5").expect("ok");
        assert_eq!(t.unit_price(0, "a10"), 1_500_000);
        assert_eq!(t.unit_price(2_000_000, "a10"), 2_000_000);
        assert_eq!(t.unit_price(0, "unknown"), 0);
        assert_eq!(t.unit_price(700, "unknown"), 700);
    }

    #[test]
    fn amounts_print_without_trailing_zeros() {
        assert_eq!(format_amount(1_250_000), "1.25");
        assert_eq!(format_amount(3_000_000), "3");
        assert_eq!(format_amount(2_800), "0.0028");
        assert_eq!(format_amount(0), "0");
        assert_eq!(parse_amount(&format_amount(123_456_789)), Ok(123_456_789));
    }
}
