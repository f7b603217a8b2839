//! The local provider: every "machine" is an OS process on this host, so the
//! quickstart can run a real fleet of worker agents without a cloud account.
//!
//! Design notes. The processes outlive the adapter (each leads its own
//! process group and is not killed on drop), so what this module really owns
//! is the bookkeeping that lets a restarted adapter find them again:
//! `machines.json` and `volumes.json` under the state dir, replaced
//! atomically after every change. A machine's state is always read from its
//! process, never from bookkeeping alone: `try_wait` on the `Child` while this
//! adapter spawned it, otherwise `kill(pid, 0)` plus the process start time
//! recorded at spawn, so an exited worker reads as stopped and a recycled pid
//! never reads as ours (and is never signalled). Start times come from
//! `/proc`, so the identity check is Linux's; elsewhere only the pid is checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::InstanceId;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::types::{
    Machine, MachineSpec, MachineState, Page, PageRequest, TAG_CONTROL_PLANE, Volume, VolumeSpec,
    VolumeState, ownership_tags,
};
use crate::{MachineProvider, ProviderError, ProviderResult};

const MACHINES_FILE: &str = "machines.json";
const VOLUMES_FILE: &str = "volumes.json";
const BOOKKEEPING_VERSION: u32 = 1;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// How often `wait_machine` and a stop in progress look at the process.
const POLL: Duration = Duration::from_millis(50);
/// How long a stop keeps watching after its SIGKILL, and a force delete
/// waits for the process to be gone, before leaving it to later observations.
const KILL_SETTLE: Duration = Duration::from_secs(5);
/// The only parts of the adapter's environment a machine sees. A cloud
/// machine never sees the control plane's environment (database URLs,
/// provider tokens); a local one should not either.
const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// Where the local provider keeps its state and whose machines it lists.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Holds `machines.json`, `volumes.json`, `machines/<id>.log` (each
    /// machine's stdout and stderr) and `volumes/<id>/`.
    pub state_dir: PathBuf,
    /// Written into every machine's ownership tags; listings show only
    /// machines and volumes carrying it.
    pub control_plane_id: String,
    /// SIGTERM-to-SIGKILL time used when `stop_machine` is given zero.
    pub stop_grace_default: Duration,
}

/// Runs machines as local processes. Clones share one state.
#[derive(Clone)]
pub struct LocalProvider {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider").finish_non_exhaustive()
    }
}

struct Inner {
    config: LocalConfig,
    book: Mutex<Book>,
    /// Serializes bookkeeping writes. Each write snapshots `book` while
    /// holding it, so the last rename always carries the latest state.
    writer: tokio::sync::Mutex<()>,
}

mod book;
mod process;

use book::*;
use process::*;

