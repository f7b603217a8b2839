//! Input rules of the public and worker APIs, checked before anything is
//! read or written. Every refusal is INVALID_ARGUMENT whose message starts
//! with the offending field (`names[3]: …`), so a caller can point at it.

use std::collections::{BTreeMap, HashMap};

use flotilla_core::InstanceId;
use flotilla_core::disruption::{BadBudget, Budget, IdleAction};
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_store::pool::{NewPool, PoolTimeoutsUpdate};
use tonic::Status;

/// Provider kinds a pool may name.
pub const PROVIDERS: &[&str] = &["fly", "scaleway", "local", "sim", "docker"];
/// Largest desired capacity of one pool (the schema's CHECK agrees).
pub const MAX_DESIRED_CAPACITY: u32 = 10_000;
/// Largest per-instance data volume (the schema's CHECK agrees).
/// The largest volume any provider takes (Scaleway Block Storage, 10 TB);
/// the adapter's CheckSpec refuses what a pool's provider does not (Fly: 500).
pub const MAX_VOLUME_GB: u32 = 10_000;
/// Longest phase deadline a pool may set: a week.
pub const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3600;
pub const MAX_LABELS: usize = 32;
pub const MAX_IDEMPOTENCY_KEY: usize = 128;
/// Most instance ids one call may name.
pub const MAX_IDS: usize = 1000;

/// A pool or instance name: 1-63 chars of `[a-z0-9-]`, starting with a letter.
pub fn name(field: &str, s: &str) -> Result<(), Status> {
    if s.is_empty() {
        return Err(invalid_field(field, "required"));
    }
    if s.len() > 63 {
        return Err(invalid_field(field, "at most 63 characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(invalid_field(field, "must start with a letter a-z"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid_field(field, "only a-z, 0-9 and '-' are allowed"));
    }
    Ok(())
}

/// Labels: at most 32; keys 1-63 chars of `[a-z0-9_./-]`; values at most
/// 255 chars, no control characters. Returned sorted, so the first bad key
/// reported is the same on every call.
pub fn labels(
    field: &str,
    labels: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Status> {
    if labels.len() > MAX_LABELS {
        return Err(invalid_field(field, format!("at most {MAX_LABELS} labels")));
    }
    let sorted: BTreeMap<String, String> = labels.clone().into_iter().collect();
    for (k, v) in &sorted {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'.' | b'/' | b'-')
            });
        if !key_ok {
            return Err(invalid_field(
                field,
                format!("key {k:?}: 1-63 characters of a-z, 0-9, '_', '.', '/', '-'"),
            ));
        }
        if v.chars().count() > 255 {
            return Err(invalid_field(
                field,
                format!("value of {k:?}: at most 255 characters"),
            ));
        }
        if v.chars().any(char::is_control) {
            return Err(invalid_field(
                field,
                format!("value of {k:?}: control characters are not allowed"),
            ));
        }
    }
    Ok(sorted)
}

/// An idempotency key: empty (none), or at most 128 printable ASCII chars.
pub fn idempotency_key(s: &str) -> Result<Option<String>, Status> {
    const FIELD: &str = "idempotency_key";
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_IDEMPOTENCY_KEY {
        return Err(invalid_field(
            FIELD,
            format!("at most {MAX_IDEMPOTENCY_KEY} characters"),
        ));
    }
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid_field(FIELD, "only printable ASCII is allowed"));
    }
    Ok(Some(s.to_owned()))
}

/// An instance id (a UUID).
pub fn instance_id(field: &str, s: &str) -> Result<InstanceId, Status> {
    if s.is_empty() {
        return Err(invalid_field(field, "required"));
    }
    s.parse().map_err(|_| invalid_field(field, "not a UUID"))
}

/// Free text with an upper bound in characters.
pub fn max_chars(field: &str, s: &str, max: usize) -> Result<(), Status> {
    if s.chars().count() > max {
        return Err(invalid_field(field, format!("at most {max} characters")));
    }
    Ok(())
}

/// A short provider-facing word (instance type, region): 1-64 printable
/// ASCII chars without spaces.
fn word(field: &str, s: &str) -> Result<(), Status> {
    if s.is_empty() {
        return Err(invalid_field(field, "required"));
    }
    if s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid_field(
            field,
            "1-64 printable characters without spaces",
        ));
    }
    Ok(())
}

fn to_i32(field: &str, v: u32) -> Result<i32, Status> {
    i32::try_from(v).map_err(|_| invalid_field(field, "too large"))
}

/// Phase deadlines of a pool; 0 means "the service default" (stored as NULL).
pub fn timeouts(field: &str, t: &v1::PoolTimeouts) -> Result<PoolTimeoutsUpdate, Status> {
    let one = |name: &str, v: u32| -> Result<Option<i32>, Status> {
        if v > MAX_TIMEOUT_SECONDS {
            return Err(invalid_field(
                &format!("{field}.{name}"),
                format!("at most {MAX_TIMEOUT_SECONDS} seconds"),
            ));
        }
        Ok((v > 0).then_some(v as i32))
    };
    Ok(PoolTimeoutsUpdate {
        booting_seconds: one("booting_seconds", t.booting_seconds)?,
        installing_seconds: one("installing_seconds", t.installing_seconds)?,
        starting_seconds: one("starting_seconds", t.starting_seconds)?,
        draining_seconds: one("draining_seconds", t.draining_seconds)?,
    })
}

