//! What Scaleway sends and how Flotilla reads it: the Instance, Block
//! Storage and IPAM answers (the fields Flotilla uses), the state
//! vocabularies, `key=value` tags, paging, and the classification of error
//! answers by the resource they name.
//!
//! Shapes follow scaleway-sdk-go (`api/instance/v1/instance_sdk.go`,
//! `api/block/v1/block_sdk.go`, `api/ipam/v1/ipam_sdk.go`, `scw/errors.go`)
//! and recorded answers in terraform-provider-scaleway's test cassettes.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Deserializer};

use crate::http::classify_status;
use crate::types::*;
use crate::{ProviderError, ProviderResult};

/// Scaleway's largest page (Instance `per_page`, Block `page_size`).
pub const MAX_PER_PAGE: u32 = 100;

/// Scaleway sizes are decimal: 1 GB is 10^9 bytes.
pub const GB: u64 = 1_000_000_000;

/// Block Storage volume sizes Scaleway accepts: 1 GB to 10 TB
/// (block_sdk.go, `CreateVolumeRequestFromEmpty.Size`; Block Storage docs).
pub const BLOCK_SIZE_GB: std::ops::RangeInclusive<u32> = 1..=10_000;

/// A 429 from Scaleway carries no `Retry-After`; this is the least pause
/// Flotilla takes on its own before calling again.
pub const RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(1);

/// Tag on a root volume naming the server it was made for, so it can be
/// found and deleted after the server is gone (the server's DELETE only
/// detaches it).
pub const TAG_MACHINE: &str = "flotilla_machine_id";
/// Tag on a volume saying what it is for (`root`); data volumes have none.
pub use flotilla_core::tags::TAG_VOLUME_ROLE as TAG_ROLE;
pub const ROLE_ROOT: &str = "root";

/// Reads `null` as the type's default: Scaleway sends `null` for empty
/// lists and names as often as it omits them.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
pub struct ServerEnvelope {
    pub server: ApiServer,
}

#[derive(Deserialize)]
pub struct ServerList {
    #[serde(default, deserialize_with = "nullable")]
    pub servers: Vec<ApiServer>,
}

/// A server (instance_sdk.go, `Server`), the fields Flotilla reads.
#[derive(Deserialize)]
pub struct ApiServer {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub commercial_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub creation_date: Option<String>,
    /// Always `null` with routed IPs (every new server); see `private_nics`.
    #[serde(default)]
    pub private_ip: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub zone: String,
    /// The actions the server accepts in its current state.
    #[serde(default, deserialize_with = "nullable")]
    pub allowed_actions: Vec<String>,
    /// Slot "0" is the root volume.
    #[serde(default, deserialize_with = "nullable")]
    pub volumes: BTreeMap<String, ServerVolume>,
    #[serde(default, deserialize_with = "nullable")]
    pub private_nics: Vec<PrivateNic>,
}

impl ApiServer {
    pub fn allows(&self, action: &str) -> bool {
        self.allowed_actions.iter().any(|a| a == action)
    }

    /// The root volume when it lives in the Block Storage API (the only
    /// kind a server delete leaves behind).
    pub fn block_root(&self) -> Option<&str> {
        self.volumes
            .get("0")
            .filter(|v| v.volume_type == "sbs_volume")
            .map(|v| v.id.as_str())
    }
}

#[derive(Deserialize)]
pub struct ServerVolume {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub volume_type: String,
}

/// instance_sdk.go, `PrivateNIC`.
#[derive(Deserialize)]
pub struct PrivateNic {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub private_network_id: String,
}

/// A Block Storage volume (block_sdk.go, `Volume`).
#[derive(Deserialize)]
pub struct BlockVolume {
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    /// Bytes.
    #[serde(default, deserialize_with = "nullable")]
    pub size: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub references: Vec<Reference>,
    #[serde(default, deserialize_with = "nullable")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub zone: String,
}

impl BlockVolume {
    /// The server holding the volume: any reference not yet `detached`
    /// (block_sdk.go, `ReferenceStatus`: attaching, attached, detaching…).
    pub fn holder(&self) -> Option<&Reference> {
        self.references.iter().find(|r| r.status != "detached")
    }
}

/// block_sdk.go, `Reference`.
#[derive(Deserialize)]
pub struct Reference {
    #[serde(default, deserialize_with = "nullable")]
    pub product_resource_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub product_resource_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
}

#[derive(Deserialize)]
pub struct BlockList {
    #[serde(default, deserialize_with = "nullable")]
    pub volumes: Vec<BlockVolume>,
    #[serde(default)]
    pub total_count: Option<u64>,
}

