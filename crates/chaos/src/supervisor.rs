//! The process supervisor: every Flotilla service as its own OS process,
//! with its environment, its log file, `kill -9` on demand and a restart
//! after it died (killed by the chaos, or exited by itself because a
//! dependency was down when it started).
//!
//! Design notes: a single watcher task polls the children with `try_wait`
//! and respawns the dead ones once their hold-down has passed, exactly like
//! an orchestrator with `restart: always` would. Children are spawned with
//! `kill_on_drop`, and `Supervisor`'s `Drop` kills what is left, so a failing
//! test never leaves a service running.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How one service process is started.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Unique per replica, e.g. `scheduler-1`.
    pub name: String,
    pub program: PathBuf,
    pub env: BTreeMap<String, String>,
    /// Whether the chaos may pick it for a `kill -9`.
    pub killable: bool,
}

struct Slot {
    spec: ServiceSpec,
    child: Option<Child>,
    /// Not respawned before this instant.
    down_until: Instant,
    starts: u32,
    /// Exits the supervisor did not cause.
    unexpected_exits: u32,
    kills: u32,
}

/// Counters for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessStats {
    pub starts: u32,
    pub kills: u32,
    pub unexpected_exits: u32,
}

/// Owns every service process of a run.
pub struct Supervisor {
    slots: Arc<Mutex<Vec<Slot>>>,
    log_dir: PathBuf,
    stop: CancellationToken,
}

/// How long a service that exited by itself is held down before it is
/// started again (a crash loop must not eat the CPU).
const RESPAWN_DELAY: Duration = Duration::from_millis(1000);

impl Supervisor {
    pub fn new(log_dir: &Path) -> anyhow::Result<Supervisor> {
        std::fs::create_dir_all(log_dir)?;
        let supervisor = Supervisor {
            slots: Arc::new(Mutex::new(Vec::new())),
            log_dir: log_dir.to_path_buf(),
            stop: CancellationToken::new(),
        };
        let slots = supervisor.slots.clone();
        let log_dir = supervisor.log_dir.clone();
        let stop = supervisor.stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
                for slot in slots.iter_mut() {
                    watch_slot(slot, &log_dir);
                }
            }
        });
        Ok(supervisor)
    }

    /// Starts a service now and keeps it running.
    pub fn add(&self, spec: ServiceSpec) -> anyhow::Result<()> {
        let mut slot = Slot {
            spec,
            child: None,
            down_until: Instant::now(),
            starts: 0,
            unexpected_exits: 0,
            kills: 0,
        };
        spawn_slot(&mut slot, &self.log_dir)?;
        self.lock().push(slot);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names of the services the chaos may kill.
    pub fn killable(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|s| s.spec.killable)
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// SIGKILL `name`; it is started again after `down_for`.
    pub fn kill9(&self, name: &str, down_for: Duration) -> bool {
        let mut slots = self.lock();
        let Some(slot) = slots.iter_mut().find(|s| s.spec.name == name) else {
            return false;
        };
        if let Some(child) = slot.child.as_mut() {
            // start_kill is SIGKILL on Unix; the watcher reaps it.
            let _ = child.start_kill();
        }
        slot.kills += 1;
        slot.down_until = Instant::now() + down_for;
        true
    }

    /// Sends `SIGSTOP` (`pause`) or `SIGCONT` to `name`: a replica that is
    /// paused rather than killed keeps its connections and its claims, and
    /// resumes as if no time had passed. Returns whether a process got it.
    pub fn pause(&self, name: &str, pause: bool) -> bool {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let slots = self.lock();
        let Some(pid) = slots
            .iter()
            .find(|s| s.spec.name == name)
            .and_then(|s| s.child.as_ref())
            .and_then(|c| c.id())
        else {
            return false;
        };
        let signal = if pause {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(pid as i32), signal).is_ok()
    }

    /// Whether every service is running right now.
    pub fn all_up(&self) -> bool {
        self.lock().iter_mut().all(|s| match s.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        })
    }

    pub fn stats(&self) -> BTreeMap<String, ProcessStats> {
        self.lock()
            .iter()
            .map(|s| {
                (
                    s.spec.name.clone(),
                    ProcessStats {
                        starts: s.starts,
                        kills: s.kills,
                        unexpected_exits: s.unexpected_exits,
                    },
                )
            })
            .collect()
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// SIGKILLs every service and waits for them.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let children: Vec<Child> = self
            .lock()
            .iter_mut()
            .filter_map(|s| s.child.take())
            .collect();
        for mut child in children {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.cancel();
        for slot in self.lock().iter_mut() {
            if let Some(mut child) = slot.child.take() {
                let _ = child.start_kill();
            }
        }
    }
}

fn watch_slot(slot: &mut Slot, log_dir: &Path) {
    if let Some(child) = slot.child.as_mut() {
        match child.try_wait() {
            Ok(None) => return,
            Ok(Some(_status)) => {
                slot.child = None;
                let now = Instant::now();
                if slot.down_until <= now {
                    // Nobody killed it: it stopped by itself.
                    slot.unexpected_exits += 1;
                    slot.down_until = now + RESPAWN_DELAY;
                }
            }
            Err(_) => return,
        }
    }
    if Instant::now() >= slot.down_until
        && let Err(e) = spawn_slot(slot, log_dir)
    {
        eprintln!("chaos: respawning {} failed: {e:#}", slot.spec.name);
        slot.down_until = Instant::now() + RESPAWN_DELAY;
    }
}

fn spawn_slot(slot: &mut Slot, log_dir: &Path) -> anyhow::Result<()> {
    let path = log_dir.join(format!("{}.log", slot.spec.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let child = Command::new(&slot.spec.program)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&slot.spec.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", slot.spec.program.display()))?;
    slot.child = Some(child);
    slot.starts += 1;
    Ok(())
}
