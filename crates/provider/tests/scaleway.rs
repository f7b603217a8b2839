//! The Scaleway provider against an in-process fake of the Instances API v1
//! that answers like the real one: servers boot through `starting`, a
//! running server refuses DELETE with a 400, deleting a server only detaches
//! its volumes, and attached volumes refuse DELETE. Flags make it rate
//! limit, fail, stall or misbehave.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use flotilla_core::InstanceId;
use flotilla_provider::scaleway::{ScalewayConfig, ScalewayProvider};
use flotilla_provider::{
    MachineProvider, MachineSpec, MachineState, PageRequest, ProviderError, TAG_CONTROL_PLANE,
    TAG_INSTANCE, TAG_POOL, VolumeSpec, VolumeState,
};
use serde_json::{Value, json};

const SECRET: &str = "scw-secret-3f9a1c77-do-not-leak";
const PROJECT: &str = "11111111-2222-3333-4444-555555555555";
const ZONE: &str = "fr-par-1";
const CONTROL_PLANE: &str = "cp-test";

// ---------------------------------------------------------------- the fake

#[derive(Default)]
struct Flags {
    rate_limited: bool,
    failing: bool,
    slow: Option<Duration>,
    poweron_does_nothing: bool,
    user_data_fails: bool,
    ignore_tag_filter: bool,
    omit_total_count: bool,
}

#[derive(Clone)]
struct FakeServer {
    id: String,
    name: String,
    state: String,
    commercial_type: String,
    tags: Vec<String>,
    root_volume: String,
    volumes: Vec<String>,
    terminating: bool,
    user_data: Option<String>,
}

struct FakeVolume {
    id: String,
    name: String,
    size: u64,
    server: Option<String>,
    tags: Vec<String>,
}

#[derive(Default)]
struct World {
    servers: BTreeMap<String, FakeServer>,
    volumes: BTreeMap<String, FakeVolume>,
    actions: Vec<(String, String)>,
    create_bodies: Vec<Value>,
    flags: Flags,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().expect("fake lock")
    }

    fn insert_server(&self, tags: Vec<String>) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let server = FakeServer {
            id: id.clone(),
            name: format!("srv-{id}"),
            state: "stopped".into(),
            commercial_type: "DEV1-S".into(),
            tags,
            root_volume: uuid::Uuid::new_v4().to_string(),
            volumes: Vec::new(),
            terminating: false,
            user_data: None,
        };
        self.world().servers.insert(id.clone(), server);
        id
    }

    fn set_state(&self, id: &str, state: &str) {
        self.world().servers.get_mut(id).expect("server").state = state.into();
    }

    fn server(&self, id: &str) -> Option<FakeServer> {
        self.world().servers.get(id).cloned()
    }

    fn attach(&self, volume: &str, server: Option<&str>) {
        self.world().volumes.get_mut(volume).expect("volume").server = server.map(str::to_owned);
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({ "type": kind, "message": message }))).into_response()
}

fn unknown(what: &str, id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "unknown_resource",
        &format!("\"{id}\" {what} not found"),
    )
}

fn server_json(s: &FakeServer) -> Value {
    let mut volumes = serde_json::Map::new();
    volumes.insert(
        "0".into(),
        json!({ "id": s.root_volume, "volume_type": "l_ssd" }),
    );
    for (i, v) in s.volumes.iter().enumerate() {
        volumes.insert(
            (i + 1).to_string(),
            json!({ "id": v, "volume_type": "b_ssd" }),
        );
    }
    json!({
        "id": s.id,
        "name": s.name,
        "state": s.state,
        "commercial_type": s.commercial_type,
        "tags": s.tags,
        "creation_date": "2024-05-01T12:00:00.123456+00:00",
        "private_ip": null,
        "zone": ZONE,
        "volumes": volumes,
        "arch": "x86_64",
        "state_detail": "",
    })
}

