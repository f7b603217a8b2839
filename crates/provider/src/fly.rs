//! Fly.io Machines API client (also the client of the simulated cloud,
//! which speaks the same API).
//!
//! Design notes: ownership is written into each machine's `config.metadata`
//! (instance id, pool, control plane id) and listings filter on it, so the
//! orphan scan can tie any machine back to its row. Fly volumes have no
//! metadata, so a volume's name carries its instance id (`fl_` + the UUID in
//! base 36, 28 chars within Fly's 30-char limit). A start is checked by
//! reading the machine back: a 200 that leaves the machine neither starting
//! nor started is an error. Right after a destroy, Fly's GET briefly shows
//! `destroyed` before answering 404; both mean gone.

use std::collections::BTreeMap;
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
}

/// A machine as Fly's API returns it (fields Flotilla reads).
#[derive(Debug, Deserialize)]
struct ApiMachine {
    id: String,
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

/// The guest for an instance type: `shared-cpu-Nx`, `performance-Nx`,
/// a GPU kind (`a10`, `l40s`, `a100-40gb`, `a100-80gb`), or `<cpus>x<memory_mb>`.
fn guest(instance_type: &str) -> ProviderResult<Guest> {
    let bad = || {
        ProviderError::InvalidArgument(format!(
            "instance_type: {instance_type:?} is not a Fly size \
             (shared-cpu-Nx, performance-Nx, a10, l40s, a100-40gb, a100-80gb, or <cpus>x<memory_mb>)"
        ))
    };
    let cpus = |n: &str| n.parse::<u32>().ok().filter(|n| (1..=16).contains(n));
    if let Some(n) = instance_type
        .strip_prefix("shared-cpu-")
        .and_then(|r| r.strip_suffix('x'))
    {
        let n = cpus(n).ok_or_else(bad)?;
        return Ok(Guest {
            cpu_kind: "shared".into(),
            cpus: n,
            memory_mb: 256 * n,
            gpu_kind: None,
        });
    }
    if let Some(n) = instance_type
        .strip_prefix("performance-")
        .and_then(|r| r.strip_suffix('x'))
    {
        let n = cpus(n).ok_or_else(bad)?;
        return Ok(Guest {
            cpu_kind: "performance".into(),
            cpus: n,
            memory_mb: 2048 * n,
            gpu_kind: None,
        });
    }
    if ["a10", "l40s", "a100-40gb", "a100-80gb"].contains(&instance_type) {
        return Ok(Guest {
            cpu_kind: "performance".into(),
            cpus: 8,
            memory_mb: 32768,
            gpu_kind: Some(instance_type.to_owned()),
        });
    }
    if let Some((c, m)) = instance_type.split_once('x') {
        let c = cpus(c).ok_or_else(bad)?;
        let m = m
            .parse::<u32>()
            .ok()
            .filter(|m| (256..=262_144).contains(m))
            .ok_or_else(bad)?;
        return Ok(Guest {
            cpu_kind: "shared".into(),
            cpus: c,
            memory_mb: m,
            gpu_kind: None,
        });
    }
    Err(bad())
}

/// The volume name that carries an instance id: `fl_` + base-36 UUID.
pub fn volume_name(id: InstanceId) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut n = id.0.as_u128();
    let mut out = [b'0'; 25];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    format!("fl_{}", String::from_utf8_lossy(&out))
}

/// The instance id a volume name carries, if it is one of ours.
pub fn instance_of_volume(name: &str) -> Option<InstanceId> {
    let digits = name.strip_prefix("fl_")?;
    if digits.len() != 25 {
        return None;
    }
    let mut n: u128 = 0;
    for c in digits.chars() {
        n = n.checked_mul(36)?.checked_add(c.to_digit(36)? as u128)?;
    }
    Some(InstanceId(uuid::Uuid::from_u128(n)))
}

