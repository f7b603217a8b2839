//! Scaleway: servers of the Instance API v1 as machines, volumes of the
//! Block Storage API v1 as volumes, in one zone of one project.
//!
//! Design notes:
//! - Ownership is written as `key=value` tags (instance id, pool, control
//!   plane id) and read back into `Machine.tags`; listings filter on the
//!   control-plane tag server-side and again here.
//! - The environment goes into cloud-init user data ([`cloud_init`]), a
//!   call separate from the create. [`MachineProvider::prepare_machine`]
//!   (re)applies it, so a server adopted after a create that failed half
//!   way boots with a fresh worker token.
//! - A server's root volume is made from the image in the Block Storage
//!   API, untagged. DELETE /servers and `terminate` only detach it, and it
//!   bills on. So every root is tagged with its instance, control plane and
//!   server ([`wire::TAG_MACHINE`]) as soon as the server exists, and is
//!   deleted once detached: by `delete_machine`, by `wait_machine` for
//!   `Destroyed`, and by the orphan scan (`list_volumes` returns it).
//! - Data volumes are Block Storage volumes (the Instance API refuses
//!   `b_ssd` since 2025-04-30), attached at create as `sbs_volume`, read
//!   and deleted through the Block API, never the Instance API (which
//!   answers 404 for them).
//! - Actions are checked against the server's `allowed_actions` first: an
//!   action the state does not allow yet is `FailedPrecondition` ("not
//!   now"), never `InvalidArgument`. `stopped in place` still holds its node
//!   and refuses DELETE, so it is powered off first.
//! - A 404 is `NotFound` only when its body names the resource asked for
//!   ([`wire::classify`]).
//! - Reaching a worker: with routed IPs `private_ip` is always null, and
//!   Flotilla asks for no public IP. With `private_network_id` set, every
//!   server gets a NIC in that Private Network and `Machine.private_ip` is
//!   its IPv4 address from IPAM (read by `get_machine`). Without it a
//!   Scaleway machine has no address Flotilla can health-check.

pub mod cloud_init;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_core::{Classify, ErrorClass, InstanceId};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::time::Instant;

use crate::http::{classify_transport, client_builder};
use crate::types::*;
use crate::{MachineProvider, ProviderError, ProviderResult};
use cloud_init::cloud_config;
use wire::*;

const AUTH_HEADER: &str = "x-auth-token";

/// First and longest pause between two reads in a wait.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);

/// IOPS class of data volumes (block_sdk.go `CreateVolumeRequest.PerfIops`;
/// 5000 is the `sbs_5k` class, the one images' roots use).
const DATA_VOLUME_IOPS: u32 = 5000;

const SERVER: &str = "instance_server";
/// The Block Storage API names its volumes `volume` in a 404.
const VOLUME: &str = "volume";

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
    /// Bound on opening a connection (`HTTP_CONNECT_TIMEOUT_SECONDS`).
    pub connect_timeout: Duration,
    /// Private Network every server joins; its IPAM address is the
    /// machine's `private_ip`. `None`: servers get no reachable address.
    pub private_network_id: Option<String>,
    /// How long `delete_machine` waits for the root volume to detach before
    /// answering `FailedPrecondition` (the next call finishes the job).
    pub root_detach_timeout: Duration,
}

impl ScalewayConfig {
    pub const DEFAULT_BASE_URL: &'static str = "https://api.scaleway.com";
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_ROOT_DETACH_TIMEOUT: Duration = Duration::from_secs(30);

    /// Settings with the public API URL and the default timeouts.
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
            connect_timeout: flotilla_telemetry::http_client::DEFAULT_CONNECT_TIMEOUT,
            private_network_id: None,
            root_detach_timeout: Self::DEFAULT_ROOT_DETACH_TIMEOUT,
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
            .field("private_network_id", &self.private_network_id)
            .field("root_detach_timeout", &self.root_detach_timeout)
            .finish()
    }
}

