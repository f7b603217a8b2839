//! The local provider's bookkeeping: what it knows of every machine and
//! volume, and `machines.json` / `volumes.json` under the state dir,
//! replaced atomically after every change so a restarted adapter finds its
//! processes again. A record is never trusted over the process it names.
//!
//! Secrets in a machine's environment (the worker token, and any variable
//! named like a credential, see [`is_secret`]) are written to the files
//! only as `sha256:<hex>`; their values live in this process's memory
//! ([`Book::secrets`]) and in the environment of the process they were
//! handed to. A restarted adapter therefore cannot spawn such a machine
//! again until the scheduler applies a fresh token (`prepare_machine`),
//! exactly as for a cloud machine whose token only its hash remembers.

use super::*;

#[derive(Default)]
pub(super) struct Book {
    pub(super) machines: BTreeMap<String, MachineRecord>,
    pub(super) volumes: BTreeMap<String, VolumeRecord>,
    /// Processes this adapter spawned: `try_wait` on them is the truth, and
    /// is what reaps them.
    pub(super) children: HashMap<String, Child>,
    /// Machines whose spawn is under way outside the lock; a second start,
    /// a stop or a plain delete is refused meanwhile.
    pub(super) spawning: HashSet<String>,
    /// The plain values of the secret variables of each machine's
    /// environment, by machine id. Never written to disk.
    pub(super) secrets: HashMap<String, BTreeMap<String, String>>,
}

/// How a secret's value is written in the bookkeeping: its hash only.
pub(super) const HASHED: &str = "sha256:";

