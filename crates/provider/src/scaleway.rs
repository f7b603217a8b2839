//! Scaleway Instances API v1 client: servers as machines and block volumes
//! as volumes, in one zone of one project.
//!
//! Design notes: Scaleway tags are plain strings, so ownership is written as
//! `key=value` tags (instance id, pool, control plane id) and read back into
//! `Machine.tags`; listings filter on the control-plane tag server-side and
//! again here. Scaleway has no per-server environment, and tags are readable
//! by anyone with the project's read access, so env goes into cloud-init
//! user data instead. Actions (`poweron`, `poweroff`, `terminate`) answer 202
//! with a task, which says nothing about the outcome: a start is checked by
//! reading the server back. Deletes look at the server's state first because
//! Scaleway refuses to delete a running server with a 400 that would
//! otherwise read as a permanent bad request. Deleting a server only detaches
//! its block volumes, which keep billing; they go through `delete_volume`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use flotilla_core::{Classify, ErrorClass, InstanceId};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::json;
use tokio::time::Instant;

use crate::http::{classify_status, classify_transport, client_builder};
use crate::types::*;
use crate::{MachineProvider, ProviderError, ProviderResult};

const AUTH_HEADER: &str = "x-auth-token";

/// Scaleway's largest page.
const MAX_PER_PAGE: u32 = 100;

/// First and longest pause between two reads in `wait_machine`.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);

/// Where cloud-init writes the machine's environment, readable by root only.
const ENV_FILE: &str = "/etc/flotilla/env";

/// Connection settings for one zone of one project.
#[derive(Clone)]
pub struct ScalewayConfig {
    /// [`ScalewayConfig::DEFAULT_BASE_URL`], or a fake API's URL in tests.
    pub base_url: String,
    /// Availability zone such as `fr-par-1`; every server and volume lives here.
    pub zone: String,
    /// The project that owns, and pays for, what Flotilla creates.
    pub project_id: String,
    /// IAM API key secret, sent as `X-Auth-Token`. Never logged or printed.
    pub secret_key: String,
    /// Written into the ownership tags; listings only return its resources.
    pub control_plane_id: String,
    /// Bound on each HTTP request (a wait spans many).
    pub request_timeout: Duration,
}