fn volume_json(v: &FakeVolume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "state": "available",
        "size": v.size,
        "volume_type": "b_ssd",
        "server": v.server.as_ref().map(|id| json!({ "id": id, "name": "srv" })),
        "tags": v.tags,
        "creation_date": "2024-05-01T12:00:00+00:00",
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
    if token != SECRET {
        // Echoes what it got: the provider must not pass it on.
        return error(
            StatusCode::UNAUTHORIZED,
            "denied_authentication",
            &format!("invalid auth token {token}"),
        );
    }
    let (rate_limited, failing, slow) = {
        let w = fake.world();
        (w.flags.rate_limited, w.flags.failing, w.flags.slow)
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    if rate_limited {
        let body = json!({ "type": "too_many_requests", "message": "quota exceeded" });
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "7")],
            Json(body),
        )
            .into_response();
    }
    if failing {
        // Wording that a text match would misread as "gone", plus the
        // request's token, as a misbehaving proxy might echo it.
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            &format!("server not found in cache (x-auth-token: {token})"),
        );
    }
    next.run(req).await
}

/// One page of `items` under `key`, with `X-Total-Count` unless omitted.
fn listing(
    key: &str,
    items: Vec<Value>,
    query: &HashMap<String, String>,
    omit_total: bool,
) -> Response {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_arguments", m);
    let number = |name: &str, default: usize| match query.get(name) {
        None => Some(default),
        Some(p) => p.parse::<usize>().ok(),
    };
    let (Some(per_page), Some(page)) = (number("per_page", 50), number("page", 1)) else {
        return bad("per_page and page are numbers");
    };
    if !(1..=100).contains(&per_page) || page == 0 {
        return bad("per_page must be 1-100 and page at least 1");
    }
    let mut headers = HeaderMap::new();
    if !omit_total {
        headers.insert("x-total-count", items.len().into());
    }
    let page: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    (headers, Json(json!({ key: page }))).into_response()
}

fn has_tags(tags: &[String], query: &HashMap<String, String>, ignore: bool) -> bool {
    ignore
        || query
            .get("tags")
            .is_none_or(|want| want.split(',').all(|t| tags.iter().any(|x| x == t)))
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|t| t.as_str().map(str::to_owned))
        .collect()
}