/// ipam_sdk.go, `ListIPsResponse`.
#[derive(Deserialize)]
pub struct IpamList {
    #[serde(default, deserialize_with = "nullable")]
    pub ips: Vec<IpamIp>,
}

#[derive(Deserialize)]
pub struct IpamIp {
    /// CIDR notation: `10.2.4.2/22`.
    pub address: String,
    #[serde(default)]
    pub is_ipv6: bool,
}

/// scw/errors.go, `ResponseError` and the standard errors it becomes.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    kind: String,
    #[serde(default, deserialize_with = "nullable")]
    message: String,
    #[serde(default, deserialize_with = "nullable")]
    resource: String,
    #[serde(default, deserialize_with = "nullable")]
    resource_id: String,
}

/// The resource a request is about: a 404 is "gone" only when it names it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// As Scaleway names it in a 404: `instance_server`, `volume` (Block).
    pub resource: &'static str,
    pub id: &'a str,
}

/// Classifies an error answer. On top of [`classify_status`]:
/// - 404 is `NotFound` only when its body names `subject` (scw/errors.go
///   `ResourceNotFoundError`; the Instance API's older `unknown_resource`
///   shape names the id in its message). A 404 naming another resource (an
///   image, a project, a volume in the request) is `InvalidArgument`; one
///   naming nothing (a wrong path or zone) is `Unavailable`: neither says
///   the subject is gone.
/// - `quotas_exceeded` (403) is `ResourceExhausted`, as is the Instance
///   API's `invalid_request_error` "quota exceeded for this resource".
/// - 429 has no `Retry-After`: [`RATE_LIMIT_BACKOFF`] is the least pause.
/// - `precondition_failed`, `transient_state` and `locked` are
///   `FailedPrecondition`.
pub fn classify(
    status: StatusCode,
    headers: &HeaderMap,
    body: &str,
    subject: Option<Subject<'_>>,
) -> ProviderError {
    let base = classify_status(status, headers, body);
    let parsed: ErrorBody = serde_json::from_str(body).unwrap_or_default();
    let message = base.to_string();
    match status.as_u16() {
        404 => {
            let names_subject = subject.is_some_and(|s| match parsed.kind.as_str() {
                "not_found" => {
                    parsed.resource == s.resource
                        && (parsed.resource_id.is_empty() || parsed.resource_id == s.id)
                }
                "unknown_resource" => parsed.message.contains(s.id),
                _ => false,
            });
            if names_subject {
                base
            } else if !parsed.resource.is_empty() {
                ProviderError::InvalidArgument(format!(
                    "Scaleway has no {} {:?} (check the zone, project and references): {message}",
                    parsed.resource, parsed.resource_id
                ))
            } else {
                ProviderError::Unavailable(format!(
                    "a 404 that names no resource (wrong zone or path?): {message}"
                ))
            }
        }
        429 => ProviderError::ResourceExhausted {
            message,
            retry_after: Some(base.retry_after().unwrap_or(RATE_LIMIT_BACKOFF)),
        },
        _ if parsed.kind == "quotas_exceeded"
            || (parsed.kind == "invalid_request_error"
                && parsed
                    .message
                    .to_ascii_lowercase()
                    .contains("quota exceeded for this resource")) =>
        {
            ProviderError::ResourceExhausted {
                message: format!("Scaleway quota reached: {message}"),
                retry_after: None,
            }
        }
        _ if matches!(
            parsed.kind.as_str(),
            "precondition_failed" | "transient_state" | "locked"
        ) =>
        {
            ProviderError::FailedPrecondition(message)
        }
        _ => base,
    }
}

/// Scaleway's server states (instance_sdk.go, `ServerState`), mapped
/// exactly. `stopped in place` still holds its node (DELETE is refused
/// until a `poweroff`), so it is not `Stopped`: it reads as on its way
/// there, and every stop, wait and delete powers it off.
pub fn server_state(s: &str) -> MachineState {
    match s {
        "running" => MachineState::Started,
        "starting" => MachineState::Starting,
        "stopping" | "stopped in place" => MachineState::Stopping,
        "stopped" => MachineState::Stopped,
        "locked" => MachineState::Failed,
        _ => MachineState::Unknown,
    }
}

/// Block volume status (block_sdk.go, `VolumeStatus`); a volume any server
/// still references is attached whatever its status.
pub fn volume_state(v: &BlockVolume) -> VolumeState {
    match v.status.as_str() {
        "error" | "locked" => VolumeState::Failed,
        "deleting" => VolumeState::Destroying,
        "deleted" => VolumeState::Destroyed,
        _ if v.holder().is_some() => VolumeState::Attached,
        "creating" => VolumeState::Creating,
        "available" => VolumeState::Available,
        _ => VolumeState::Unknown,
    }
}