/// A [`MachineProvider`] over the Scaleway Instance and Block Storage APIs.
/// Cheap to clone.
#[derive(Clone)]
pub struct ScalewayProvider {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{base_url}` without a trailing `/`.
    base: String,
    zone: String,
    project_id: String,
    control_plane_id: String,
    private_network_id: Option<String>,
    root_detach_timeout: Duration,
    /// Kept only to scrub it from provider answers quoted in errors.
    secret_key: String,
}

impl std::fmt::Debug for ScalewayProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalewayProvider")
            .field("base", &self.inner.base)
            .field("zone", &self.inner.zone)
            .field("project_id", &self.inner.project_id)
            .field("secret_key", &"<redacted>")
            .field("control_plane_id", &self.inner.control_plane_id)
            .finish()
    }
}

fn server(id: &str) -> Option<Subject<'_>> {
    Some(Subject {
        resource: SERVER,
        id,
    })
}

fn volume(id: &str) -> Option<Subject<'_>> {
    Some(Subject {
        resource: VOLUME,
        id,
    })
}

fn not_now(s: &ApiServer, action: &str) -> ProviderError {
    ProviderError::FailedPrecondition(format!(
        "server {} is {}: {action} is not allowed now (allowed: {}); retry once its state changes",
        s.id,
        s.state,
        s.allowed_actions.join(", ")
    ))
}

impl ScalewayProvider {
    /// Checks the settings and builds the HTTP client; makes no request
    /// (see [`ScalewayProvider::check`]).
    pub fn new(config: ScalewayConfig) -> ProviderResult<Self> {
        let invalid = ProviderError::InvalidArgument;
        let base =
            reqwest::Url::parse(&config.base_url).map_err(|e| invalid(format!("base_url: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("base_url: must be http or https".into()));
        }
        if !is_zone(&config.zone) {
            return Err(invalid(format!(
                "zone: {:?} is not a Scaleway zone (like fr-par-1)",
                config.zone
            )));
        }
        if config.project_id.trim().is_empty() {
            return Err(invalid("project_id is empty".into()));
        }
        if let Some(pn) = &config.private_network_id {
            check_id("private_network_id", pn)?;
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
        let http = client_builder(config.request_timeout, config.connect_timeout)
            .default_headers(HeaderMap::from_iter([(
                HeaderName::from_static(AUTH_HEADER),
                token,
            )]))
            .build()
            .map_err(|e| invalid(format!("http client: {e}")))?;
        Ok(ScalewayProvider {
            inner: Arc::new(Inner {
                http,
                base: config.base_url.trim_end_matches('/').to_owned(),
                zone: config.zone,
                project_id: config.project_id,
                control_plane_id: config.control_plane_id,
                private_network_id: config.private_network_id,
                root_detach_timeout: config.root_detach_timeout,
                secret_key: config.secret_key,
            }),
        })
    }

    /// Checks that the zone and the project answer with these credentials:
    /// one listing in each API. The adapter runs it at start, so a wrong
    /// zone or project is a clear error then, not a 404 misread later.
    pub async fn check(&self) -> ProviderResult<()> {
        let p = &self.inner;
        let context = |api: &str, e: ProviderError| {
            let text = format!(
                "Scaleway {api} API check (zone {}, project {}) failed: {e}",
                p.zone, p.project_id
            );
            match e {
                ProviderError::Unavailable(_) | ProviderError::DeadlineExceeded(_) => {
                    ProviderError::Unavailable(text)
                }
                ProviderError::Unauthenticated(_) => ProviderError::Unauthenticated(text),
                ProviderError::PermissionDenied(_) => ProviderError::PermissionDenied(text),
                _ => ProviderError::InvalidArgument(text),
            }
        };
        let req = self
            .instance(Method::GET, "/servers")
            .query(&[("project", p.project_id.as_str()), ("per_page", "1")]);
        self.send_json::<ServerList>(req, None)
            .await
            .map_err(|e| context("Instance", e))?;
        let req = self
            .block(Method::GET, "/volumes")
            .query(&[("project_id", p.project_id.as_str()), ("page_size", "1")]);
        self.send_json::<BlockList>(req, None)
            .await
            .map_err(|e| context("Block Storage", e))?;
        Ok(())
    }

    fn instance(&self, method: Method, path: &str) -> RequestBuilder {
        let p = &self.inner;
        p.http.request(
            method,
            format!("{}/instance/v1/zones/{}{path}", p.base, p.zone),
        )
    }

    fn block(&self, method: Method, path: &str) -> RequestBuilder {
        let p = &self.inner;
        p.http.request(
            method,
            format!("{}/block/v1/zones/{}{path}", p.base, p.zone),
        )
    }

    fn ipam(&self, method: Method, path: &str) -> RequestBuilder {
        let p = &self.inner;
        p.http.request(
            method,
            format!("{}/ipam/v1/regions/{}{path}", p.base, region_of(&p.zone)),
        )
    }

    /// A proxy or API echoing the request back must not carry the token
    /// into an error message.
    fn redact(&self, text: &str) -> String {
        text.replace(self.inner.secret_key.as_str(), "<redacted>")
    }

    /// Sends a request; a non-2xx answer becomes its classified error, a
    /// 404 `NotFound` only when it names `subject`.
    async fn send(
        &self,
        req: RequestBuilder,
        subject: Option<Subject<'_>>,
    ) -> ProviderResult<(HeaderMap, Bytes)> {
        let resp = req.send().await.map_err(|e| classify_transport(&e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| classify_transport(&e))?;
        if status.is_success() {
            Ok((headers, body))
        } else {
            // Redacted before `classify` truncates it, so no prefix survives.
            let body = self.redact(&String::from_utf8_lossy(&body));
            Err(classify(status, &headers, &body, subject))
        }
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        subject: Option<Subject<'_>>,
    ) -> ProviderResult<(HeaderMap, T)> {
        let (headers, body) = self.send(req, subject).await?;
        let value = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Unavailable(
                self.redact(&format!("unexpected answer from Scaleway: {e}")),
            )
        })?;
        Ok((headers, value))
    }

    async fn server(&self, id: &str) -> ProviderResult<ApiServer> {
        let (_, s): (_, ServerEnvelope) = self
            .send_json(
                self.instance(Method::GET, &format!("/servers/{id}")),
                server(id),
            )
            .await?;
        Ok(s.server)
    }

    /// Runs `action` if the server's state allows it now; otherwise, or when
    /// the state moved between the read and the call (Scaleway's 400),
    /// `FailedPrecondition`. Actions answer 202 with a task, which says
    /// nothing of the outcome: callers read the server back.
    async fn act(&self, s: &ApiServer, action: &str) -> ProviderResult<()> {
        if !s.allows(action) {
            return Err(not_now(s, action));
        }
        let req = self
            .instance(Method::POST, &format!("/servers/{}/action", s.id))
            .json(&json!({ "action": action }));
        match self.send(req, server(&s.id)).await {
            Ok(_) => Ok(()),
            Err(e @ ProviderError::InvalidArgument(_)) => {
                let now = self.server(&s.id).await?;
                if now.allows(action) {
                    Err(e)
                } else {
                    Err(not_now(&now, action))
                }
            }
            Err(e) => Err(e),
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

    fn cp_tag(&self) -> String {
        format!("{TAG_CONTROL_PLANE}={}", self.inner.control_plane_id)
    }

    /// The listing filter: this control plane's tag plus `more`, all required.
    fn tag_filter(&self, more: &[&str]) -> String {
        let mut filter = self.cp_tag();
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
        let req = self.instance(Method::GET, "/servers").query(&[
            ("project", self.inner.project_id.clone()),
            ("tags", self.tag_filter(more)),
            ("per_page", per_page.to_string()),
            ("page", number.to_string()),
        ]);
        let (headers, list): (_, ServerList) = self.send_json(req, None).await?;
        let next = next_page(total_count(&headers), number, per_page, list.servers.len());
        let items = list
            .servers
            .into_iter()
            .map(|s| self.machine(&s))
            // The filter is the server's; checking again keeps another
            // installation's servers out even if it were ignored.
            .filter(|m| self.owned(&m.tags))
            .collect();
        Ok(Page { items, next })
    }

    /// One page of this control plane's Block volumes carrying all `tags`.
    async fn volumes_page(
        &self,
        tags: &[String],
        page: &PageRequest,
    ) -> ProviderResult<Page<BlockVolume>> {
        let (per_page, number) = page_params(page)?;
        let mut query = vec![
            ("project_id", self.inner.project_id.clone()),
            ("page_size", per_page.to_string()),
            ("page", number.to_string()),
        ];
        // block_sdk.go `ListVolumesRequest.Tags`: one `tags` parameter per tag.
        query.extend(tags.iter().map(|t| ("tags", t.clone())));
        let req = self.block(Method::GET, "/volumes").query(&query);
        let (_, list): (_, BlockList) = self.send_json(req, None).await?;
        let next = next_page(list.total_count, number, per_page, list.volumes.len());
        let items = list
            .volumes
            .into_iter()
            .filter(|v| {
                let have = decode_tags(&v.tags);
                tags.iter().all(|t| {
                    let (k, val) = t.split_once('=').unwrap_or((t, ""));
                    have.get(k).map(String::as_str) == Some(val)
                })
            })
            .collect();
        Ok(Page { items, next })
    }

    fn owned(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(TAG_CONTROL_PLANE) == Some(&self.inner.control_plane_id)
    }

    fn region(&self, zone: &str) -> String {
        if zone.is_empty() {
            self.inner.zone.clone()
        } else {
            zone.to_owned()
        }
    }

    fn machine(&self, s: &ApiServer) -> Machine {
        Machine {
            state: server_state(&s.state),
            provider_state: s.state.clone(),
            region: self.region(&s.zone),
            instance_type: s.commercial_type.clone(),
            tags: decode_tags(&s.tags),
            created_at: parse_time(s.creation_date.as_deref()),
            private_ip: s.private_ip.clone().unwrap_or_default(),
            id: s.id.clone(),
            name: s.name.clone(),
        }
    }

    fn volume(&self, v: BlockVolume) -> Volume {
        let tags = decode_tags(&v.tags);
        let attached = v
            .holder()
            .filter(|r| r.product_resource_type == SERVER)
            .map(|r| r.product_resource_id.clone());
        Volume {
            state: volume_state(&v),
            provider_state: v.status,
            size_gb: u32::try_from(v.size.saturating_add(GB / 2) / GB).unwrap_or(u32::MAX),
            region: self.region(&v.zone),
            attached_machine_id: attached,
            instance_id: tags.get(TAG_INSTANCE).and_then(|s| s.parse().ok()),
            tags,
            created_at: parse_time(v.created_at.as_deref()),
            id: v.id,
            name: v.name,
        }
    }

    async fn block_volume(&self, id: &str) -> ProviderResult<BlockVolume> {
        self.send_json(
            self.block(Method::GET, &format!("/volumes/{id}")),
            volume(id),
        )
        .await
        .map(|(_, v)| v)
    }

    /// Tags the server's Block root volume with the server's ownership and
    /// its own id, once: Scaleway creates it from the image untagged.
    async fn tag_root(&self, s: &ApiServer) -> ProviderResult<()> {
        let Some(root) = s.block_root() else {
            return Ok(());
        };
        check_id("root volume id from Scaleway", root)
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        let current = self.block_volume(root).await?;
        let mut tags = decode_tags(&current.tags);
        let server_tags = decode_tags(&s.tags);
        if tags.get(TAG_MACHINE) == Some(&s.id) && self.owned(&tags) {
            return Ok(());
        }
        for key in [TAG_INSTANCE, TAG_POOL, TAG_CONTROL_PLANE] {
            if let Some(v) = server_tags.get(key) {
                tags.insert(key.to_owned(), v.clone());
            }
        }
        tags.insert(
            TAG_CONTROL_PLANE.to_owned(),
            self.inner.control_plane_id.clone(),
        );
        tags.insert(TAG_MACHINE.to_owned(), s.id.clone());
        tags.insert(TAG_ROLE.to_owned(), ROLE_ROOT.to_owned());
        let tags = encode_tags(&tags, BTreeMap::new())?;
        let req = self
            .block(Method::PATCH, &format!("/volumes/{root}"))
            .json(&json!({ "tags": tags }));
        self.send(req, volume(root)).await.map(|_| ())
    }

    /// Deletes the root volumes of server `id` that are detached.
    /// `FailedPrecondition` while one is still held (`detaching`).
    async fn delete_roots(&self, id: &str) -> ProviderResult<()> {
        let tags = [
            self.cp_tag(),
            format!("{TAG_MACHINE}={id}"),
            format!("{TAG_ROLE}={ROLE_ROOT}"),
        ];
        let mut page = PageRequest {
            size: MAX_PER_PAGE,
            token: None,
        };
        loop {
            let got = self.volumes_page(&tags, &page).await?;
            for v in got.items {
                if matches!(v.status.as_str(), "deleting" | "deleted") {
                    continue;
                }
                if let Some(r) = v.holder() {
                    return Err(ProviderError::FailedPrecondition(format!(
                        "root volume {} of server {id} is still {} to {}",
                        v.id, r.status, r.product_resource_id
                    )));
                }
                match self.delete_block_volume(&v.id).await {
                    Ok(()) | Err(ProviderError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
                tracing::info!(server_id = %id, volume_id = %v.id, "root volume deleted");
            }
            match got.next {
                Some(next) => page.token = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// [`Self::delete_roots`], retried until `root_detach_timeout`.
    async fn delete_roots_waiting(&self, id: &str) -> ProviderResult<()> {
        let deadline = Instant::now() + self.inner.root_detach_timeout;
        let mut delay = POLL_FIRST;
        loop {
            match self.delete_roots(id).await {
                Err(e) if e.class() == ErrorClass::Retryable && Instant::now() < deadline => {
                    let pause = delay
                        .max(e.retry_after().unwrap_or_default())
                        .min(deadline.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(pause).await;
                    delay = (delay * 2).min(POLL_MAX);
                }
                other => return other,
            }
        }
    }

    /// DELETE through the Block API, after checking nothing holds the
    /// volume: Scaleway refuses while it is attached or still detaching.
    async fn delete_block_volume(&self, id: &str) -> ProviderResult<()> {
        let held = |v: &BlockVolume| {
            v.holder().map(|r| {
                ProviderError::FailedPrecondition(format!(
                    "volume {id} is {} to server {}",
                    r.status, r.product_resource_id
                ))
            })
        };
        if let Some(e) = held(&self.block_volume(id).await?) {
            return Err(e);
        }
        match self
            .send(
                self.block(Method::DELETE, &format!("/volumes/{id}")),
                volume(id),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Attached between the read and the delete.
            Err(e @ (ProviderError::InvalidArgument(_) | ProviderError::FailedPrecondition(_))) => {
                Err(held(&self.block_volume(id).await?).unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Everything a created server needs before its first boot, each step
    /// idempotent: the user data, the root volume's tags, the Private
    /// Network NIC.
    async fn prepare(&self, s: &ApiServer, user_data: Option<String>) -> ProviderResult<()> {
        check_id("server id from Scaleway", &s.id)
            .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
        if let Some(user_data) = user_data {
            let req = self
                .instance(
                    Method::PATCH,
                    &format!("/servers/{}/user_data/cloud-init", s.id),
                )
                .header(CONTENT_TYPE, "text/plain")
                .body(user_data);
            self.send(req, server(&s.id)).await?;
        }
        self.tag_root(s).await?;
        if let Some(pn) = &self.inner.private_network_id
            && !s.private_nics.iter().any(|n| &n.private_network_id == pn)
        {
            let req = self
                .instance(Method::POST, &format!("/servers/{}/private_nics", s.id))
                .json(&json!({ "private_network_id": pn }));
            self.send(req, server(&s.id)).await?;
        }
        Ok(())
    }

    /// The IPv4 address IPAM gave the server's NIC in the Private Network.
    async fn private_address(&self, s: &ApiServer) -> ProviderResult<Option<String>> {
        let nic = s
            .private_nics
            .iter()
            .find(|n| match &self.inner.private_network_id {
                Some(pn) => &n.private_network_id == pn,
                None => true,
            });
        let Some(nic) = nic else {
            return Ok(None);
        };
        let req = self.ipam(Method::GET, "/ips").query(&[
            ("project_id", self.inner.project_id.as_str()),
            ("resource_type", "instance_private_nic"),
            ("resource_id", nic.id.as_str()),
        ]);
        let (_, list): (_, IpamList) = self.send_json(req, None).await?;
        Ok(list.ips.into_iter().find(|ip| !ip.is_ipv6).map(|ip| {
            ip.address
                .split_once('/')
                .map_or(ip.address.clone(), |(a, _)| a.to_owned())
        }))
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

    /// Commercial type spelling, this zone, an image, and a Block Storage
    /// size (1 GB-10 TB), without calling Scaleway.
    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        let invalid = |m: String| Err(ProviderError::InvalidArgument(m));
        if !is_zone(&spec.region) && !spec.region.is_empty() {
            return invalid(format!(
                "region: {:?} is not a Scaleway zone (like fr-par-1)",
                spec.region
            ));
        }
        self.check_zone(&spec.region)?;
        if !is_commercial_type(&spec.instance_type) {
            return invalid(format!(
                "instance_type: {:?} is not a Scaleway commercial type (like DEV1-S, PRO2-XXS)",
                spec.instance_type
            ));
        }
        if spec.image.trim().is_empty() {
            return invalid("image: is empty (an image label like ubuntu_noble, or an id)".into());
        }
        if spec.volume_size_gb != 0 && !BLOCK_SIZE_GB.contains(&spec.volume_size_gb) {
            return invalid(format!(
                "volume_size_gb: {} is outside Block Storage's 1..=10000 GB",
                spec.volume_size_gb
            ));
        }
        Ok(())
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
            // Workers are reached through the Private Network; a public
            // IPv4 per short-lived worker is cost and exposure for nothing.
            "dynamic_ip_required": false,
        });
        if !spec.volume_ids.is_empty() {
            // Slot 0 is the root volume, made from the image. A Block
            // volume must say `sbs_volume` (without it Scaleway looks for
            // an Instance volume of that id and answers 404).
            let volumes: serde_json::Map<String, serde_json::Value> = spec
                .volume_ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    (
                        (i + 1).to_string(),
                        json!({ "id": id, "volume_type": "sbs_volume" }),
                    )
                })
                .collect();
            body["volumes"] = volumes.into();
        }
        let (_, created): (_, ServerEnvelope) = self
            .send_json(self.instance(Method::POST, "/servers").json(&body), None)
            .await?;
        // If this fails the server exists half prepared and is never started
        // by us; it carries the ownership tags, so the scheduler adopts it
        // (and prepares it again) or the orphan scan deletes it.
        if let Err(e) = self.prepare(&created.server, user_data).await {
            tracing::warn!(server_id = %created.server.id, error = %e, "server created but not prepared");
            return Err(e);
        }
        Ok(self.machine(&created.server))
    }

    /// Sets the user data (the environment) again, tags the root volume
    /// and joins the Private Network: what a create that failed half way
    /// left undone.
    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn prepare_machine(
        &self,
        id: &str,
        env: &BTreeMap<String, String>,
    ) -> ProviderResult<bool> {
        check_id("machine_id", id)?;
        let user_data = Some(cloud_config(env)?);
        let s = self.server(id).await?;
        self.prepare(&s, user_data).await?;
        Ok(true)
    }

    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let s = self.server(id).await?;
        if !server_state(&s.state).is_running() {
            match self.act(&s, "poweron").await {
                Ok(()) => {}
                // Started by someone else in between: read below.
                Err(ProviderError::FailedPrecondition(_))
                    if server_state(&self.server(id).await?.state).is_running() => {}
                Err(e) => return Err(e),
            }
        }
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
    /// so `grace` is not sent. `stopped in place` is powered off too: it
    /// still holds its node.
    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn stop_machine(&self, id: &str, _grace: Duration) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let s = self.server(id).await?;
        if !matches!(s.state.as_str(), "stopped" | "stopping") {
            self.act(&s, "poweroff").await?;
        }
        self.get_machine(id).await
    }

    /// Polls the server; `Destroyed` is reached when it answers 404 and its
    /// root volume is deleted. A server `stopped in place` is powered off
    /// on the way to `Stopped`. Transient errors are polled through until
    /// the deadline.
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
            let mut pause = delay;
            let step = async {
                let s = self.server(id).await?;
                if state == MachineState::Stopped && s.state == "stopped in place" {
                    self.act(&s, "poweroff").await?;
                }
                Ok::<_, ProviderError>(self.machine(&s))
            };
            match tokio::time::timeout(remaining, step).await {
                Err(_) => break,
                Ok(Ok(m)) if m.state == state => return Ok(m),
                Ok(Ok(m)) => last = format!("it is {}", m.provider_state),
                Ok(Err(ProviderError::NotFound(_))) if state == MachineState::Destroyed => {
                    match self.delete_roots(id).await {
                        Ok(()) => return Ok(Self::gone(id)),
                        Err(e) if e.class() == ErrorClass::Retryable => last = e.to_string(),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Err(e)) if e.class() == ErrorClass::Retryable => {
                    pause = pause.max(e.retry_after().unwrap_or_default());
                    last = e.to_string();
                }
                Ok(Err(e)) => return Err(e),
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            delay = (delay * 2).min(POLL_MAX);
        }
        Err(ProviderError::DeadlineExceeded(format!(
            "server {id} did not reach {} within {timeout:?}: {last}",
            state.as_str()
        )))
    }

    /// Deletes a stopped server and then its root volume once detached, or
    /// with `force` terminates a running one (the root goes with the wait
    /// for `Destroyed`, or the next delete). A server already gone still
    /// has its detached roots deleted before the `NotFound`. Data volumes
    /// are only detached; they go through `delete_volume`.
    #[tracing::instrument(skip_all, fields(server_id = %id, force))]
    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        check_id("machine_id", id)?;
        let s = match self.server(id).await {
            Ok(s) => s,
            Err(ProviderError::NotFound(e)) => {
                self.delete_roots(id).await?;
                return Err(ProviderError::NotFound(e));
            }
            Err(e) => return Err(e),
        };
        // Before anything that detaches it, so it can be found afterwards.
        self.tag_root(&s).await?;
        match s.state.as_str() {
            "stopped" => {
                let req = self.instance(Method::DELETE, &format!("/servers/{id}"));
                match self.send(req, server(id)).await {
                    Ok(_) => {}
                    // Started between the read and the delete: Scaleway's
                    // 400 then means "not now", not "never".
                    Err(e @ ProviderError::InvalidArgument(_)) => {
                        let now = self.server(id).await?;
                        return if now.state == "stopped" {
                            Err(e)
                        } else {
                            Err(ProviderError::FailedPrecondition(format!(
                                "server {id} is {}, stop it first",
                                now.state
                            )))
                        };
                    }
                    Err(e) => return Err(e),
                }
                self.delete_roots_waiting(id).await.map_err(|e| match e {
                    ProviderError::FailedPrecondition(m) => ProviderError::FailedPrecondition(
                        format!("server {id} deleted, its root volume not yet: {m}; retry"),
                    ),
                    e => e,
                })
            }
            "stopped in place" => {
                self.act(&s, "poweroff").await?;
                Err(ProviderError::FailedPrecondition(format!(
                    "server {id} was stopped in place (still holding its node); powering it off, retry once stopped"
                )))
            }
            // `terminate` stops and deletes in one task; the server answers
            // 404 once it is done (see `wait_machine`).
            "running" if force => self.act(&s, "terminate").await,
            _ => Err(ProviderError::FailedPrecondition(format!(
                "server {id} is {}; {}",
                s.state,
                if force {
                    "retry once it is running or stopped"
                } else {
                    "stop it first"
                }
            ))),
        }
    }

    /// The server, with its Private Network address from IPAM when the
    /// Instance API gives none (routed IPs). An IPAM failure leaves the
    /// address empty: it never makes a live server look unreadable.
    #[tracing::instrument(skip_all, fields(server_id = %id))]
    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        check_id("machine_id", id)?;
        let s = self.server(id).await?;
        let mut m = self.machine(&s);
        if m.private_ip.is_empty() {
            match self.private_address(&s).await {
                Ok(Some(ip)) => m.private_ip = ip,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "private address not read from IPAM"),
            }
        }
        Ok(m)
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

    /// A Block Storage volume (`sbs_5k`), tagged with its ownership.
    #[tracing::instrument(skip_all, fields(instance_id = %spec.instance_id))]
    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        self.check_zone(&spec.region)?;
        if !BLOCK_SIZE_GB.contains(&spec.size_gb) {
            return Err(ProviderError::InvalidArgument(format!(
                "size_gb: {} is outside Block Storage's 1..=10000 GB",
                spec.size_gb
            )));
        }
        let tags = encode_tags(
            &BTreeMap::new(),
            ownership_tags(spec.instance_id, &spec.pool, &self.inner.control_plane_id),
        )?;
        let body = json!({
            "name": format!("flotilla-{}", spec.instance_id),
            "project_id": self.inner.project_id,
            "from_empty": { "size": u64::from(spec.size_gb) * GB },
            "perf_iops": DATA_VOLUME_IOPS,
            "tags": tags,
        });
        let (_, v): (_, BlockVolume) = self
            .send_json(self.block(Method::POST, "/volumes").json(&body), None)
            .await?;
        Ok(self.volume(v))
    }

    /// Through the Block API; `FailedPrecondition` while a server holds the
    /// volume, including while it is still `detaching` after a server delete.
    #[tracing::instrument(skip_all, fields(volume_id = %id))]
    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        check_id("volume_id", id)?;
        self.delete_block_volume(id).await
    }

    /// This control plane's Block volumes: data volumes and server roots.
    #[tracing::instrument(skip_all)]
    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let got = self.volumes_page(&[self.cp_tag()], page).await?;
        Ok(Page {
            items: got.items.into_iter().map(|v| self.volume(v)).collect(),
            next: got.next,
        })
    }
}