async fn create_server(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let bad = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_arguments", m);
    let (Some(name), Some(commercial_type), Some(_image), Some(tags)) = (
        body["name"].as_str(),
        body["commercial_type"].as_str(),
        body["image"].as_str(),
        string_list(&body["tags"]),
    ) else {
        return bad("name, commercial_type, image and tags are required");
    };
    if body["project"] != PROJECT {
        return error(StatusCode::FORBIDDEN, "permission_denied", "wrong project");
    }
    let mut w = fake.world();
    let mut volumes = Vec::new();
    if let Some(map) = body["volumes"].as_object() {
        for i in 1..=map.len() {
            let Some(id) = map.get(&i.to_string()).and_then(|v| v["id"].as_str()) else {
                return bad("volumes must be numbered from 1");
            };
            match w.volumes.get(id) {
                Some(v) if v.server.is_none() => volumes.push(id.to_owned()),
                Some(_) => return bad("volume is already attached"),
                None => return unknown("volume", id),
            }
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    for v in &volumes {
        w.volumes.get_mut(v).expect("checked").server = Some(id.clone());
    }
    let server = FakeServer {
        id: id.clone(),
        name: name.into(),
        state: "stopped".into(),
        commercial_type: commercial_type.into(),
        tags,
        root_volume: uuid::Uuid::new_v4().to_string(),
        volumes,
        terminating: false,
        user_data: None,
    };
    let answer = json!({ "server": server_json(&server) });
    w.servers.insert(id, server);
    w.create_bodies.push(body);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_servers(
    State(fake): State<Fake>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let w = fake.world();
    let matching: Vec<Value> = w
        .servers
        .values()
        .filter(|s| has_tags(&s.tags, &query, w.flags.ignore_tag_filter))
        .map(server_json)
        .collect();
    listing("servers", matching, &query, w.flags.omit_total_count)
}

/// Answers the current state, then moves a transient one a step on, so a
/// poll sees `starting` before `running`.
async fn get_server(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let Some(s) = w.servers.get_mut(&id) else {
        return unknown("instance", &id);
    };
    let answer = json!({ "server": server_json(s) });
    match (s.state.as_str(), s.terminating) {
        ("starting", _) => s.state = "running".into(),
        ("stopping", false) => s.state = "stopped".into(),
        ("stopping", true) => {
            let gone = w.servers.remove(&id).expect("present");
            for v in gone.volumes {
                if let Some(v) = w.volumes.get_mut(&v) {
                    v.server = None;
                }
            }
        }
        _ => {}
    }
    Json(answer).into_response()
}

async fn delete_server(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let Some(s) = w.servers.get(&id) else {
        return unknown("instance", &id);
    };
    if s.state != "stopped" && s.state != "stopped in place" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "instance should be powered off.",
        );
    }
    let gone = w.servers.remove(&id).expect("present");
    // Like Scaleway: block volumes are detached, not deleted.
    for v in gone.volumes {
        if let Some(v) = w.volumes.get_mut(&v) {
            v.server = None;
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn server_action(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let mut guard = fake.world();
    let w = &mut *guard;
    let action = body["action"].as_str().unwrap_or_default().to_owned();
    let Some(s) = w.servers.get_mut(&id) else {
        return unknown("instance", &id);
    };
    let refuse = |m: &str| error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    match (action.as_str(), s.state.as_str()) {
        ("poweron", "stopped" | "stopped in place") => {
            if !w.flags.poweron_does_nothing {
                s.state = "starting".into();
            }
        }
        ("poweron", _) => return refuse("instance should be stopped"),
        ("poweroff", "running" | "stopped in place") => s.state = "stopping".into(),
        ("terminate", "running") => {
            s.state = "stopping".into();
            s.terminating = true;
        }
        ("stop_in_place", "running") => s.state = "stopped in place".into(),
        ("poweroff" | "terminate" | "stop_in_place", _) => {
            return refuse("instance should be running");
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_arguments",
                "unknown action",
            );
        }
    }
    w.actions.push((action.clone(), id));
    let task = json!({ "task": { "id": uuid::Uuid::new_v4(), "description": action, "status": "pending" } });
    (StatusCode::ACCEPTED, Json(task)).into_response()
}

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
            "service_unavailable",
            "try later",
        );
    }
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("text/plain")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "text/plain only",
        );
    }
    if key != "cloud-init" {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "unexpected key",
        );
    }
    let Some(s) = w.servers.get_mut(&id) else {
        return unknown("instance", &id);
    };
    s.user_data = Some(body);
    StatusCode::NO_CONTENT.into_response()
}

async fn create_volume(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    let (Some(name), Some(size), Some(tags)) = (
        body["name"].as_str(),
        body["size"].as_u64(),
        string_list(&body["tags"]),
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_arguments",
            "name, size, tags",
        );
    };
    if body["volume_type"] != "b_ssd" || body["project"] != PROJECT {
        return error(StatusCode::BAD_REQUEST, "invalid_arguments", "volume_type");
    }
    let v = FakeVolume {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        size,
        server: None,
        tags,
    };
    let answer = json!({ "volume": volume_json(&v) });
    fake.world().volumes.insert(v.id.clone(), v);
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_volumes(
    State(fake): State<Fake>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let w = fake.world();
    let matching: Vec<Value> = w
        .volumes
        .values()
        .filter(|v| has_tags(&v.tags, &query, w.flags.ignore_tag_filter))
        .map(volume_json)
        .collect();
    listing("volumes", matching, &query, w.flags.omit_total_count)
}

async fn get_volume(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    match fake.world().volumes.get(&id) {
        Some(v) => Json(json!({ "volume": volume_json(v) })).into_response(),
        None => unknown("volume", &id),
    }
}