pub fn desired_capacity(field: &str, v: u32) -> Result<i32, Status> {
    if v > MAX_DESIRED_CAPACITY {
        return Err(invalid_field(
            field,
            format!("at most {MAX_DESIRED_CAPACITY}"),
        ));
    }
    to_i32(field, v)
}

/// A pool's warm stock size (see `flotilla_store::warm`); 0 is none. The
/// same bound as the desired capacity: a pool never needs more machines
/// in reserve than it may ever run.
pub fn warm_size(field: &str, v: u32) -> Result<i32, Status> {
    if v > MAX_DESIRED_CAPACITY {
        return Err(invalid_field(
            field,
            format!(
                "at most {MAX_DESIRED_CAPACITY} (the most machines a pool may keep; 0 for no warm stock)"
            ),
        ));
    }
    to_i32(field, v)
}

pub fn price(field: &str, v: u64) -> Result<i64, Status> {
    i64::try_from(v).map_err(|_| invalid_field(field, "too large"))
}

/// Largest spend cap: a billion an hour, in micros. Beyond it is a typo
/// (or a unit mistake), not a budget.
pub const MAX_SPEND_CAP_MICROS: u64 = 1_000_000_000 * 1_000_000;

/// A pool's spend cap in micros per hour; 0 is no cap.
pub fn spend_cap(field: &str, v: u64) -> Result<i64, Status> {
    if v > MAX_SPEND_CAP_MICROS {
        return Err(invalid_field(
            field,
            format!("at most {MAX_SPEND_CAP_MICROS} (micros per hour; 0 for no cap)"),
        ));
    }
    price(field, v)
}

/// A pool's disruption budget: a count or a percentage; "" is the default.
pub fn disruption_budget(field: &str, v: &str) -> Result<Budget, Status> {
    if v.is_empty() {
        return Ok(Budget::DEFAULT);
    }
    v.parse()
        .map_err(|e: BadBudget| invalid_field(field, e.to_string()))
}

/// What idle stop does: "terminate" or "stop"; "" is `terminate`.
pub fn idle_action(field: &str, v: &str) -> Result<IdleAction, Status> {
    if v.is_empty() {
        return Ok(IdleAction::default());
    }
    v.parse().map_err(|e: String| invalid_field(field, e))
}

/// Longest max lifetime or idle timeout: a year. Beyond it is a unit
/// mistake (milliseconds for seconds), not a policy.
pub const MAX_LIFETIME_SECONDS: u32 = 366 * 24 * 3600;

/// A pool's max lifetime or idle timeout in seconds; 0 is off.
pub fn lifetime(field: &str, v: u32) -> Result<i32, Status> {
    if v > MAX_LIFETIME_SECONDS {
        return Err(invalid_field(
            field,
            format!("at most {MAX_LIFETIME_SECONDS} seconds (0 for never)"),
        ));
    }
    to_i32(field, v)
}

/// The pool a CreatePool asks for, as the store takes it.
pub fn new_pool(p: Option<&v1::Pool>) -> Result<NewPool, Status> {
    let p = p.ok_or_else(|| invalid_field("pool", "required"))?;
    name("pool.name", &p.name)?;
    if !PROVIDERS.contains(&p.provider.as_str()) {
        return Err(invalid_field(
            "pool.provider",
            format!("must be one of {}", PROVIDERS.join(", ")),
        ));
    }
    word("pool.instance_type", &p.instance_type)?;
    word("pool.region", &p.region)?;
    max_chars("pool.image", &p.image, 1024)?;
    if p.image.chars().any(char::is_control) {
        return Err(invalid_field(
            "pool.image",
            "control characters are not allowed",
        ));
    }
    if p.volume_size_gb > MAX_VOLUME_GB {
        return Err(invalid_field(
            "pool.volume_size_gb",
            format!("at most {MAX_VOLUME_GB}"),
        ));
    }
    let t = timeouts("pool.timeouts", &p.timeouts.unwrap_or_default())?;
    Ok(NewPool {
        name: p.name.clone(),
        provider: p.provider.clone(),
        instance_type: p.instance_type.clone(),
        region: p.region.clone(),
        image: p.image.clone(),
        desired_capacity: desired_capacity("pool.desired_capacity", p.desired_capacity)?,
        volume_size_gb: to_i32("pool.volume_size_gb", p.volume_size_gb)?,
        booting_timeout_seconds: t.booting_seconds,
        installing_timeout_seconds: t.installing_seconds,
        starting_timeout_seconds: t.starting_seconds,
        draining_timeout_seconds: t.draining_seconds,
        price_per_hour_micros: price("pool.price_per_hour_micros", p.price_per_hour_micros)?,
        labels: labels("pool.labels", &p.labels)?,
        health_check_url: health_check_url("pool.health_check_url", &p.health_check_url)?,
        spend_cap_per_hour_micros: spend_cap(
            "pool.spend_cap_per_hour_micros",
            p.spend_cap_per_hour_micros,
        )?,
        disruption_budget: Some(disruption_budget(
            "pool.disruption_budget",
            &p.disruption_budget,
        )?),
        max_lifetime_seconds: lifetime("pool.max_lifetime_seconds", p.max_lifetime_seconds)?,
        idle_timeout_seconds: lifetime("pool.idle_timeout_seconds", p.idle_timeout_seconds)?,
        idle_action: Some(idle_action("pool.idle_action", &p.idle_action)?),
        warm_size: warm_size("pool.warm_size", p.warm_size)?,
    })
}

