//! The Scaleway provider against an in-process fake of the Instance API v1,
//! the Block Storage API v1 and the IPAM API v1, written only from
//! Scaleway's published material. Every rule cites its source (repository
//! and path); every rule is on unless a test turns a fault on by name.
//!
//! Sources:
//! - [SDK-I] scaleway/scaleway-sdk-go `api/instance/v1/instance_sdk.go`
//! - [SDK-B] scaleway/scaleway-sdk-go `api/block/v1/block_sdk.go`
//! - [SDK-IPAM] scaleway/scaleway-sdk-go `api/ipam/v1/ipam_sdk.go`
//! - [SDK-E] scaleway/scaleway-sdk-go `scw/errors.go`
//! - [TF-ROOT] scaleway/terraform-provider-scaleway
//!   `internal/services/instance/testdata/server-root-volume-from-image-block.cassette.yaml`
//! - [TF-STATE] scaleway/terraform-provider-scaleway
//!   `internal/services/instance/testdata/server-state-stop.cassette.yaml`
//! - [TF-PN] scaleway/terraform-provider-scaleway
//!   `internal/services/instance/testdata/server-private-network.cassette.yaml`
//! - [TF-BLOCK] scaleway/terraform-provider-scaleway
//!   `internal/services/block/testdata/volume-basic.cassette.yaml`
//! - [TF-DEL] scaleway/terraform-provider-scaleway
//!   `internal/services/instance/server.go` (`ResourceInstanceServerDelete`
//!   deletes the root volume itself after the server) and
//!   `internal/services/instance/instancehelpers/block.go`
//!   (`DeleteUnknownVolume`: Block volumes through the Block API)
//! - [MIGRATION] Scaleway's Block Storage migration notice: `b_ssd`
//!   creates through the Instance API refused since 2025-04-30.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use flotilla_core::InstanceId;
use flotilla_provider::scaleway::{ScalewayConfig, ScalewayProvider};
use flotilla_provider::{
    MachineProvider, MachineSpec, MachineState, PageRequest, ProviderError, SpecCheck,
    TAG_CONTROL_PLANE, TAG_INSTANCE, TAG_POOL, VolumeSpec, VolumeState,
};
use serde_json::{Value, json};

const SECRET: &str = "scw-secret-3f9a1c77-do-not-leak";
const PROJECT: &str = "11111111-2222-3333-4444-555555555555";
const ZONE: &str = "fr-par-1";
const REGION: &str = "fr-par";
const CONTROL_PLANE: &str = "cp-test";
const PRIVATE_NETWORK: &str = "492d550a-53a1-4c44-9051-312793566403";

// ---------------------------------------------------------------- the fake

/// Faults a test turns on by name; all off by default.
#[derive(Default)]
struct Flags {
    /// This many next requests answer 429, without `Retry-After`.
    rate_limited: u32,
    failing: bool,
    slow: Option<Duration>,
    user_data_fails: bool,
    /// The next create makes the server and answers 500 anyway.
    create_then_fails: bool,
    ignore_tag_filter: bool,
    omit_total_count: bool,
    /// Servers allowed before a create is refused by quota.
    server_quota: Option<usize>,
}

#[derive(Clone)]
struct FakeServer {
    id: String,
    name: String,
    state: String,
    commercial_type: String,
    tags: Vec<String>,
    /// Slot 0, a Block volume made from the image [TF-ROOT].
    root: String,
    data: Vec<String>,
    terminating: bool,
    user_data: Option<String>,
    /// (nic id, private network id).
    nics: Vec<(String, String)>,
}

#[derive(Clone)]
struct FakeVolume {
    id: String,
    name: String,
    size: u64,
    tags: Vec<String>,
    /// (server id, reference status) [SDK-B `Reference`].
    reference: Option<(String, String)>,
    /// Reads until a `detaching` reference is `detached`.
    detach_reads: u32,
}

#[derive(Default)]
struct World {
    servers: BTreeMap<String, FakeServer>,
    volumes: BTreeMap<String, FakeVolume>,
    /// nic id → IPv4 address.
    ipam: BTreeMap<String, String>,
    actions: Vec<(String, String)>,
    create_bodies: Vec<Value>,
    /// Every request as "METHOD /path", in order.
    log: Vec<String>,
    flags: Flags,
    /// Reads a `detaching` reference takes to become `detached`.
    detach_after: u32,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().expect("fake lock")
    }

    fn insert_server(&self, tags: Vec<String>) -> String {
        let mut w = self.world();
        let id = uuid::Uuid::new_v4().to_string();
        let root = w.new_root(&id);
        let server = FakeServer {
            id: id.clone(),
            name: format!("srv-{id}"),
            state: "stopped".into(),
            commercial_type: "DEV1-S".into(),
            tags,
            root,
            data: Vec::new(),
            terminating: false,
            user_data: None,
            nics: Vec::new(),
        };
        w.servers.insert(id.clone(), server);
        id
    }

    fn set_state(&self, id: &str, state: &str) {
        self.world().servers.get_mut(id).expect("server").state = state.into();
    }

    fn server(&self, id: &str) -> Option<FakeServer> {
        self.world().servers.get(id).cloned()
    }

    fn counts(&self) -> (usize, usize, usize) {
        let w = self.world();
        let roots = w
            .volumes
            .values()
            .filter(|v| v.name.ends_with("_sbs_volume_0"))
            .count();
        (w.servers.len(), roots, w.volumes.len() - roots)
    }
}

impl World {
    /// A root volume as Scaleway makes it from an image: in the Block API,
    /// named after the image, with empty tags, referenced by the server
    /// [TF-ROOT].
    fn new_root(&mut self, server: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.volumes.insert(
            id.clone(),
            FakeVolume {
                id: id.clone(),
                name: "Ubuntu 24.04 Noble Numbat_sbs_volume_0".into(),
                size: 10 * 1_000_000_000,
                tags: Vec::new(),
                reference: Some((server.to_owned(), "attached".into())),
                detach_reads: 0,
            },
        );
        id
    }

    /// DELETE /servers and `terminate` delete local volumes but only detach
    /// Block ones, which stay in the Block API [TF-DEL]; the reference
    /// lingers in `detaching` for a while [SDK-B `ReferenceStatusDetaching`].
    fn remove_server(&mut self, id: &str) {
        let Some(gone) = self.servers.remove(id) else {
            return;
        };
        let reads = self.detach_after;
        for v in std::iter::once(&gone.root).chain(&gone.data) {
            if let Some(v) = self.volumes.get_mut(v) {
                v.reference = Some((id.to_owned(), "detaching".into()));
                v.detach_reads = reads;
            }
        }
    }
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// The 404 of both APIs: it names the resource and its id [SDK-E
/// `ResourceNotFoundError`; TF-STATE, TF-BLOCK].
fn not_found(resource: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        json!({ "type": "not_found", "message": "resource is not found",
                "resource": resource, "resource_id": id }),
    )
}