async fn delete_volume(State(fake): State<Fake>, Path(id): Path<String>) -> Response {
    let mut w = fake.world();
    match w.volumes.get(&id) {
        None => unknown("volume", &id),
        Some(v) if v.server.is_some() => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "volume is in use",
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
    let fake = Fake::default();
    let zone = Router::new()
        .route("/servers", get(list_servers).post(create_server))
        .route("/servers/{id}", get(get_server).delete(delete_server))
        .route("/servers/{id}/action", post(server_action))
        .route("/servers/{id}/user_data/{key}", patch(set_user_data))
        .route("/volumes", get(list_volumes).post(create_volume))
        .route("/volumes/{id}", get(get_volume).delete(delete_volume));
    let app = Router::new()
        .nest(&format!("/instance/v1/zones/{ZONE}"), zone)
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

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn a_server_goes_from_created_to_running_to_stopped_to_deleted_then_is_not_found() {
    let h = start().await;
    let p = h.provider();
    assert_eq!(p.kind(), "scaleway");
    let mut spec = spec();
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
    assert_eq!(m.tags[TAG_POOL], "gpu");
    assert_eq!(m.tags[TAG_CONTROL_PLANE], CONTROL_PLANE);
    assert_eq!(m.tags["team"], "ml");
    assert_eq!(
        (m.region.as_str(), m.instance_type.as_str()),
        (ZONE, "DEV1-S")
    );
    assert!(m.created_at.is_some());
    assert_eq!(m.private_ip, "");

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
        .expect("user data set");
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert!(
        !user_data.contains("s3cr3t"),
        "env must be encoded: {user_data}"
    );
    let content = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("content: "))
        .expect("content line");
    assert_eq!(
        String::from_utf8(base64_decode(content)).expect("utf-8"),
        "API_KEY='s3cr3t value'\\''s $HOME'\nMODE='batch'\n"
    );

    let started = p.start_machine(&m.id).await.map_err(clean).expect("start");
    assert_eq!(started.state, MachineState::Starting);
    let running = p
        .wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");
    assert_eq!(running.provider_state, "running");

    let stopping = p
        .stop_machine(&m.id, Duration::from_secs(10))
        .await
        .expect("stop");
    assert_eq!(stopping.state, MachineState::Stopping);
    p.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("stopped");

    p.delete_machine(&m.id, false)
        .await
        .map_err(clean)
        .expect("delete");
    assert!(h.fake.server(&m.id).is_none());
    let gone = p.get_machine(&m.id).await.map_err(clean).expect_err("gone");
    assert!(matches!(gone, ProviderError::NotFound(_)), "{gone}");
    let waited = p
        .wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .expect("destroyed");
    assert_eq!(waited.state, MachineState::Destroyed);
    let again = p
        .delete_machine(&m.id, false)
        .await
        .expect_err("already gone");
    assert!(matches!(again, ProviderError::NotFound(_)), "{again}");
}

#[tokio::test]
async fn deleting_a_running_server_without_force_is_refused_and_the_server_stays() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    p.start_machine(&m.id).await.expect("start");
    p.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");

    let e = p
        .delete_machine(&m.id, false)
        .await
        .map_err(clean)
        .expect_err("refused");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("running"), "{e}");
    assert_eq!(
        h.fake.server(&m.id).map(|s| s.state),
        Some("running".into())
    );
    assert_eq!(
        p.get_machine(&m.id).await.expect("still there").state,
        MachineState::Started
    );
}

#[tokio::test]
async fn force_deleting_a_running_server_terminates_it_and_only_detaches_its_volume() {
    let h = start().await;
    let p = h.provider();
    let vol = p.create_volume(&volume_spec()).await.expect("volume");
    let mut spec = spec();
    spec.volume_ids = vec![vol.id.clone()];
    let m = p.create_machine(&spec).await.expect("create");
    p.start_machine(&m.id).await.expect("start");
    p.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .expect("running");

    p.delete_machine(&m.id, true)
        .await
        .map_err(clean)
        .expect("force delete");
    assert!(
        h.fake
            .world()
            .actions
            .contains(&("terminate".to_owned(), m.id.clone()))
    );
    p.wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .expect("destroyed");
    assert!(matches!(
        p.get_machine(&m.id).await,
        Err(ProviderError::NotFound(_))
    ));

    // The volume outlives its server and still has to be deleted.
    let listed = p.list_volumes(&PageRequest::default()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].state, VolumeState::Available);
    assert_eq!(listed.items[0].attached_machine_id, None);
    p.delete_volume(&vol.id).await.expect("volume delete");
}