impl FlyProvider {
    pub fn new(config: FlyConfig) -> ProviderResult<Self> {
        if config.app.is_empty() {
            return Err(ProviderError::InvalidArgument(
                "FLY_APP_NAME is empty".into(),
            ));
        }
        let http = client_builder(config.request_timeout)
            .build()
            .map_err(|e| ProviderError::InvalidArgument(format!("http client: {e}")))?;
        Ok(FlyProvider { http, config })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/v1/apps/{}{}",
            self.config.base_url.trim_end_matches('/'),
            self.config.app,
            path
        )
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.config.token)
    }

    fn machine(&self, m: ApiMachine) -> Machine {
        let config = m.config.unwrap_or_default();
        let instance_type = config
            .guest
            .map(|g| match g.gpu_kind {
                Some(gpu) => gpu,
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
            instance_id: instance_of_volume(&v.name),
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
        Ok(())
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        let guest = guest(&spec.instance_type)?;
        let mut metadata = spec.tags.clone();
        metadata.extend(ownership_tags(
            spec.instance_id,
            &spec.pool,
            &self.config.control_plane_id,
        ));
        let mounts: Vec<_> = spec
            .volume_ids
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let path = if i == 0 {
                    "/data".to_owned()
                } else {
                    format!("/data{i}")
                };
                json!({ "volume": v, "path": path })
            })
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
        send(self.req(reqwest::Method::POST, &format!("/machines/{id}/start"))).await?;
        // A 200 only says the request was taken: follow the machine until it
        // is started, so a launch that fails is reported now, as an error,
        // instead of leaving the instance "booting" until a timeout.
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let m = self.get_machine(id).await?;
            match m.state {
                MachineState::Started => return Ok(m),
                MachineState::Created | MachineState::Starting | MachineState::Replacing => {}
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
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let body =
            json!({ "signal": "SIGTERM", "timeout": format!("{}s", grace.as_secs().max(1)) });
        send(
            self.req(reqwest::Method::POST, &format!("/machines/{id}/stop"))
                .json(&body),
        )
        .await?;
        self.get_machine(id).await
    }

    async fn suspend_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        send(self.req(reqwest::Method::POST, &format!("/machines/{id}/suspend"))).await?;
        self.get_machine(id).await
    }

    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let wanted = match state {
            MachineState::Started => "started",
            MachineState::Stopped => "stopped",
            MachineState::Suspended => "suspended",
            MachineState::Destroyed => "destroyed",
            other => {
                return Err(ProviderError::InvalidArgument(format!(
                    "state: cannot wait for {}",
                    other.as_str()
                )));
            }
        };
        let secs = timeout.as_secs().clamp(1, 60);
        let req = self
            .req(reqwest::Method::GET, &format!("/machines/{id}/wait"))
            .query(&[("state", wanted), ("timeout", &secs.to_string())])
            // The server holds the request up to `secs`.
            .timeout(Duration::from_secs(secs) + self.config.request_timeout);
        match send(req).await {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {}
            Err(e) => return Err(e),
        }
        match self.get_machine(id).await {
            Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => Ok(Machine {
                id: id.to_owned(),
                name: String::new(),
                state: MachineState::Destroyed,
                provider_state: "destroyed".into(),
                region: String::new(),
                instance_type: String::new(),
                tags: BTreeMap::new(),
                created_at: None,
                private_ip: String::new(),
            }),
            other => other,
        }
    }

    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        check_id("machine_id", id)?;
        let mut req = self.req(reqwest::Method::DELETE, &format!("/machines/{id}"));
        if force {
            req = req.query(&[("force", "true")]);
        }
        send(req).await.map(|_| ())
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let m: ApiMachine =
            send_json(self.req(reqwest::Method::GET, &format!("/machines/{id}"))).await?;
        Ok(self.machine(m))
    }

    /// Fly's listing is not paginated: the whole (filtered) list is one page.
    async fn list_machines(&self, _page: &PageRequest) -> ProviderResult<Page<Machine>> {
        let filter = format!("metadata.{TAG_CONTROL_PLANE}");
        let list: Vec<ApiMachine> = send_json(
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
        let list: Vec<ApiMachine> =
            send_json(self.req(reqwest::Method::GET, "/machines").query(&[
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
        if !(1..=500).contains(&spec.size_gb) {
            return Err(ProviderError::InvalidArgument(format!(
                "size_gb: {} is outside 1..=500",
                spec.size_gb
            )));
        }
        let body = json!({
            "name": volume_name(spec.instance_id),
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
        send(self.req(reqwest::Method::DELETE, &format!("/volumes/{id}")))
            .await
            .map(|_| ())
    }

    async fn list_volumes(&self, _page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let list: Vec<ApiVolume> = send_json(self.req(reqwest::Method::GET, "/volumes")).await?;
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
    fn volume_names_carry_the_instance_id_within_flys_limit() {
        for _ in 0..100 {
            let id = InstanceId::new();
            let name = volume_name(id);
            assert!(name.len() <= 30, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
            assert_eq!(instance_of_volume(&name), Some(id));
        }
        assert_eq!(instance_of_volume("data"), None);
        assert_eq!(instance_of_volume("fl_zzzzzzzzzzzzzzzzzzzzzzzzz"), None);
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
        assert_eq!(guest("a10").map(|g| g.gpu_kind), Ok(Some("a10".to_owned())));
        assert_eq!(
            guest("4x8192").map(|g| (g.cpus, g.memory_mb)),
            Ok((4, 8192))
        );
        for bad in ["", "huge", "shared-cpu-99x", "4x1", "x"] {
            let e = guest(bad).expect_err(bad);
            assert!(e.to_string().contains("instance_type"), "{e}");
        }
    }
}