/// The Instance API's 400 for a request refused in the current state
/// [SDK-E `InvalidRequestError`].
fn refused(message: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        json!({ "type": "invalid_request_error", "message": message }),
    )
}

fn invalid(argument: &str, help: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        json!({ "type": "invalid_arguments", "message": "invalid argument(s)",
                "details": [{ "argument_name": argument, "reason": "constraint", "help_message": help }] }),
    )
}

/// The actions each state allows, as recorded [TF-STATE, TF-ROOT].
fn allowed_actions(state: &str) -> &'static [&'static str] {
    match state {
        "stopped" => &["poweron", "backup"],
        "starting" | "stopping" => &["stop_in_place", "backup"],
        "running" => &["poweroff", "terminate", "reboot", "stop_in_place", "backup"],
        "stopped in place" => &["poweron", "poweroff", "terminate", "reboot", "backup"],
        _ => &[],
    }
}

fn server_json(s: &FakeServer) -> Value {
    let mut volumes = serde_json::Map::new();
    volumes.insert(
        "0".into(),
        json!({ "id": s.root, "volume_type": "sbs_volume", "boot": false, "state": "available", "zone": ZONE }),
    );
    for (i, v) in s.data.iter().enumerate() {
        volumes.insert(
            (i + 1).to_string(),
            json!({ "id": v, "volume_type": "sbs_volume", "boot": false, "state": "available", "zone": ZONE }),
        );
    }
    let nics: Vec<Value> = s
        .nics
        .iter()
        .map(|(id, pn)| json!({ "id": id, "private_network_id": pn, "server_id": s.id, "state": "available", "ipam_ip_ids": [] }))
        .collect();
    json!({
        "id": s.id,
        "name": s.name,
        "state": s.state,
        "allowed_actions": allowed_actions(&s.state),
        "commercial_type": s.commercial_type,
        "tags": s.tags,
        "creation_date": "2024-05-01T12:00:00.123456+00:00",
        // Routed IPs: always null [TF-ROOT, TF-PN].
        "private_ip": null,
        "public_ips": [],
        "routed_ip_enabled": true,
        "zone": ZONE,
        "volumes": volumes,
        "private_nics": nics,
        "arch": "x86_64",
        "state_detail": "",
    })
}

fn volume_json(v: &FakeVolume) -> Value {
    let references: Vec<Value> = v
        .reference
        .iter()
        .map(|(server, status)| json!({ "id": uuid::Uuid::new_v4(), "product_resource_type": "instance_server",
                                       "product_resource_id": server, "type": "exclusive", "status": status }))
        .collect();
    json!({
        "id": v.id,
        "name": v.name,
        "type": "sbs_5k",
        "size": v.size,
        "project_id": PROJECT,
        "created_at": "2024-05-01T12:00:00.620092Z",
        "references": references,
        "status": if v.reference.is_some() { "in_use" } else { "available" },
        "tags": v.tags,
        "specs": { "perf_iops": 5000, "class": "sbs" },
        "zone": ZONE,
    })
}

/// Checks the token and applies the failure flags, as the API gateway would.
async fn gate(State(fake): State<Fake>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    fake.world()
        .log
        .push(format!("{} {}", req.method(), req.uri().path()));
    if token != SECRET {
        // Echoes what it got: the provider must not pass it on.
        return error(
            StatusCode::UNAUTHORIZED,
            json!({ "type": "denied_authentication", "message": format!("invalid auth token {token}") }),
        );
    }
    let (limited, failing, slow) = {
        let mut w = fake.world();
        let limited = w.flags.rate_limited > 0;
        if limited {
            w.flags.rate_limited -= 1;
        }
        (limited, w.flags.failing, w.flags.slow)
    };
    if let Some(d) = slow {
        // Not a wait for a condition: the fake API's own slowness, which
        // the provider's request timeout is tested against.
        tokio::time::sleep(d).await;
    }
    if limited {
        // No Retry-After: Scaleway sends none.
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "message": "rate limit exceeded" }),
        );
    }
    if failing {
        // Wording that a text match would misread as "gone", plus the
        // request's token, as a misbehaving proxy might echo it.
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "type": "internal_error", "message": format!("server not found in cache (x-auth-token: {token})") }),
        );
    }
    next.run(req).await
}

/// Anything outside the routes (another zone, a typo): a 404 naming nothing.
async fn no_route(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("404 page not found: {}", uri.path()),
    )
        .into_response()
}

/// One page of `items` under `key`; the Instance API counts in
/// `X-Total-Count`, the Block API in `total_count` [SDK-B `ListVolumesResponse`].
fn listing(
    key: &str,
    items: Vec<Value>,
    query: &[(String, String)],
    size_param: &str,
    total_in_body: bool,
    omit_total: bool,
) -> Response {
    let get = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let number = |name: &str, default: usize| match get(name) {
        None => Some(default),
        Some(p) => p.parse::<usize>().ok(),
    };
    let (Some(per_page), Some(page)) = (number(size_param, 50), number("page", 1)) else {
        return invalid(size_param, "page and page size are numbers");
    };
    if !(1..=100).contains(&per_page) || page == 0 {
        return invalid(size_param, "must be 1-100 and page at least 1");
    }
    let total = items.len();
    let page: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let mut headers = HeaderMap::new();
    let mut body = json!({ key: page });
    if !omit_total {
        if total_in_body {
            body["total_count"] = total.into();
        } else {
            headers.insert("x-total-count", total.into());
        }
    }
    (headers, Json(body)).into_response()
}

/// Instance listings take `tags=a,b`; Block listings one `tags` per tag.
fn has_tags(tags: &[String], wanted: &[String], ignore: bool) -> bool {
    ignore || wanted.iter().all(|t| tags.iter().any(|x| x == t))
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_str().map(str::to_owned))
        .collect()
}