#[tokio::test]
async fn a_poweron_that_leaves_the_server_stopped_is_an_error() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    h.fake.world().flags.poweron_does_nothing = true;

    let e = p
        .start_machine(&m.id)
        .await
        .map_err(clean)
        .expect_err("did not start");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("did not start"), "{e}");
    let waited = p
        .wait_machine(&m.id, MachineState::Started, Duration::from_millis(500))
        .await
        .expect_err("never starts");
    assert!(
        matches!(waited, ProviderError::DeadlineExceeded(_)),
        "{waited}"
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
async fn a_server_stopped_in_place_reads_as_stopped_and_keeps_its_provider_state() {
    let h = start().await;
    let p = h.provider();
    let m = p.create_machine(&spec()).await.expect("create");
    h.fake.set_state(&m.id, "stopped in place");
    let got = p.get_machine(&m.id).await.expect("get");
    assert_eq!(got.state, MachineState::Stopped);
    assert_eq!(got.provider_state, "stopped in place");
    let waited = p
        .wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .expect("wait");
    assert_eq!(waited.provider_state, "stopped in place");
}

#[tokio::test]
async fn transient_states_are_not_read_as_stopped_and_locked_is_failed() {
    let h = start().await;
    let p = h.provider();
    let id = h.fake.insert_server(Vec::new());
    for (state, want) in [
        ("stopping", MachineState::Stopping),
        ("locked", MachineState::Failed),
        ("provisioning", MachineState::Unknown),
    ] {
        h.fake.set_state(&id, state);
        let got = p.get_machine(&id).await.expect("get");
        assert_eq!((got.state, got.provider_state.as_str()), (want, state));
        h.fake.set_state(&id, state);
        let e = p
            .delete_machine(&id, true)
            .await
            .expect_err("not deletable");
        assert!(
            matches!(e, ProviderError::FailedPrecondition(_)),
            "{state}: {e}"
        );
    }
}

#[tokio::test]
async fn a_rate_limited_answer_is_resource_exhausted_with_retry_after() {
    let h = start().await;
    let p = h.provider();
    h.fake.world().flags.rate_limited = true;
    let e = p
        .get_machine(&uuid::Uuid::new_v4().to_string())
        .await
        .map_err(clean)
        .expect_err("429");
    assert!(matches!(e, ProviderError::ResourceExhausted { .. }), "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    let e = p
        .list_machines(&PageRequest::default())
        .await
        .expect_err("429");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
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
async fn a_volume_is_kept_while_attached_deleted_once_detached_then_not_found() {
    let h = start().await;
    let p = h.provider();
    let spec = volume_spec();
    let vol = p.create_volume(&spec).await.map_err(clean).expect("create");
    assert_eq!((vol.state, vol.size_gb), (VolumeState::Available, 10));
    assert_eq!(vol.instance_id, Some(spec.instance_id));
    assert_eq!(vol.tags[TAG_CONTROL_PLANE], CONTROL_PLANE);
    assert_eq!(h.fake.world().volumes[&vol.id].size, 10_000_000_000);

    let server = h.fake.insert_server(Vec::new());
    h.fake.attach(&vol.id, Some(&server));
    let listed = p.list_volumes(&PageRequest::default()).await.expect("list");
    assert_eq!(listed.items[0].state, VolumeState::Attached);
    assert_eq!(
        listed.items[0].attached_machine_id.as_deref(),
        Some(server.as_str())
    );
    let e = p
        .delete_volume(&vol.id)
        .await
        .map_err(clean)
        .expect_err("attached");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains(&server), "{e}");
    assert!(h.fake.world().volumes.contains_key(&vol.id));

    h.fake.attach(&vol.id, None);
    p.delete_volume(&vol.id).await.expect("delete");
    let e = p
        .delete_volume(&vol.id)
        .await
        .map_err(clean)
        .expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
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
async fn when_user_data_cannot_be_set_the_error_is_returned_and_the_server_is_still_listed() {
    let h = start().await;
    let p = h.provider();
    h.fake.world().flags.user_data_fails = true;
    let mut spec = spec();
    spec.env = BTreeMap::from([("TOKEN".to_owned(), "x".to_owned())]);
    let e = p
        .create_machine(&spec)
        .await
        .map_err(clean)
        .expect_err("user data failed");
    assert!(matches!(e, ProviderError::Unavailable(_)), "{e}");

    let listed = p
        .list_machines(&PageRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].instance_id(), Some(spec.instance_id));
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
}
