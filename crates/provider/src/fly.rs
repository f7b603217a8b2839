//! Fly.io Machines API client (also the client of the simulated cloud,
//! which speaks the same API).
//!
//! Design notes: ownership is written into each machine's `config.metadata`
//! (instance id, pool, control plane id) and listings filter on it, so the
//! orphan scan can tie any machine back to its row. Fly volumes have no
//! metadata, so a volume's name carries its owner: `f`, a 4-character
//! digest of the control-plane id and the instance UUID in base 36 (30
//! chars, Fly's limit), and listings keep only names with our digest. A
//! start is checked by reading the machine back: a 200 that leaves the
//! machine neither starting nor started is an error. Right after a destroy,
//! Fly's GET briefly shows `destroyed` before answering 404; both mean
//! gone. A 404 means gone only for the thing asked about: before one is
//! passed on as `NotFound`, the app is confirmed to exist, so a mistyped or
//! deleted app never makes every machine look gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::InstanceId;
use reqwest::Client;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{client_builder, send, send_json};
use crate::types::*;
use crate::{MachineProvider, ProviderError, ProviderResult};

/// Connection settings.
#[derive(Clone)]
pub struct FlyConfig {
    /// `https://api.machines.dev` for Fly; the simulator's URL for `sim`.
    pub base_url: String,
    pub token: String,
    pub app: String,
    pub control_plane_id: String,
    pub request_timeout: Duration,
    /// Bound on opening a connection (`HTTP_CONNECT_TIMEOUT_SECONDS`).
    pub connect_timeout: Duration,
    /// How long a start may take to show `started` before it counts as failed.
    pub start_timeout: Duration,
    /// Reported by [`MachineProvider::kind`]: "fly" or "sim".
    pub kind: &'static str,
}

impl std::fmt::Debug for FlyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlyConfig")
            .field("base_url", &self.base_url)
            .field("token", &"<redacted>")
            .field("app", &self.app)
            .field("control_plane_id", &self.control_plane_id)
            .field("kind", &self.kind)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct FlyProvider {
    http: Client,
    config: FlyConfig,
    /// When `GET /v1/apps/{app}` last answered 200 (shared by clones).
    app_seen: Arc<Mutex<Option<tokio::time::Instant>>>,
}