/// Whether the variable `key` holds a credential that must not be kept in
/// the clear: the worker token, and any `*_TOKEN`, `*_SECRET`,
/// `*_PASSWORD` or `*_KEY`.
pub(super) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    ["_TOKEN", "_SECRET", "_PASSWORD", "_KEY"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// Splits an environment into what may be written (secrets replaced by
/// `sha256:<hex>`) and the secrets' plain values.
pub(super) fn split_secrets(
    env: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut stored = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for (k, v) in env {
        if is_secret(k) {
            stored.insert(
                k.clone(),
                format!("{HASHED}{}", flotilla_core::token::token_hash_hex(v)),
            );
            secrets.insert(k.clone(), v.clone());
        } else {
            stored.insert(k.clone(), v.clone());
        }
    }
    (stored, secrets)
}

/// The environment to hand a process: the stored one with each hashed
/// secret replaced by its plain value. `Err(key)`: a secret whose value
/// this process does not hold (it restarted since it was given).
pub(super) fn reveal(
    stored: &BTreeMap<String, String>,
    secrets: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (k, v) in stored {
        if is_secret(k) && v.starts_with(HASHED) {
            match secrets.and_then(|s| s.get(k)) {
                Some(plain) => env.insert(k.clone(), plain.clone()),
                None => return Err(k.clone()),
            };
        } else {
            env.insert(k.clone(), v.clone());
        }
    }
    Ok(env)
}

/// What the caller last asked of a machine; the observed state is derived
/// from this and the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Desired {
    Created,
    Started,
    Stopped,
    /// The last spawn failed.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MachineRecord {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) instance_id: InstanceId,
    pub(super) region: String,
    pub(super) instance_type: String,
    pub(super) tags: BTreeMap<String, String>,
    pub(super) command: Vec<String>,
    /// `spec.env`, kept so a restarted adapter can start the machine again;
    /// secrets only as `sha256:<hex>` (see [`split_secrets`]).
    pub(super) env: BTreeMap<String, String>,
    pub(super) volume_ids: Vec<String>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) desired: Desired,
    /// For humans reading the file; never trusted over the process.
    pub(super) last_state: MachineState,
    /// Set while the process may still run; cleared once it is seen gone.
    pub(super) pid: Option<u32>,
    /// Field 22 of `/proc/<pid>/stat` at spawn: tells our process from a
    /// later one that got the same pid.
    pub(super) start_time: Option<u64>,
    /// When a stop turns into SIGKILL. Persisted so a restarted adapter
    /// finishes the stop.
    pub(super) kill_at: Option<DateTime<Utc>>,
    /// How the last run ended ("exited: 1") or why the last spawn failed.
    pub(super) outcome: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct VolumeRecord {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) instance_id: InstanceId,
    pub(super) size_gb: u32,
    pub(super) region: String,
    pub(super) tags: BTreeMap<String, String>,
    pub(super) created_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct MachinesFile {
    pub(super) version: u32,
    pub(super) machines: Vec<MachineRecord>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct VolumesFile {
    pub(super) version: u32,
    pub(super) volumes: Vec<VolumeRecord>,
}

impl Book {
    /// Reads the machine's real state from its process, sends the SIGKILL
    /// of a stop whose grace ran out, and says whether the record changed.
    pub(super) fn observe(&mut self, id: &str, now: DateTime<Utc>) -> Option<(Machine, bool)> {
        let spawning = self.spawning.contains(id);
        let rec = self.machines.get_mut(id)?;
        let before = rec.clone();
        let alive = match rec.pid {
            None => None,
            Some(pid) => {
                let alive = match self.children.get_mut(id).map(Child::try_wait) {
                    Some(Ok(None)) => true,
                    Some(Ok(Some(status))) => {
                        rec.outcome = Some(describe_exit(status));
                        false
                    }
                    // Not (or no longer) our child to wait for.
                    Some(Err(_)) | None => {
                        let ours = process_is_ours(pid, rec.start_time);
                        if !ours {
                            rec.outcome = Some("exited (status not seen by this adapter)".into());
                        }
                        ours
                    }
                };
                if alive {
                    Some(pid)
                } else {
                    self.children.remove(id);
                    rec.pid = None;
                    rec.start_time = None;
                    rec.kill_at = None;
                    None
                }
            }
        };

        let (state, provider_state) = match (alive, rec.desired) {
            _ if spawning => (MachineState::Starting, "starting".to_owned()),
            (Some(pid), Desired::Stopped) => {
                if rec.kill_at.is_some_and(|at| at <= now) {
                    signal_group(pid, Signal::SIGKILL);
                }
                (MachineState::Stopping, format!("stopping (pid {pid})"))
            }
            (Some(pid), _) => (MachineState::Started, format!("running (pid {pid})")),
            (None, Desired::Created) => (MachineState::Created, "created".to_owned()),
            (None, Desired::Failed) => (
                MachineState::Failed,
                rec.outcome.clone().unwrap_or_else(|| "failed".into()),
            ),
            (None, Desired::Started | Desired::Stopped) => (
                MachineState::Stopped,
                rec.outcome.clone().unwrap_or_else(|| "stopped".into()),
            ),
        };
        rec.last_state = state;
        let machine = Machine {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state,
            provider_state,
            region: rec.region.clone(),
            instance_type: rec.instance_type.clone(),
            tags: rec.tags.clone(),
            created_at: Some(rec.created_at),
            private_ip: "127.0.0.1".into(),
        };
        Some((machine, *rec != before))
    }

    /// A machine whose process runs (or is being spawned) and lists the volume.
    pub(super) fn volume_user(&mut self, volume_id: &str) -> Option<String> {
        let users: Vec<String> = self
            .machines
            .values()
            .filter(|m| m.volume_ids.iter().any(|v| v == volume_id))
            .map(|m| m.id.clone())
            .collect();
        let now = Utc::now();
        users.into_iter().find(|id| {
            self.observe(id, now)
                .is_some_and(|(m, _)| !m.state.is_deletable())
        })
    }

    pub(super) fn to_volume(&self, rec: &VolumeRecord) -> Volume {
        let attached = self
            .machines
            .values()
            .find(|m| m.volume_ids.contains(&rec.id))
            .map(|m| m.id.clone());
        let state = if attached.is_some() {
            VolumeState::Attached
        } else {
            VolumeState::Available
        };
        Volume {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state,
            provider_state: if attached.is_some() {
                "attached".into()
            } else {
                "available".into()
            },
            size_gb: rec.size_gb,
            region: rec.region.clone(),
            attached_machine_id: attached,
            tags: rec.tags.clone(),
            created_at: Some(rec.created_at),
            instance_id: Some(rec.instance_id),
        }
    }
}

/// Reads a bookkeeping file; a missing one is an empty book. An unreadable
/// one stops the adapter rather than forgetting the processes it lists.
pub(super) fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> ProviderResult<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            ProviderError::InvalidArgument(format!(
                "state_dir: {} is not valid bookkeeping: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(format!("reading {}", path.display()), &e)),
    }
}

/// Writes a temporary file beside `path` and renames it over `path`, so a
/// crash leaves either the old or the new file, never half of one.
/// `tempfile` creates it owner-only (0600): the machines' environments may
/// hold secrets. Blocking file work, so it runs off the async threads.
pub(super) async fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let path = path.to_path_buf();
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || write_atomic_sync(&path, &bytes))
        .await
        .map_err(io::Error::other)?
}

/// [`write_atomic`] on the calling thread (at startup, before serving).
pub(super) fn write_atomic_sync(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map(drop).map_err(|e| e.error)
}
