//! The simulated cloud: every app's machines and volumes, the state machine
//! that moves them, and the ground truth tests read.
//!
//! Design notes: all state lives behind one `std::sync::Mutex`, held only for
//! the bookkeeping of one call and never across an await, so thousands of
//! machines and many concurrent calls stay cheap. A transition that takes
//! time (`starting` → `started`) is a timer task that re-takes the lock and
//! applies its step only if the machine's version is still the one it was
//! scheduled at; any change in between (a stop, a kill, a forced destroy)
//! bumps the version and so cancels it. Zero delays apply inline, under the
//! same lock, so benchmarks at zero latency spawn no timers. `wait` watches a
//! per-machine `watch` channel instead of polling.
//!
//! Destroyed machines and volumes stay in the truth (tests want to see what
//! was destroyed); the API hides them as Fly does.
//!
//! Apps exist only when configured ([`SimConfig::apps`]) or added
//! ([`Sim::add_app`]): a call naming any other app is a 404 for the app,
//! as on Fly (`GET /v1/apps/{app_name}`, OpenAPI `Apps_show`), never an app
//! created on the fly, so a mistyped app name is seen in tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::faults::{Faults, InvalidFaults, Operation, chance};
use crate::ids;
use crate::model::{
    CreateMachineRequest, CreateVolumeRequest, Machine, MachineState, Restart, Volume, VolumeState,
};
use crate::stats::Stats;

/// How a sim is set up when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The bearer token every `/v1` call must carry.
    pub token: String,
    /// Region of machines created without one (and without a volume).
    pub default_region: String,
    pub faults: Faults,
    /// The apps that exist; every other app name answers 404. The default
    /// is `flotilla`, the provider-adapter's default `SIM_APP_NAME`.
    pub apps: Vec<String>,
    /// Keep every `/v1` request (method, path, query, body) for
    /// [`Sim::requests`]; off by default so benchmarks keep no log.
    pub record_requests: bool,
}

/// The app every default sim has.
pub const DEFAULT_APP: &str = "flotilla";

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            token: "sim-token".to_owned(),
            default_region: "iad".to_owned(),
            faults: Faults::default(),
            apps: vec![DEFAULT_APP.to_owned()],
            record_requests: false,
        }
    }
}

/// One `/v1` request as the sim received it (see [`SimConfig::record_requests`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Without the query string, e.g. `/v1/apps/fleet/machines/3d8d/wait`.
    pub path: String,
    pub query: Vec<(String, String)>,
    /// The body as JSON, when there was one.
    pub body: Option<serde_json::Value>,
    pub status: u16,
}

/// A machine as the sim knows it, with the app it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineTruth {
    pub app: String,
    #[serde(flatten)]
    pub machine: Machine,
    /// Every state the machine entered, oldest first: what it was at any
    /// past moment (a checker asks whether a machine declared gone was
    /// running when the verdict fell).
    #[serde(default)]
    pub history: Vec<StateChange>,
}

/// A state a machine entered, and when (the sim's wall clock, to the
/// microsecond; `updated_at` keeps Fly's whole seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub state: MachineState,
    pub at: chrono::DateTime<Utc>,
}

/// A volume as the sim knows it, with the app it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeTruth {
    pub app: String,
    #[serde(flatten)]
    pub volume: Volume,
}

/// Which machines a list call returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MachineFilter {
    pub region: Option<String>,
    /// Every pair must be in the machine's `config.metadata`.
    pub metadata: Vec<(String, String)>,
}

impl MachineFilter {
    fn matches(&self, machine: &Machine) -> bool {
        self.region.as_ref().is_none_or(|r| *r == machine.region)
            && self
                .metadata
                .iter()
                .all(|(k, v)| machine.config.metadata.get(k) == Some(v))
    }
}

/// The simulated cloud. Cheap to clone: clones share the same state.
#[derive(Clone)]
pub struct Sim {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("default_region", &self.inner.default_region)
            .finish_non_exhaustive()
    }
}

struct Inner {
    token: String,
    default_region: String,
    world: Mutex<World>,
    faults: RwLock<Arc<Faults>>,
    stats: Mutex<Stats>,
    workers: Mutex<HashMap<String, WorkerHealth>>,
    /// Token buckets of Fly's per-machine rate limits, by (app, machine, action).
    buckets: Mutex<HashMap<(String, String, Operation), Bucket>>,
    record_requests: std::sync::atomic::AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    /// API calls received and not answered yet (a sign tests wait for).
    in_flight: std::sync::atomic::AtomicU64,
    /// Delayed steps not applied yet, by machine id (a sign tests read).
    scheduled: Mutex<HashMap<String, usize>>,
}

/// Counts one API call in flight until dropped (answered, or abandoned by
/// its client).
pub(crate) struct InFlight(Sim);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .inner
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A token bucket: `tokens` left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Fly's per-machine rate limit of one action: (requests per second, burst).
/// Source: Fly docs "Machines API rate limits"
/// (https://fly.io/docs/machines/api/#rate-limits) and the Fly staff answer
/// at https://community.fly.io/t/understanding-fly-io-api-rate-hard-limits/20636/3:
/// "1 request, per second, per action ... burstable up to 3 ... except the
/// Get Machine call — that one is 5 req/s, burstable up to 10".
fn machine_rate_limit(op: Operation) -> Option<(f64, f64)> {
    match op {
        Operation::Get => Some((5.0, 10.0)),
        Operation::Start
        | Operation::Stop
        | Operation::Suspend
        | Operation::Wait
        | Operation::Delete => Some((1.0, 3.0)),
        Operation::Create
        | Operation::List
        | Operation::VolumeCreate
        | Operation::VolumeGet
        | Operation::VolumeList
        | Operation::VolumeDelete
        | Operation::AppGet => None,
    }
}

