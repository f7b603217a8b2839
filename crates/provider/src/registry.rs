//! The configured providers, by kind, each behind its guard.
//!
//! Design notes: one rate limiter per provider account (the provider
//! throttles the account) and one circuit breaker per provider and region
//! (a region that fails should not stop the others), created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::docker::DockerProvider;
use crate::fly::FlyProvider;
use crate::guard::{GuardConfig, Guarded, Limiter, limiter};
use crate::local::LocalProvider;
use crate::scaleway::ScalewayProvider;
use crate::types::*;
use crate::{MachineProvider, ProviderResult};

/// Any implemented provider; dispatches to the one it holds.
#[derive(Debug, Clone)]
pub enum AnyProvider {
    /// Fly Machines, or the simulated cloud that speaks its API.
    Fly(FlyProvider),
    Scaleway(ScalewayProvider),
    /// Processes on this machine.
    Local(LocalProvider),
    /// Containers of a Docker Engine.
    Docker(DockerProvider),
}

macro_rules! dispatch {
    ($self:ident, $p:ident => $call:expr) => {
        match $self {
            AnyProvider::Fly($p) => $call,
            AnyProvider::Scaleway($p) => $call,
            AnyProvider::Local($p) => $call,
            AnyProvider::Docker($p) => $call,
        }
    };
}

impl MachineProvider for AnyProvider {
    fn kind(&self) -> &'static str {
        dispatch!(self, p => p.kind())
    }

    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        dispatch!(self, p => p.check_spec(spec))
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        dispatch!(self, p => p.create_machine(spec).await)
    }

    async fn prepare_machine(
        &self,
        id: &str,
        env: &std::collections::BTreeMap<String, String>,
    ) -> ProviderResult<bool> {
        dispatch!(self, p => p.prepare_machine(id, env).await)
    }

    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        dispatch!(self, p => p.start_machine(id).await)
    }

    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        dispatch!(self, p => p.stop_machine(id, grace).await)
    }

    async fn suspend_machine(&self, id: &str) -> ProviderResult<Machine> {
        dispatch!(self, p => p.suspend_machine(id).await)
    }

    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        dispatch!(self, p => p.wait_machine(id, state, timeout).await)
    }

    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        dispatch!(self, p => p.delete_machine(id, force).await)
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        dispatch!(self, p => p.get_machine(id).await)
    }

    async fn list_machines(&self, page: &PageRequest) -> ProviderResult<Page<Machine>> {
        dispatch!(self, p => p.list_machines(page).await)
    }

    async fn find_machines(
        &self,
        instance: flotilla_core::InstanceId,
    ) -> ProviderResult<Vec<Machine>> {
        dispatch!(self, p => p.find_machines(instance).await)
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        dispatch!(self, p => p.create_volume(spec).await)
    }

    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        dispatch!(self, p => p.delete_volume(id).await)
    }

    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        dispatch!(self, p => p.list_volumes(page).await)
    }
}

struct Entry {
    provider: AnyProvider,
    limiter: Arc<Limiter>,
    scopes: Mutex<HashMap<String, Arc<Guarded<AnyProvider>>>>,
}

/// Providers by kind ("fly", "scaleway", "local", "docker", "sim").
pub struct Registry {
    entries: HashMap<String, Entry>,
    guard: GuardConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Registry {
    pub fn new(guard: GuardConfig) -> Self {
        Registry {
            entries: HashMap::new(),
            guard,
        }
    }

    /// Adds (or replaces) the provider for its kind.
    pub fn insert(&mut self, provider: AnyProvider) {
        self.entries.insert(
            provider.kind().to_owned(),
            Entry {
                provider,
                limiter: limiter(&self.guard),
                scopes: Mutex::new(HashMap::new()),
            },
        );
    }

    /// Configured kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<_> = self.entries.keys().cloned().collect();
        k.sort();
        k
    }

    /// The guarded provider for `kind` in `region`, or `None` if `kind` is
    /// not configured.
    pub fn get(&self, kind: &str, region: &str) -> Option<Arc<Guarded<AnyProvider>>> {
        let entry = self.entries.get(kind)?;
        let mut scopes = entry.scopes.lock().unwrap_or_else(|p| p.into_inner());
        let guarded = scopes.entry(region.to_owned()).or_insert_with(|| {
            Arc::new(Guarded::with_limiter(
                entry.provider.clone(),
                format!("{kind}/{region}"),
                self.guard.clone(),
                entry.limiter.clone(),
            ))
        });
        Some(guarded.clone())
    }
}