async fn create_server(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let (Some(name), Some(commercial_type), Some(_image), Some(tags)) = (
        body["name"].as_str(),
        body["commercial_type"].as_str(),
        body["image"].as_str(),
        string_list(&body["tags"]),
    ) else {
        return invalid("name", "name, commercial_type, image and tags are required");
    };
    if body["project"] != PROJECT {
        return not_found("project_id", body["project"].as_str().unwrap_or_default());
    }
    let mut guard = fake.world();
    let w = &mut *guard;
    if w.flags.server_quota.is_some_and(|q| w.servers.len() >= q) {
        // [SDK-E `QuotasExceededError`].
        return error(
            StatusCode::FORBIDDEN,
            json!({ "type": "quotas_exceeded", "message": "quota(s) exceeded for this resource",
                    "details": [{ "resource": "instances_dev1_s", "quota": w.servers.len(), "current": w.servers.len() }] }),
        );
    }
    let mut data = Vec::new();
    if let Some(map) = body["volumes"].as_object() {
        for i in 1..=map.len() {
            let Some(v) = map.get(&i.to_string()) else {
                return invalid("volumes", "volumes are numbered from 1 after the root");
            };
            let Some(id) = v["id"].as_str() else {
                return invalid("volumes", "id required");
            };
            // Without `volume_type: sbs_volume` the Instance API looks for
            // an Instance volume and answers 404 [SDK-I
            // `VolumeServerVolumeTypeSbsVolume`; TF-DEL block.go `VolumeTemplate`].
            if v["volume_type"] != "sbs_volume" {
                return not_found("instance_volume", id);
            }
            match w.volumes.get(id) {
                Some(v) if v.reference.is_none() => data.push(id.to_owned()),
                Some(_) => return refused("volume is already attached to a server"),
                None => return not_found("volume", id),
            }
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    for v in &data {
        w.volumes.get_mut(v).expect("checked").reference = Some((id.clone(), "attached".into()));
    }
    let root = w.new_root(&id);
    let server = FakeServer {
        id: id.clone(),
        name: name.into(),
        state: "stopped".into(),
        commercial_type: commercial_type.into(),
        tags,
        root,
        data,
        terminating: false,
        user_data: None,
        nics: Vec::new(),
    };
    let answer = json!({ "server": server_json(&server) });
    w.servers.insert(id, server);
    w.create_bodies.push(body);
    if std::mem::take(&mut w.flags.create_then_fails) {
        return error(
            StatusCode::GATEWAY_TIMEOUT,
            json!({ "type": "internal_error", "message": "upstream timed out" }),
        );
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_servers(
    State(fake): State<Fake>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let w = fake.world();
    let wanted: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "tags")
        .flat_map(|(_, v)| v.split(',').map(str::to_owned))
        .collect();
    if let Some((_, p)) = query.iter().find(|(k, _)| k == "project")
        && p != PROJECT
    {
        return not_found("project_id", p);
    }
    let matching: Vec<Value> = w
        .servers
        .values()
        .filter(|s| has_tags(&s.tags, &wanted, w.flags.ignore_tag_filter))
        .map(server_json)
        .collect();
    listing(
        "servers",
        matching,
        &query,
        "per_page",
        false,
        w.flags.omit_total_count,
    )
}

/// Answers the current state, then moves a transient one a step on, so a
/// poll sees `starting` before `running`, `stopping` before `stopped`.
async fn get_server(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let Some(s) = w.servers.get_mut(&id) else {
        return not_found("instance_server", &id);
    };
    let answer = json!({ "server": server_json(s) });
    match (s.state.as_str(), s.terminating) {
        ("starting", _) => s.state = "running".into(),
        ("stopping", false) => s.state = "stopped".into(),
        ("stopping", true) => w.remove_server(&id),
        _ => {}
    }
    Json(answer).into_response()
}

/// DELETE is refused unless `stopped`: `stopped in place` still holds its
/// node [SDK-I `ServerStateStoppedInPlace`; TF-STATE: no delete allowed].
async fn delete_server(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut w = fake.world();
    let Some(s) = w.servers.get(&id) else {
        return not_found("instance_server", &id);
    };
    if s.state != "stopped" {
        return refused("instance should be powered off.");
    }
    w.remove_server(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// An action outside the state's `allowed_actions` is a 400 [TF-STATE].
async fn server_action(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let action = body["action"].as_str().unwrap_or_default().to_owned();
    let Some(s) = w.servers.get_mut(&id) else {
        return not_found("instance_server", &id);
    };
    if !allowed_actions(&s.state).contains(&action.as_str()) {
        return refused(&format!(
            "action {action} is not allowed in state {}",
            s.state
        ));
    }
    match action.as_str() {
        "poweron" => s.state = "starting".into(),
        "poweroff" => s.state = "stopping".into(),
        "terminate" => {
            s.state = "stopping".into();
            s.terminating = true;
        }
        "stop_in_place" => s.state = "stopped in place".into(),
        _ => {}
    }
    w.actions.push((action.clone(), id));
    let task = json!({ "task": { "id": uuid::Uuid::new_v4(), "description": action, "status": "pending" } });
    (StatusCode::ACCEPTED, Json(task)).into_response()
}

/// [SDK-I `SetServerUserDataRequest`: PATCH …/user_data/{key}, text/plain].
async fn set_user_data(
    State(fake): State<Fake>,
    Path((id, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut w = fake.world();
    if w.flags.user_data_fails {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "type": "service_unavailable", "message": "try later" }),
        );
    }
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("text/plain")
    {
        return invalid("content-type", "text/plain only");
    }
    if key != "cloud-init" {
        return invalid("key", "unexpected key");
    }
    let Some(s) = w.servers.get_mut(&id) else {
        return not_found("instance_server", &id);
    };
    s.user_data = Some(body);
    StatusCode::NO_CONTENT.into_response()
}

/// [SDK-I `CreatePrivateNICRequest`]; IPAM gives the NIC an address [TF-PN].
async fn create_private_nic(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let Some(pn) = body["private_network_id"].as_str() else {
        return invalid("private_network_id", "required");
    };
    if pn != PRIVATE_NETWORK {
        return not_found("private_network", pn);
    }
    let Some(s) = w.servers.get_mut(&id) else {
        return not_found("instance_server", &id);
    };
    let nic = uuid::Uuid::new_v4().to_string();
    s.nics.push((nic.clone(), pn.to_owned()));
    let n = w.ipam.len() + 2;
    w.ipam.insert(nic.clone(), format!("10.2.4.{n}/22"));
    (
        StatusCode::CREATED,
        Json(json!({ "private_nic": { "id": nic, "private_network_id": pn, "server_id": id, "state": "syncing" } })),
    )
        .into_response()
}

/// [SDK-IPAM `ListIPsRequest`: resource_type, resource_id]; each NIC has an
/// IPv6 and an IPv4 address, the IPv6 first [TF-PN].
async fn ipam_ips(
    State(fake): State<Fake>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let w = fake.world();
    let ips: Vec<Value> = query
        .get("resource_id")
        .and_then(|nic| w.ipam.get(nic).map(|a| (nic, a)))
        .map(|(nic, a)| {
            vec![
                json!({ "id": uuid::Uuid::new_v4(), "address": "fd5f:519c:6d46:96bf:fa3d:a8af:6ecc:eb1c/64", "is_ipv6": true,
                        "resource": { "type": "instance_private_nic", "id": nic } }),
                json!({ "id": uuid::Uuid::new_v4(), "address": a, "is_ipv6": false,
                        "resource": { "type": "instance_private_nic", "id": nic } }),
            ]
        })
        .unwrap_or_default();
    Json(json!({ "total_count": ips.len(), "ips": ips })).into_response()
}

/// Creating `b_ssd` through the Instance API is refused [MIGRATION].
async fn instance_create_volume() -> Response {
    refused(
        "b_ssd volumes can no longer be created through the Instance API; use the Block Storage API",
    )
}

/// Block volumes are unknown to the Instance API [TF-ROOT: 404 instance_volume].
async fn instance_get_volume(Path(id): Path<String>) -> Response {
    not_found("instance_volume", &id)
}

/// [SDK-B `CreateVolumeRequest`: name, project_id, from_empty.size, tags];
/// 1 GB to 10 TB.
async fn block_create_volume(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let (Some(name), Some(size), Some(tags)) = (
        body["name"].as_str(),
        body["from_empty"]["size"].as_u64(),
        string_list(&body["tags"]),
    ) else {
        return invalid(
            "from_empty.size",
            "name, from_empty.size and tags are required",
        );
    };
    if body["project_id"] != PROJECT {
        return not_found(
            "project_id",
            body["project_id"].as_str().unwrap_or_default(),
        );
    }
    if !(1_000_000_000..=10_000_000_000_000).contains(&size) {
        return invalid("from_empty.size", "size must be between 1 GB and 10 TB");
    }
    let v = FakeVolume {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        size,
        tags,
        reference: None,
        detach_reads: 0,
    };
    let answer = volume_json(&v);
    fake.world().volumes.insert(v.id.clone(), v);
    Json(answer).into_response()
}

/// Reading a volume moves a `detaching` reference on towards `detached`.
fn observe(v: &mut FakeVolume) {
    if let Some((_, status)) = &v.reference
        && status == "detaching"
    {
        if v.detach_reads == 0 {
            v.reference = None;
        } else {
            v.detach_reads -= 1;
        }
    }
}

async fn block_list_volumes(
    State(fake): State<Fake>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let wanted: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "tags")
        .map(|(_, v)| v.clone())
        .collect();
    let ignore = w.flags.ignore_tag_filter;
    let mut matching = Vec::new();
    for v in w.volumes.values_mut() {
        if has_tags(&v.tags, &wanted, ignore) {
            matching.push(volume_json(v));
            observe(v);
        }
    }
    listing(
        "volumes",
        matching,
        &query,
        "page_size",
        true,
        w.flags.omit_total_count,
    )
}

async fn block_get_volume(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut w = fake.world();
    match w.volumes.get_mut(&id) {
        Some(v) => {
            let answer = volume_json(v);
            observe(v);
            Json(answer).into_response()
        }
        None => not_found("volume", &id),
    }
}

/// [SDK-B `UpdateVolumeRequest`: tags].
async fn block_update_volume(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut w = fake.world();
    let Some(v) = w.volumes.get_mut(&id) else {
        return not_found("volume", &id);
    };
    if let Some(tags) = string_list(&body["tags"]) {
        v.tags = tags;
    }
    Json(volume_json(v)).into_response()
}

/// Refused while any reference is not `detached` [SDK-B `ReferenceStatus`;
/// SDK-E `PreconditionFailedError`].
async fn block_delete_volume(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut w = fake.world();
    match w.volumes.get(&id) {
        None => not_found("volume", &id),
        Some(v) if v.reference.is_some() => error(
            StatusCode::PRECONDITION_FAILED,
            json!({ "type": "precondition_failed", "precondition": "resource_still_in_use",
                    "help_message": "the volume is still attached to a server" }),
        ),
        Some(_) => {
            w.volumes.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

// ---------------------------------------------------------------- harness

struct Harness {
    fake: Fake,
    url: String,
}

async fn start() -> Harness {
    let fake = Fake(Arc::new(Mutex::new(World {
        detach_after: 2,
        ..World::default()
    })));
    let instance = Router::new()
        .route("/servers", get(list_servers).post(create_server))
        .route("/servers/{id}", get(get_server).delete(delete_server))
        .route("/servers/{id}/action", post(server_action))
        .route("/servers/{id}/user_data/{key}", patch(set_user_data))
        .route("/servers/{id}/private_nics", post(create_private_nic))
        .route("/volumes", post(instance_create_volume))
        .route("/volumes/{id}", get(instance_get_volume));
    let block = Router::new()
        .route(
            "/volumes",
            get(block_list_volumes).post(block_create_volume),
        )
        .route(
            "/volumes/{id}",
            get(block_get_volume)
                .patch(block_update_volume)
                .delete(block_delete_volume),
        );
    let app = Router::new()
        .nest(&format!("/instance/v1/zones/{ZONE}"), instance)
        .nest(&format!("/block/v1/zones/{ZONE}"), block)
        .route(&format!("/ipam/v1/regions/{REGION}/ips"), get(ipam_ips))
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(fake.clone(), gate))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Harness { fake, url }
}

impl Harness {
    fn config(&self, secret: &str, timeout: Duration) -> ScalewayConfig {
        ScalewayConfig {
            base_url: self.url.clone(),
            request_timeout: timeout,
            private_network_id: Some(PRIVATE_NETWORK.into()),
            root_detach_timeout: Duration::from_secs(5),
            ..ScalewayConfig::new(ZONE, PROJECT, secret, CONTROL_PLANE)
        }
    }

    fn provider(&self) -> ScalewayProvider {
        ScalewayProvider::new(self.config(SECRET, Duration::from_secs(5))).expect("provider")
    }
}

fn spec() -> MachineSpec {
    MachineSpec {
        instance_id: InstanceId::new(),
        name: "worker-1".into(),
        pool: "gpu".into(),
        region: ZONE.into(),
        instance_type: "DEV1-S".into(),
        image: "ubuntu_noble".into(),
        env: BTreeMap::new(),
        tags: BTreeMap::from([("team".to_owned(), "ml".to_owned())]),
        volume_ids: Vec::new(),
        start: true,
    }
}

fn volume_spec() -> VolumeSpec {
    VolumeSpec {
        instance_id: InstanceId::new(),
        pool: "gpu".into(),
        region: ZONE.into(),
        size_gb: 10,
    }
}

/// Every error a test sees goes through here: none may carry the secret.
fn clean(e: ProviderError) -> ProviderError {
    assert!(!e.to_string().contains(SECRET), "{e}");
    assert!(!format!("{e:?}").contains(SECRET), "{e:?}");
    e
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().chars().filter(|c| *c != '=') {
        let v = ALPHABET.find(c).expect("base64 digit") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn env_file(user_data: &str) -> String {
    let content = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("content: "))
        .expect("content line");
    String::from_utf8(base64_decode(content)).expect("utf-8")
}

const WAIT: Duration = Duration::from_secs(10);

/// Retries `op` while it answers a retryable error, as a reconcile loop
/// would on its next ticks, up to a deadline.
async fn until_done<T, F, Fut>(what: &str, mut op: F) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProviderError>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match op().await {
            Err(
                e @ (ProviderError::FailedPrecondition(_)
                | ProviderError::ResourceExhausted { .. }
                | ProviderError::Unavailable(_)),
            ) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%what, error = %e, "retrying");
                // The poll of a deadline loop, spaced as the provider asked
                // (Retry-After), as a reconcile loop's next tick would be.
                tokio::time::sleep(e.retry_after().unwrap_or(Duration::from_millis(50))).await;
            }
            other => return other,
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_full_lifecycle_with_faults_leaves_no_server_no_root_and_no_data_volume() {
    let h = start().await;
    let p = h.provider();
    assert_eq!(p.kind(), "scaleway");

    // A data volume, then a server using it, with its environment.
    let vol = p
        .create_volume(&volume_spec())
        .await
        .map_err(clean)
        .expect("volume");
    let mut spec = spec();
    spec.volume_ids = vec![vol.id.clone()];
    spec.env = BTreeMap::from([
        ("API_KEY".to_owned(), "s3cr3t value's $HOME".to_owned()),
        ("MODE".to_owned(), "batch".to_owned()),
    ]);
    let m = p
        .create_machine(&spec)
        .await
        .map_err(clean)
        .expect("create");
    assert_eq!(
        (m.state, m.provider_state.as_str()),
        (MachineState::Stopped, "stopped")
    );
    assert_eq!(m.instance_id(), Some(spec.instance_id));
    assert_eq!(m.tags["team"], "ml");
    let body = h.fake.world().create_bodies[0].clone();
    assert_eq!(body["dynamic_ip_required"], false);
    assert!(
        !body.to_string().contains("s3cr3t"),
        "env leaked into the create: {body}"
    );
    let user_data = h
        .fake
        .server(&m.id)
        .and_then(|s| s.user_data)
        .expect("user data");
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert_eq!(
        env_file(&user_data),
        "API_KEY='s3cr3t value'\\''s $HOME'\nMODE='batch'\n"
    );

    // A second server whose create succeeds at Scaleway but answers an error.
    h.fake.world().flags.create_then_fails = true;
    let mut lost = self::spec();
    lost.env = BTreeMap::from([("TOKEN".to_owned(), "x".to_owned())]);
    let e = p
        .create_machine(&lost)
        .await
        .map_err(clean)
        .expect_err("504");
    assert!(matches!(e, ProviderError::Unavailable(_)), "{e}");
    let adopted = p.find_machines(lost.instance_id).await.expect("find");
    assert_eq!(adopted.len(), 1);

    // Start through a 429 (no Retry-After) and the `starting` state.
    h.fake.world().flags.rate_limited = 1;
    let e = p
        .start_machine(&m.id)
        .await
        .map_err(clean)
        .expect_err("429");
    assert!(matches!(e, ProviderError::ResourceExhausted { .. }), "{e}");
    let started = until_done("start", || p.start_machine(&m.id))
        .await
        .expect("start");
    assert_eq!(started.state, MachineState::Starting);
    let running = p
        .wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");
    assert_eq!(running.provider_state, "running");
    assert_eq!(
        running.private_ip, "",
        "the wait reads no IPAM; get_machine does"
    );
    let got = p.get_machine(&m.id).await.expect("get");
    assert!(got.private_ip.starts_with("10.2.4."), "{}", got.private_ip);

    // Someone stops it in place; stop, wait and delete still converge.
    h.fake.world().servers.get_mut(&m.id).expect("server").state = "stopped in place".into();
    until_done("stop", || p.stop_machine(&m.id, Duration::from_secs(10)))
        .await
        .expect("stop");
    p.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("stopped");
    until_done("delete", || p.delete_machine(&m.id, false))
        .await
        .expect("delete");
    until_done("delete data volume", || p.delete_volume(&vol.id))
        .await
        .expect("data volume");

    // The adopted one is deleted while running, by force.
    let other = &adopted[0].id;
    p.start_machine(other).await.expect("start adopted");
    p.wait_machine(other, MachineState::Started, WAIT)
        .await
        .expect("running");
    p.delete_machine(other, true).await.expect("terminate");
    p.wait_machine(other, MachineState::Destroyed, WAIT)
        .await
        .expect("destroyed");

    assert_eq!(
        h.fake.counts(),
        (0, 0, 0),
        "servers, root volumes, data volumes left"
    );
    let listed = p.list_volumes(&PageRequest::default()).await.expect("list");
    assert!(listed.items.is_empty());
}

#[tokio::test]
async fn deleting_a_server_deletes_its_root_volume_once_detached() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    let root = h.fake.server(&m.id).expect("server").root;
    // Tagged right after the create, so the orphan scan sees it.
    let listed = p.list_volumes(&PageRequest::default()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].id, root);
    assert_eq!(listed.items[0].instance_id, m.instance_id());
    assert_eq!(
        listed.items[0].attached_machine_id.as_deref(),
        Some(m.id.as_str())
    );

    p.delete_machine(&m.id, false)
        .await
        .map_err(clean)
        .expect("delete");
    assert!(h.fake.server(&m.id).is_none());
    assert!(
        !h.fake.world().volumes.contains_key(&root),
        "root volume left behind"
    );
    let again = p.delete_machine(&m.id, false).await.expect_err("gone");
    assert!(matches!(again, ProviderError::NotFound(_)), "{again}");
}

#[tokio::test]
async fn a_root_still_detaching_is_failed_precondition_and_the_next_delete_removes_it() {
    let h = start().await;
    h.fake.world().detach_after = 1000;
    let mut config = h.config(SECRET, Duration::from_secs(5));
    config.root_detach_timeout = Duration::from_millis(300);
    let p = ScalewayProvider::new(config).expect("provider");
    let m = p.create_machine(&spec()).await.expect("create");
    let root = h.fake.server(&m.id).expect("server").root;

    let e = p
        .delete_machine(&m.id, false)
        .await
        .expect_err("root detaching");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(h.fake.server(&m.id).is_none());
    let e = p
        .delete_machine(&m.id, false)
        .await
        .expect_err("still detaching");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    // The orphan scan sees it meanwhile, detaching, still owned.
    let listed = p.list_volumes(&PageRequest::default()).await.expect("list");
    assert_eq!(
        listed.items.iter().map(|v| &v.id).collect::<Vec<_>>(),
        [&root]
    );

    h.fake
        .world()
        .volumes
        .get_mut(&root)
        .expect("root")
        .detach_reads = 0;
    let e = until_done("delete", || p.delete_machine(&m.id, false))
        .await
        .expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
    assert_eq!(h.fake.counts(), (0, 0, 0));
}

#[tokio::test]
async fn data_volumes_are_block_volumes_attached_as_sbs_volume() {
    let h = start().await;
    let p = h.provider();
    let spec = volume_spec();
    let vol = p.create_volume(&spec).await.map_err(clean).expect("create");
    assert_eq!((vol.state, vol.size_gb), (VolumeState::Available, 10));
    assert_eq!(vol.instance_id, Some(spec.instance_id));
    assert_eq!(vol.tags[TAG_CONTROL_PLANE], CONTROL_PLANE);
    assert_eq!(h.fake.world().volumes[&vol.id].size, 10_000_000_000);
    assert!(
        h.fake
            .world()
            .log
            .iter()
            .all(|l| !l.contains("/instance/v1/zones/fr-par-1/volumes")),
        "the Instance API was asked about volumes"
    );

    let mut m = self::spec();
    m.volume_ids = vec![vol.id.clone()];
    let m = p
        .create_machine(&m)
        .await
        .map_err(clean)
        .expect("create with volume");
    assert_eq!(
        h.fake.server(&m.id).expect("server").data,
        vec![vol.id.clone()]
    );
    assert_eq!(
        h.fake.world().create_bodies[0]["volumes"]["1"]["volume_type"],
        "sbs_volume"
    );
    let e = p
        .delete_volume(&vol.id)
        .await
        .map_err(clean)
        .expect_err("attached");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains(&m.id), "{e}");

    for size in [0, 10_001] {
        let e = p
            .create_volume(&VolumeSpec {
                size_gb: size,
                ..volume_spec()
            })
            .await
            .expect_err("size");
        assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
    }
    let big = p
        .create_volume(&VolumeSpec {
            size_gb: 2000,
            ..volume_spec()
        })
        .await
        .expect("2 TB is a Block size");
    assert_eq!(big.size_gb, 2000);
}

#[tokio::test]
async fn a_detaching_volume_is_kept_until_detached_then_deleted_then_not_found() {
    let h = start().await;
    let p = h.provider();
    let vol = p.create_volume(&volume_spec()).await.expect("volume");
    let mut spec = spec();
    spec.volume_ids = vec![vol.id.clone()];
    let m = p.create_machine(&spec).await.expect("create");
    h.fake.world().detach_after = 3;
    p.delete_machine(&m.id, false).await.expect("delete server");

    h.fake
        .world()
        .volumes
        .get_mut(&vol.id)
        .expect("vol")
        .detach_reads = 3;
    let e = p
        .delete_volume(&vol.id)
        .await
        .map_err(clean)
        .expect_err("detaching");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("detaching"), "{e}");
    assert!(h.fake.world().volumes.contains_key(&vol.id));
    until_done("delete", || p.delete_volume(&vol.id))
        .await
        .expect("deleted");
    let e = p
        .delete_volume(&vol.id)
        .await
        .map_err(clean)
        .expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
}

#[tokio::test]
async fn a_server_stopped_in_place_is_powered_off_before_it_is_deleted() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    h.fake.set_state(&m.id, "stopped in place");
    let got = p.get_machine(&m.id).await.expect("get");
    assert_ne!(
        got.state,
        MachineState::Stopped,
        "stopped in place is not deletable"
    );
    assert_eq!(got.provider_state, "stopped in place");

    let e = p
        .delete_machine(&m.id, false)
        .await
        .map_err(clean)
        .expect_err("not yet");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(
        h.fake
            .world()
            .actions
            .contains(&("poweroff".to_owned(), m.id.clone()))
    );
    p.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("stopped");
    p.delete_machine(&m.id, false).await.expect("delete");
    assert_eq!(h.fake.counts(), (0, 0, 0));

    // The wait for `Stopped` powers it off by itself.
    let m = p.create_machine(&spec()).await.expect("create");
    h.fake.set_state(&m.id, "stopped in place");
    let stopped = p
        .wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("wait");
    assert_eq!(stopped.provider_state, "stopped");
}