/// A pool's health check URL template (see `flotilla_core::health`).
pub fn health_check_url(field: &str, v: &str) -> Result<String, Status> {
    flotilla_core::health::HealthUrl::parse(v)
        .map(|t| t.as_str().to_owned())
        .map_err(|e| invalid_field(field, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(s: Status) -> String {
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        s.message().split(':').next().unwrap_or_default().to_owned()
    }

    #[test]
    fn names_are_lowercase_words_starting_with_a_letter() {
        for ok in ["a", "gpu-1", "w0", &"a".repeat(63)] {
            assert!(name("n", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "-a",
            "A",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert_eq!(field_of(name("names[2]", bad).expect_err(bad)), "names[2]");
        }
    }

    #[test]
    fn labels_are_bounded_in_number_key_and_value() {
        let ok: HashMap<_, _> = [("team/x.y_z-1".to_owned(), "any thing ✓".to_owned())].into();
        assert_eq!(labels("labels", &ok).expect("ok").len(), 1);
        let too_many: HashMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", &too_many).is_err());
        for (k, v) in [("", "v"), ("Key", "v"), ("k k", "v"), ("k", "line\nbreak")] {
            let one: HashMap<_, _> = [(k.to_owned(), v.to_owned())].into();
            assert_eq!(field_of(labels("labels", &one).expect_err(k)), "labels");
        }
        let long: HashMap<_, _> = [("k".to_owned(), "v".repeat(256))].into();
        assert!(labels("labels", &long).is_err());
        let long_key: HashMap<_, _> = [("k".repeat(64), String::new())].into();
        assert!(labels("labels", &long_key).is_err());
    }

    #[test]
    fn idempotency_keys_are_short_printable_ascii() {
        assert_eq!(idempotency_key("").expect("ok"), None);
        assert_eq!(
            idempotency_key("a b-1").expect("ok").as_deref(),
            Some("a b-1")
        );
        for bad in ["tab\there", "é", &"k".repeat(129)] {
            assert_eq!(
                field_of(idempotency_key(bad).expect_err(bad)),
                "idempotency_key"
            );
        }
    }

    #[test]
    fn a_pool_names_its_bad_field() {
        let good = v1::Pool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "a10".into(),
            region: "ams".into(),
            ..Default::default()
        };
        assert!(new_pool(Some(&good)).is_ok());
        assert_eq!(field_of(new_pool(None).expect_err("none")), "pool");
        type Spoil = fn(&mut v1::Pool);
        let cases: [(&str, Spoil); 14] = [
            ("pool.idle_action", |p| p.idle_action = "hibernate".into()),
            ("pool.warm_size", |p| p.warm_size = 10_001),
            ("pool.name", |p| p.name = "Gpu".into()),
            ("pool.provider", |p| p.provider = "aws".into()),
            ("pool.instance_type", |p| p.instance_type.clear()),
            ("pool.region", |p| p.region = "a b".into()),
            ("pool.desired_capacity", |p| p.desired_capacity = 10_001),
            ("pool.volume_size_gb", |p| p.volume_size_gb = 10_001),
            ("pool.timeouts.booting_seconds", |p| {
                p.timeouts = Some(v1::PoolTimeouts {
                    booting_seconds: MAX_TIMEOUT_SECONDS + 1,
                    ..Default::default()
                })
            }),
            ("pool.health_check_url", |p| {
                p.health_check_url = "http://{private_ip}:8080/{token}".into()
            }),
            ("pool.spend_cap_per_hour_micros", |p| {
                p.spend_cap_per_hour_micros = MAX_SPEND_CAP_MICROS + 1
            }),
            ("pool.disruption_budget", |p| {
                p.disruption_budget = "110%".into()
            }),
            ("pool.max_lifetime_seconds", |p| {
                p.max_lifetime_seconds = MAX_LIFETIME_SECONDS + 1
            }),
            ("pool.idle_timeout_seconds", |p| {
                p.idle_timeout_seconds = MAX_LIFETIME_SECONDS + 1
            }),
        ];
        for (field, spoil) in cases {
            let mut p = good.clone();
            spoil(&mut p);
            assert_eq!(field_of(new_pool(Some(&p)).expect_err(field)), field);
        }
    }
}