/// A machine as Fly's API returns it (fields Flotilla reads).
#[derive(Debug, Deserialize)]
struct ApiMachine {
    id: String,
    /// The machine version (26 characters); `wait` needs it.
    #[serde(default)]
    instance_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    private_ip: Option<String>,
    #[serde(default)]
    config: Option<ApiMachineConfig>,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiMachineConfig {
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    guest: Option<Guest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Guest {
    cpu_kind: String,
    cpus: u32,
    memory_mb: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gpu_kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiVolume {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    size_gb: u32,
    #[serde(default)]
    region: String,
    #[serde(default)]
    attached_machine_id: Option<String>,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
}

/// Fly's machine states, mapped exactly.
pub fn machine_state(s: &str) -> MachineState {
    match s {
        "created" => MachineState::Created,
        "starting" => MachineState::Starting,
        "started" => MachineState::Started,
        "stopping" => MachineState::Stopping,
        "stopped" => MachineState::Stopped,
        "suspending" => MachineState::Suspending,
        "suspended" => MachineState::Suspended,
        "replacing" => MachineState::Replacing,
        "destroying" => MachineState::Destroying,
        "destroyed" => MachineState::Destroyed,
        "failed" => MachineState::Failed,
        "creating" => MachineState::Creating,
        "restarting" => MachineState::Restarting,
        "launch_failed" => MachineState::LaunchFailed,
        "updating" => MachineState::Updating,
        "replaced" => MachineState::Replaced,
        "migrated" => MachineState::Migrated,
        _ => MachineState::Unknown,
    }
}

fn volume_state(s: &str, attached: bool) -> VolumeState {
    match s {
        "created" | "hydrating" if attached => VolumeState::Attached,
        "created" => VolumeState::Available,
        "creating" | "hydrating" | "restoring" => VolumeState::Creating,
        "destroying" | "pending_destroy" | "scheduling_destroy" => VolumeState::Destroying,
        "destroyed" => VolumeState::Destroyed,
        "failed" => VolumeState::Failed,
        _ => VolumeState::Unknown,
    }
}

/// Fly's GPU kinds (`guest.gpu_kind`), by the size names Fly also uses for
/// them. Source: Fly docs "Using GPUs" ("The available GPU types are: a10,
/// l40s, a100-pcie-40gb and a100-sxm4-80gb") and the GPU quickstart
/// (`vm.size` a10, l40s, a100-40gb, a100-80gb).
const GPU_KINDS: &[(&str, &str)] = &[
    ("a10", "a10"),
    ("l40s", "l40s"),
    ("a100-40gb", "a100-pcie-40gb"),
    ("a100-80gb", "a100-sxm4-80gb"),
];

/// Memory per CPU, in MB, that Fly accepts for each CPU kind, in multiples
/// of 256 (Fly docs, "Machine sizing": shared 256-2048 MB per CPU,
/// performance 2048-8192 MB per CPU).
fn memory_per_cpu(cpu_kind: &str) -> std::ops::RangeInclusive<u32> {
    if cpu_kind == "performance" {
        2048..=8192
    } else {
        256..=2048
    }
}

/// The guest for an instance type: `shared-cpu-Nx`, `performance-Nx`, a GPU
/// (`a10`, `l40s`, `a100-40gb`/`a100-pcie-40gb`, `a100-80gb`/`a100-sxm4-80gb`),
/// or a custom size `<cpus>x<memory_mb>` (shared CPUs) or
/// `performance-<cpus>x<memory_mb>`, within Fly's per-CPU memory ranges.
fn guest(instance_type: &str) -> ProviderResult<Guest> {
    let bad = |why: &str| {
        ProviderError::InvalidArgument(format!(
            "instance_type: {instance_type:?} is not a Fly size{why} (shared-cpu-Nx, \
             performance-Nx, a10, l40s, a100-40gb, a100-80gb, <cpus>x<memory_mb> or \
             performance-<cpus>x<memory_mb>)"
        ))
    };
    let cpus = |n: &str| n.parse::<u32>().ok().filter(|n| (1..=16).contains(n));
    let preset = |kind: &str, n: &str, per_cpu: u32| -> ProviderResult<Guest> {
        let n = cpus(n).ok_or_else(|| bad(""))?;
        Ok(Guest {
            cpu_kind: kind.into(),
            cpus: n,
            memory_mb: per_cpu * n,
            gpu_kind: None,
        })
    };
    let custom = |kind: &str, c: &str, m: &str| -> ProviderResult<Guest> {
        let c = cpus(c).ok_or_else(|| bad(""))?;
        let m = m.parse::<u32>().map_err(|_| bad(""))?;
        let range = memory_per_cpu(kind);
        let (min, max) = (range.start() * c, range.end() * c);
        if !m.is_multiple_of(256) || !(min..=max).contains(&m) {
            return Err(bad(&format!(
                ": {c} {kind} CPUs take {min} to {max} MB of memory in multiples of 256"
            )));
        }
        Ok(Guest {
            cpu_kind: kind.into(),
            cpus: c,
            memory_mb: m,
            gpu_kind: None,
        })
    };
    if let Some(n) = instance_type
        .strip_prefix("shared-cpu-")
        .and_then(|r| r.strip_suffix('x'))
    {
        return preset("shared", n, 256);
    }
    if let Some(rest) = instance_type.strip_prefix("performance-") {
        if let Some(n) = rest.strip_suffix('x') {
            return preset("performance", n, 2048);
        }
        if let Some((c, m)) = rest.split_once('x') {
            return custom("performance", c, m);
        }
        return Err(bad(""));
    }
    if let Some((_, kind)) = GPU_KINDS
        .iter()
        .find(|(size, kind)| *size == instance_type || *kind == instance_type)
    {
        return Ok(Guest {
            cpu_kind: "performance".into(),
            cpus: 8,
            memory_mb: 32768,
            gpu_kind: Some((*kind).to_owned()),
        });
    }
    if let Some((c, m)) = instance_type.split_once('x') {
        return custom("shared", c, m);
    }
    Err(bad(""))
}

/// Base-36 digits of `n`, `width` of them (the most significant first).
fn base36(mut n: u128, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Characters of the control-plane digest in a volume name.
const DIGEST_LEN: usize = 4;
/// Base-36 characters of an instance id (a UUID) in a volume name.
const ID_LEN: usize = 25;

/// A short, stable digest of the control-plane id (FNV-1a, 4 base-36
/// characters), so a volume name says which installation owns it.
pub fn control_plane_digest(control_plane: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in control_plane.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    base36(u128::from(hash) % 36u128.pow(DIGEST_LEN as u32), DIGEST_LEN)
}

/// The volume name that carries its owner: `f`, the control-plane digest
/// and the instance UUID in base 36 (30 characters, Fly's limit, of
/// lowercase letters and digits).
pub fn volume_name(control_plane: &str, id: InstanceId) -> String {
    format!(
        "f{}{}",
        control_plane_digest(control_plane),
        base36(id.0.as_u128(), ID_LEN)
    )
}

/// The control-plane digest and instance id a volume name carries, if it
/// has the shape of one of Flotilla's.
fn parse_volume_name(name: &str) -> Option<(&str, InstanceId)> {
    let rest = name.strip_prefix('f')?;
    if rest.len() != DIGEST_LEN + ID_LEN || !rest.is_ascii() {
        return None;
    }
    let (digest, digits) = rest.split_at(DIGEST_LEN);
    if !digest
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    let mut n: u128 = 0;
    for c in digits.chars() {
        if c.is_ascii_uppercase() {
            return None;
        }
        n = n.checked_mul(36)?.checked_add(c.to_digit(36)? as u128)?;
    }
    Some((digest, InstanceId(uuid::Uuid::from_u128(n))))
}

/// The instance id a volume name carries, whichever installation named it.
pub fn instance_of_volume(name: &str) -> Option<InstanceId> {
    parse_volume_name(name).map(|(_, id)| id)
}

/// The instance id of a volume named by the installation `control_plane`;
/// `None` for another installation's volume or one Flotilla did not name.
pub fn owned_volume_instance(control_plane: &str, name: &str) -> Option<InstanceId> {
    parse_volume_name(name)
        .filter(|(digest, _)| *digest == control_plane_digest(control_plane))
        .map(|(_, id)| id)
}

/// How long a positive answer of `GET /v1/apps/{app}` is trusted before a
/// 404 on a machine or volume is believed again without asking.
const APP_SEEN_FOR: Duration = Duration::from_secs(10);

/// Longest pause between two reads of a poll.
const POLL_MAX_PAUSE: Duration = Duration::from_secs(1);

/// A failure a poll rides out: the next read may well succeed.
fn transient(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::ResourceExhausted { .. }
            | ProviderError::Unavailable(_)
            | ProviderError::DeadlineExceeded(_)
    )
}

fn wait_state(state: MachineState) -> ProviderResult<&'static str> {
    match state {
        MachineState::Started => Ok("started"),
        MachineState::Stopped => Ok("stopped"),
        MachineState::Suspended => Ok("suspended"),
        MachineState::Destroyed => Ok("destroyed"),
        other => Err(ProviderError::InvalidArgument(format!(
            "state: cannot wait for {}",
            other.as_str()
        ))),
    }
}

fn destroyed(id: &str) -> Machine {
    Machine {
        id: id.to_owned(),
        name: String::new(),
        state: MachineState::Destroyed,
        provider_state: "destroyed".into(),
        region: String::new(),
        instance_type: String::new(),
        tags: BTreeMap::new(),
        created_at: None,
        private_ip: String::new(),
    }
}

impl FlyProvider {
    pub fn new(config: FlyConfig) -> ProviderResult<Self> {
        if config.app.is_empty() {
            return Err(ProviderError::InvalidArgument(
                "FLY_APP_NAME is empty".into(),
            ));
        }
        let http = client_builder(config.request_timeout, config.connect_timeout)
            .build()
            .map_err(|e| ProviderError::InvalidArgument(format!("http client: {e}")))?;
        Ok(FlyProvider {
            http,
            config,
            app_seen: Arc::new(Mutex::new(None)),
        })
    }

    fn app_url(&self) -> String {
        format!(
            "{}/v1/apps/{}",
            self.config.base_url.trim_end_matches('/'),
            self.config.app,
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.app_url(), path)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.config.token)
    }

    /// Checks that the configured app exists (`GET /v1/apps/{app}`, OpenAPI
    /// `Apps_show`): the adapter's readiness check, and the second look
    /// behind every 404. A missing app is `FailedPrecondition` naming
    /// FLY_APP_NAME, never `NotFound`.
    pub async fn check_app(&self) -> ProviderResult<()> {
        let req = self
            .http
            .get(self.app_url())
            .bearer_auth(&self.config.token);
        match send(req).await {
            Ok(_) => {
                *self.app_seen.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(tokio::time::Instant::now());
                Ok(())
            }
            Err(ProviderError::NotFound(_)) => {
                *self.app_seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Err(ProviderError::FailedPrecondition(format!(
                    "the Fly app {:?} is missing (404 on GET /v1/apps/{}): FLY_APP_NAME is \
                     mistyped or the app was deleted",
                    self.config.app, self.config.app
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// A 404 means gone only for the thing asked about: before a machine's
    /// or volume's 404 is passed on as `NotFound`, the app must be known to
    /// exist (recently seen, or asked now). A missing app, or an app that
    /// cannot be confirmed, is never "gone".
    async fn confirm_not_found(&self, e: ProviderError) -> ProviderError {
        if !matches!(e, ProviderError::NotFound(_)) {
            return e;
        }
        let fresh = self
            .app_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < APP_SEEN_FOR);
        if fresh {
            return e;
        }
        match self.check_app().await {
            Ok(()) => e,
            Err(missing @ ProviderError::FailedPrecondition(_)) => missing,
            Err(other) => ProviderError::Unavailable(format!(
                "a 404 could not be confirmed, the app did not answer: {other}"
            )),
        }
    }

    /// [`send`] for a call on one machine or volume: its 404 is confirmed.
    async fn send_item(&self, req: reqwest::RequestBuilder) -> ProviderResult<bytes::Bytes> {
        match send(req).await {
            Err(e) => Err(self.confirm_not_found(e).await),
            ok => ok,
        }
    }

    /// [`send_json`] for a call on one machine or volume.
    async fn send_item_json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> ProviderResult<T> {
        let body = self.send_item(req).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Unavailable(format!("unexpected answer from provider: {e}"))
        })
    }

    /// [`send_json`] for a listing: the only thing a listing's 404 can name
    /// is the app, so it is never `NotFound`.
    async fn send_list<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> ProviderResult<T> {
        match send_json(req).await {
            Err(e @ ProviderError::NotFound(_)) => match self.confirm_not_found(e).await {
                ProviderError::NotFound(m) => Err(ProviderError::Unavailable(format!(
                    "a listing answered 404 although the app exists: {m}"
                ))),
                other => Err(other),
            },
            other => other,
        }
    }

    async fn get_api_machine(&self, id: &str) -> ProviderResult<ApiMachine> {
        self.send_item_json(self.req(reqwest::Method::GET, &format!("/machines/{id}")))
            .await
    }

    /// Reads the machine until `deadline`, riding out transient failures
    /// (429, 5xx, timeouts) with backoff; the last one is returned only
    /// when the deadline passed.
    async fn get_patiently(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> ProviderResult<ApiMachine> {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.get_api_machine(id).await {
                Err(e) if transient(&e) => {
                    let wait = e.retry_after().unwrap_or(pause).max(pause);
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(POLL_MAX_PAUSE);
                }
                other => return other,
            }
        }
    }

    fn machine(&self, m: ApiMachine) -> Machine {
        let config = m.config.unwrap_or_default();
        let instance_type = config
            .guest
            .map(|g| match g.gpu_kind {
                Some(gpu) => GPU_KINDS
                    .iter()
                    .find(|(_, kind)| *kind == gpu)
                    .map_or(gpu.clone(), |(size, _)| (*size).to_owned()),
                None if g.cpu_kind == "performance" => format!("performance-{}x", g.cpus),
                None => format!("shared-cpu-{}x", g.cpus),
            })
            .unwrap_or_default();
        Machine {
            state: machine_state(&m.state),
            provider_state: m.state,
            id: m.id,
            name: m.name,
            region: m.region,
            instance_type,
            tags: config.metadata.unwrap_or_default(),
            created_at: m.created_at,
            private_ip: m.private_ip.unwrap_or_default(),
        }
    }

    fn volume(&self, v: ApiVolume) -> Volume {
        let attached = v
            .attached_machine_id
            .as_deref()
            .is_some_and(|s| !s.is_empty());
        Volume {
            state: volume_state(&v.state, attached),
            provider_state: v.state,
            instance_id: owned_volume_instance(&self.config.control_plane_id, &v.name),
            id: v.id,
            name: v.name,
            size_gb: v.size_gb,
            region: v.region,
            attached_machine_id: v.attached_machine_id.filter(|s| !s.is_empty()),
            tags: BTreeMap::new(),
            created_at: v.created_at,
        }
    }

    fn owned(&self, m: &Machine) -> bool {
        m.tags.get(TAG_CONTROL_PLANE) == Some(&self.config.control_plane_id)
    }
}

fn check_id(field: &str, id: &str) -> ProviderResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "{field}: {id:?} is not a valid id"
        )))
    }
}