#[tokio::test]
async fn actions_the_state_does_not_allow_yet_are_failed_precondition() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    p.start_machine(&m.id).await.expect("start");
    // Still `starting`: a poweroff is not allowed yet [TF-STATE].
    h.fake.set_state(&m.id, "starting");
    let e = p
        .stop_machine(&m.id, Duration::from_secs(1))
        .await
        .map_err(clean)
        .expect_err("starting");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("starting"), "{e}");

    p.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");
    p.stop_machine(&m.id, Duration::from_secs(1))
        .await
        .expect("stop");
    h.fake.set_state(&m.id, "stopping");
    let e = p
        .start_machine(&m.id)
        .await
        .map_err(clean)
        .expect_err("stopping");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");

    // Transient states are never deletable, with or without force.
    for state in ["starting", "stopping", "provisioning"] {
        for force in [false, true] {
            // Each read moves a transient state on; set it before each call.
            h.fake.set_state(&m.id, state);
            let e = p
                .delete_machine(&m.id, force)
                .await
                .expect_err("not deletable");
            assert!(
                matches!(e, ProviderError::FailedPrecondition(_)),
                "{state}: {e}"
            );
        }
    }
    h.fake.set_state(&m.id, "locked");
    assert_eq!(
        p.get_machine(&m.id).await.expect("get").state,
        MachineState::Failed
    );
}