/// What the simulated worker process on a machine answers to a health probe.
#[derive(Debug, Clone, Copy, Default)]
struct WorkerHealth {
    /// The machine runs but its worker does not come up (a container that
    /// fails to start inside a started machine).
    unhealthy: bool,
    probes: u64,
}

/// The answer of a simulated worker's health endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerProbe {
    /// Started and healthy: 200.
    Up,
    /// Known but not serving (not started, or marked unhealthy): 503.
    Down,
    /// No such machine: 404.
    Unknown,
}

#[derive(Default)]
struct World {
    /// Only apps that exist are keys.
    apps: HashMap<String, App>,
    /// Creation order, so listings are stable.
    next_seq: u64,
}

#[derive(Default)]
struct App {
    machines: HashMap<String, MachineRecord>,
    volumes: HashMap<String, VolumeRecord>,
}

struct MachineRecord {
    app: String,
    seq: u64,
    machine: Machine,
    /// Bumped on every state change; a timer applies only at its own version.
    version: u64,
    destroyed_at: Option<Instant>,
    state_tx: watch::Sender<MachineState>,
    history: Vec<StateChange>,
}

struct VolumeRecord {
    app: String,
    seq: u64,
    volume: Volume,
}

/// The second half of a transition, due after a delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    FinishStart {
        fails: bool,
    },
    FinishStop,
    FinishSuspend,
    FinishDestroy,
    /// A transient state (`replacing`, `updating`, `restarting`) ends in `started`.
    Settle,
    /// The destroyed machine lets go of its volumes.
    ReleaseVolumes,
    /// The worker process exits by itself.
    Die,
}

#[derive(Debug)]
struct Pending {
    app: String,
    id: String,
    version: u64,
    step: Step,
    delay: Duration,
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

impl MachineRecord {
    fn set_state(&mut self, state: MachineState) {
        let now = Utc::now();
        self.machine.state = state;
        self.machine.updated_at = now;
        self.history.push(StateChange { state, at: now });
        self.version += 1;
        self.state_tx.send_replace(state);
    }

    fn pending(&self, step: Step, delay: Duration) -> Pending {
        Pending {
            app: self.app.clone(),
            id: self.machine.id.clone(),
            version: self.version,
            step,
            delay,
        }
    }

    /// Past its linger, a destroyed machine answers 404 as if it never was.
    fn is_gone(&self, linger: Duration) -> bool {
        self.destroyed_at.is_some_and(|at| at.elapsed() >= linger)
    }

    fn begin_start(&mut self, faults: &Faults) -> Pending {
        self.set_state(MachineState::Starting);
        let fails = chance(faults.start_fails_rate);
        self.pending(Step::FinishStart { fails }, millis(faults.start_delay_ms))
    }

    fn begin_stop(&mut self, faults: &Faults) -> Pending {
        self.set_state(MachineState::Stopping);
        self.pending(Step::FinishStop, millis(faults.stop_delay_ms))
    }

    fn begin_suspend(&mut self, faults: &Faults) -> Pending {
        self.set_state(MachineState::Suspending);
        self.pending(Step::FinishSuspend, millis(faults.stop_delay_ms))
    }

    fn begin_destroy(&mut self, faults: &Faults) -> Pending {
        self.set_state(MachineState::Destroying);
        self.pending(Step::FinishDestroy, millis(faults.destroy_delay_ms))
    }

    /// The machine's process is gone; an `auto_destroy` machine goes on to
    /// be destroyed, as Fly does.
    fn exited(&mut self, faults: &Faults) -> Option<Pending> {
        self.set_state(MachineState::Stopped);
        (self.machine.config.auto_destroy == Some(true)).then(|| self.begin_destroy(faults))
    }

    fn truth(&self) -> MachineTruth {
        MachineTruth {
            app: self.app.clone(),
            machine: self.machine.clone(),
            history: self.history.clone(),
        }
    }
}

impl VolumeRecord {
    fn truth(&self) -> VolumeTruth {
        VolumeTruth {
            app: self.app.clone(),
            volume: self.volume.clone(),
        }
    }
}

impl World {
    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn app(&mut self, app: &str) -> Result<&mut App, ApiError> {
        self.apps.get_mut(app).ok_or(ApiError::app_not_found())
    }

    fn live_machine(
        &mut self,
        app: &str,
        id: &str,
        linger: Duration,
    ) -> Result<&mut MachineRecord, ApiError> {
        self.app(app)?
            .machines
            .get_mut(id)
            .filter(|rec| !rec.is_gone(linger))
            .ok_or(ApiError::machine_not_found())
    }