impl ScalewayConfig {
    pub const DEFAULT_BASE_URL: &'static str = "https://api.scaleway.com";
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// Settings with the public API URL and the default request timeout.
    pub fn new(
        zone: impl Into<String>,
        project_id: impl Into<String>,
        secret_key: impl Into<String>,
        control_plane_id: impl Into<String>,
    ) -> Self {
        ScalewayConfig {
            base_url: Self::DEFAULT_BASE_URL.to_owned(),
            zone: zone.into(),
            project_id: project_id.into(),
            secret_key: secret_key.into(),
            control_plane_id: control_plane_id.into(),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for ScalewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalewayConfig")
            .field("base_url", &self.base_url)
            .field("zone", &self.zone)
            .field("project_id", &self.project_id)
            .field("secret_key", &"<redacted>")
            .field("control_plane_id", &self.control_plane_id)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A [`MachineProvider`] over the Scaleway Instances API. Cheap to clone.
#[derive(Clone)]
pub struct ScalewayProvider {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{base_url}/instance/v1/zones/{zone}`.
    zone_url: String,
    zone: String,
    project_id: String,
    control_plane_id: String,
    /// Kept only to scrub it from provider answers quoted in errors.
    secret_key: String,
}

impl std::fmt::Debug for ScalewayProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalewayProvider")
            .field("zone_url", &self.inner.zone_url)
            .field("project_id", &self.inner.project_id)
            .field("secret_key", &"<redacted>")
            .field("control_plane_id", &self.inner.control_plane_id)
            .finish()
    }
}

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
struct ServerEnvelope {
    server: ApiServer,
}

#[derive(Deserialize)]
struct ServerList {
    #[serde(default, deserialize_with = "nullable")]
    servers: Vec<ApiServer>,
}

/// A server as the API returns it (the fields Flotilla reads).
#[derive(Deserialize)]
struct ApiServer {
    id: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    state: String,
    #[serde(default, deserialize_with = "nullable")]
    commercial_type: String,
    #[serde(default, deserialize_with = "nullable")]
    tags: Vec<String>,
    #[serde(default)]
    creation_date: Option<String>,
    #[serde(default)]
    private_ip: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    zone: String,
}

#[derive(Deserialize)]
struct VolumeEnvelope {
    volume: ApiVolume,
}

#[derive(Deserialize)]
struct VolumeList {
    #[serde(default, deserialize_with = "nullable")]
    volumes: Vec<ApiVolume>,
}

#[derive(Deserialize)]
struct ApiVolume {
    id: String,
    #[serde(default, deserialize_with = "nullable")]
    name: String,
    #[serde(default, deserialize_with = "nullable")]
    state: String,
    /// Bytes.
    #[serde(default, deserialize_with = "nullable")]
    size: u64,
    #[serde(default)]
    server: Option<ServerRef>,
    #[serde(default, deserialize_with = "nullable")]
    tags: Vec<String>,
    #[serde(default)]
    creation_date: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    zone: String,
}

#[derive(Deserialize)]
struct ServerRef {
    id: String,
}

/// Scaleway's server states, mapped exactly. `stopped in place` keeps its
/// disks (and bills for them) but is stopped all the same.
fn server_state(s: &str) -> MachineState {
    match s {
        "running" => MachineState::Started,
        "starting" => MachineState::Starting,
        "stopping" => MachineState::Stopping,
        "stopped" | "stopped in place" => MachineState::Stopped,
        "locked" => MachineState::Failed,
        _ => MachineState::Unknown,
    }
}

/// A volume bound to a server is attached whatever it is doing; otherwise
/// only `available` is settled.
fn volume_state(s: &str, attached: bool) -> VolumeState {
    match s {
        "error" => VolumeState::Failed,
        _ if attached => VolumeState::Attached,
        "available" => VolumeState::Available,
        _ => VolumeState::Unknown,
    }
}

/// `key=value` tags, ownership last so a spec cannot override it.
fn encode_tags(
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
fn decode_tags(tags: &[String]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (t.clone(), String::new()),
        })
        .collect()
}

fn parse_time(s: Option<&str>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn check_id(field: &str, id: &str) -> ProviderResult<()> {
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

fn is_env_name(k: &str) -> bool {
    let mut bytes = k.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The environment as cloud-init user data: one `#cloud-config` document
/// writing a shell env file (`set -a; . /etc/flotilla/env`). The file is
/// base64-encoded in the YAML so no value can break out of it, and each
/// value is single-quoted so none is expanded by the shell. Error messages
/// name keys, never values: values are often secrets.
fn cloud_config(env: &BTreeMap<String, String>) -> ProviderResult<String> {
    let mut file = String::new();
    for (k, v) in env {
        if !is_env_name(k) {
            return Err(ProviderError::InvalidArgument(format!(
                "env: {k:?} is not a valid variable name"
            )));
        }
        if v.contains('\0') {
            return Err(ProviderError::InvalidArgument(format!(
                "env: the value of {k} contains a NUL byte"
            )));
        }
        file.push_str(k);
        file.push_str("='");
        file.push_str(&v.replace('\'', r"'\''"));
        file.push_str("'\n");
    }
    Ok(format!(
        "#cloud-config\n\
         write_files:\n  \
           - path: {ENV_FILE}\n    \
             owner: root:root\n    \
             permissions: '0600'\n    \
             encoding: b64\n    \
             content: {}\n",
        base64(file.as_bytes())
    ))
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Scaleway sizes are decimal: 1 GB is 10^9 bytes.
const GB: u64 = 1_000_000_000;

fn page_params(page: &PageRequest) -> ProviderResult<(u32, u32)> {
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

/// The next page while more remain: by `X-Total-Count` when Scaleway sends
/// it, else while pages come back full. An empty page always ends the walk.
fn next_page(headers: &HeaderMap, number: u32, per_page: u32, returned: usize) -> Option<String> {
    if returned == 0 {
        return None;
    }
    let total = headers
        .get("x-total-count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let more = match total {
        Some(total) => u64::from(number) * u64::from(per_page) < total,
        None => returned >= per_page as usize,
    };
    more.then(|| number.checked_add(1))
        .flatten()
        .map(|n| n.to_string())
}

impl ScalewayProvider {
    /// Checks the settings and builds the HTTP client; makes no request.
    pub fn new(config: ScalewayConfig) -> ProviderResult<Self> {
        let invalid = ProviderError::InvalidArgument;
        let base =
            reqwest::Url::parse(&config.base_url).map_err(|e| invalid(format!("base_url: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("base_url: must be http or https".into()));
        }
        let zone_ok = !config.zone.is_empty()
            && config
                .zone
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !zone_ok {
            return Err(invalid(format!(
                "zone: {:?} is not a Scaleway zone (like fr-par-1)",
                config.zone
            )));
        }
        if config.project_id.trim().is_empty() {
            return Err(invalid("project_id is empty".into()));
        }
        // The listing filter is a comma-separated list of tags.
        let cp = &config.control_plane_id;
        if cp.is_empty() || cp.contains(',') || !cp.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(format!(
                "control_plane_id: {cp:?} must be non-empty printable ASCII without ','"
            )));
        }
        if config.secret_key.is_empty() {
            return Err(invalid("secret_key is empty".into()));
        }
        if config.request_timeout.is_zero() {
            return Err(invalid("request_timeout is zero".into()));
        }
        let mut token = HeaderValue::from_str(&config.secret_key)
            .map_err(|_| invalid("secret_key is not a valid header value".into()))?;
        token.set_sensitive(true);
        let http = client_builder(config.request_timeout)
            .default_headers(HeaderMap::from_iter([(
                HeaderName::from_static(AUTH_HEADER),
                token,
            )]))
            .build()
            .map_err(|e| invalid(format!("http client: {e}")))?;
        let zone_url = format!(
            "{}/instance/v1/zones/{}",
            config.base_url.trim_end_matches('/'),
            config.zone
        );
        Ok(ScalewayProvider {
            inner: Arc::new(Inner {
                http,
                zone_url,
                zone: config.zone,
                project_id: config.project_id,
                control_plane_id: config.control_plane_id,
                secret_key: config.secret_key,
            }),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.inner
            .http
            .request(method, format!("{}{path}", self.inner.zone_url))
    }

    /// A proxy or API echoing the request back must not carry the token
    /// into an error message.
    fn redact(&self, text: &str) -> String {
        text.replace(self.inner.secret_key.as_str(), "<redacted>")
    }

    /// Sends a request; a non-2xx answer becomes its classified error.
    async fn send(&self, req: RequestBuilder) -> ProviderResult<(HeaderMap, Bytes)> {
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| classify_transport(&e))?;
        if status.is_success() {
            Ok((headers, body))
        } else {
            // Redacted before `classify_status` truncates it, so no prefix survives.
            let body = self.redact(&String::from_utf8_lossy(&body));
            Err(classify_status(status, &headers, &body))
        }
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
    ) -> ProviderResult<(HeaderMap, T)> {
        let (headers, body) = self.send(req).await?;
        let value = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Unavailable(
                self.redact(&format!("unexpected answer from Scaleway: {e}")),
            )
        })?;
        Ok((headers, value))
    }

    /// Server actions answer 202 with a task; the caller reads the outcome back.
    async fn action(&self, id: &str, action: &str) -> ProviderResult<()> {
        let req = self
            .request(Method::POST, &format!("/servers/{id}/action"))
            .json(&json!({ "action": action }));
        self.send(req).await.map(|_| ())
    }

    /// Runs an action, accepting Scaleway's 400 for "already there" (a
    /// `poweron` of a running server) when a read shows the wanted state.
    async fn action_towards(
        &self,
        id: &str,
        action: &str,
        reached: fn(MachineState) -> bool,
    ) -> ProviderResult<()> {
        match self.action(id, action).await {
            Err(e @ ProviderError::InvalidArgument(_)) => {
                let m = self.get_machine(id).await?;
                if reached(m.state) { Ok(()) } else { Err(e) }
            }
            other => other,
        }
    }

    fn check_zone(&self, region: &str) -> ProviderResult<()> {
        if region.is_empty() || region == self.inner.zone {
            Ok(())
        } else {
            Err(ProviderError::InvalidArgument(format!(
                "region: {region:?} is not this provider's zone {}",
                self.inner.zone
            )))
        }
    }

    /// The listing filter: this control plane's tag plus `more`, all required.
    fn tag_filter(&self, more: &[&str]) -> String {
        let mut filter = format!("{TAG_CONTROL_PLANE}={}", self.inner.control_plane_id);
        for tag in more {
            filter.push(',');
            filter.push_str(tag);
        }
        filter
    }

    /// One page of this control plane's servers that also carry `more` tags.
    async fn servers_page(
        &self,
        more: &[&str],
        page: &PageRequest,
    ) -> ProviderResult<Page<Machine>> {
        let (per_page, number) = page_params(page)?;
        let req = self.request(Method::GET, "/servers").query(&[
            ("tags", self.tag_filter(more)),
            ("per_page", per_page.to_string()),
            ("page", number.to_string()),
        ]);
        let (headers, list): (_, ServerList) = self.send_json(req).await?;
        let next = next_page(&headers, number, per_page, list.servers.len());
        let items = list
            .servers
            .into_iter()
            .map(|s| self.machine(s))
            // The filter is the server's; checking again keeps another
            // installation's servers out even if it were ignored.
            .filter(|m| self.owned(&m.tags))
            .collect();
        Ok(Page { items, next })
    }

    fn owned(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(TAG_CONTROL_PLANE) == Some(&self.inner.control_plane_id)
    }

    fn region(&self, zone: String) -> String {
        if zone.is_empty() {
            self.inner.zone.clone()
        } else {
            zone
        }
    }

    fn machine(&self, s: ApiServer) -> Machine {
        Machine {
            state: server_state(&s.state),
            provider_state: s.state,
            region: self.region(s.zone),
            instance_type: s.commercial_type,
            tags: decode_tags(&s.tags),
            created_at: parse_time(s.creation_date.as_deref()),
            private_ip: s.private_ip.unwrap_or_default(),
            id: s.id,
            name: s.name,
        }
    }

    fn volume(&self, v: ApiVolume) -> Volume {
        let tags = decode_tags(&v.tags);
        let attached = v.server.map(|s| s.id);
        Volume {
            state: volume_state(&v.state, attached.is_some()),
            provider_state: v.state,
            size_gb: u32::try_from(v.size.saturating_add(GB / 2) / GB).unwrap_or(u32::MAX),
            region: self.region(v.zone),
            attached_machine_id: attached,
            instance_id: tags.get(TAG_INSTANCE).and_then(|s| s.parse().ok()),
            tags,
            created_at: parse_time(v.creation_date.as_deref()),
            id: v.id,
            name: v.name,
        }
    }

    async fn get_volume(&self, id: &str) -> ProviderResult<Volume> {
        let (_, v): (_, VolumeEnvelope) = self
            .send_json(self.request(Method::GET, &format!("/volumes/{id}")))
            .await?;
        Ok(self.volume(v.volume))
    }

    fn gone(id: &str) -> Machine {
        Machine {
            id: id.to_owned(),
            name: String::new(),
            state: MachineState::Destroyed,
            provider_state: "deleted".into(),
            region: String::new(),
            instance_type: String::new(),
            tags: BTreeMap::new(),
            created_at: None,
            private_ip: String::new(),
        }
    }
}

impl MachineProvider for ScalewayProvider {
    fn kind(&self) -> &'static str {
        "scaleway"
    }

    /// Scaleway creates servers stopped and cannot boot them in the same
    /// call, so `spec.start` is left to `start_machine`; that also keeps the
    /// first boot after the user data is in place.
    #[tracing::instrument(skip_all, fields(instance_id = %spec.instance_id))]
    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        self.check_zone(&spec.region)?;
        for (field, value) in [
            ("name", &spec.name),
            ("instance_type", &spec.instance_type),
            ("image", &spec.image),
        ] {
            if value.is_empty() {
                return Err(ProviderError::InvalidArgument(format!("{field} is empty")));
            }
        }
        for v in &spec.volume_ids {
            check_id("volume_id", v)?;
        }
        let tags = encode_tags(
            &spec.tags,
            ownership_tags(spec.instance_id, &spec.pool, &self.inner.control_plane_id),
        )?;
        // Checked before the create, so a bad env never leaves a server behind.
        let user_data = if spec.env.is_empty() {
            None
        } else {
            Some(cloud_config(&spec.env)?)
        };
        let mut body = json!({
            "name": spec.name,
            "project": self.inner.project_id,
            "commercial_type": spec.instance_type,
            "image": spec.image,
            "tags": tags,
            // Workers talk to the control plane privately; a public IPv4
            // per short-lived worker is cost and exposure for nothing.
            "dynamic_ip_required": false,
        });
        if !spec.volume_ids.is_empty() {
            // Slot 0 is the root volume, made from the image.
            let volumes: serde_json::Map<String, serde_json::Value> = spec
                .volume_ids
                .iter()
                .enumerate()
                .map(|(i, id)| ((i + 1).to_string(), json!({ "id": id })))
                .collect();
            body["volumes"] = volumes.into();
        }
        let (_, created): (_, ServerEnvelope) = self
            .send_json(self.request(Method::POST, "/servers").json(&body))
            .await?;
        let machine = self.machine(created.server);
        if let Some(user_data) = user_data {
            check_id("server id from Scaleway", &machine.id)
                .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
            // The env cannot travel in the create call. If this fails the
            // server exists without it and is never started by us; it
            // carries the ownership tags, so the orphan scan finds it.
            let req = self
                .request(
                    Method::PATCH,
                    &format!("/servers/{}/user_data/cloud-init", machine.id),
                )
                .header(CONTENT_TYPE, "text/plain")
                .body(user_data);
            if let Err(e) = self.send(req).await {
                tracing::warn!(server_id = %machine.id, error = %e, "server created but its user data was not set");
                return Err(e);
            }
        }
        Ok(machine)
    }

    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        self.action_towards(id, "poweron", MachineState::is_running)
            .await?;
        // A 202 only says the task was queued; the server must show it.
        let m = self.get_machine(id).await?;
        if m.state.is_running() {
            Ok(m)
        } else {
            Err(ProviderError::FailedPrecondition(format!(
                "server {id} did not start: it is {}",
                m.provider_state
            )))
        }
    }

    /// Scaleway's `poweroff` is an ACPI shutdown with no configurable grace,
    /// so `grace` is not sent.
    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn stop_machine(&self, id: &str, _grace: Duration) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        self.action_towards(id, "poweroff", |s| {
            matches!(s, MachineState::Stopping | MachineState::Stopped)
        })
        .await?;
        self.get_machine(id).await
    }

    /// Polls the server; `Destroyed` is reached when it answers 404.
    /// Transient errors are polled through until the deadline.
    #[tracing::instrument(skip_all, fields(server_id = %id, state = state.as_str()))]
    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let deadline = Instant::now() + timeout;
        let mut delay = POLL_FIRST;
        let mut last = "no answer yet".to_owned();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match tokio::time::timeout(remaining, self.get_machine(id)).await {
                Err(_) => break,
                Ok(Ok(m)) if m.state == state => return Ok(m),
                Ok(Ok(m)) => last = format!("it is {}", m.provider_state),
                Ok(Err(ProviderError::NotFound(_))) if state == MachineState::Destroyed => {
                    return Ok(Self::gone(id));
                }
                Ok(Err(e)) if e.class() == ErrorClass::Retryable => last = e.to_string(),
                Ok(Err(e)) => return Err(e),
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            delay = (delay * 2).min(POLL_MAX);
        }
        Err(ProviderError::DeadlineExceeded(format!(
            "server {id} did not reach {} within {timeout:?}: {last}",
            state.as_str()
        )))
    }