#[tokio::test]
async fn starting_a_server_that_already_runs_is_accepted() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    p.start_machine(&m.id).await.expect("start");
    p.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");
    let again = p.start_machine(&m.id).await.expect("already running");
    assert_eq!(again.state, MachineState::Started);
}

#[tokio::test]
async fn a_quota_is_resource_exhausted_not_permission_denied() {
    let h = start().await;
    let p = h.provider();
    h.fake.world().flags.server_quota = Some(0);
    let e = p
        .create_machine(&spec())
        .await
        .map_err(clean)
        .expect_err("quota");
    assert!(matches!(e, ProviderError::ResourceExhausted { .. }), "{e}");
    assert!(e.to_string().contains("quota"), "{e}");
}

#[tokio::test]
async fn a_429_without_retry_after_is_resource_exhausted_with_our_own_backoff() {
    let h = start().await;
    let p = h.provider();
    h.fake.world().flags.rate_limited = 1;
    let e = p
        .get_machine(&uuid::Uuid::new_v4().to_string())
        .await
        .map_err(clean)
        .expect_err("429");
    assert!(matches!(e, ProviderError::ResourceExhausted { .. }), "{e}");
    assert!(
        e.retry_after().is_some_and(|d| d >= Duration::from_secs(1)),
        "{e:?}"
    );

    // A wait polls through 429s.
    let m = p.create_machine(&spec()).await.expect("create");
    h.fake.world().flags.rate_limited = 2;
    p.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("polled through");
}