    fn live_volume(&mut self, app: &str, id: &str) -> Result<&mut VolumeRecord, ApiError> {
        self.app(app)?
            .volumes
            .get_mut(id)
            .filter(|rec| rec.volume.state != VolumeState::Destroyed)
            .ok_or(ApiError::volume_not_found())
    }

    fn find_machine(&mut self, id: &str) -> Option<&mut MachineRecord> {
        self.apps.values_mut().find_map(|a| a.machines.get_mut(id))
    }

    /// Applies a due step if nothing changed the machine since it was
    /// scheduled; returns the step that follows, if any.
    fn apply(&mut self, pending: &Pending, faults: &Faults) -> Option<Pending> {
        let app = self.apps.get_mut(&pending.app)?;
        let rec = app.machines.get_mut(&pending.id)?;
        if rec.version != pending.version {
            return None;
        }
        match pending.step {
            Step::FinishStart { fails: true } => {
                rec.set_state(MachineState::Failed);
                None
            }
            Step::FinishStart { fails: false } => {
                // Fly's machine states page lists `replacing`, `updating`
                // and `restarting` as transient states a client can see on
                // its way (https://fly.io/docs/machines/machine-states/).
                if chance(faults.transient_state_rate) {
                    let transient = [
                        MachineState::Replacing,
                        MachineState::Updating,
                        MachineState::Restarting,
                    ][rand::random_range(0..3)];
                    rec.set_state(transient);
                    return Some(rec.pending(Step::Settle, millis(faults.transient_state_ms)));
                }
                rec.set_state(MachineState::Started);
                faults
                    .roll_death()
                    .map(|after| rec.pending(Step::Die, after))
            }
            Step::Settle => {
                rec.set_state(MachineState::Started);
                faults
                    .roll_death()
                    .map(|after| rec.pending(Step::Die, after))
            }
            Step::FinishStop | Step::Die => rec.exited(faults),
            Step::FinishSuspend => {
                rec.set_state(MachineState::Suspended);
                None
            }
            Step::FinishDestroy => {
                rec.set_state(MachineState::Destroyed);
                rec.destroyed_at = Some(Instant::now());
                // Volumes stay bound until the destroy completes, and a
                // while after: deleting one meanwhile is Fly's 412 "volume
                // is currently bound to machine: <id>", which clients must
                // retry (the delay is our estimate; Fly documents none).
                Some(rec.pending(Step::ReleaseVolumes, millis(faults.volume_release_delay_ms)))
            }
            Step::ReleaseVolumes => {
                for mount in &rec.machine.config.mounts {
                    if let Some(vol) = app.volumes.get_mut(&mount.volume)
                        && vol.volume.attached_machine_id.as_deref() == Some(&pending.id)
                    {
                        vol.volume.attached_machine_id = None;
                    }
                }
                None
            }
        }
    }
}

fn still_active() -> ApiError {
    ApiError::FailedPrecondition("machine still active, refusing to start".to_owned())
}

/// Fly's per-CPU memory ranges, in MB: shared CPUs take 256 to 2048 MB
/// each, performance CPUs 2048 to 8192 MB each, in multiples of 256
/// (https://fly.io/docs/machines/guides-examples/machine-sizing/).
fn check_guest(guest: &crate::model::Guest) -> Result<(), ApiError> {
    let per_cpu = match guest.cpu_kind.as_str() {
        "shared" => 256..=2048,
        "performance" => 2048..=8192,
        other => {
            return Err(ApiError::BadRequest(format!(
                "invalid config.guest.cpu_kind {other:?}: must be shared or performance"
            )));
        }
    };
    if !(1..=16).contains(&guest.cpus) {
        return Err(ApiError::BadRequest(format!(
            "invalid config.guest.cpus {}: must be between 1 and 16",
            guest.cpus
        )));
    }
    // The GPU kinds Fly names (https://fly.io/docs/kubernetes/using-gpus/:
    // "a10, l40s, a100-pcie-40gb and a100-sxm4-80gb").
    if let Some(gpu) = guest.extra.get("gpu_kind") {
        const GPU_KINDS: &[&str] = &["a10", "l40s", "a100-pcie-40gb", "a100-sxm4-80gb"];
        if !gpu.as_str().is_some_and(|g| GPU_KINDS.contains(&g)) {
            return Err(ApiError::BadRequest(format!(
                "invalid config.guest.gpu_kind {gpu}: must be one of {GPU_KINDS:?}"
            )));
        }
    }
    let (min, max) = (per_cpu.start() * guest.cpus, per_cpu.end() * guest.cpus);
    if !guest.memory_mb.is_multiple_of(256) || !(min..=max).contains(&guest.memory_mb) {
        return Err(ApiError::BadRequest(format!(
            "invalid config.guest.memory_mb {}: {} {} CPUs take {min} to {max} MB in multiples of 256",
            guest.memory_mb, guest.cpus, guest.cpu_kind
        )));
    }
    Ok(())
}

fn being_destroyed() -> ApiError {
    ApiError::FailedPrecondition("machine has been destroyed".to_owned())
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        let world = World {
            apps: config
                .apps
                .iter()
                .map(|name| (name.clone(), App::default()))
                .collect(),
            next_seq: 0,
        };
        Sim {
            inner: Arc::new(Inner {
                token: config.token,
                default_region: config.default_region,
                world: Mutex::new(world),
                faults: RwLock::new(Arc::new(config.faults)),
                stats: Mutex::new(Stats::default()),
                workers: Mutex::new(HashMap::new()),
                buckets: Mutex::new(HashMap::new()),
                record_requests: std::sync::atomic::AtomicBool::new(config.record_requests),
                requests: Mutex::new(Vec::new()),
                in_flight: std::sync::atomic::AtomicU64::new(0),
                scheduled: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Makes `app` exist (idempotent).
    pub fn add_app(&self, app: &str) {
        self.world().apps.entry(app.to_owned()).or_default();
    }

    /// Deletes `app` with everything in it, as deleting a Fly app destroys
    /// its machines and volumes; later calls naming it answer 404. Returns
    /// whether it existed.
    pub fn delete_app(&self, app: &str) -> bool {
        self.world().apps.remove(app).is_some()
    }

    /// The apps that exist, sorted.
    pub fn apps(&self) -> Vec<String> {
        let mut apps: Vec<String> = self.world().apps.keys().cloned().collect();
        apps.sort();
        apps
    }

    /// Every `/v1` request received while recording was on, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Turns the request log on or off (it keeps what it has).
    pub fn set_recording(&self, on: bool) {
        self.inner
            .record_requests
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn recording(&self) -> bool {
        self.inner
            .record_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn record_request(&self, request: RecordedRequest) {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
    }

    pub fn token(&self) -> &str {
        &self.inner.token
    }

    // --- ground truth and control, for tests and the admin endpoints ---

    pub fn faults(&self) -> Faults {
        Faults::clone(&self.current_faults())
    }

    /// Replaces the fault set; applies to the next request and the next
    /// scheduled transition.
    pub fn set_faults(&self, faults: Faults) -> Result<(), InvalidFaults> {
        faults.validate()?;
        *self
            .inner
            .faults
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(faults);
        Ok(())
    }

    /// Changes some knobs and keeps the rest.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) -> Result<(), InvalidFaults> {
        let mut faults = self.faults();
        change(&mut faults);
        self.set_faults(faults)
    }

    /// Every machine the sim holds, destroyed ones included, in creation order.
    pub fn machines(&self) -> Vec<MachineTruth> {
        // Sequence numbers start at 1: every machine is after cursor 0.
        self.machines_created_after(0).0
    }

    /// The machines created after `cursor` (0 at first, then the cursor
    /// this returned), in creation order, and the next cursor. For pollers
    /// of a large sim: only new machines are cloned, so the world's lock is
    /// held for a scan, not for a copy of every machine.
    pub fn machines_created_after(&self, cursor: u64) -> (Vec<MachineTruth>, u64) {
        let world = self.world();
        let mut records: Vec<&MachineRecord> = world
            .apps
            .values()
            .flat_map(|a| a.machines.values())
            .filter(|rec| rec.seq > cursor)
            .collect();
        records.sort_by_key(|rec| rec.seq);
        let next = records.last().map_or(cursor, |rec| rec.seq);
        (
            records.into_iter().map(MachineRecord::truth).collect(),
            next,
        )
    }

    pub fn machine(&self, id: &str) -> Option<MachineTruth> {
        self.world()
            .apps
            .values()
            .find_map(|a| a.machines.get(id))
            .map(MachineRecord::truth)
    }

    /// Every volume the sim holds, destroyed ones included, in creation order.
    pub fn volumes(&self) -> Vec<VolumeTruth> {
        let world = self.world();
        let mut records: Vec<&VolumeRecord> = world
            .apps
            .values()
            .flat_map(|a| a.volumes.values())
            .collect();
        records.sort_by_key(|rec| rec.seq);
        records.into_iter().map(VolumeRecord::truth).collect()
    }

    pub fn volume(&self, id: &str) -> Option<VolumeTruth> {
        self.world()
            .apps
            .values()
            .find_map(|a| a.volumes.get(id))
            .map(VolumeRecord::truth)
    }

    pub fn stats(&self) -> Stats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the worker on machine `id` answer health probes as healthy or
    /// not (machines are healthy once started unless told otherwise).
    pub fn set_worker_healthy(&self, id: &str, healthy: bool) {
        self.workers().entry(id.to_owned()).or_default().unhealthy = !healthy;
    }

    /// Health probes the worker on machine `id` has answered.
    pub fn worker_probes(&self, id: &str) -> u64 {
        self.workers().get(id).map_or(0, |w| w.probes)
    }

    /// A health probe of the worker on machine `id`, counted.
    pub fn probe_worker(&self, id: &str) -> WorkerProbe {
        let started = match self.machine(id) {
            None => return WorkerProbe::Unknown,
            Some(m) => m.machine.state == crate::model::MachineState::Started,
        };
        let mut workers = self.workers();
        let w = workers.entry(id.to_owned()).or_default();
        w.probes += 1;
        if started && !w.unhealthy {
            WorkerProbe::Up
        } else {
            WorkerProbe::Down
        }
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkerHealth>> {
        self.inner
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every machine, volume and counter; the apps and the faults
    /// stay as set. Pending `wait` calls end with 404.
    pub fn reset(&self) {
        {
            let mut world = self.world();
            for app in world.apps.values_mut() {
                *app = App::default();
            }
            world.next_seq = 0;
        }
        self.workers().clear();
        self.buckets().clear();
        self.inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        *self
            .inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Stats::default();
    }

    /// The machine's process dies now: a running machine goes to `stopped`
    /// (and on to destroyed if `auto_destroy`). `None` if the id is unknown.
    pub fn kill(&self, id: &str) -> Option<MachineTruth> {
        let faults = self.current_faults();
        let mut world = self.world();
        let rec = world.find_machine(id)?;
        let next = match rec.machine.state {
            MachineState::Starting
            | MachineState::Started
            | MachineState::Stopping
            | MachineState::Suspending
            | MachineState::Replacing
            | MachineState::Updating
            | MachineState::Restarting => rec.exited(&faults),
            MachineState::Created
            | MachineState::Stopped
            | MachineState::Suspended
            | MachineState::Failed
            | MachineState::Destroying
            | MachineState::Destroyed => None,
        };
        self.run_steps(&mut world, &faults, next);
        world.find_machine(id).map(|rec| rec.truth())
    }

    // --- the API operations ---

    pub(crate) fn authorized(&self, bearer: Option<&str>) -> bool {
        bearer == Some(self.inner.token.as_str())
    }

    fn buckets(&self) -> MutexGuard<'_, HashMap<(String, String, Operation), Bucket>> {
        self.inner
            .buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one token of `op` on machine `id`, or answers Fly's 429 with
    /// the seconds until the next token as `Retry-After`.
    pub(crate) fn rate_limit(&self, app: &str, id: &str, op: Operation) -> Result<(), ApiError> {
        let Some((per_second, burst)) = machine_rate_limit(op) else {
            return Ok(());
        };
        if !self.current_faults().rate_limits {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets();
        let bucket = buckets
            .entry((app.to_owned(), id.to_owned(), op))
            .or_insert(Bucket {
                tokens: burst,
                at: now,
            });
        let refilled = now.saturating_duration_since(bucket.at).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refilled).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / per_second;
            Err(ApiError::RateLimited {
                retry_after_secs: wait.ceil().max(1.0) as u64,
            })
        }
    }

    /// `GET /v1/apps/{app}`: 404 unless the app exists.
    pub(crate) fn get_app(&self, app: &str) -> Result<serde_json::Value, ApiError> {
        self.world().app(app)?;
        Ok(serde_json::json!({
            "id": app,
            "name": app,
            "organization": { "name": "Simulated", "slug": "personal" },
            "status": "deployed",
        }))
    }

    /// API calls received and not answered yet: a test waits for one to be
    /// in flight before it interrupts whoever made it.
    pub fn in_flight(&self) -> u64 {
        self.inner
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Delayed steps of machine `id` not applied yet: zero means nothing
    /// more happens to it by itself, so a test can say "nothing happened"
    /// without waiting for it not to.
    pub fn steps_scheduled(&self, id: &str) -> usize {
        self.scheduled().get(id).copied().unwrap_or(0)
    }

    fn scheduled(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.inner
            .scheduled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call in flight until the guard drops.
    pub(crate) fn call_started(&self) -> InFlight {
        self.inner
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub(crate) fn record(&self, op: Operation, status: u16) {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(op, status);
    }

    pub(crate) fn current_faults(&self) -> Arc<Faults> {
        Arc::clone(
            &self
                .inner
                .faults
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    pub(crate) fn create_machine(
        &self,
        app: &str,
        request: CreateMachineRequest,
    ) -> Result<Machine, ApiError> {
        let config = request.config;
        if config.image.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::BadRequest(
                "invalid config.image: an image is required".to_owned(),
            ));
        }
        if let Some(restart) = &config.restart
            && !Restart::POLICIES.contains(&restart.policy.as_str())
        {
            return Err(ApiError::BadRequest(format!(
                "invalid config.restart.policy {:?}: must be one of {:?}",
                restart.policy,
                Restart::POLICIES
            )));
        }
        if let Some(guest) = &config.guest {
            check_guest(guest)?;
        }
        // "A Machine can only mount one volume at a time"
        // (https://fly.io/docs/volumes/overview/).
        if config.mounts.len() > 1 {
            return Err(ApiError::BadRequest(format!(
                "invalid config.mounts: a machine can mount only one volume, got {}",
                config.mounts.len()
            )));
        }

        let faults = self.current_faults();
        let mut world = self.world();
        world.app(app)?;
        let seq = world.next_seq();
        let app_state = world.app(app)?;

        let mut region = request.region;
        for mount in &config.mounts {
            let volume = app_state
                .volumes
                .get(&mount.volume)
                .map(|rec| &rec.volume)
                .filter(|v| v.state != VolumeState::Destroyed)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("volume {} not found", mount.volume))
                })?;
            if let Some(holder) = &volume.attached_machine_id {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume is currently bound to machine: {holder}"
                )));
            }
            match &region {
                None => region = Some(volume.region.clone()),
                Some(r) if *r != volume.region => {
                    return Err(ApiError::BadRequest(format!(
                        "volume {} is in region {}, not {r}",
                        volume.id, volume.region
                    )));
                }
                Some(_) => {}
            }
        }

        let id = ids::machine_id();
        let now = Utc::now();
        let machine = Machine {
            name: request.name.unwrap_or_else(|| format!("machine-{id}")),
            id: id.clone(),
            state: MachineState::Created,
            region: region.unwrap_or_else(|| self.inner.default_region.clone()),
            instance_id: ids::instance_id(),
            private_ip: ids::private_ip(),
            config,
            created_at: now,
            updated_at: now,
        };
        for mount in &machine.config.mounts {
            if let Some(vol) = app_state.volumes.get_mut(&mount.volume) {
                vol.volume.attached_machine_id = Some(id.clone());
            }
        }
        // Fly answers a create with the machine as created; the launch
        // shows only in later reads.
        let answer = machine.clone();
        let (state_tx, _) = watch::channel(MachineState::Created);
        let rec = app_state
            .machines
            .entry(id)
            .insert_entry(MachineRecord {
                app: app.to_owned(),
                seq,
                machine,
                version: 0,
                destroyed_at: None,
                state_tx,
                history: vec![StateChange {
                    state: MachineState::Created,
                    at: now,
                }],
            })
            .into_mut();
        // `skip_launch: true` leaves the machine `created`, never started,
        // until `POST /machines/{id}/start` (Fly's Machines API OpenAPI
        // document, `CreateMachineRequest.skip_launch`; flyctl's
        // `fly machine create`: "Create, but don't start, a machine",
        // fly.io/docs/flyctl/machine). Warm pools rely on it.
        let launch = (request.skip_launch != Some(true)).then(|| rec.begin_start(&faults));
        self.run_steps(&mut world, &faults, launch);
        Ok(answer)
    }

    pub(crate) fn get_machine(&self, app: &str, id: &str) -> Result<Machine, ApiError> {
        let linger = millis(self.current_faults().destroyed_linger_ms);
        let mut world = self.world();
        Ok(world.live_machine(app, id, linger)?.machine.clone())
    }

    pub(crate) fn list_machines(
        &self,
        app: &str,
        filter: &MachineFilter,
    ) -> Result<Vec<Machine>, ApiError> {
        let listing = self.current_faults().listing;
        let world = self.world();
        let app_state = world.apps.get(app).ok_or(ApiError::app_not_found())?;
        let mut records: Vec<&MachineRecord> = app_state
            .machines
            .values()
            .filter(|rec| rec.machine.state != MachineState::Destroyed)
            .filter(|rec| filter.matches(&rec.machine))
            .collect();
        records.sort_by_key(|rec| rec.seq);
        // The listing fault lies here only; `get_machine` reads the world.
        let now = Utc::now();
        Ok(records
            .into_iter()
            .enumerate()
            .filter(|(i, rec)| !listing.hides(*i, rec.machine.created_at, now))
            .map(|(_, rec)| rec.machine.clone())
            .collect())
    }

    /// Returns the state the machine was started from.
    pub(crate) fn start_machine(&self, app: &str, id: &str) -> Result<MachineState, ApiError> {
        let faults = self.current_faults();
        let mut world = self.world();
        let rec = world.live_machine(app, id, millis(faults.destroyed_linger_ms))?;
        let previous = rec.machine.state;
        match previous {
            MachineState::Created
            | MachineState::Stopped
            | MachineState::Suspended
            | MachineState::Failed => {}
            MachineState::Starting
            | MachineState::Started
            | MachineState::Stopping
            | MachineState::Suspending
            | MachineState::Replacing
            | MachineState::Updating
            | MachineState::Restarting => return Err(still_active()),
            MachineState::Destroying | MachineState::Destroyed => return Err(being_destroyed()),
        }
        let launch = rec.begin_start(&faults);
        self.run_steps(&mut world, &faults, Some(launch));
        Ok(previous)
    }

    pub(crate) fn stop_machine(&self, app: &str, id: &str) -> Result<(), ApiError> {
        let faults = self.current_faults();
        let mut world = self.world();
        let rec = world.live_machine(app, id, millis(faults.destroyed_linger_ms))?;
        let next = match rec.machine.state {
            MachineState::Starting
            | MachineState::Started
            | MachineState::Suspending
            | MachineState::Suspended
            | MachineState::Replacing
            | MachineState::Updating
            | MachineState::Restarting => rec.begin_stop(&faults),
            // Nothing is running: stopping again is a no-op, as on Fly.
            MachineState::Created
            | MachineState::Stopping
            | MachineState::Stopped
            | MachineState::Failed => return Ok(()),
            MachineState::Destroying | MachineState::Destroyed => return Err(being_destroyed()),
        };
        self.run_steps(&mut world, &faults, Some(next));
        Ok(())
    }

    pub(crate) fn suspend_machine(&self, app: &str, id: &str) -> Result<(), ApiError> {
        let faults = self.current_faults();
        let mut world = self.world();
        let rec = world.live_machine(app, id, millis(faults.destroyed_linger_ms))?;
        let next = match rec.machine.state {
            MachineState::Started => rec.begin_suspend(&faults),
            MachineState::Suspending | MachineState::Suspended => return Ok(()),
            MachineState::Created
            | MachineState::Starting
            | MachineState::Stopping
            | MachineState::Stopped
            | MachineState::Replacing
            | MachineState::Updating
            | MachineState::Restarting
            | MachineState::Failed => {
                return Err(ApiError::FailedPrecondition(
                    "machine is not started, refusing to suspend".to_owned(),
                ));
            }
            MachineState::Destroying | MachineState::Destroyed => return Err(being_destroyed()),
        };
        self.run_steps(&mut world, &faults, Some(next));
        Ok(())
    }

    pub(crate) fn destroy_machine(&self, app: &str, id: &str, force: bool) -> Result<(), ApiError> {
        let faults = self.current_faults();
        let mut world = self.world();
        let rec = world.live_machine(app, id, millis(faults.destroyed_linger_ms))?;
        let state = rec.machine.state;
        if state == MachineState::Destroyed {
            return Err(ApiError::machine_not_found());
        }
        if !force && !MachineState::DESTROYABLE.contains(&state) {
            return Err(ApiError::FailedPrecondition(
                "unable to destroy machine, not currently stopped, suspended or failed".to_owned(),
            ));
        }
        if state == MachineState::Destroying {
            return Ok(());
        }
        let next = rec.begin_destroy(&faults);
        self.run_steps(&mut world, &faults, Some(next));
        Ok(())
    }

    /// Resolves when the machine is in `target`. The lock is released before
    /// waiting; a reset ends the wait with 404. `instance_id` names the
    /// machine version waited on: one the machine is not at never matches,
    /// so such a wait ends with 408 at its timeout.
    pub(crate) async fn wait_for_state(
        &self,
        app: &str,
        id: &str,
        target: MachineState,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let (mut state_rx, version_matches) = {
            let linger = millis(self.current_faults().destroyed_linger_ms);
            let mut world = self.world();
            let rec = world.live_machine(app, id, linger)?;
            let matches = instance_id.is_none_or(|v| v == rec.machine.instance_id);
            (rec.state_tx.subscribe(), matches)
        };
        if !version_matches {
            tokio::time::sleep(timeout).await;
            return Err(ApiError::WaitTimedOut(target));
        }
        match tokio::time::timeout(timeout, state_rx.wait_for(|s| *s == target)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_closed)) => Err(ApiError::machine_not_found()),
            Err(_elapsed) => Err(ApiError::WaitTimedOut(target)),
        }
    }

    pub(crate) fn create_volume(
        &self,
        app: &str,
        request: CreateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        let name_ok = !request.name.is_empty()
            && request.name.len() <= CreateVolumeRequest::MAX_NAME_LEN
            && request
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return Err(ApiError::BadRequest(format!(
                "invalid volume name {:?}: 1 to {} characters of a-z, 0-9 and _",
                request.name,
                CreateVolumeRequest::MAX_NAME_LEN
            )));
        }
        if !CreateVolumeRequest::SIZE_GB.contains(&request.size_gb) {
            return Err(ApiError::BadRequest(format!(
                "invalid size_gb {}: must be between {} and {}",
                request.size_gb,
                CreateVolumeRequest::SIZE_GB.start(),
                CreateVolumeRequest::SIZE_GB.end()
            )));
        }
        let Some(region) = request.region.filter(|r| !r.is_empty()) else {
            return Err(ApiError::BadRequest("region is required".to_owned()));
        };
        let volume = Volume {
            id: ids::volume_id(),
            name: request.name,
            state: VolumeState::Created,
            size_gb: request.size_gb,
            region,
            attached_machine_id: None,
            created_at: Utc::now(),
        };
        let mut world = self.world();
        world.app(app)?;
        let seq = world.next_seq();
        world.app(app)?.volumes.insert(
            volume.id.clone(),
            VolumeRecord {
                app: app.to_owned(),
                seq,
                volume: volume.clone(),
            },
        );
        Ok(volume)
    }