    /// Deletes a stopped server, or with `force` terminates a running one.
    /// Either way Scaleway only detaches block volumes, which keep billing:
    /// they are not gone until `delete_volume` removes them.
    #[tracing::instrument(skip_all, fields(server_id = %id, force))]
    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        check_id("machine_id", id)?;
        let m = self.get_machine(id).await?;
        match m.state {
            MachineState::Stopped => {
                let req = self.request(Method::DELETE, &format!("/servers/{id}"));
                match self.send(req).await {
                    Ok(_) => Ok(()),
                    // Started between the read and the delete: Scaleway's
                    // 400 then means "not now", not "never".
                    Err(e @ ProviderError::InvalidArgument(_)) => {
                        let now = self.get_machine(id).await?;
                        if now.state == MachineState::Stopped {
                            Err(e)
                        } else {
                            Err(ProviderError::FailedPrecondition(format!(
                                "server {id} is {}, stop it first",
                                now.provider_state
                            )))
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            // `terminate` stops and deletes in one task; the server answers
            // 404 once it is done (see `wait_machine`).
            MachineState::Started if force => self.action(id, "terminate").await,
            _ if force => Err(ProviderError::FailedPrecondition(format!(
                "server {id} is {}; retry once it is running or stopped",
                m.provider_state
            ))),
            _ => Err(ProviderError::FailedPrecondition(format!(
                "server {id} is {}, stop it first",
                m.provider_state
            ))),
        }
    }

    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let (_, s): (_, ServerEnvelope) = self
            .send_json(self.request(Method::GET, &format!("/servers/{id}")))
            .await?;
        Ok(self.machine(s.server))
    }

    #[tracing::instrument(skip_all)]
    async fn list_machines(&self, page: &PageRequest) -> ProviderResult<Page<Machine>> {
        self.servers_page(&[], page).await
    }

    /// Scaleway filters by tag server-side, so only this instance's servers
    /// are fetched.
    #[tracing::instrument(skip_all, fields(instance_id = %instance))]
    async fn find_machines(&self, instance: InstanceId) -> ProviderResult<Vec<Machine>> {
        let tag = format!("{TAG_INSTANCE}={instance}");
        let mut page = PageRequest {
            size: MAX_PER_PAGE,
            token: None,
        };
        let mut found = Vec::new();
        loop {
            let got = self.servers_page(&[tag.as_str()], &page).await?;
            found.extend(
                got.items
                    .into_iter()
                    .filter(|m| m.instance_id() == Some(instance)),
            );
            match got.next {
                Some(next) => page.token = Some(next),
                None => return Ok(found),
            }
        }
    }

    #[tracing::instrument(skip_all, fields(instance_id = %spec.instance_id))]
    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        self.check_zone(&spec.region)?;
        if !(1..=500).contains(&spec.size_gb) {
            return Err(ProviderError::InvalidArgument(format!(
                "size_gb: {} is outside 1..=500",
                spec.size_gb
            )));
        }
        let tags = encode_tags(
            &BTreeMap::new(),
            ownership_tags(spec.instance_id, &spec.pool, &self.inner.control_plane_id),
        )?;
        let body = json!({
            "name": format!("flotilla-{}", spec.instance_id),
            "project": self.inner.project_id,
            "volume_type": "b_ssd",
            "size": u64::from(spec.size_gb) * GB,
            "tags": tags,
        });
        let (_, v): (_, VolumeEnvelope) = self
            .send_json(self.request(Method::POST, "/volumes").json(&body))
            .await?;
        Ok(self.volume(v.volume))
    }

    /// Scaleway refuses to delete an attached volume with a 400, so the
    /// binding is read first and reported as a precondition.
    #[tracing::instrument(skip_all, fields(volume_id = %id))]
    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        check_id("volume_id", id)?;
        let attached = |v: &Volume| {
            v.attached_machine_id.as_ref().map(|server| {
                ProviderError::FailedPrecondition(format!(
                    "volume {id} is attached to server {server}"
                ))
            })
        };
        if let Some(e) = attached(&self.get_volume(id).await?) {
            return Err(e);
        }
        match self
            .send(self.request(Method::DELETE, &format!("/volumes/{id}")))
            .await
        {
            Ok(_) => Ok(()),
            // Attached between the read and the delete.
            Err(e @ ProviderError::InvalidArgument(_)) => {
                Err(attached(&self.get_volume(id).await?).unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let (per_page, number) = page_params(page)?;
        let req = self.request(Method::GET, "/volumes").query(&[
            ("tags", self.tag_filter(&[])),
            ("per_page", per_page.to_string()),
            ("page", number.to_string()),
        ]);
        let (headers, list): (_, VolumeList) = self.send_json(req).await?;
        let next = next_page(&headers, number, per_page, list.volumes.len());
        let items = list
            .volumes
            .into_iter()
            .map(|v| self.volume(v))
            .filter(|v| self.owned(&v.tags))
            .collect();
        Ok(Page { items, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_state_maps_exactly_and_transients_are_never_stopped() {
        assert_eq!(server_state("running"), MachineState::Started);
        assert_eq!(server_state("starting"), MachineState::Starting);
        assert_eq!(server_state("stopping"), MachineState::Stopping);
        assert_eq!(server_state("stopped"), MachineState::Stopped);
        assert_eq!(server_state("stopped in place"), MachineState::Stopped);
        assert_eq!(server_state("locked"), MachineState::Failed);
        assert_eq!(server_state("provisioning"), MachineState::Unknown);
        assert_eq!(server_state(""), MachineState::Unknown);
        assert_eq!(volume_state("available", false), VolumeState::Available);
        assert_eq!(volume_state("available", true), VolumeState::Attached);
        assert_eq!(volume_state("error", true), VolumeState::Failed);
        assert_eq!(volume_state("hotsyncing", false), VolumeState::Unknown);
    }

    #[test]
    fn tags_round_trip_and_ownership_wins() {
        let extra = BTreeMap::from([
            ("team".to_owned(), "a=b".to_owned()),
            (TAG_POOL.to_owned(), "spoofed".to_owned()),
        ]);
        let id = InstanceId::new();
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
    fn base64_matches_the_rfc_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn env_is_refused_by_key_without_quoting_the_value() {
        let env = BTreeMap::from([("1BAD".to_owned(), "hunter2".to_owned())]);
        let e = cloud_config(&env).expect_err("bad key");
        assert!(e.to_string().contains("1BAD") && !e.to_string().contains("hunter2"));
        let env = BTreeMap::from([("OK".to_owned(), "a\0b".to_owned())]);
        assert!(
            !cloud_config(&env)
                .expect_err("nul")
                .to_string()
                .contains("a\0b")
        );
    }

    #[test]
    fn pages_continue_by_total_count_or_full_pages() {
        let mut h = HeaderMap::new();
        assert_eq!(next_page(&h, 1, 100, 100), Some("2".into()));
        assert_eq!(next_page(&h, 1, 100, 99), None);
        h.insert("x-total-count", HeaderValue::from_static("250"));
        assert_eq!(next_page(&h, 2, 100, 100), Some("3".into()));
        assert_eq!(next_page(&h, 3, 100, 50), None);
        assert_eq!(next_page(&h, 3, 100, 0), None);
        let bad = PageRequest {
            size: 0,
            token: Some("x".into()),
        };
        assert!(page_params(&bad).is_err());
        assert_eq!(page_params(&PageRequest::default()), Ok((100, 1)));
    }
}