#[tokio::test]
async fn a_404_is_not_found_only_for_the_resource_it_names() {
    let h = start().await;
    let p = h.provider();
    // A server that does not exist: gone.
    let e = p
        .get_machine(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("404");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");

    // A create naming a volume that does not exist: not "gone".
    let mut spec = spec();
    spec.volume_ids = vec![uuid::Uuid::new_v4().to_string()];
    let e = p
        .create_machine(&spec)
        .await
        .map_err(clean)
        .expect_err("no volume");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");

    // Another zone: a 404 that names nothing.
    let m = p.create_machine(&self::spec()).await.expect("create");
    let mut wrong = h.config(SECRET, Duration::from_secs(5));
    wrong.zone = "nl-ams-1".into();
    let wrong = ScalewayProvider::new(wrong).expect("provider");
    let e = wrong.get_machine(&m.id).await.expect_err("wrong zone");
    assert!(!matches!(e, ProviderError::NotFound(_)), "{e}");
    let e = wrong
        .delete_machine(&m.id, true)
        .await
        .expect_err("wrong zone");
    assert!(!matches!(e, ProviderError::NotFound(_)), "{e}");
    let e = wrong
        .wait_machine(&m.id, MachineState::Destroyed, Duration::from_millis(500))
        .await
        .expect_err("wrong zone");
    assert!(!matches!(e, ProviderError::NotFound(_)), "{e}");
    assert!(h.fake.server(&m.id).is_some());
}

#[tokio::test]
async fn the_check_fails_clearly_for_a_wrong_zone_or_project_and_passes_otherwise() {
    let h = start().await;
    h.provider().check().await.expect("right zone and project");

    let mut zone = h.config(SECRET, Duration::from_secs(5));
    zone.zone = "nl-ams-1".into();
    let e = ScalewayProvider::new(zone)
        .expect("provider")
        .check()
        .await
        .expect_err("zone");
    assert!(e.to_string().contains("nl-ams-1"), "{e}");

    let mut project = h.config(SECRET, Duration::from_secs(5));
    project.project_id = "99999999-2222-3333-4444-555555555555".into();
    let e = ScalewayProvider::new(project)
        .expect("provider")
        .check()
        .await
        .expect_err("project");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("99999999"), "{e}");
}

