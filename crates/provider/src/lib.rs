//! Flotilla's provider layer: one honest, classified view of every cloud.
//!
//! [`MachineProvider`] is the one trait; `fly` (also used for the simulated
//! cloud, which speaks the same API), `scaleway`, `local` and `docker`
//! (containers of a Docker Engine) implement it.
//! Every outcome is a [`ProviderError`] from the closed set in
//! `flotilla-core`, decided here once from the HTTP status (never from error
//! text alone), and a call whose answer means "did not happen" is an error,
//! never a success.

pub mod docker;
pub mod fly;
pub mod guard;
pub mod http;
pub mod local;
pub mod registry;
pub mod scaleway;
pub mod types;

pub use flotilla_core::ProviderError;
pub use types::*;

use std::future::Future;
use std::time::Duration;

/// Result of every provider call.
pub type ProviderResult<T> = Result<T, ProviderError>;

/// One cloud account (or this machine's processes), seen through the
/// operations Flotilla needs. Implementations are cheap to clone and safe to
/// share between tasks.
pub trait MachineProvider: Send + Sync + 'static {
    /// "fly", "scaleway", "local", "docker" or "sim".
    fn kind(&self) -> &'static str;

    /// Checks, without calling the provider, that machines of this shape
    /// could be created here: the size, region and image as the provider
    /// names them. Pools are checked with it when they are created, so a
    /// typo is an `InvalidArgument` naming the field then, not a failed
    /// create later. The default accepts everything.
    fn check_spec(&self, spec: &SpecCheck) -> ProviderResult<()> {
        let _ = spec;
        Ok(())
    }

    /// Creates a machine carrying the ownership tags of `spec`. Starts it
    /// when `spec.start` is set and the provider can do both in one call.
    fn create_machine(
        &self,
        spec: &MachineSpec,
    ) -> impl Future<Output = ProviderResult<Machine>> + Send;

    /// Applies `env` to a created machine that was never started, where
    /// the provider keeps the environment apart from the create (Scaleway's
    /// user data). The scheduler calls it before starting a machine it
    /// adopted, with a fresh worker token. `Ok(false)`: this provider
    /// carries the environment in the create itself and changed nothing.
    fn prepare_machine(
        &self,
        id: &str,
        env: &std::collections::BTreeMap<String, String>,
    ) -> impl Future<Output = ProviderResult<bool>> + Send {
        let _ = (id, env);
        async { Ok(false) }
    }

    /// Starts a created or stopped machine. An answer that leaves the
    /// machine neither starting nor started is an error.
    fn start_machine(&self, id: &str) -> impl Future<Output = ProviderResult<Machine>> + Send;

    /// Asks the machine to stop; `grace` is the time between SIGTERM and kill.
    fn stop_machine(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = ProviderResult<Machine>> + Send;

    /// Suspends the machine (memory snapshot) where the provider supports
    /// it; others refuse with `InvalidArgument`.
    fn suspend_machine(&self, id: &str) -> impl Future<Output = ProviderResult<Machine>> + Send {
        let kind = self.kind();
        let id = id.to_owned();
        async move {
            Err(ProviderError::InvalidArgument(format!(
                "suspend: {kind} cannot suspend machine {id}"
            )))
        }
    }

    /// Waits until the machine reaches `state` (`DeadlineExceeded` after `timeout`).
    fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> impl Future<Output = ProviderResult<Machine>> + Send;

    /// Deletes the machine. `NotFound` means it is already gone.
    /// `FailedPrecondition` while it still runs, unless `force`.
    fn delete_machine(
        &self,
        id: &str,
        force: bool,
    ) -> impl Future<Output = ProviderResult<()>> + Send;

    fn get_machine(&self, id: &str) -> impl Future<Output = ProviderResult<Machine>> + Send;

    /// Machines carrying this control plane's ownership tag, one page at a time.
    fn list_machines(
        &self,
        page: &PageRequest,
    ) -> impl Future<Output = ProviderResult<Page<Machine>>> + Send;

    /// Every machine tagged with `instance`, however many pages that takes.
    /// Providers that can filter by tag server-side override this.
    fn find_machines(
        &self,
        instance: flotilla_core::InstanceId,
    ) -> impl Future<Output = ProviderResult<Vec<Machine>>> + Send {
        async move {
            let mut found = Vec::new();
            let mut page = PageRequest {
                size: 1000,
                token: None,
            };
            loop {
                let got = self.list_machines(&page).await?;
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
    }

    fn create_volume(
        &self,
        spec: &VolumeSpec,
    ) -> impl Future<Output = ProviderResult<Volume>> + Send;

    /// Deletes a volume. `NotFound` means it is already gone;
    /// `FailedPrecondition` while it is still bound to a machine.
    fn delete_volume(&self, id: &str) -> impl Future<Output = ProviderResult<()>> + Send;

    /// Volumes owned by Flotilla, one page at a time.
    fn list_volumes(
        &self,
        page: &PageRequest,
    ) -> impl Future<Output = ProviderResult<Page<Volume>>> + Send;
}