    pub(crate) fn get_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        Ok(self.world().live_volume(app, id)?.volume.clone())
    }

    pub(crate) fn list_volumes(&self, app: &str) -> Result<Vec<Volume>, ApiError> {
        let world = self.world();
        let app_state = world.apps.get(app).ok_or(ApiError::app_not_found())?;
        let mut records: Vec<&VolumeRecord> = app_state
            .volumes
            .values()
            .filter(|rec| rec.volume.state != VolumeState::Destroyed)
            .collect();
        records.sort_by_key(|rec| rec.seq);
        Ok(records.into_iter().map(|rec| rec.volume.clone()).collect())
    }

    pub(crate) fn destroy_volume(&self, app: &str, id: &str) -> Result<Volume, ApiError> {
        let mut world = self.world();
        let rec = world.live_volume(app, id)?;
        if let Some(holder) = &rec.volume.attached_machine_id {
            return Err(ApiError::FailedPrecondition(format!(
                "volume is currently bound to machine: {holder}"
            )));
        }
        rec.volume.state = VolumeState::Destroyed;
        Ok(rec.volume.clone())
    }

    // --- plumbing ---

    fn world(&self) -> MutexGuard<'_, World> {
        self.inner
            .world
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies due steps now and hands delayed ones to timer tasks. Outside
    /// a Tokio runtime there is nothing to run a timer, so every step applies
    /// at once.
    fn run_steps(&self, world: &mut World, faults: &Faults, first: Option<Pending>) {
        let mut next = first;
        while let Some(pending) = next.take() {
            if !pending.delay.is_zero()
                && let Ok(runtime) = Handle::try_current()
            {
                self.spawn_timer(&runtime, pending);
            } else {
                next = world.apply(&pending, faults);
            }
        }
    }

    fn spawn_timer(&self, runtime: &Handle, pending: Pending) {
        let sim = self.clone();
        *self.scheduled().entry(pending.id.clone()).or_default() += 1;
        runtime.spawn(async move {
            tokio::time::sleep(pending.delay).await;
            let faults = sim.current_faults();
            let mut world = sim.world();
            let next = world.apply(&pending, &faults);
            sim.run_steps(&mut world, &faults, next);
            // Counted down once its follow-up (if any) is scheduled, so the
            // count never dips to zero between the two.
            if let Some(n) = sim.scheduled().get_mut(&pending.id) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MachineConfig;

    fn instant_sim() -> Sim {
        Sim::new(SimConfig {
            faults: Faults::instant(),
            apps: vec!["app".to_owned()],
            ..SimConfig::default()
        })
    }

    fn request(image: &str) -> CreateMachineRequest {
        CreateMachineRequest {
            config: MachineConfig {
                image: Some(image.to_owned()),
                ..MachineConfig::default()
            },
            ..CreateMachineRequest::default()
        }
    }

    #[test]
    fn with_zero_delays_a_create_is_started_before_the_call_returns() {
        let sim = instant_sim();
        let machine = sim.create_machine("app", request("img")).unwrap();
        assert_eq!(machine.state, MachineState::Created);
        let truth = sim.machine(&machine.id).unwrap();
        assert_eq!(truth.machine.state, MachineState::Started);
    }

    #[test]
    fn an_auto_destroy_machine_that_is_killed_ends_destroyed() {
        let sim = instant_sim();
        let mut req = request("img");
        req.config.auto_destroy = Some(true);
        let machine = sim.create_machine("app", req).unwrap();
        let killed = sim.kill(&machine.id).unwrap();
        assert_eq!(killed.machine.state, MachineState::Destroyed);
    }

    #[test]
    fn the_truth_keeps_every_state_a_machine_entered_in_order() {
        let sim = instant_sim();
        let machine = sim.create_machine("app", request("img")).unwrap();
        sim.stop_machine("app", &machine.id).unwrap();
        sim.destroy_machine("app", &machine.id, false).unwrap();
        let history = sim.machine(&machine.id).unwrap().history;
        let states: Vec<MachineState> = history.iter().map(|c| c.state).collect();
        assert_eq!(
            states,
            [
                MachineState::Created,
                MachineState::Starting,
                MachineState::Started,
                MachineState::Stopping,
                MachineState::Stopped,
                MachineState::Destroying,
                MachineState::Destroyed,
            ]
        );
        assert!(history.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn a_stale_timer_does_not_undo_a_later_change() {
        let sim = instant_sim();
        let machine = sim.create_machine("app", request("img")).unwrap();
        let pending = {
            let mut world = sim.world();
            let rec = world.find_machine(&machine.id).unwrap();
            rec.pending(Step::Die, Duration::ZERO)
        };
        sim.stop_machine("app", &machine.id).unwrap();
        sim.start_machine("app", &machine.id).unwrap();
        let next = sim.world().apply(&pending, &Faults::instant());
        assert!(next.is_none());
        let state = sim.machine(&machine.id).unwrap().machine.state;
        assert_eq!(state, MachineState::Started);
    }

    #[test]
    fn an_unknown_app_is_a_404_for_the_app_and_creates_nothing() {
        let sim = instant_sim();
        let err = sim.create_machine("ap", request("img")).unwrap_err();
        assert_eq!(err, ApiError::app_not_found());
        assert!(sim.apps() == ["app"] && sim.machines().is_empty());
        sim.add_app("ap");
        sim.create_machine("ap", request("img")).unwrap();
        assert!(sim.delete_app("ap"));
        assert_eq!(
            sim.list_machines("ap", &MachineFilter::default()),
            Err(ApiError::app_not_found())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_follow_flys_published_buckets() {
        // Source: Fly docs "Machines API rate limits": 1 req/s per action
        // per machine (burst 3); GET machine 5 req/s (burst 10).
        let sim = instant_sim();
        for _ in 0..3 {
            sim.rate_limit("app", "m1", Operation::Stop).unwrap();
        }
        let err = sim.rate_limit("app", "m1", Operation::Stop).unwrap_err();
        assert_eq!(
            err,
            ApiError::RateLimited {
                retry_after_secs: 1
            }
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        sim.rate_limit("app", "m1", Operation::Stop).unwrap();
        assert!(sim.rate_limit("app", "m1", Operation::Stop).is_err());
        // Another action and another machine have their own buckets.
        sim.rate_limit("app", "m1", Operation::Delete).unwrap();
        sim.rate_limit("app", "m2", Operation::Stop).unwrap();
        for _ in 0..10 {
            sim.rate_limit("app", "m1", Operation::Get).unwrap();
        }
        assert!(sim.rate_limit("app", "m1", Operation::Get).is_err());
        // Lists and creates are not per-machine actions.
        for _ in 0..100 {
            sim.rate_limit("app", "m1", Operation::List).unwrap();
        }
    }
}