#[tokio::test]
async fn prepare_machine_sets_fresh_user_data_on_a_server_whose_create_failed_half_way() {
    let h = start().await;
    let p = h.provider();
    h.fake.world().flags.user_data_fails = true;
    let mut spec = spec();
    spec.env = BTreeMap::from([("FLOTILLA_WORKER_TOKEN".to_owned(), "old".to_owned())]);
    let e = p
        .create_machine(&spec)
        .await
        .map_err(clean)
        .expect_err("user data failed");
    assert!(matches!(e, ProviderError::Unavailable(_)), "{e}");
    let found = p.find_machines(spec.instance_id).await.expect("find");
    assert_eq!(found.len(), 1);
    let id = &found[0].id;
    assert_eq!(h.fake.server(id).expect("server").user_data, None);

    h.fake.world().flags.user_data_fails = false;
    let env = BTreeMap::from([("FLOTILLA_WORKER_TOKEN".to_owned(), "fresh".to_owned())]);
    assert!(p.prepare_machine(id, &env).await.expect("prepare"));
    let user_data = h
        .fake
        .server(id)
        .expect("server")
        .user_data
        .expect("user data");
    assert_eq!(env_file(&user_data), "FLOTILLA_WORKER_TOKEN='fresh'\n");
    // …and what else the create left undone: root tags, the NIC.
    assert_eq!(h.fake.server(id).expect("server").nics.len(), 1);
    assert_eq!(
        p.list_volumes(&PageRequest::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    // Idempotent.
    assert!(p.prepare_machine(id, &env).await.expect("again"));
    assert_eq!(h.fake.server(id).expect("server").nics.len(), 1);
}

#[tokio::test]
async fn the_private_ip_is_the_ipam_address_of_the_private_network_nic() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    let nics = h.fake.server(&m.id).expect("server").nics;
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].1, PRIVATE_NETWORK);
    let got = p.get_machine(&m.id).await.expect("get");
    let ip: std::net::Ipv4Addr = got.private_ip.parse().expect("an IPv4 address, no prefix");
    assert_eq!(ip.octets()[..3], [10, 2, 4]);

    // Without a Private Network there is no NIC and no address.
    let mut config = h.config(SECRET, Duration::from_secs(5));
    config.private_network_id = None;
    let bare = ScalewayProvider::new(config).expect("provider");
    let m = bare.create_machine(&spec()).await.expect("create");
    assert!(h.fake.server(&m.id).expect("server").nics.is_empty());
    assert_eq!(bare.get_machine(&m.id).await.expect("get").private_ip, "");
}

