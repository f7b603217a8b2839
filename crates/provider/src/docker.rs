//! The Docker provider: every machine is a container of one Docker Engine,
//! reached through its Unix socket with the Engine API (bollard).
//!
//! Design notes. The engine is the only bookkeeping: a machine is a
//! container carrying Flotilla's ownership labels (instance id, pool,
//! control-plane id), a volume is a named Docker volume with the same
//! labels, and listings ask the engine with a label filter on our
//! control-plane id (and check the labels again). Nothing is remembered
//! here, so a restarted adapter sees exactly what the engine holds.
//!
//! A pool's image is `<image reference> [command ...]`: the container runs
//! that image, with the command (e.g. `flotilla:dev agent`) in place of
//! the image's CMD. Containers are never restarted by the engine
//! (`restart: no`): Flotilla decides when a worker is replaced. Images are
//! not pulled; a missing one is a refusal naming it.
//!
//! Classification is the engine's status code, never its wording: 404 is
//! `NotFound` for the thing asked about (the engine answered for it), 409
//! is `FailedPrecondition` (a running container removed without force, a
//! volume in use, a name taken), 5xx and an engine that does not answer
//! are `Unavailable`, a call that outlives its timeout is
//! `DeadlineExceeded`. A 404 on create names a missing image or network,
//! never a machine, so it is `FailedPrecondition`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, HostConfig, Mount, MountType,
    RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListVolumesOptions, RemoveContainerOptions,
    RemoveVolumeOptions, StopContainerOptions,
};
use chrono::{DateTime, Utc};
use flotilla_core::InstanceId;
use uuid::Uuid;

use crate::types::*;
use crate::{MachineProvider, ProviderError, ProviderResult};

/// Label holding the region the pool named (the engine has no regions).
pub const LABEL_REGION: &str = "flotilla_region";
/// Label holding the instance type the container was sized from.
pub const LABEL_INSTANCE_TYPE: &str = "flotilla_instance_type";
/// Label holding a volume's requested size (the local driver has no sizes).
pub const LABEL_SIZE_GB: &str = "flotilla_size_gb";

/// The instance type of a container without CPU or memory limits.
pub const UNLIMITED: &str = "container";

/// Where the first volume of a machine is mounted; further ones at `/data-<n>`.
const VOLUME_PATH: &str = "/data";

const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// How often `wait_machine` looks at the container.
const POLL: Duration = Duration::from_millis(100);
/// What a stop may take beyond its grace: the engine's kill and cleanup.
const STOP_SLACK: Duration = Duration::from_secs(10);

/// Connection and placement settings.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// `unix:///var/run/docker.sock`, or a socket path.
    pub host: String,
    /// The network every container joins (so workers reach the api);
    /// empty: the engine's default bridge.
    pub network: String,
    /// Written into every container's and volume's labels; listings show
    /// only what carries it.
    pub control_plane_id: String,
    /// Longest time one Engine API call may take (a stop adds its grace).
    pub request_timeout: Duration,
    /// SIGTERM-to-SIGKILL time used when `stop_machine` is given zero.
    pub stop_grace_default: Duration,
}

impl DockerConfig {
    /// Defaults for the engine of this machine.
    pub fn new(control_plane_id: impl Into<String>) -> Self {
        DockerConfig {
            host: "unix:///var/run/docker.sock".into(),
            network: String::new(),
            control_plane_id: control_plane_id.into(),
            request_timeout: Duration::from_secs(30),
            stop_grace_default: Duration::from_secs(10),
        }
    }
}

/// Runs machines as containers of one Docker Engine. Clones share the
/// connection.
#[derive(Clone)]
pub struct DockerProvider {
    docker: Docker,
    config: Arc<DockerConfig>,
    /// Set once the API version was agreed with the engine.
    negotiated: Arc<tokio::sync::OnceCell<()>>,
}

impl std::fmt::Debug for DockerProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerProvider")
            .field("host", &self.config.host)
            .field("network", &self.config.network)
            .field("control_plane_id", &self.config.control_plane_id)
            .finish()
    }
}

