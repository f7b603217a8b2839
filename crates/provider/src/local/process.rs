//! The local provider's processes: spawning a machine's command in a
//! process group of its own, signalling that group, and telling our process
//! from a later one that got the same pid (`/proc` start times).

use super::*;

/// What a spawn needs, copied out of the book so the lock is not held
/// while the process starts.
pub(super) struct Launch {
    pub(super) program: String,
    pub(super) args: Vec<String>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) log: PathBuf,
}

/// Opens the log, then spawns the process in a group of its own (so a
/// signal to the group reaches whatever it forks) that survives the adapter.
pub(super) async fn launch(plan: &Launch) -> ProviderResult<Child> {
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.log)
        .await
        .map_err(|e| unavailable(format!("opening {}", plan.log.display()), &e))?
        .into_std()
        .await;
    let stderr = log
        .try_clone()
        .map_err(|e| unavailable(format!("opening {}", plan.log.display()), &e))?;
    Command::new(&plan.program)
        .args(&plan.args)
        .env_clear()
        .envs(&plan.env)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::InvalidInput => {
                ProviderError::InvalidArgument(format!("image: cannot run {:?}: {e}", plan.program))
            }
            _ => unavailable(format!("spawning {:?}", plan.program), &e),
        })
}

/// After a SIGKILL, waits (bounded) until the process is really gone, so a
/// force delete does not return while it still runs.
pub(super) async fn wait_gone(pid: u32, start_time: Option<u64>, child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = tokio::time::timeout(KILL_SETTLE, child.wait()).await;
        return;
    }
    let give_up = far_from_now(KILL_SETTLE);
    while process_is_ours(pid, start_time) && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(POLL / 5).await;
    }
}

/// Signals the process group led by `pid`. Only pids seen alive and ours
/// get here; ESRCH just means it is already gone.
pub(super) fn signal_group(pid: u32, sig: Signal) {
    let Some(pgid) = safe_pid(pid) else {
        return;
    };
    if let Err(e) = signal::killpg(pgid, sig) {
        tracing::debug!(pid, signal = ?sig, error = %e, "signal not delivered");
    }
}

/// 0, 1 and negative pids mean "our own group", init or "everything" to
/// kill(2); bookkeeping read from disk must never reach those.
pub(super) fn safe_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .map(Pid::from_raw)
}

/// The process is alive, not a zombie, and the same one we spawned.
pub(super) fn process_is_ours(pid: u32, start_time: Option<u64>) -> bool {
    let Some(p) = safe_pid(pid) else {
        return false;
    };
    // EPERM means another user's process: a recycled pid, not ours.
    if signal::kill(p, None).is_err() {
        return false;
    }
    match start_time {
        Some(recorded) => proc_stat(pid).is_some_and(|s| !s.dead && s.start_time == recorded),
        // No start time was readable at spawn (no /proc): the pid is all we have.
        None => proc_stat(pid).is_none_or(|s| !s.dead),
    }
}

pub(super) struct ProcStat {
    /// Zombie or dead: exited, only waiting to be reaped.
    pub(super) dead: bool,
    /// Clock ticks after boot; unique per pid at any one time.
    pub(super) start_time: u64,
}

pub(super) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command name, in parentheses) may itself hold spaces and
    // parentheses, so fields are counted from the last ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    // `fields` now starts at field 4; field 22 is the 19th from here.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat {
        dead: matches!(state, "Z" | "X" | "x"),
        start_time,
    })
}

pub(super) fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited: {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("exited: {status}"),
    }
}