impl LocalProvider {
    /// Creates the state dir if needed and loads the bookkeeping of an
    /// earlier run, whose processes this adapter then manages again.
    pub fn open(config: LocalConfig) -> ProviderResult<Self> {
        let state_dir = &config.state_dir;
        for dir in [state_dir.join("machines"), state_dir.join("volumes")] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| unavailable(format!("creating {}", dir.display()), &e))?;
        }
        // Absolute, so the volume paths handed to machines hold whatever
        // their working directory.
        let state_dir = std::fs::canonicalize(state_dir)
            .map_err(|e| unavailable(format!("resolving {}", state_dir.display()), &e))?;
        let config = LocalConfig {
            state_dir,
            ..config
        };
        let machines: Option<MachinesFile> = load(&config.state_dir.join(MACHINES_FILE))?;
        let volumes: Option<VolumesFile> = load(&config.state_dir.join(VOLUMES_FILE))?;
        // Bookkeeping written before secrets were hashed: the values move
        // to memory and the file is rewritten at once with hashes only.
        let mut secrets = HashMap::new();
        let mut machines: BTreeMap<String, MachineRecord> = machines
            .map(|f| f.machines)
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.id.clone(), m))
            .collect();
        for rec in machines.values_mut() {
            let plain: BTreeMap<String, String> = rec
                .env
                .iter()
                .filter(|(k, v)| is_secret(k) && !v.starts_with(HASHED))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !plain.is_empty() {
                let (stored, _) = split_secrets(&rec.env);
                rec.env = stored;
                secrets.insert(rec.id.clone(), plain);
            }
        }
        if !secrets.is_empty() {
            let path = config.state_dir.join(MACHINES_FILE);
            let bytes = serde_json::to_vec_pretty(&MachinesFile {
                version: BOOKKEEPING_VERSION,
                machines: machines.values().cloned().collect(),
            })
            .map_err(|e| ProviderError::Unavailable(format!("encoding {MACHINES_FILE}: {e}")))?;
            write_atomic_sync(&path, &bytes)
                .map_err(|e| unavailable(format!("writing {}", path.display()), &e))?;
            tracing::info!(
                machines = secrets.len(),
                "local provider: secrets in the bookkeeping replaced by their hashes"
            );
        }
        let book = Book {
            machines,
            secrets,
            volumes: volumes
                .map(|f| f.volumes)
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.id.clone(), v))
                .collect(),
            ..Book::default()
        };
        Ok(LocalProvider {
            inner: Arc::new(Inner {
                config,
                book: Mutex::new(book),
                writer: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The pid of the machine's main process (also its process group) as
    /// last recorded; `None` once it was seen gone or never ran.
    pub fn pid(&self, machine_id: &str) -> Option<u32> {
        self.book().machines.get(machine_id).and_then(|m| m.pid)
    }

    /// Where the machine's stdout and stderr go. The file outlives the
    /// machine.
    pub fn log_path(&self, machine_id: &str) -> PathBuf {
        self.inner
            .config
            .state_dir
            .join("machines")
            .join(format!("{machine_id}.log"))
    }

    fn volume_path(&self, volume_id: &str) -> PathBuf {
        self.inner.config.state_dir.join("volumes").join(volume_id)
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic elsewhere while holding the lock leaves the book usable:
        // every change to it is a single insert or field write.
        self.inner
            .book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn owns(&self, tags: &BTreeMap<String, String>) -> bool {
        tags.get(TAG_CONTROL_PLANE) == Some(&self.inner.config.control_plane_id)
    }

    /// Observes the machine and keeps what changed. Observations only add
    /// hindsight (an exit status), so failing to write them is not the
    /// caller's error.
    async fn refresh(&self, id: &str) -> ProviderResult<Machine> {
        let (machine, changed) = self
            .book()
            .observe(id, Utc::now())
            .ok_or_else(|| machine_not_found(id))?;
        if changed {
            self.persist_best_effort().await;
        }
        Ok(machine)
    }

    async fn persist_best_effort(&self) {
        if let Err(e) = self.persist().await {
            tracing::warn!(error = %e, "local provider: bookkeeping not written");
        }
    }

    /// Writes both bookkeeping files, each replaced atomically.
    async fn persist(&self) -> ProviderResult<()> {
        let _writer = self.inner.writer.lock().await;
        let (machines, volumes) = {
            let book = self.book();
            let machines = serde_json::to_vec_pretty(&MachinesFile {
                version: BOOKKEEPING_VERSION,
                machines: book.machines.values().cloned().collect(),
            });
            let volumes = serde_json::to_vec_pretty(&VolumesFile {
                version: BOOKKEEPING_VERSION,
                volumes: book.volumes.values().cloned().collect(),
            });
            (machines, volumes)
        };
        let dir = &self.inner.config.state_dir;
        for (name, bytes) in [(MACHINES_FILE, machines), (VOLUMES_FILE, volumes)] {
            let bytes =
                bytes.map_err(|e| ProviderError::Unavailable(format!("encoding {name}: {e}")))?;
            write_atomic(&dir.join(name), &bytes)
                .await
                .map_err(|e| unavailable(format!("writing {name}"), &e))?;
        }
        Ok(())
    }

    /// Spawns the machine's process. Refused while one still runs, as Fly
    /// refuses to start an active machine.
    async fn start(&self, id: &str) -> ProviderResult<Machine> {
        let record = {
            let mut book = self.book();
            let (machine, _) = book
                .observe(id, Utc::now())
                .ok_or_else(|| machine_not_found(id))?;
            if matches!(
                machine.state,
                MachineState::Starting | MachineState::Started | MachineState::Stopping
            ) {
                return Err(ProviderError::FailedPrecondition(format!(
                    "machine still active, refusing to start: {id} is {}",
                    machine.state.as_str()
                )));
            }
            let env = book
                .machines
                .get(id)
                .map(|r| reveal(&r.env, book.secrets.get(id)))
                .transpose()
                .map_err(|key| {
                    ProviderError::FailedPrecondition(format!(
                        "machine {id}: {key} is kept only as a hash and this adapter restarted \
                         since it was given; apply the environment again (PrepareMachine) \
                         before starting it"
                    ))
                })?;
            book.spawning.insert(id.to_owned());
            book.machines.get(id).cloned().zip(env)
        };
        let Some((record, env)) = record else {
            return Err(machine_not_found(id));
        };
        let spawned = match self.launch_plan(&record, env) {
            Ok(plan) => launch(&plan).await,
            Err(e) => Err(e),
        };

        let (result, observed) = self.record_spawn(id, spawned);
        self.persist().await?;
        result?;
        observed.ok_or_else(|| machine_not_found(id))
    }

    /// Books the outcome of a spawn: the child and its identity, or why it
    /// failed (the machine then reads as failed, never as started).
    fn record_spawn(
        &self,
        id: &str,
        spawned: ProviderResult<Child>,
    ) -> (ProviderResult<()>, Option<Machine>) {
        let mut guard = self.book();
        let book = &mut *guard;
        book.spawning.remove(id);
        let Some(rec) = book.machines.get_mut(id) else {
            // Force-deleted while spawning: the process must not outlive it.
            if let Some(pid) = spawned.as_ref().ok().and_then(Child::id) {
                signal_group(pid, Signal::SIGKILL);
            }
            return (Err(machine_not_found(id)), None);
        };
        let result = match spawned {
            Ok(child) => {
                let pid = child.id();
                rec.pid = pid;
                rec.start_time = pid.and_then(proc_stat).map(|s| s.start_time);
                rec.desired = Desired::Started;
                rec.kill_at = None;
                rec.outcome = None;
                tracing::info!(machine_id = id, pid, "local machine started");
                book.children.insert(id.to_owned(), child);
                Ok(())
            }
            Err(e) => {
                rec.pid = None;
                rec.start_time = None;
                rec.desired = Desired::Failed;
                rec.outcome = Some(format!("failed to start: {e}"));
                tracing::warn!(machine_id = id, error = %e, "local machine failed to start");
                Err(e)
            }
        };
        let observed = book.observe(id, Utc::now()).map(|(machine, _)| machine);
        (result, observed)
    }

    /// What to spawn for `record`, with `env` its revealed environment.
    fn launch_plan(
        &self,
        record: &MachineRecord,
        env: BTreeMap<String, String>,
    ) -> ProviderResult<Launch> {
        let (program, args) = record
            .command
            .split_first()
            .ok_or_else(|| ProviderError::InvalidArgument("image: empty command".into()))?;
        let spec_env = env;
        let mut env: BTreeMap<String, String> = INHERITED_ENV
            .iter()
            .filter_map(|key| std::env::var(key).ok().map(|v| ((*key).to_owned(), v)))
            .collect();
        env.extend(spec_env);
        // Ours last, so a spec cannot pose as another instance.
        env.insert(
            "FLOTILLA_INSTANCE_ID".into(),
            record.instance_id.to_string(),
        );
        env.insert("FLOTILLA_MACHINE_ID".into(), record.id.clone());
        for (n, volume) in record.volume_ids.iter().enumerate() {
            env.insert(
                format!("FLOTILLA_VOLUME_{n}"),
                self.volume_path(volume).display().to_string(),
            );
        }
        Ok(Launch {
            program: program.clone(),
            args: args.to_vec(),
            env,
            log: self.log_path(&record.id),
        })
    }

    /// Keeps observing a stop in progress so its SIGKILL goes out on time
    /// and the exit is recorded even if nobody asks.
    fn watch_stop(&self, id: &str, grace: Duration) {
        let provider = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let give_up = far_from_now(KILL_SETTLE);
            while tokio::time::Instant::now() < give_up {
                match provider.refresh(&id).await {
                    Ok(m) if m.state == MachineState::Stopping => tokio::time::sleep(POLL).await,
                    _ => break,
                }
            }
        });
    }
}

impl MachineProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn create_machine(&self, spec: &MachineSpec) -> ProviderResult<Machine> {
        let command: Vec<String> = spec.image.split_whitespace().map(str::to_owned).collect();
        if command.is_empty() {
            return Err(ProviderError::InvalidArgument(
                "image: empty command (for the local provider, the image is the command line)"
                    .into(),
            ));
        }
        validate_name(&spec.name)?;
        validate_env(&spec.env)?;
        let mut tags = spec.tags.clone();
        // Ownership tags last: a spec tag cannot claim another control plane.
        tags.extend(ownership_tags(
            spec.instance_id,
            &spec.pool,
            &self.inner.config.control_plane_id,
        ));

        let id = {
            let mut book = self.book();
            if let Some(missing) = spec
                .volume_ids
                .iter()
                .find(|v| !book.volumes.contains_key(*v))
            {
                // Not NotFound: that would read as "already done" to the caller.
                return Err(ProviderError::InvalidArgument(format!(
                    "volume_ids: no volume {missing}"
                )));
            }
            let id = loop {
                let id = format!("local-{}", short_hex());
                if !book.machines.contains_key(&id) {
                    break id;
                }
            };
            let (stored_env, secrets) = split_secrets(&spec.env);
            book.secrets.insert(id.clone(), secrets);
            book.machines.insert(
                id.clone(),
                MachineRecord {
                    id: id.clone(),
                    name: spec.name.clone(),
                    instance_id: spec.instance_id,
                    region: spec.region.clone(),
                    instance_type: spec.instance_type.clone(),
                    tags,
                    command,
                    env: stored_env,
                    volume_ids: spec.volume_ids.clone(),
                    created_at: Utc::now(),
                    desired: Desired::Created,
                    last_state: MachineState::Created,
                    pid: None,
                    start_time: None,
                    kill_at: None,
                    outcome: None,
                },
            );
            id
        };
        self.persist().await?;
        if spec.start {
            self.start(&id).await
        } else {
            self.refresh(&id).await
        }
    }

    async fn start_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.start(id).await
    }

    /// Replaces the environment of a machine that does not run: how a
    /// restarted adapter, which kept only the hash of a machine's worker
    /// token, is given a token to start it with.
    async fn prepare_machine(
        &self,
        id: &str,
        env: &BTreeMap<String, String>,
    ) -> ProviderResult<bool> {
        validate_env(env)?;
        {
            let mut book = self.book();
            let (machine, _) = book
                .observe(id, Utc::now())
                .ok_or_else(|| machine_not_found(id))?;
            if matches!(
                machine.state,
                MachineState::Starting | MachineState::Started | MachineState::Stopping
            ) {
                return Err(ProviderError::FailedPrecondition(format!(
                    "machine {id} is {}: its environment is applied only while it does not run",
                    machine.state.as_str()
                )));
            }
            let (stored, secrets) = split_secrets(env);
            if let Some(rec) = book.machines.get_mut(id) {
                rec.env = stored;
            }
            book.secrets.insert(id.to_owned(), secrets);
        }
        self.persist().await?;
        Ok(true)
    }

    async fn stop_machine(&self, id: &str, grace: Duration) -> ProviderResult<Machine> {
        let grace = if grace.is_zero() {
            self.inner.config.stop_grace_default
        } else {
            grace
        };
        let machine = {
            let mut book = self.book();
            let now = Utc::now();
            let (machine, _) = book.observe(id, now).ok_or_else(|| machine_not_found(id))?;
            if machine.state == MachineState::Starting {
                return Err(ProviderError::FailedPrecondition(format!(
                    "machine {id} is starting; stop it once started"
                )));
            }
            if let Some(rec) = book.machines.get_mut(id) {
                if let Some(pid) = rec.pid {
                    let kill_at = chrono::Duration::from_std(grace)
                        .ok()
                        .and_then(|g| now.checked_add_signed(g))
                        .unwrap_or(DateTime::<Utc>::MAX_UTC);
                    // A repeated stop never pushes the SIGKILL later.
                    rec.kill_at = Some(rec.kill_at.map_or(kill_at, |at| at.min(kill_at)));
                    rec.desired = Desired::Stopped;
                    signal_group(pid, Signal::SIGTERM);
                    tracing::info!(machine_id = id, pid, ?grace, "local machine stopping");
                } else if rec.desired == Desired::Started {
                    rec.desired = Desired::Stopped;
                }
            }
            book.observe(id, now)
                .map(|(machine, _)| machine)
                .ok_or_else(|| machine_not_found(id))?
        };
        self.persist().await?;
        if machine.state == MachineState::Stopping {
            self.watch_stop(id, grace);
        }
        Ok(machine)
    }

    async fn wait_machine(
        &self,
        id: &str,
        state: MachineState,
        timeout: Duration,
    ) -> ProviderResult<Machine> {
        let deadline = far_from_now(timeout);
        let mut last: Option<Machine> = None;
        loop {
            match self.refresh(id).await {
                Ok(machine) if machine.state == state => return Ok(machine),
                Ok(machine) => last = Some(machine),
                Err(ProviderError::NotFound(_)) if state == MachineState::Destroyed => {
                    return Ok(destroyed(id, last));
                }
                Err(e) => return Err(e),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let seen = last.map_or("unknown", |m| m.state.as_str());
                return Err(ProviderError::DeadlineExceeded(format!(
                    "machine {id} not {} after {timeout:?} (last {seen})",
                    state.as_str()
                )));
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    async fn delete_machine(&self, id: &str, force: bool) -> ProviderResult<()> {
        let killed = {
            let mut book = self.book();
            let (machine, _) = book
                .observe(id, Utc::now())
                .ok_or_else(|| machine_not_found(id))?;
            if !machine.state.is_deletable() && !force {
                return Err(ProviderError::FailedPrecondition(format!(
                    "unable to destroy machine, not currently stopped: {id} is {}",
                    machine.state.as_str()
                )));
            }
            let child = book.children.remove(id);
            book.secrets.remove(id);
            // After `observe`, a pid on the record means the process is ours and alive.
            match book.machines.remove(id) {
                Some(MachineRecord {
                    pid: Some(pid),
                    start_time,
                    ..
                }) => {
                    signal_group(pid, Signal::SIGKILL);
                    tracing::info!(machine_id = id, pid, "local machine killed for delete");
                    Some((pid, start_time, child))
                }
                _ => None,
            }
        };
        self.persist().await?;
        if let Some((pid, start_time, child)) = killed {
            wait_gone(pid, start_time, child).await;
        }
        Ok(())
    }

    async fn get_machine(&self, id: &str) -> ProviderResult<Machine> {
        self.refresh(id).await
    }

    async fn list_machines(&self, page: &PageRequest) -> ProviderResult<Page<Machine>> {
        let (items, next, changed) = {
            let mut book = self.book();
            let owned = book
                .machines
                .values()
                .filter(|m| self.owns(&m.tags))
                .map(|m| m.id.clone());
            let (ids, next) = page_of(owned, page);
            let now = Utc::now();
            let mut changed = false;
            let mut items = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some((machine, c)) = book.observe(id, now) {
                    changed |= c;
                    items.push(machine);
                }
            }
            (items, next, changed)
        };
        if changed {
            self.persist_best_effort().await;
        }
        Ok(Page { items, next })
    }

    async fn create_volume(&self, spec: &VolumeSpec) -> ProviderResult<Volume> {
        if !(1..=500).contains(&spec.size_gb) {
            return Err(ProviderError::InvalidArgument(format!(
                "size_gb: {} is outside 1-500",
                spec.size_gb
            )));
        }
        let hex = short_hex();
        let id = format!("vol-{hex}");
        let path = self.volume_path(&id);
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(|e| unavailable(format!("creating {}", path.display()), &e))?;
        let record = VolumeRecord {
            id: id.clone(),
            name: format!("flotilla_{hex}"),
            instance_id: spec.instance_id,
            size_gb: spec.size_gb,
            region: spec.region.clone(),
            tags: ownership_tags(
                spec.instance_id,
                &spec.pool,
                &self.inner.config.control_plane_id,
            ),
            created_at: Utc::now(),
        };
        let volume = {
            let mut book = self.book();
            let volume = book.to_volume(&record);
            book.volumes.insert(id, record);
            volume
        };
        self.persist().await?;
        Ok(volume)
    }

    async fn delete_volume(&self, id: &str) -> ProviderResult<()> {
        {
            let mut book = self.book();
            if !book.volumes.contains_key(id) {
                return Err(ProviderError::NotFound(format!("volume {id}")));
            }
            if let Some(machine) = book.volume_user(id) {
                return Err(ProviderError::FailedPrecondition(format!(
                    "volume {id} is in use by running machine {machine}"
                )));
            }
            book.volumes.remove(id);
        }
        self.persist().await?;
        let path = self.volume_path(id);
        match tokio::fs::remove_dir_all(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // The volume is gone from the books; a leftover directory only
            // costs disk.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "volume directory left behind")
            }
        }
        Ok(())
    }

    async fn list_volumes(&self, page: &PageRequest) -> ProviderResult<Page<Volume>> {
        let book = self.book();
        let owned = book
            .volumes
            .values()
            .filter(|v| self.owns(&v.tags))
            .map(|v| v.id.clone());
        let (ids, next) = page_of(owned, page);
        let items = ids
            .iter()
            .filter_map(|id| book.volumes.get(id))
            .map(|v| book.to_volume(v))
            .collect();
        Ok(Page { items, next })
    }
}

/// One page of ids (already sorted), starting after the token.
pub(super) fn page_of(
    ids: impl Iterator<Item = String>,
    page: &PageRequest,
) -> (Vec<String>, Option<String>) {
    let size = match page.size {
        0 => DEFAULT_PAGE_SIZE,
        n => usize::try_from(n)
            .unwrap_or(MAX_PAGE_SIZE)
            .min(MAX_PAGE_SIZE),
    };
    let mut ids: Vec<String> = ids
        .filter(|id| page.token.as_ref().is_none_or(|token| id > token))
        .take(size + 1)
        .collect();
    let next = if ids.len() > size {
        ids.truncate(size);
        ids.last().cloned()
    } else {
        None
    };
    (ids, next)
}

pub(super) fn validate_name(name: &str) -> ProviderResult<()> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidArgument(format!(
            "name: {name:?} is not 1-63 characters of a-z, 0-9 and -"
        )))
    }
}