/// `key=value` tags, ownership last so a spec cannot override it.
pub fn encode_tags(
    extra: &BTreeMap<String, String>,
    ownership: BTreeMap<String, String>,
) -> ProviderResult<Vec<String>> {
    let mut tags = extra.clone();
    tags.extend(ownership);
    tags.into_iter()
        .map(|(k, v)| {
            // An `=` in the key would move the split point when read back.
            if k.is_empty() || k.contains('=') {
                Err(ProviderError::InvalidArgument(format!(
                    "tags: {k:?} is not a valid tag key (non-empty, no '=')"
                )))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

/// Tags set by hand in the console may lack the `=`; they read as empty values.
pub fn decode_tags(tags: &[String]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (t.clone(), String::new()),
        })
        .collect()
}

pub fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

pub fn check_id(field: &str, id: &str) -> ProviderResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "{field}: {id:?} is not a valid id"
        )))
    }
}

/// `fr-par-1`: country, city, number (Scaleway's zone names).
pub fn is_zone(zone: &str) -> bool {
    let parts: Vec<&str> = zone.split('-').collect();
    matches!(parts.as_slice(), [c, city, n]
        if c.len() == 2 && c.bytes().all(|b| b.is_ascii_lowercase())
        && city.len() == 3 && city.bytes().all(|b| b.is_ascii_lowercase())
        && n.len() == 1 && n.bytes().all(|b| (b'1'..=b'9').contains(&b)))
}

/// The region of a zone: `fr-par-1` is in `fr-par` (the IPAM API is regional).
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(r, _)| r)
}

/// Commercial types are upper-case words and digits joined by `-`
/// (`DEV1-S`, `PRO2-XXS`, `POP2-HC-2C-4G`, `L4-1-24G`, `H100-1-80G`).
pub fn is_commercial_type(t: &str) -> bool {
    (2..=32).contains(&t.len())
        && t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        })
}

pub fn page_params(page: &PageRequest) -> ProviderResult<(u32, u32)> {
    let per_page = match page.size {
        0 => MAX_PER_PAGE,
        n => n.min(MAX_PER_PAGE),
    };
    let number = match &page.token {
        None => 1,
        Some(t) => t.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
            ProviderError::InvalidArgument(format!("page token: {t:?} is not a page number"))
        })?,
    };
    Ok((per_page, number))
}

/// The next page while more remain: by the total count when Scaleway
/// sends it (`X-Total-Count` on Instance listings, `total_count` in Block
/// ones), else while pages come back full. An empty page ends the walk.
pub fn next_page(
    total: Option<u64>,
    number: u32,
    per_page: u32,
    returned: usize,
) -> Option<String> {
    if returned == 0 {
        return None;
    }
    let more = match total {
        Some(total) => u64::from(number) * u64::from(per_page) < total,
        None => returned >= per_page as usize,
    };
    more.then(|| number.checked_add(1))
        .flatten()
        .map(|n| n.to_string())
}