#[tokio::test]
async fn pool_shapes_are_checked_without_calling_scaleway() {
    let h = start().await;
    let p = h.provider();
    let ok = SpecCheck {
        region: ZONE.into(),
        instance_type: "PRO2-XXS".into(),
        image: "ubuntu_noble".into(),
        volume_size_gb: 10_000,
    };
    p.check_spec(&ok).expect("valid");
    for (bad, field) in [
        (
            SpecCheck {
                instance_type: "pro2-xxs".into(),
                ..ok.clone()
            },
            "instance_type",
        ),
        (
            SpecCheck {
                region: "fr-par".into(),
                ..ok.clone()
            },
            "region",
        ),
        (
            SpecCheck {
                region: "nl-ams-1".into(),
                ..ok.clone()
            },
            "region",
        ),
        (
            SpecCheck {
                image: " ".into(),
                ..ok.clone()
            },
            "image",
        ),
        (
            SpecCheck {
                volume_size_gb: 10_001,
                ..ok.clone()
            },
            "volume_size_gb",
        ),
    ] {
        let e = p.check_spec(&bad).expect_err(field);
        assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    assert!(h.fake.world().log.is_empty());
}

#[tokio::test]
async fn a_500_is_unavailable_and_never_read_as_gone() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    let vol = p.create_volume(&volume_spec()).await.expect("volume");
    h.fake.world().flags.failing = true;
    for e in [
        p.get_machine(&m.id).await.expect_err("500"),
        p.delete_machine(&m.id, false).await.expect_err("500"),
        p.delete_machine(&m.id, true).await.expect_err("500"),
        p.delete_volume(&vol.id).await.expect_err("500"),
        p.list_volumes(&PageRequest::default())
            .await
            .expect_err("500"),
    ] {
        let e = clean(e);
        assert!(matches!(e, ProviderError::Unavailable(_)), "{e}");
    }
    let e = p
        .wait_machine(&m.id, MachineState::Destroyed, Duration::from_millis(500))
        .await
        .map_err(clean)
        .expect_err("a 500 is not a 404");
    assert!(matches!(e, ProviderError::DeadlineExceeded(_)), "{e}");
    h.fake.world().flags.failing = false;
    assert!(h.fake.server(&m.id).is_some());
}

#[tokio::test]
async fn a_wrong_secret_key_is_unauthenticated_and_never_quoted() {
    let h = start().await;
    let wrong = "wrong-key-0c2b9d";
    let p = ScalewayProvider::new(h.config(wrong, Duration::from_secs(5))).expect("provider");
    let e = p
        .get_machine(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("401");
    assert!(matches!(e, ProviderError::Unauthenticated(_)), "{e}");
    assert!(!e.to_string().contains(wrong), "{e}");
    assert!(e.to_string().contains("<redacted>"), "{e}");
}

#[tokio::test]
async fn listing_250_tagged_servers_across_pages_returns_exactly_those() {
    let h = start().await;
    let p = h.provider();
    let ours: BTreeSet<String> = (0..250)
        .map(|_| {
            h.fake.insert_server(vec![
                format!("{TAG_CONTROL_PLANE}={CONTROL_PLANE}"),
                format!("{TAG_INSTANCE}={}", InstanceId::new()),
            ])
        })
        .collect();
    for _ in 0..30 {
        h.fake.insert_server(vec!["unrelated".into()]);
    }
    for _ in 0..20 {
        h.fake
            .insert_server(vec![format!("{TAG_CONTROL_PLANE}=other-cp")]);
    }

    async fn walk(p: &ScalewayProvider, size: u32) -> (Vec<String>, usize) {
        let mut page = PageRequest { size, token: None };
        let (mut ids, mut pages) = (Vec::new(), 0);
        loop {
            let got = p.list_machines(&page).await.expect("page");
            pages += 1;
            assert!(pages <= 10, "the walk does not end");
            ids.extend(got.items.into_iter().map(|m| m.id));
            match got.next {
                Some(next) => page.token = Some(next),
                None => return (ids, pages),
            }
        }
    }

    // The API filters and counts; 1000 is clamped to Scaleway's 100.
    let (ids, pages) = walk(&p, 1000).await;
    assert_eq!(ids.len(), 250);
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), ours);
    assert_eq!(pages, 3);

    // Without the filter or the count, the client's own check and the
    // full-page rule still give exactly ours.
    {
        let mut w = h.fake.world();
        w.flags.ignore_tag_filter = true;
        w.flags.omit_total_count = true;
    }
    let (ids, pages) = walk(&p, 0).await;
    assert_eq!(ids.len(), 250);
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), ours);
    assert_eq!(pages, 4, "300 servers: three full pages, then an empty one");

    let bad = PageRequest {
        size: 10,
        token: Some("not-a-page".into()),
    };
    assert!(matches!(
        p.list_machines(&bad).await,
        Err(ProviderError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn an_answer_slower_than_the_request_timeout_is_deadline_exceeded() {
    let h = start().await;
    let p = ScalewayProvider::new(h.config(SECRET, Duration::from_millis(300))).expect("provider");
    h.fake.world().flags.slow = Some(Duration::from_secs(3));
    let e = p
        .get_machine(&uuid::Uuid::new_v4().to_string())
        .await
        .map_err(clean)
        .expect_err("slow");
    assert!(matches!(e, ProviderError::DeadlineExceeded(_)), "{e}");
}

#[tokio::test]
async fn the_secret_key_is_in_no_debug_output_nor_config_error() {
    let h = start().await;
    let p = h.provider();
    assert!(!format!("{p:?}").contains(SECRET));
    assert!(!format!("{:?}", h.config(SECRET, WAIT)).contains(SECRET));

    let bad_secret = format!("{SECRET}\n");
    let e = ScalewayProvider::new(h.config(&bad_secret, WAIT)).expect_err("bad header value");
    clean(e);
    let mut bad_zone = h.config(SECRET, WAIT);
    bad_zone.zone = "../fr-par-1".into();
    let e = ScalewayProvider::new(bad_zone)
        .map_err(clean)
        .expect_err("bad zone");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
}

#[tokio::test]
async fn a_bad_env_name_is_refused_before_any_server_is_created() {
    let h = start().await;
    let p = h.provider();
    let mut spec = spec();
    spec.env = BTreeMap::from([("BAD-NAME".to_owned(), "hunter2".to_owned())]);
    let e = p.create_machine(&spec).await.expect_err("bad env");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(h.fake.world().servers.is_empty());
}

#[tokio::test]
async fn finding_an_instances_servers_returns_only_those_even_unfiltered() {
    let h = start().await;
    let p = h.provider();
    let spec = spec();
    let mine = p.create_machine(&spec).await.expect("create");
    for _ in 0..3 {
        p.create_machine(&self::spec())
            .await
            .expect("other instance");
    }
    h.fake
        .insert_server(vec![format!("{TAG_INSTANCE}={}", spec.instance_id)]);

    let found = p.find_machines(spec.instance_id).await.expect("find");
    assert_eq!(found.iter().map(|m| &m.id).collect::<Vec<_>>(), [&mine.id]);
    h.fake.world().flags.ignore_tag_filter = true;
    let found = p.find_machines(spec.instance_id).await.expect("find");
    assert_eq!(found.iter().map(|m| &m.id).collect::<Vec<_>>(), [&mine.id]);
    assert_eq!(found[0].tags[TAG_POOL], "gpu");
}