/// The engine's container states (Engine API, `ContainerState.Status`:
/// created, running, paused, restarting, removing, exited, dead; newer
/// engines also say stopping), mapped exactly.
pub fn machine_state(s: &str) -> MachineState {
    match s {
        "created" => MachineState::Created,
        "running" => MachineState::Started,
        // Frozen with its memory: the nearest of Flotilla's states.
        "paused" => MachineState::Suspended,
        "restarting" => MachineState::Restarting,
        "removing" => MachineState::Destroying,
        "exited" => MachineState::Stopped,
        "dead" => MachineState::Failed,
        "stopping" => MachineState::Stopping,
        _ => MachineState::Unknown,
    }
}

/// Classifies a bollard error by the engine's status code, or as a
/// transport failure when the engine did not answer.
pub fn classify(what: &str, e: DockerError) -> ProviderError {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let message = format!("{what}: engine answered {status_code}: {}", message.trim());
            match status_code {
                404 => ProviderError::NotFound(message),
                409 => ProviderError::FailedPrecondition(message),
                401 => ProviderError::Unauthenticated(message),
                403 => ProviderError::PermissionDenied(message),
                429 => ProviderError::ResourceExhausted {
                    message,
                    retry_after: None,
                },
                400..=499 => ProviderError::InvalidArgument(message),
                // 5xx, and anything else where a success was expected.
                _ => ProviderError::Unavailable(message),
            }
        }
        DockerError::RequestTimeoutError => {
            ProviderError::DeadlineExceeded(format!("{what}: the engine did not answer in time"))
        }
        other => ProviderError::Unavailable(format!("{what}: the engine did not answer: {other}")),
    }
}

/// `<image> [command ...]` of a pool: the image reference and the command
/// that replaces the image's CMD (empty: the image's own).
pub fn parse_image(image: &str) -> ProviderResult<(String, Vec<String>)> {
    let mut words = image.split_whitespace();
    let Some(reference) = words.next() else {
        return Err(ProviderError::InvalidArgument(
            "image: empty (for the docker provider: <image reference> [command ...])".into(),
        ));
    };
    // Docker's reference grammar: lowercase repository path components,
    // an optional tag, an optional digest. Uppercase never resolves.
    let ok = reference.bytes().all(|b| {
        b.is_ascii_lowercase()
            || b.is_ascii_digit()
            || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
            || (b.is_ascii_uppercase() && reference.contains('@'))
    }) && !reference.starts_with(['.', '-', '/', ':', '@']);
    if !ok {
        return Err(ProviderError::InvalidArgument(format!(
            "image: {reference:?} is not a Docker image reference (lowercase name[:tag][@digest])"
        )));
    }
    Ok((reference.to_owned(), words.map(str::to_owned).collect()))
}

/// CPU and memory limits of an instance type: `container` (none) or
/// `<cpus>x<memory_mb>` (e.g. `1x512`; 1-64 CPUs, 6 MB or more, the
/// engine's minimum).
pub fn limits(instance_type: &str) -> ProviderResult<Option<(i64, i64)>> {
    if instance_type == UNLIMITED {
        return Ok(None);
    }
    let bad = || {
        ProviderError::InvalidArgument(format!(
            "instance_type: {instance_type:?} is not a docker size ({UNLIMITED}, or \
             <cpus>x<memory_mb> with 1-64 CPUs and at least 6 MB)"
        ))
    };
    let (cpus, memory) = instance_type.split_once('x').ok_or_else(bad)?;
    let cpus: i64 = cpus
        .parse()
        .ok()
        .filter(|c| (1..=64).contains(c))
        .ok_or_else(bad)?;
    let memory: i64 = memory
        .parse()
        .ok()
        .filter(|m| (6..=1 << 24).contains(m))
        .ok_or_else(bad)?;
    Ok(Some((cpus * 1_000_000_000, memory * 1024 * 1024)))
}

fn check_volume_size(field: &str, size_gb: u32) -> ProviderResult<()> {
    if (1..=500).contains(&size_gb) {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "{field}: {size_gb} is outside 1..=500"
        )))
    }
}

/// Container and volume names and ids the engine accepts in a URL path.
fn check_id(field: &str, id: &str) -> ProviderResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "{field}: {id:?} is not a valid id"
        )))
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

/// `now + d`, saturating.
fn far_from_now(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365))
}

