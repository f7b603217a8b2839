//! Input checks for the Provider API: every refusal is INVALID_ARGUMENT
//! naming the field, decided before anything reaches a provider.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_core::InstanceId;
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_provider::MachineState;
use tonic::Status;

pub const MAX_ENV: usize = 64;
pub const MAX_TAGS: usize = 32;
pub const MAX_VOLUMES: usize = 8;
pub const MAX_PAGE: u32 = 1000;

/// A checked target.
#[derive(Debug, Clone)]
pub struct Target {
    pub provider: String,
    pub pool: String,
    pub region: String,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn target(t: Option<&v1::ProviderTarget>, configured: &[String]) -> Result<Target, Status> {
    let t = t.ok_or_else(|| invalid_field("target", "is required"))?;
    if t.provider.is_empty() {
        return Err(invalid_field("target.provider", "is required"));
    }
    if !configured.iter().any(|k| k == &t.provider) {
        return Err(invalid_field(
            "target.provider",
            format!(
                "{:?} is not configured in this adapter (configured: {})",
                t.provider,
                configured.join(", ")
            ),
        ));
    }
    if !dns_label(&t.pool) {
        return Err(invalid_field(
            "target.pool",
            format!(
                "{:?} is not a pool name (1-63 chars, [a-z0-9-], starting with a letter)",
                t.pool
            ),
        ));
    }
    let region_ok = t.region.len() <= 32
        && t.region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok {
        return Err(invalid_field(
            "target.region",
            format!("{:?} is not a region", t.region),
        ));
    }
    Ok(Target {
        provider: t.provider.clone(),
        pool: t.pool.clone(),
        region: t.region.clone(),
    })
}

pub fn resource_id<'a>(field: &str, id: &'a str) -> Result<&'a str, Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?' && b != b'#');
    if ok {
        Ok(id)
    } else if id.is_empty() {
        Err(invalid_field(field, "is required"))
    } else {
        Err(invalid_field(field, format!("{id:?} is not a valid id")))
    }
}

pub fn instance_id(id: &str) -> Result<InstanceId, Status> {
    id.parse()
        .map_err(|_| invalid_field("instance_id", format!("{id:?} is not a UUID")))
}

pub fn name(name: &str) -> Result<(), Status> {
    if dns_label(name) {
        Ok(())
    } else {
        Err(invalid_field(
            "name",
            format!("{name:?}: 1-63 chars, [a-z0-9-], starting with a letter"),
        ))
    }
}

pub fn non_empty(field: &str, v: &str, max: usize) -> Result<(), Status> {
    if v.is_empty() {
        Err(invalid_field(field, "is required"))
    } else if v.len() > max {
        Err(invalid_field(field, format!("longer than {max} chars")))
    } else {
        Ok(())
    }
}

pub fn env(env: &HashMap<String, String>) -> Result<(), Status> {
    if env.len() > MAX_ENV {
        return Err(invalid_field("env", format!("more than {MAX_ENV} entries")));
    }
    for (k, v) in env {
        let key_ok = !k.is_empty()
            && k.len() <= 128
            && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            return Err(invalid_field(
                "env",
                format!("{k:?} is not a variable name"),
            ));
        }
        if v.len() > 4096 {
            return Err(invalid_field(
                "env",
                format!("value of {k} is longer than 4096 bytes"),
            ));
        }
    }
    Ok(())
}

pub fn tags(tags: &HashMap<String, String>) -> Result<(), Status> {
    if tags.len() > MAX_TAGS {
        return Err(invalid_field("tags", format!("more than {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.starts_with(flotilla_core::tags::RESERVED_PREFIX) {
            return Err(invalid_field(
                "tags",
                format!("{k:?}: flotilla_* keys are set by the adapter"),
            ));
        }
        if k.is_empty() || k.len() > 63 || v.len() > 255 {
            return Err(invalid_field(
                "tags",
                format!("{k:?}: key 1-63 chars, value up to 255"),
            ));
        }
    }
    Ok(())
}

pub fn volume_ids(ids: &[String]) -> Result<(), Status> {
    if ids.len() > MAX_VOLUMES {
        return Err(invalid_field(
            "volume_ids",
            format!("more than {MAX_VOLUMES} volumes"),
        ));
    }
    for id in ids {
        resource_id("volume_ids", id)?;
    }
    Ok(())
}

/// The largest volume any provider takes: Scaleway Block Storage's 10 TB.
/// Each provider refuses what is above its own limit (Fly: 500 GB).
pub const MAX_VOLUME_GB: u32 = 10_000;

pub fn size_gb(size: u32) -> Result<u32, Status> {
    if (1..=MAX_VOLUME_GB).contains(&size) {
        Ok(size)
    } else {
        Err(invalid_field(
            "size_gb",
            format!("{size} is outside 1..={MAX_VOLUME_GB}"),
        ))
    }
}

pub fn wait_state(s: i32) -> Result<MachineState, Status> {
    match v1::MachineState::try_from(s) {
        Ok(v1::MachineState::Started) => Ok(MachineState::Started),
        Ok(v1::MachineState::Stopped) => Ok(MachineState::Stopped),
        Ok(v1::MachineState::Suspended) => Ok(MachineState::Suspended),
        Ok(v1::MachineState::Destroyed) => Ok(MachineState::Destroyed),
        _ => Err(invalid_field(
            "state",
            "must be STARTED, STOPPED, SUSPENDED or DESTROYED",
        )),
    }
}

/// A protobuf duration within `[min, max]`, or `default` when unset.
pub fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, Status> {
    let Some(d) = d else { return Ok(default) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(invalid_field(field, "is negative"));
    }
    let v = Duration::new(d.seconds as u64, d.nanos as u32);
    if v < min || v > max {
        return Err(invalid_field(
            field,
            format!("{v:?} is outside {min:?}..={max:?}"),
        ));
    }
    Ok(v)
}

pub fn page_size(size: u32) -> Result<u32, Status> {
    if size > MAX_PAGE {
        Err(invalid_field(
            "page_size",
            format!("{size} is above {MAX_PAGE}"),
        ))
    } else {
        Ok(size)
    }
}