pub(super) fn validate_env(env: &BTreeMap<String, String>) -> ProviderResult<()> {
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(ProviderError::InvalidArgument(format!(
                "env: {key:?} is not a valid variable"
            )));
        }
    }
    Ok(())
}

pub(super) fn destroyed(id: &str, last: Option<Machine>) -> Machine {
    let base = last.unwrap_or_else(|| Machine {
        id: id.to_owned(),
        name: String::new(),
        state: MachineState::Destroyed,
        provider_state: String::new(),
        region: String::new(),
        instance_type: String::new(),
        tags: BTreeMap::new(),
        created_at: None,
        private_ip: String::new(),
    });
    Machine {
        state: MachineState::Destroyed,
        provider_state: "destroyed".into(),
        ..base
    }
}

/// `now + d`, saturating: a caller's huge timeout means "a long time", not a panic.
pub(super) fn far_from_now(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365))
}

pub(super) fn short_hex() -> String {
    let mut hex = Uuid::new_v4().simple().to_string();
    hex.truncate(12);
    hex
}

pub(super) fn machine_not_found(id: &str) -> ProviderError {
    ProviderError::NotFound(format!("machine {id}"))
}

pub(super) fn unavailable(what: String, e: &io::Error) -> ProviderError {
    ProviderError::Unavailable(format!("{what}: {e}"))
}