/// One page of sorted ids, starting after the token.
fn page_of<T>(mut items: Vec<(String, T)>, page: &PageRequest) -> (Vec<T>, Option<String>) {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let size = match page.size {
        0 => DEFAULT_PAGE_SIZE,
        n => usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE),
    };
    let mut items: Vec<_> = items
        .into_iter()
        .filter(|(id, _)| page.token.as_ref().is_none_or(|t| id > t))
        .take(size + 1)
        .collect();
    let next = if items.len() > size {
        items.truncate(size);
        items.last().map(|(id, _)| id.clone())
    } else {
        None
    };
    (items.into_iter().map(|(_, t)| t).collect(), next)
}

impl DockerProvider {
    /// A client of the engine at `config.host` (a Unix socket). Nothing is
    /// asked of the engine yet: the first call agrees on the API version.
    pub fn new(config: DockerConfig) -> ProviderResult<Self> {
        let path = config
            .host
            .strip_prefix("unix://")
            .unwrap_or(&config.host)
            .to_owned();
        if path.is_empty() || !path.starts_with('/') {
            return Err(ProviderError::InvalidArgument(format!(
                "DOCKER_HOST: {:?} is not a Unix socket (unix:///path or /path); only the \
                 socket is supported",
                config.host
            )));
        }
        if !config.network.is_empty() {
            check_id("DOCKER_NETWORK", &config.network)?;
        }
        // bollard asks for its newest API version; the first call lowers
        // it to the engine's own when that is older (Docker 20.10: 1.41).
        let docker = Docker::connect_with_unix(
            &path,
            // bollard's own timeout is a backstop; each call has its own.
            3600,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| match e {
            DockerError::SocketNotFoundError(_) => ProviderError::InvalidArgument(format!(
                "DOCKER_HOST: no socket at {path}: is the Docker socket mounted?"
            )),
            other => classify("connect", other),
        })?;
        Ok(DockerProvider {
            docker,
            config: Arc::new(config),
            negotiated: Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    pub fn config(&self) -> &DockerConfig {
        &self.config
    }

    /// Runs one Engine API call within `limit`, after the API version was
    /// agreed (once; retried on the next call if the engine did not answer).
    async fn call<T>(
        &self,
        what: &str,
        limit: Duration,
        call: impl Future<Output = Result<T, DockerError>>,
    ) -> ProviderResult<T> {
        self.negotiate().await?;
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map_err(|e| classify(what, e)),
            Err(_) => Err(ProviderError::DeadlineExceeded(format!(
                "{what}: no answer from the engine within {limit:?}"
            ))),
        }
    }

    async fn negotiate(&self) -> ProviderResult<()> {
        let limit = self.config.request_timeout;
        self.negotiated
            .get_or_try_init(|| async {
                // bollard keeps the version in state shared by clones, so
                // the agreed version holds for `self.docker` too.
                match tokio::time::timeout(limit, self.docker.clone().negotiate_version()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(classify("version", e)),
                    Err(_) => Err(ProviderError::Unavailable(format!(
                        "version: no answer from the engine within {limit:?}"
                    ))),
                }
            })
            .await
            .map(|_| ())
    }

    /// The adapter's readiness check: the engine answers, and the
    /// configured network exists (a missing one would fail every create).
    pub async fn check(&self) -> ProviderResult<()> {
        let limit = self.config.request_timeout;
        self.call("ping", limit, self.docker.ping()).await?;
        if !self.config.network.is_empty() {
            let net = &self.config.network;
            match self
                .call(
                    "network",
                    limit,
                    self.docker.inspect_network(
                        net,
                        None::<bollard::query_parameters::InspectNetworkOptions>,
                    ),
                )
                .await
            {
                Ok(_) => {}
                Err(ProviderError::NotFound(_)) => {
                    return Err(ProviderError::FailedPrecondition(format!(
                        "DOCKER_NETWORK: the engine has no network {net:?}"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn owned(&self, labels: &HashMap<String, String>) -> bool {
        labels.get(TAG_CONTROL_PLANE) == Some(&self.config.control_plane_id)
    }

    async fn inspect(&self, id: &str) -> ProviderResult<ContainerInspectResponse> {
        check_id("machine_id", id)?;
        let c = self
            .call(
                "inspect container",
                self.config.request_timeout,
                self.docker.inspect_container(
                    id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                ),
            )
            .await?;
        // Another installation's container (or one Flotilla did not make)
        // is not ours to report on, stop or delete.
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        if !self.owned(&labels) {
            return Err(ProviderError::InvalidArgument(format!(
                "machine_id: container {id} does not carry this control plane's label"
            )));
        }
        Ok(c)
    }

    /// A 404 on a call about a container means gone only when the engine
    /// says so of the container itself: a start's 404 can name the network
    /// it joins. The container is looked up again; if it is there, the 404
    /// was about something else and the call is refused instead.
    async fn confirm_gone(&self, id: &str, e: ProviderError) -> ProviderError {
        let ProviderError::NotFound(message) = e else {
            return e;
        };
        match self.inspect(id).await {
            Err(gone @ ProviderError::NotFound(_)) => gone,
            Ok(_) => ProviderError::FailedPrecondition(format!(
                "container {id} exists, but the engine answered 404 for something it needs                  (DOCKER_NETWORK {:?}?): {message}",
                self.config.network
            )),
            Err(other) => other,
        }
    }

    fn inspected(&self, c: ContainerInspectResponse) -> Machine {
        let state = c
            .state
            .as_ref()
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default();
        let labels = c
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.clone())
            .unwrap_or_default();
        let private_ip = networks
            .get(&self.config.network)
            .or_else(|| networks.values().next())
            .and_then(|e| e.ip_address.clone())
            .unwrap_or_default();
        let created_at = c
            .created
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        self.machine(
            c.id.unwrap_or_default(),
            c.name.unwrap_or_default(),
            state,
            labels,
            created_at,
            private_ip,
        )
    }

    fn summarized(&self, c: ContainerSummary) -> Machine {
        let state = c.state.map(|s| s.to_string()).unwrap_or_default();
        let name = c
            .names
            .and_then(|n| n.into_iter().next())
            .unwrap_or_default();
        let networks = c
            .network_settings
            .and_then(|n| n.networks)
            .unwrap_or_default();
        let private_ip = networks
            .get(&self.config.network)
            .or_else(|| networks.values().next())
            .and_then(|e| e.ip_address.clone())
            .unwrap_or_default();
        let created_at = c.created.and_then(|s| DateTime::from_timestamp(s, 0));
        self.machine(
            c.id.unwrap_or_default(),
            name,
            state,
            c.labels.unwrap_or_default(),
            created_at,
            private_ip,
        )
    }

    fn machine(
        &self,
        id: String,
        name: String,
        state: String,
        labels: HashMap<String, String>,
        created_at: Option<DateTime<Utc>>,
        private_ip: String,
    ) -> Machine {
        let tags: BTreeMap<String, String> = labels.into_iter().collect();
        Machine {
            id,
            // The engine reports names with a leading slash.
            name: name.trim_start_matches('/').to_owned(),
            state: machine_state(&state),
            provider_state: state,
            region: tags.get(LABEL_REGION).cloned().unwrap_or_default(),
            instance_type: tags.get(LABEL_INSTANCE_TYPE).cloned().unwrap_or_default(),
            tags,
            created_at,
            // An exited container keeps no address.
            private_ip,
        }
    }

    /// Every container (running or not) carrying these labels.
    async fn containers(&self, labels: &[(&str, &str)]) -> ProviderResult<Vec<ContainerSummary>> {
        let filters = HashMap::from([(
            "label".to_owned(),
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = self
            .call(
                "list containers",
                self.config.request_timeout,
                self.docker.list_containers(Some(options)),
            )
            .await?;
        // The filter is the engine's; checking again keeps another
        // installation's containers out even if it were ignored.
        Ok(list
            .into_iter()
            .filter(|c| c.labels.as_ref().is_some_and(|l| self.owned(l)))
            .collect())
    }

    fn to_volume(&self, v: bollard::models::Volume, users: &HashMap<String, String>) -> Volume {
        let tags: BTreeMap<String, String> = v.labels.into_iter().collect();
        let attached = users.get(&v.name).cloned();
        Volume {
            id: v.name.clone(),
            state: if attached.is_some() {
                VolumeState::Attached
            } else {
                VolumeState::Available
            },
            provider_state: if attached.is_some() {
                "in_use"
            } else {
                "unused"
            }
            .into(),
            size_gb: tags
                .get(LABEL_SIZE_GB)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            region: tags.get(LABEL_REGION).cloned().unwrap_or_default(),
            attached_machine_id: attached,
            instance_id: tags.get(TAG_INSTANCE).and_then(|s| s.parse().ok()),
            created_at: v
                .created_at
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
            name: v.name,
            tags,
        }
    }

    /// Volume name -> id of a container of ours that mounts it.
    async fn volume_users(&self) -> ProviderResult<HashMap<String, String>> {
        let control = self.config.control_plane_id.clone();
        let mut users = HashMap::new();
        for c in self.containers(&[(TAG_CONTROL_PLANE, &control)]).await? {
            let id = c.id.clone().unwrap_or_default();
            for m in c.mounts.unwrap_or_default() {
                if let Some(name) = m.name {
                    users.insert(name, id.clone());
                }
            }
        }
        Ok(users)
    }
}

impl MachineProvider for DockerProvider {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        limits(&spec.instance_type)?;
        parse_image(&spec.image)?;
        if spec.volume_size_gb != 0 {
            check_volume_size("volume_size_gb", spec.volume_size_gb)?;
        }
        Ok(())
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        let (image, command) = parse_image(&spec.image)?;
        let limits = limits(&spec.instance_type)?;
        check_id("name", &spec.name)?;
        for (key, value) in &spec.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(ProviderError::InvalidArgument(format!(
                    "env: {key:?} is not a valid variable"
                )));
            }
        }
        // The engine creates a named volume it does not know on the fly:
        // each must exist already, and be ours, or the mount would make an
        // unlabelled volume nobody deletes.
        let mut mounts = Vec::with_capacity(spec.volume_ids.len());
        for (i, volume) in spec.volume_ids.iter().enumerate() {
            check_id("volume_ids", volume)?;
            let v = match self
                .call(
                    "inspect volume",
                    self.config.request_timeout,
                    self.docker.inspect_volume(volume),
                )
                .await
            {
                Ok(v) => v,
                // Not NotFound: that would read as "already done" to the caller.
                Err(ProviderError::NotFound(_)) => {
                    return Err(ProviderError::InvalidArgument(format!(
                        "volume_ids: no volume {volume}"
                    )));
                }
                Err(e) => return Err(e),
            };
            if !self.owned(&v.labels) {
                return Err(ProviderError::InvalidArgument(format!(
                    "volume_ids: volume {volume} does not carry this control plane's label"
                )));
            }
            mounts.push(Mount {
                typ: Some(MountType::VOLUME),
                source: Some(volume.clone()),
                target: Some(if i == 0 {
                    VOLUME_PATH.to_owned()
                } else {
                    format!("{VOLUME_PATH}-{i}")
                }),
                ..Default::default()
            });
        }
        let mut labels: HashMap<String, String> = spec.tags.clone().into_iter().collect();
        labels.insert(LABEL_REGION.into(), spec.region.clone());
        labels.insert(LABEL_INSTANCE_TYPE.into(), spec.instance_type.clone());
        // Ownership labels last: a spec tag cannot claim another control plane.
        labels.extend(ownership_tags(
            spec.instance_id,
            &spec.pool,
            &self.config.control_plane_id,
        ));
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: (!command.is_empty()).then_some(command),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            hostname: Some(spec.name.chars().take(63).collect()),
            // A stop is SIGTERM, then SIGKILL after the grace.
            stop_signal: Some("SIGTERM".into()),
            host_config: Some(HostConfig {
                network_mode: (!self.config.network.is_empty())
                    .then(|| self.config.network.clone()),
                mounts: (!mounts.is_empty()).then_some(mounts),
                // Flotilla decides when a machine goes away or comes back.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                auto_remove: Some(false),
                nano_cpus: limits.map(|(cpus, _)| cpus),
                memory: limits.map(|(_, memory)| memory),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = match self
            .call(
                "create container",
                self.config.request_timeout,
                self.docker.create_container(Some(options), body),
            )
            .await
        {
            Ok(c) => c,
            // What a create's 404 names is its image or network.
            Err(ProviderError::NotFound(m)) => {
                return Err(ProviderError::FailedPrecondition(format!(
                    "the engine lacks the image {image:?} or the network {:?} (images are not \
                     pulled): {m}",
                    self.config.network
                )));
            }
            Err(e) => return Err(e),
        };
        if spec.start {
            self.start_machine(&created.id).await
        } else {
            self.get_machine(&created.id).await
        }
    }

    /// Starts the container and reads it back: a start the engine took
    /// that leaves the container neither running nor starting (it exited
    /// at once) is an error.
    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.inspect(id).await?;
        if let Err(e) = self
            .call(
                "start container",
                self.config.request_timeout,
                self.docker
                    .start_container(id, None::<bollard::query_parameters::StartContainerOptions>),
            )
            .await
        {
            return Err(self.confirm_gone(id, e).await);
        }
        let m = self.get_machine(id).await?;
        if m.state.is_running() || m.state == MachineState::Restarting {
            Ok(m)
        } else {
            Err(ProviderError::FailedPrecondition(format!(
                "machine {id} did not start: it is {}",
                m.provider_state
            )))
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; the engine answers once the
    /// container has stopped.
    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        let grace = if grace.is_zero() {
            self.config.stop_grace_default
        } else {
            grace
        };
        self.inspect(id).await?;
        let secs = i32::try_from(grace.as_secs().max(1)).unwrap_or(i32::MAX);
        let options = StopContainerOptions {
            t: Some(secs),
            signal: Some("SIGTERM".into()),
        };
        if let Err(e) = self
            .call(
                "stop container",
                self.config.request_timeout + grace + STOP_SLACK,
                self.docker.stop_container(id, Some(options)),
            )
            .await
        {
            return Err(self.confirm_gone(id, e).await);
        }
        self.get_machine(id).await
    }

    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let deadline = far_from_now(timeout);
        loop {
            let seen = match self.get_machine(id).await {
                Ok(m) if m.state == state => return Ok(m),
                Ok(m) => m.provider_state,
                Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                    return Ok(destroyed(id));
                }
                Err(e) => return Err(e),
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ProviderError::DeadlineExceeded(format!(
                    "machine {id} not {} after {timeout:?} (last {seen})",
                    state.as_str()
                )));
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    /// Removes the container (and its anonymous volumes, never the named
    /// ones Flotilla created). Without `force` the engine refuses a
    /// running container with 409 (`FailedPrecondition`); with it, the
    /// engine kills it first.
    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        self.inspect(id).await?;
        let options = RemoveContainerOptions {
            force,
            v: true,
            ..Default::default()
        };
        match self
            .call(
                "remove container",
                self.config.request_timeout + STOP_SLACK,
                self.docker.remove_container(id, Some(options)),
            )
            .await
        {
            Err(e) => Err(self.confirm_gone(id, e).await),
            ok => ok,
        }
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        Ok(self.inspected(self.inspect(id).await?))
    }

    async fn list_machines(&self, page: &PageRequest) -> ProviderResult<Page<Machine>> {
        let control = self.config.control_plane_id.clone();
        let all = self
            .containers(&[(TAG_CONTROL_PLANE, &control)])
            .await?
            .into_iter()
            .map(|c| self.summarized(c))
            .map(|m| (m.id.clone(), m))
            .collect();
        let (items, next) = page_of(all, page);
        Ok(Page { items, next })
    }

    async fn find_machines(&self, instance: InstanceId) -> ProviderResult<Vec<Machine>> {
        let control = self.config.control_plane_id.clone();
        let instance = instance.to_string();
        Ok(self
            .containers(&[(TAG_CONTROL_PLANE, &control), (TAG_INSTANCE, &instance)])
            .await?
            .into_iter()
            .map(|c| self.summarized(c))
            .filter(|m| m.tags.get(TAG_INSTANCE) == Some(&instance))
            .collect())
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        check_volume_size("size_gb", spec.size_gb)?;
        let mut labels: HashMap<String, String> =
            ownership_tags(spec.instance_id, &spec.pool, &self.config.control_plane_id)
                .into_iter()
                .collect();
        labels.insert(LABEL_REGION.into(), spec.region.clone());
        labels.insert(LABEL_SIZE_GB.into(), spec.size_gb.to_string());
        let mut suffix = Uuid::new_v4().simple().to_string();
        suffix.truncate(12);
        let request = VolumeCreateRequest {
            name: Some(format!("flotilla-{}-{suffix}", spec.instance_id.0.simple())),
            labels: Some(labels),
            ..Default::default()
        };
        let v = self
            .call(
                "create volume",
                self.config.request_timeout,
                self.docker.create_volume(request),
            )
            .await?;
        Ok(self.to_volume(v, &HashMap::new()))
    }

    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        check_id("volume_id", id)?;
        let v = self
            .call(
                "inspect volume",
                self.config.request_timeout,
                self.docker.inspect_volume(id),
            )
            .await?;
        if !self.owned(&v.labels) {
            return Err(ProviderError::InvalidArgument(format!(
                "volume_id: volume {id} does not carry this control plane's label"
            )));
        }
        // No force: a volume a container still mounts is refused (409).
        self.call(
            "remove volume",
            self.config.request_timeout,
            self.docker
                .remove_volume(id, Some(RemoveVolumeOptions { force: false })),
        )
        .await
    }

    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!(
                "{TAG_CONTROL_PLANE}={}",
                self.config.control_plane_id
            )],
        )]);
        let list = self
            .call(
                "list volumes",
                self.config.request_timeout,
                self.docker.list_volumes(Some(ListVolumesOptions {
                    filters: Some(filters),
                })),
            )
            .await?;
        let users = self.volume_users().await?;
        let all = list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter(|v| self.owned(&v.labels))
            .map(|v| self.to_volume(v, &users))
            .map(|v| (v.id.clone(), v))
            .collect();
        let (items, next) = page_of(all, page);
        Ok(Page { items, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_container_state_maps_exactly() {
        // Engine API, ContainerState.Status.
        for (docker, ours) in [
            ("created", MachineState::Created),
            ("running", MachineState::Started),
            ("paused", MachineState::Suspended),
            ("restarting", MachineState::Restarting),
            ("removing", MachineState::Destroying),
            ("exited", MachineState::Stopped),
            ("dead", MachineState::Failed),
            ("stopping", MachineState::Stopping),
        ] {
            assert_eq!(machine_state(docker), ours, "{docker}");
        }
        assert_eq!(machine_state(""), MachineState::Unknown);
        assert_eq!(machine_state("frozen"), MachineState::Unknown);
    }

    #[test]
    fn engine_answers_are_classified_by_status_alone() {
        let answer = |status_code| DockerError::DockerResponseServerError {
            status_code,
            message: "No such container: x".into(),
        };
        assert!(matches!(
            classify("c", answer(404)),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(
            classify("c", answer(409)),
            ProviderError::FailedPrecondition(_)
        ));
        assert!(matches!(
            classify("c", answer(500)),
            ProviderError::Unavailable(_)
        ));
        assert!(matches!(
            classify("c", answer(400)),
            ProviderError::InvalidArgument(_)
        ));
        let io = DockerError::IOError {
            err: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(matches!(classify("c", io), ProviderError::Unavailable(_)));
        assert!(matches!(
            classify("c", DockerError::RequestTimeoutError),
            ProviderError::DeadlineExceeded(_)
        ));
    }

    #[test]
    fn images_and_sizes_are_parsed_or_refused_with_the_field_name() {
        assert_eq!(
            parse_image("flotilla:dev agent --flag").expect("ok"),
            (
                "flotilla:dev".to_owned(),
                vec!["agent".into(), "--flag".into()]
            )
        );
        assert_eq!(
            parse_image("registry.example.com:5000/a/b:1.2")
                .expect("ok")
                .1,
            Vec::<String>::new()
        );
        for bad in ["", "   ", "Flotilla:dev", "-x", "a;b"] {
            let e = parse_image(bad).expect_err(bad);
            assert!(e.to_string().contains("image"), "{e}");
        }
        assert_eq!(limits(UNLIMITED).expect("ok"), None);
        assert_eq!(
            limits("2x512").expect("ok"),
            Some((2_000_000_000, 512 * 1024 * 1024))
        );
        for bad in [
            "",
            "huge",
            "0x512",
            "65x512",
            "1x5",
            "1x",
            "x512",
            "shared-cpu-1x",
        ] {
            let e = limits(bad).expect_err(bad);
            assert!(e.to_string().contains("instance_type"), "{e}");
        }
    }

    #[test]
    fn pages_follow_the_token_in_id_order() {
        let items: Vec<_> = ["c", "a", "b"]
            .into_iter()
            .map(|s| (s.to_owned(), s.to_owned()))
            .collect();
        let first = page_of(
            items.clone(),
            &PageRequest {
                size: 2,
                token: None,
            },
        );
        assert_eq!(
            first,
            (vec!["a".to_owned(), "b".to_owned()], Some("b".into()))
        );
        let second = page_of(
            items,
            &PageRequest {
                size: 2,
                token: first.1,
            },
        );
        assert_eq!(second, (vec!["c".to_owned()], None));
    }
}