fn check_volume_size(size_gb: u32) -> ProviderResult<()> {
    if (1..=500).contains(&size_gb) {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "size_gb: {size_gb} is outside 1..=500"
        )))
    }
}

impl MachineProvider for FlyProvider {
    fn kind(&self) -> &'static str {
        self.config.kind
    }

    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        guest(&spec.instance_type)?;
        if spec.image.is_empty() {
            return Err(ProviderError::InvalidArgument(
                "image: Fly needs an image to create a machine".into(),
            ));
        }
        if spec.volume_size_gb != 0 {
            check_volume_size(spec.volume_size_gb).map_err(|_| {
                ProviderError::InvalidArgument(format!(
                    "volume_size_gb: {} is outside 1..=500",
                    spec.volume_size_gb
                ))
            })?;
        }
        Ok(())
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        let guest = guest(&spec.instance_type)?;
        // "A Machine can only mount one volume at a time" (Fly docs,
        // volumes overview).
        if spec.volume_ids.len() > 1 {
            return Err(ProviderError::InvalidArgument(format!(
                "volume_ids: a Fly machine mounts one volume, got {}",
                spec.volume_ids.len()
            )));
        }
        let mut metadata = spec.tags.clone();
        metadata.extend(ownership_tags(
            spec.instance_id,
            &spec.pool,
            &self.config.control_plane_id,
        ));
        let mounts: Vec<_> = spec
            .volume_ids
            .iter()
            .map(|v| json!({ "volume": v, "path": "/data" }))
            .collect();
        let body = json!({
            "name": spec.name,
            "region": spec.region,
            "skip_launch": !spec.start,
            "config": {
                "image": spec.image,
                "env": spec.env,
                "metadata": metadata,
                "guest": guest,
                "mounts": mounts,
                // Flotilla decides when a machine goes away, not Fly.
                "auto_destroy": false,
                "restart": { "policy": "no" },
            },
        });
        let m: ApiMachine =
            send_json(self.req(reqwest::Method::POST, "/machines").json(&body)).await?;
        Ok(self.machine(m))
    }

    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        self.send_item(self.req(reqwest::Method::POST, &format!("/machines/{id}/start")))
            .await?;
        // A 200 only says the request was taken: follow the machine until it
        // is started, so a launch that fails is reported now, as an error,
        // instead of leaving the instance "booting" until a timeout. A read
        // that fails in passing (429, 5xx) does not fail the start.
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let m = self.machine(self.get_patiently(id, deadline).await?);
            match m.state {
                MachineState::Started => return Ok(m),
                MachineState::Created => {}
                s if s.is_transient() => {}
                _ => {
                    return Err(ProviderError::FailedPrecondition(format!(
                        "machine {id} did not start: it is {}",
                        m.provider_state
                    )));
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Err(ProviderError::DeadlineExceeded(format!(
                    "machine {id} still {} after {:?}",
                    m.provider_state, self.config.start_timeout
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX_PAUSE);
        }
    }

    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let body =
            json!({ "signal": "SIGTERM", "timeout": format!("{}s", grace.as_secs().max(1)) });
        self.send_item(
            self.req(reqwest::Method::POST, &format!("/machines/{id}/stop"))
                .json(&body),
        )
        .await?;
        self.get_machine(id).await
    }

    async fn suspend_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        self.send_item(self.req(reqwest::Method::POST, &format!("/machines/{id}/suspend")))
            .await?;
        self.get_machine(id).await
    }

    /// Fly's `wait` names the machine version (`instance_id`, "Required
    /// when waiting for Machine to be in stopped state", Fly docs, machines
    /// resource; OpenAPI `Machines_wait`). The version is read with a GET
    /// right before the wait, which also answers at once when the machine
    /// is already there. fly-go (flaps_machines_wait.go, 22d6e51) now calls
    /// the same parameter `version`; Flotilla sends the documented
    /// `instance_id`. A 408 means "not yet", never a failure of the step.
    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let wanted = wait_state(state)?;
        let secs = timeout.as_secs().clamp(1, 60);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let current = match self.get_patiently(id, deadline).await {
            Ok(m) => m,
            Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                return Ok(destroyed(id));
            }
            Err(e) => return Err(e),
        };
        if current.state == wanted {
            return Ok(self.machine(current));
        }
        let mut query = vec![("state", wanted.to_owned()), ("timeout", secs.to_string())];
        if !current.instance_id.is_empty() {
            query.push(("instance_id", current.instance_id.clone()));
        }
        let req = self
            .req(reqwest::Method::GET, &format!("/machines/{id}/wait"))
            .query(&query)
            // The server holds the request up to `secs`.
            .timeout(Duration::from_secs(secs) + self.config.request_timeout);
        match self.send_item(req).await {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                return Ok(destroyed(id));
            }
            // Not there yet (Fly's 408, or the wait outlived its timeout):
            // say where the machine is instead.
            Err(ProviderError::DeadlineExceeded(_)) => {
                let now = match self.get_machine(id).await {
                    Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                        return Ok(destroyed(id));
                    }
                    other => other?,
                };
                if now.state == state {
                    return Ok(now);
                }
                return Err(ProviderError::DeadlineExceeded(format!(
                    "machine {id} still {} after waiting {secs}s for {wanted}",
                    now.provider_state
                )));
            }
            Err(e) => return Err(e),
        }
        let after = tokio::time::Instant::now() + self.config.request_timeout;
        match self.get_patiently(id, after).await {
            Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                Ok(destroyed(id))
            }
            other => other.map(|m| self.machine(m)),
        }
    }

    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        check_id("machine_id", id)?;
        let mut req = self.req(reqwest::Method::DELETE, &format!("/machines/{id}"));
        if force {
            req = req.query(&[("force", "true")]);
        }
        self.send_item(req).await.map(|_| ())
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        Ok(self.machine(self.get_api_machine(id).await?))
    }

    /// Fly's listing is not paginated: the whole (filtered) list is one page.
    async fn list_machines(&self, _page: &PageRequest) -> ProviderResult<Page<Machine>> {
        let filter = format!("metadata.{TAG_CONTROL_PLANE}");
        let list: Vec<ApiMachine> = self
            .send_list(
                self.req(reqwest::Method::GET, "/machines")
                    .query(&[(filter.as_str(), self.config.control_plane_id.as_str())]),
            )
            .await?;
        let items = list
            .into_iter()
            .map(|m| self.machine(m))
            // The filter is the server's; checking again costs nothing and
            // keeps another installation's machines out even if it is ignored.
            .filter(|m| self.owned(m))
            .collect();
        Ok(Page { items, next: None })
    }

    async fn find_machines(&self, instance: InstanceId) -> ProviderResult<Vec<Machine>> {
        let control = format!("metadata.{TAG_CONTROL_PLANE}");
        let owner = format!("metadata.{TAG_INSTANCE}");
        let instance = instance.to_string();
        let list: Vec<ApiMachine> = self
            .send_list(self.req(reqwest::Method::GET, "/machines").query(&[
                (control.as_str(), self.config.control_plane_id.as_str()),
                (owner.as_str(), instance.as_str()),
            ]))
            .await?;
        Ok(list
            .into_iter()
            .map(|m| self.machine(m))
            .filter(|m| self.owned(m) && m.tags.get(TAG_INSTANCE) == Some(&instance))
            .collect())
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        check_volume_size(spec.size_gb)?;
        let body = json!({
            "name": volume_name(&self.config.control_plane_id, spec.instance_id),
            "region": spec.region,
            "size_gb": spec.size_gb,
            "encrypted": true,
        });
        let v: ApiVolume =
            send_json(self.req(reqwest::Method::POST, "/volumes").json(&body)).await?;
        Ok(self.volume(v))
    }

    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        check_id("volume_id", id)?;
        self.send_item(self.req(reqwest::Method::DELETE, &format!("/volumes/{id}")))
            .await
            .map(|_| ())
    }

    /// Only volumes whose name carries this control plane's digest: Fly
    /// volumes have no metadata, and another installation sharing the app
    /// must never see (or orphan-delete) ours, nor we theirs.
    async fn list_volumes(&self, _page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let list: Vec<ApiVolume> = self
            .send_list(self.req(reqwest::Method::GET, "/volumes"))
            .await?;
        let items = list
            .into_iter()
            .map(|v| self.volume(v))
            .filter(|v| v.instance_id.is_some() && v.state != VolumeState::Destroyed)
            .collect();
        Ok(Page { items, next: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_carry_the_owner_within_flys_limit() {
        for cp in [
            "flotilla",
            "cp-test",
            "",
            "a-very-long-control-plane-identifier-0123456789",
        ] {
            for _ in 0..50 {
                let id = InstanceId::new();
                let name = volume_name(cp, id);
                // Fly: at most 30 characters of lowercase letters, digits, underscores.
                assert!(name.len() <= 30, "{name}");
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                );
                assert_eq!(instance_of_volume(&name), Some(id));
                assert_eq!(owned_volume_instance(cp, &name), Some(id));
            }
        }
        let id = InstanceId::new();
        assert_eq!(
            owned_volume_instance("other", &volume_name("cp-test", id)),
            None
        );
        assert_ne!(control_plane_digest("cp-a"), control_plane_digest("cp-b"));
        assert_eq!(instance_of_volume("data"), None);
        assert_eq!(instance_of_volume("fl_zzzzzzzzzzzzzzzzzzzzzzzzz"), None);
        assert_eq!(instance_of_volume("fabcdzzzzzzzzzzzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn every_documented_state_maps_exactly() {
        let documented = [
            "created",
            "starting",
            "started",
            "stopping",
            "stopped",
            "suspending",
            "suspended",
            "replacing",
            "destroying",
            "destroyed",
            "failed",
        ];
        for s in documented {
            assert_eq!(machine_state(s).as_str(), s);
        }
        // Transient states are never "stopped".
        for s in [
            "stopping",
            "suspending",
            "destroying",
            "replacing",
            "failed",
        ] {
            assert_ne!(machine_state(s), MachineState::Stopped, "{s}");
        }
        assert_eq!(machine_state("launching"), MachineState::Unknown);
    }

    #[test]
    fn sizes_are_parsed_or_refused_with_the_field_name() {
        assert_eq!(guest("shared-cpu-2x").map(|g| g.memory_mb), Ok(512));
        assert_eq!(guest("performance-2x").map(|g| g.memory_mb), Ok(4096));
        // GPU kinds as Fly names them in `guest.gpu_kind`.
        for (size, kind) in [
            ("a10", "a10"),
            ("l40s", "l40s"),
            ("a100-40gb", "a100-pcie-40gb"),
            ("a100-pcie-40gb", "a100-pcie-40gb"),
            ("a100-80gb", "a100-sxm4-80gb"),
            ("a100-sxm4-80gb", "a100-sxm4-80gb"),
        ] {
            assert_eq!(
                guest(size).map(|g| g.gpu_kind),
                Ok(Some(kind.to_owned())),
                "{size}"
            );
        }
        assert_eq!(
            guest("4x8192").map(|g| (g.cpus, g.memory_mb)),
            Ok((4, 8192))
        );
        assert_eq!(
            guest("performance-2x8192").map(|g| (g.cpu_kind, g.memory_mb)),
            Ok(("performance".to_owned(), 8192))
        );
        // Fly's per-CPU ranges: shared 256-2048 MB, performance 2048-8192 MB,
        // in multiples of 256.
        for bad in [
            "",
            "huge",
            "shared-cpu-99x",
            "4x1",
            "x",
            "1x4096",
            "2x256",
            "2x1000",
            "performance-2x2048",
            "performance-1x9216",
            "a100-40gb-pcie",
        ] {
            let e = guest(bad).expect_err(bad);
            assert!(e.to_string().contains("instance_type"), "{e}");
        }
    }
}