pub fn total_count(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("x-total-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn every_documented_state_maps_exactly_and_stopped_in_place_is_not_stopped() {
        assert_eq!(server_state("running"), MachineState::Started);
        assert_eq!(server_state("starting"), MachineState::Starting);
        assert_eq!(server_state("stopping"), MachineState::Stopping);
        assert_eq!(server_state("stopped"), MachineState::Stopped);
        assert_eq!(server_state("stopped in place"), MachineState::Stopping);
        assert_eq!(server_state("locked"), MachineState::Failed);
        assert_eq!(server_state("provisioning"), MachineState::Unknown);
        assert_eq!(server_state(""), MachineState::Unknown);
    }

    #[test]
    fn tags_round_trip_and_ownership_wins() {
        let extra = BTreeMap::from([
            ("team".to_owned(), "a=b".to_owned()),
            (TAG_POOL.to_owned(), "spoofed".to_owned()),
        ]);
        let id = flotilla_core::InstanceId::new();
        let tags = encode_tags(&extra, ownership_tags(id, "gpu", "cp1")).expect("valid");
        let back = decode_tags(&tags);
        assert_eq!(back["team"], "a=b");
        assert_eq!(back[TAG_POOL], "gpu");
        assert_eq!(back[TAG_INSTANCE], id.to_string());
        assert_eq!(decode_tags(&["bare".to_owned()])["bare"], "");
        let bad = BTreeMap::from([("a=b".to_owned(), String::new())]);
        assert!(encode_tags(&bad, BTreeMap::new()).is_err());
    }

    #[test]
    fn pages_continue_by_total_count_or_full_pages() {
        assert_eq!(next_page(None, 1, 100, 100), Some("2".into()));
        assert_eq!(next_page(None, 1, 100, 99), None);
        assert_eq!(next_page(Some(250), 2, 100, 100), Some("3".into()));
        assert_eq!(next_page(Some(250), 3, 100, 50), None);
        assert_eq!(next_page(Some(250), 3, 100, 0), None);
        let mut h = HeaderMap::new();
        h.insert("x-total-count", HeaderValue::from_static("250"));
        assert_eq!(total_count(&h), Some(250));
        let bad = PageRequest {
            size: 0,
            token: Some("x".into()),
        };
        assert!(page_params(&bad).is_err());
        assert_eq!(page_params(&PageRequest::default()), Ok((100, 1)));
    }

    #[test]
    fn zones_and_commercial_types_are_recognised() {
        for z in ["fr-par-1", "nl-ams-3", "pl-waw-2"] {
            assert!(is_zone(z), "{z}");
        }
        for z in [
            "fr-par",
            "FR-PAR-1",
            "fr-par-0",
            "../fr-par-1",
            "fr-paris-1",
        ] {
            assert!(!is_zone(z), "{z}");
        }
        assert_eq!(region_of("fr-par-1"), "fr-par");
        for t in [
            "DEV1-S",
            "PRO2-XXS",
            "POP2-HC-2C-4G",
            "L4-1-24G",
            "H100-1-80G",
        ] {
            assert!(is_commercial_type(t), "{t}");
        }
        for t in ["dev1-s", "DEV1_S", "-S", "DEV1--S", "A"] {
            assert!(!is_commercial_type(t), "{t}");
        }
    }

    fn class(code: u16, body: &str, resource: &'static str, id: &str) -> ProviderError {
        classify(
            StatusCode::from_u16(code).expect("code"),
            &HeaderMap::new(),
            body,
            Some(Subject { resource, id }),
        )
    }

    #[test]
    fn a_404_is_gone_only_for_the_resource_it_names() {
        let id = "56a7d81a-c51c-4b3e-ad90-11663aea16c1";
        let server = format!(
            r#"{{"type":"not_found","message":"resource is not found","resource":"instance_server","resource_id":"{id}"}}"#
        );
        assert!(matches!(
            class(404, &server, "instance_server", id),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(
            class(404, &server, "instance_server", "another-id"),
            ProviderError::InvalidArgument(_)
        ));
        assert!(matches!(
            class(404, &server, "volume", id),
            ProviderError::InvalidArgument(_)
        ));
        let project = r#"{"type":"not_found","message":"resource is not found","resource":"project_id","resource_id":"d660e627-2bff-4618-b736-922141374ad2"}"#;
        assert!(matches!(
            class(404, project, "instance_server", id),
            ProviderError::InvalidArgument(_)
        ));
        assert!(matches!(
            class(404, "<html>not found</html>", "instance_server", id),
            ProviderError::Unavailable(_)
        ));
        let old = format!(r#"{{"type":"unknown_resource","message":"\"{id}\" not found"}}"#);
        assert!(matches!(
            class(404, &old, "instance_server", id),
            ProviderError::NotFound(_)
        ));
    }

    #[test]
    fn quotas_are_resource_exhausted_and_429_backs_off_on_its_own() {
        let quota = r#"{"type":"quotas_exceeded","message":"quota exceeded","details":[{"resource":"instances","quota":10,"current":10}]}"#;
        let e = class(403, quota, "instance_server", "x");
        assert!(matches!(e, ProviderError::ResourceExhausted { .. }), "{e}");
        let e = class(
            429,
            r#"{"message":"too many requests"}"#,
            "instance_server",
            "x",
        );
        assert_eq!(e.retry_after(), Some(RATE_LIMIT_BACKOFF));
        let denied = r#"{"type":"permissions_denied","message":"insufficient permissions","details":[{"resource":"instance_server","action":"create"}]}"#;
        assert!(matches!(
            class(403, denied, "instance_server", "x"),
            ProviderError::PermissionDenied(_)
        ));
        let pre = r#"{"type":"precondition_failed","precondition":"resource_still_in_use","help_message":"detach first"}"#;
        assert!(matches!(
            class(412, pre, "volume", "x"),
            ProviderError::FailedPrecondition(_)
        ));
    }
}
