//! The local provider against real processes: every test runs `sh` and
//! `sleep` in its own state dir, and a `Harness` kills whatever it started
//! even when an assertion fails.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_core::InstanceId;
use flotilla_provider::local::{LocalConfig, LocalProvider};
use flotilla_provider::{
    MachineProvider, MachineSpec, MachineState, PageRequest, ProviderError, TAG_CONTROL_PLANE,
    TAG_INSTANCE, VolumeSpec, VolumeState,
};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

const CONTROL_PLANE: &str = "cp-test";
/// Generous: two cores shared with other builds.
const SETTLE: Duration = Duration::from_secs(10);

/// One state dir and every pid a test started; dropping it SIGKILLs their
/// process groups so a failing test leaves nothing running.
struct Harness {
    dir: tempfile::TempDir,
    pids: Vec<u32>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            dir: tempfile::tempdir().unwrap(),
            pids: Vec::new(),
        }
    }

    fn config(&self, control_plane: &str) -> LocalConfig {
        LocalConfig {
            state_dir: self.dir.path().join("state"),
            control_plane_id: control_plane.to_owned(),
            stop_grace_default: Duration::from_secs(5),
        }
    }

    fn open(&self) -> LocalProvider {
        LocalProvider::open(self.config(CONTROL_PLANE)).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Images are split on whitespace, so shell logic goes in a script file.
    fn script(&self, name: &str, body: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, body).unwrap();
        format!("sh {}", path.display())
    }

    /// For machines that may already have exited, and so have no pid.
    fn track_if_running(&mut self, pid: Option<u32>) {
        self.pids.extend(pid);
    }

    fn track(&mut self, pid: Option<u32>) -> u32 {
        let pid = pid.expect("a started machine has a pid");
        self.pids.push(pid);
        pid
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Never 0 or 1: killpg(0) is this test binary's own group.
        for pid in self.pids.iter().filter_map(|p| i32::try_from(*p).ok()) {
            if pid <= 1 {
                continue;
            }
            let pid = Pid::from_raw(pid);
            let _ = signal::killpg(pid, Signal::SIGKILL);
            let _ = signal::kill(pid, Signal::SIGKILL);
        }
    }
}

fn spec(image: &str) -> MachineSpec {
    MachineSpec {
        instance_id: InstanceId::new(),
        name: "worker-1".into(),
        pool: "default".into(),
        region: "local".into(),
        instance_type: "process".into(),
        image: image.into(),
        env: BTreeMap::new(),
        tags: BTreeMap::from([("role".to_owned(), "worker".to_owned())]),
        volume_ids: Vec::new(),
        start: true,
    }
}

/// `kill -0` succeeds and the process is not a zombie waiting to be reaped.
fn is_alive(pid: u32) -> bool {
    let alive = signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), None).is_ok();
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| rest.starts_with('Z') || rest.starts_with('X'));
    alive && !zombie
}

/// Whether `sig` is pending for `pid`: sent, not ignored (an ignored
/// signal is discarded when sent), and not yet acted on.
fn signal_pending(pid: u32, sig: Signal) -> bool {
    let bit = 1u64 << (sig as i32 - 1);
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .any(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & bit != 0))
}

/// Alive, and no signal that would end it on its way: a signal sent to it
/// before this look has either been discarded (ignored), or is pending,
/// or has ended it. A check that needs no wait for "nothing happened".
fn alive_and_unsignalled(pid: u32) -> bool {
    is_alive(pid) && !signal_pending(pid, Signal::SIGTERM) && !signal_pending(pid, Signal::SIGKILL)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    flotilla_test_utils::eventually(what, SETTLE, || {
        let held = check();
        async move { held }
    })
    .await
}

/// Waits for a script to write a line to `path` and returns it.
async fn read_line(path: &Path) -> String {
    let mut line = String::new();
    eventually("the script's output", || {
        line = std::fs::read_to_string(path).unwrap_or_default();
        line.ends_with('\n')
    })
    .await;
    line.trim_end().to_owned()
}

#[tokio::test]
async fn a_started_machine_is_a_live_process_group_until_stopped_and_deleted() {
    let mut h = Harness::new();
    let provider = h.open();
    assert_eq!(provider.kind(), "local");
    let child_file = h.path("child.pid");
    let mut spec = spec(&h.script("worker.sh", "sleep 30 &\necho $! > \"$CHILD\"\nwait\n"));
    spec.env
        .insert("CHILD".into(), child_file.display().to_string());

    let machine = provider.create_machine(&spec).await.unwrap();
    let pid = h.track(provider.pid(&machine.id));
    assert_eq!(machine.state, MachineState::Started);
    let hex = machine.id.strip_prefix("local-").unwrap();
    assert_eq!(hex.len(), 12);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(machine.instance_id(), Some(spec.instance_id));
    assert_eq!(machine.tags[TAG_CONTROL_PLANE], CONTROL_PLANE);
    assert_eq!(machine.tags["role"], "worker");
    assert!(is_alive(pid));
    let grandchild: u32 = read_line(&child_file).await.parse().unwrap();
    h.pids.push(grandchild);
    assert!(is_alive(grandchild));

    let err = provider.start_machine(&machine.id).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::FailedPrecondition(m) if m.contains("machine still active")),
        "{err}"
    );
    assert!(
        is_alive(pid),
        "a refused start must leave the process alone"
    );

    let stopping = provider
        .stop_machine(&machine.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(
            stopping.state,
            MachineState::Stopping | MachineState::Stopped
        ),
        "{stopping:?}"
    );
    let stopped = provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert_eq!(stopped.provider_state, "killed by signal 15");
    assert!(!is_alive(pid));
    eventually("SIGTERM to reach the whole process group", || {
        !is_alive(grandchild)
    })
    .await;

    let again = provider
        .stop_machine(&machine.id, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.state, MachineState::Stopped);

    provider.delete_machine(&machine.id, false).await.unwrap();
    assert!(matches!(
        provider.get_machine(&machine.id).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        provider.delete_machine(&machine.id, false).await,
        Err(ProviderError::NotFound(_))
    ));
    let gone = provider
        .wait_machine(&machine.id, MachineState::Destroyed, SETTLE)
        .await
        .unwrap();
    assert_eq!(gone.state, MachineState::Destroyed);
    let page = provider
        .list_machines(&PageRequest::default())
        .await
        .unwrap();
    assert!(page.items.is_empty());
}

#[tokio::test]
async fn deleting_a_running_machine_needs_force_and_force_kills_the_process() {
    let mut h = Harness::new();
    let provider = h.open();
    let machine = provider.create_machine(&spec("sleep 30")).await.unwrap();
    let pid = h.track(provider.pid(&machine.id));

    let err = provider
        .delete_machine(&machine.id, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::FailedPrecondition(m) if m.contains("not currently stopped")),
        "{err}"
    );
    assert!(is_alive(pid));
    assert_eq!(
        provider.get_machine(&machine.id).await.unwrap().state,
        MachineState::Started
    );

    provider.delete_machine(&machine.id, true).await.unwrap();
    assert!(
        !is_alive(pid),
        "a force delete returns once the process is gone"
    );
    assert!(matches!(
        provider.get_machine(&machine.id).await,
        Err(ProviderError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_process_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let mut h = Harness::new();
    let provider = h.open();
    let child_file = h.path("child.pid");
    let mut spec = spec(&h.script(
        "stubborn.sh",
        "trap '' TERM\nsleep 30 &\necho $! > \"$CHILD\"\nwait\n",
    ));
    spec.env
        .insert("CHILD".into(), child_file.display().to_string());
    let machine = provider.create_machine(&spec).await.unwrap();
    let pid = h.track(provider.pid(&machine.id));
    // Written after the trap, so SIGTERM is ignored from here on.
    let grandchild: u32 = read_line(&child_file).await.parse().unwrap();
    h.pids.push(grandchild);

    // A grace long enough that the looks below come inside it on a busy
    // machine.
    let grace = Duration::from_secs(2);
    let asked = Instant::now();
    let stopping = provider.stop_machine(&machine.id, grace).await.unwrap();
    assert_eq!(stopping.state, MachineState::Stopping);
    // The SIGTERM was sent before stop_machine returned: by now it was
    // discarded (ignored), is pending, or has killed.
    assert!(
        alive_and_unsignalled(pid) && alive_and_unsignalled(grandchild),
        "SIGTERM was ignored"
    );
    assert_eq!(
        provider.get_machine(&machine.id).await.unwrap().state,
        MachineState::Stopping
    );

    let stopped = provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert!(asked.elapsed() >= grace, "killed before the grace period");
    assert_eq!(stopped.provider_state, "killed by signal 9");
    assert!(!is_alive(pid));
    eventually("SIGKILL to reach the whole process group", || {
        !is_alive(grandchild)
    })
    .await;
}

#[tokio::test]
async fn a_process_that_exits_by_itself_reads_as_stopped_with_its_exit_status() {
    let mut h = Harness::new();
    let provider = h.open();
    let machine = provider
        .create_machine(&spec(&h.script("fail.sh", "exit 3\n")))
        .await
        .unwrap();
    h.track_if_running(provider.pid(&machine.id));

    let stopped = provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert_eq!(stopped.provider_state, "exited: 3");
    assert_eq!(provider.pid(&machine.id), None);

    // A stopped machine starts again and runs the same command.
    provider.start_machine(&machine.id).await.unwrap();
    h.track_if_running(provider.pid(&machine.id));
    let again = provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert_eq!(again.provider_state, "exited: 3");
    provider.delete_machine(&machine.id, false).await.unwrap();
}

#[tokio::test]
async fn a_restarted_provider_lists_the_running_machine_and_can_stop_it() {
    let mut h = Harness::new();
    let (running, created, pid) = {
        let first = h.open();
        let running = first.create_machine(&spec("sleep 30")).await.unwrap();
        let pid = first.pid(&running.id);
        let created = first
            .create_machine(&MachineSpec {
                start: false,
                ..spec("sleep 30")
            })
            .await
            .unwrap();
        (running.id, created.id, h.track(pid))
    };

    let second = h.open();
    let page = second.list_machines(&PageRequest::default()).await.unwrap();
    let states: BTreeMap<_, _> = page.items.iter().map(|m| (m.id.clone(), m.state)).collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (running.clone(), MachineState::Started),
            (created.clone(), MachineState::Created),
        ])
    );
    assert!(is_alive(pid));

    second
        .stop_machine(&running, Duration::from_secs(5))
        .await
        .unwrap();
    second
        .wait_machine(&running, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert!(!is_alive(pid));
    second.delete_machine(&running, false).await.unwrap();

    // The command and environment survive too: the restarted adapter can
    // start a machine the first one only created.
    let started = second.start_machine(&created).await.unwrap();
    let new_pid = h.track(second.pid(&created));
    assert_eq!(started.state, MachineState::Started);
    assert!(is_alive(new_pid));
    drop(second);

    let third = h.open();
    let page = third.list_machines(&PageRequest::default()).await.unwrap();
    assert_eq!(page.items.len(), 1, "the delete was written down");
    assert_eq!(page.items[0].id, created);
    third.delete_machine(&created, true).await.unwrap();
    assert!(!is_alive(new_pid));
}

#[tokio::test]
async fn a_dead_or_recycled_pid_in_bookkeeping_is_not_reported_as_running() {
    let mut h = Harness::new();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    let mut decoy = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let decoy_pid = h.track(Some(decoy.id()));
    let ids = {
        let first = h.open();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let m = first.create_machine(&spec("sleep 30")).await.unwrap();
            h.track(first.pid(&m.id));
            ids.push(m.id);
        }
        ids
    };
    // While no adapter runs, both processes die; the bookkeeping then
    // points one machine at a pid that is gone and the other at a live
    // process that is not the one it started.
    let file = h.config(CONTROL_PLANE).state_dir.join("machines.json");
    let mut book: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for machine in book["machines"].as_array_mut().unwrap() {
        let real_pid = machine["pid"].as_u64().unwrap();
        let _ = signal::killpg(
            Pid::from_raw(i32::try_from(real_pid).unwrap()),
            Signal::SIGKILL,
        );
        if machine["id"] == ids[0].as_str() {
            machine["pid"] = dead.id().into();
        } else {
            machine["pid"] = decoy_pid.into();
            // Any start time but the decoy's: a different process.
            machine["start_time"] = 1.into();
        }
    }
    std::fs::write(&file, serde_json::to_vec(&book).unwrap()).unwrap();

    let second = h.open();
    for id in &ids {
        let m = second.get_machine(id).await.unwrap();
        assert_eq!(m.state, MachineState::Stopped, "{m:?}");
    }
    let page = second.list_machines(&PageRequest::default()).await.unwrap();
    assert!(page.items.iter().all(|m| !m.state.is_running()));

    // Nothing the adapter does to the machine reaches the decoy.
    let stopped = second
        .stop_machine(&ids[1], Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    second.delete_machine(&ids[1], true).await.unwrap();
    second.delete_machine(&ids[0], false).await.unwrap();
    // Any signal was sent before the calls returned.
    assert!(
        alive_and_unsignalled(decoy_pid),
        "the unrelated process was signalled"
    );

    decoy.kill().unwrap();
    decoy.wait().unwrap();
}

#[tokio::test]
async fn the_machine_sees_its_ids_spec_env_and_volume_but_not_the_adapters_env() {
    let mut h = Harness::new();
    let provider = h.open();
    let volume = provider
        .create_volume(&VolumeSpec {
            instance_id: InstanceId::new(),
            pool: "default".into(),
            region: "local".into(),
            size_gb: 1,
        })
        .await
        .unwrap();
    let out = h.path("env.out");
    let mut spec = spec(&h.script(
        "env.sh",
        "echo \"$FLOTILLA_INSTANCE_ID|$FLOTILLA_MACHINE_ID|$GREETING|$FLOTILLA_VOLUME_0|$CARGO_MANIFEST_DIR\" > \"$OUT\"\n\
         touch \"$FLOTILLA_VOLUME_0/written\"\n\
         echo to-stdout\n\
         echo to-stderr >&2\n",
    ));
    spec.env.insert("GREETING".into(), "hello world".into());
    spec.env.insert("OUT".into(), out.display().to_string());
    spec.env
        .insert("FLOTILLA_INSTANCE_ID".into(), "spoofed".into());
    spec.volume_ids = vec![volume.id.clone()];

    let machine = provider.create_machine(&spec).await.unwrap();
    h.track_if_running(provider.pid(&machine.id));
    let stopped = provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    assert_eq!(stopped.provider_state, "exited: 0");

    let line = read_line(&out).await;
    let fields: Vec<&str> = line.split('|').collect();
    assert_eq!(fields[0], spec.instance_id.to_string());
    assert_eq!(fields[1], machine.id);
    assert_eq!(fields[2], "hello world");
    let volume_dir = Path::new(fields[3]);
    assert!(volume_dir.is_absolute() && volume_dir.ends_with(&volume.id));
    assert!(volume_dir.join("written").exists());
    assert_eq!(fields[4], "", "the adapter's own environment leaked");

    let log = std::fs::read_to_string(provider.log_path(&machine.id)).unwrap();
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );
}

#[tokio::test]
async fn an_empty_image_is_an_invalid_argument() {
    let h = Harness::new();
    let provider = h.open();
    for image in ["", "  \t "] {
        let err = provider.create_machine(&spec(image)).await.unwrap_err();
        assert!(
            matches!(&err, ProviderError::InvalidArgument(m) if m.contains("image")),
            "{err}"
        );
    }
    let err = provider
        .create_machine(&MachineSpec {
            env: BTreeMap::from([("A=B".to_owned(), "x".to_owned())]),
            ..spec("sleep 30")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");
    let page = provider
        .list_machines(&PageRequest::default())
        .await
        .unwrap();
    assert!(page.items.is_empty());
}

#[tokio::test]
async fn a_missing_program_fails_the_start_and_the_machine_is_not_started() {
    let h = Harness::new();
    let provider = h.open();
    let created = provider
        .create_machine(&MachineSpec {
            start: false,
            ..spec("/nonexistent/flotilla-agent --serve")
        })
        .await
        .unwrap();
    assert_eq!(created.state, MachineState::Created);
    let err = provider.start_machine(&created.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");
    let failed = provider.get_machine(&created.id).await.unwrap();
    assert_eq!(failed.state, MachineState::Failed);
    assert!(failed.provider_state.starts_with("failed to start"));
    assert_eq!(provider.pid(&created.id), None);

    let err = provider
        .create_machine(&spec("flotilla-no-such-program-on-path"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");

    let page = provider
        .list_machines(&PageRequest::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 2);
    for m in &page.items {
        assert_eq!(m.state, MachineState::Failed, "{m:?}");
        provider.delete_machine(&m.id, false).await.unwrap();
    }
}

#[tokio::test]
async fn a_volume_cannot_be_deleted_while_a_running_machine_uses_it() {
    let mut h = Harness::new();
    let provider = h.open();
    let volume_spec = |size_gb| VolumeSpec {
        instance_id: InstanceId::new(),
        pool: "default".into(),
        region: "local".into(),
        size_gb,
    };
    for size in [0, 501] {
        let err = provider
            .create_volume(&volume_spec(size))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProviderError::InvalidArgument(m) if m.contains("size_gb")),
            "{err}"
        );
    }
    let volume = provider.create_volume(&volume_spec(10)).await.unwrap();
    let hex = volume.id.strip_prefix("vol-").unwrap();
    assert_eq!(hex.len(), 12);
    assert_eq!(volume.state, VolumeState::Available);
    let dir = h
        .config(CONTROL_PLANE)
        .state_dir
        .join("volumes")
        .join(&volume.id);
    assert!(dir.is_dir());

    let err = provider
        .create_machine(&MachineSpec {
            volume_ids: vec!["vol-000000000000".into()],
            ..spec("sleep 30")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");

    let machine = provider
        .create_machine(&MachineSpec {
            volume_ids: vec![volume.id.clone()],
            ..spec("sleep 30")
        })
        .await
        .unwrap();
    h.track(provider.pid(&machine.id));
    let listed = provider
        .list_volumes(&PageRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].state, VolumeState::Attached);
    assert_eq!(
        listed.items[0].attached_machine_id.as_deref(),
        Some(machine.id.as_str())
    );
    assert_eq!(
        listed.items[0].tags[TAG_INSTANCE],
        volume.tags[TAG_INSTANCE]
    );

    let err = provider.delete_volume(&volume.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    assert!(dir.is_dir());

    provider
        .stop_machine(&machine.id, Duration::from_secs(5))
        .await
        .unwrap();
    provider
        .wait_machine(&machine.id, MachineState::Stopped, SETTLE)
        .await
        .unwrap();
    provider.delete_volume(&volume.id).await.unwrap();
    assert!(!dir.exists());
    assert!(matches!(
        provider.delete_volume(&volume.id).await,
        Err(ProviderError::NotFound(_))
    ));
    let listed = provider
        .list_volumes(&PageRequest::default())
        .await
        .unwrap();
    assert!(listed.items.is_empty());
}

#[tokio::test]
async fn machines_are_listed_in_pages_by_id_and_only_for_this_control_plane() {
    let h = Harness::new();
    let idle = |n: usize| MachineSpec {
        name: format!("worker-{n}"),
        start: false,
        ..spec("sleep 30")
    };
    let foreign = {
        let other = LocalProvider::open(h.config("cp-other")).unwrap();
        other.create_machine(&idle(0)).await.unwrap().id
    };

    let provider = h.open();
    let mut created = BTreeSet::new();
    for n in 1..=7 {
        created.insert(provider.create_machine(&idle(n)).await.unwrap().id);
    }

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut request = PageRequest {
        size: 3,
        token: None,
    };
    loop {
        let page = provider.list_machines(&request).await.unwrap();
        sizes.push(page.items.len());
        seen.extend(page.items.into_iter().map(|m| m.id));
        match page.next {
            Some(token) => request.token = Some(token),
            None => break,
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "sorted by id: {seen:?}"
    );
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    assert!(!seen.contains(&foreign));

    let all = provider
        .list_machines(&PageRequest::default())
        .await
        .unwrap();
    assert_eq!(all.items.len(), 7);
    assert_eq!(all.next, None);
}

#[tokio::test]
async fn a_corrupt_bookkeeping_file_stops_the_provider_from_opening() {
    let h = Harness::new();
    drop(h.open());
    let file = h.config(CONTROL_PLANE).state_dir.join("machines.json");
    std::fs::write(&file, "{ not json").unwrap();
    let err = LocalProvider::open(h.config(CONTROL_PLANE)).err().unwrap();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");
}

#[tokio::test]
async fn a_worker_token_reaches_its_process_but_only_its_hash_the_bookkeeping() {
    use std::os::unix::fs::PermissionsExt;

    let mut h = Harness::new();
    let out = h.path("token.out");
    let mut spec = spec(&h.script("tok.sh", "echo \"$FLOTILLA_WORKER_TOKEN\" > \"$OUT\"\n"));
    spec.env
        .insert("FLOTILLA_WORKER_TOKEN".into(), "tok-plain-123".into());
    spec.env.insert("OUT".into(), out.display().to_string());
    let file = h.config(CONTROL_PLANE).state_dir.join("machines.json");
    let id = {
        let provider = h.open();
        let m = provider.create_machine(&spec).await.unwrap();
        h.track_if_running(provider.pid(&m.id));
        assert_eq!(read_line(&out).await, "tok-plain-123");
        provider
            .wait_machine(&m.id, MachineState::Stopped, SETTLE)
            .await
            .unwrap();
        m.id
    };
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("tok-plain-123"), "{text}");
    assert!(
        text.contains(&flotilla_core::token::token_hash_hex("tok-plain-123")),
        "{text}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");

    // A restarted adapter holds only the hash: it refuses to spawn the
    // machine until a fresh token is applied, and says why without it.
    let second = h.open();
    let err = second.start_machine(&id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    assert!(
        err.to_string().contains("FLOTILLA_WORKER_TOKEN") && !err.to_string().contains("tok-"),
        "{err}"
    );
    std::fs::remove_file(&out).unwrap();
    let mut env = spec.env.clone();
    env.insert("FLOTILLA_WORKER_TOKEN".into(), "tok-fresh-456".into());
    assert!(second.prepare_machine(&id, &env).await.unwrap());
    let m = second.start_machine(&id).await.unwrap();
    h.track_if_running(second.pid(&m.id));
    assert_eq!(read_line(&out).await, "tok-fresh-456");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("tok-fresh-456"), "{text}");
}

#[tokio::test]
async fn bookkeeping_with_plain_tokens_from_an_older_adapter_is_rewritten_with_hashes() {
    let h = Harness::new();
    drop(h.open());
    let file = h.config(CONTROL_PLANE).state_dir.join("machines.json");
    {
        let provider = h.open();
        let mut s = spec("sleep 30");
        s.start = false;
        s.env
            .insert("FLOTILLA_WORKER_TOKEN".into(), "old-plain".into());
        provider.create_machine(&s).await.unwrap();
    }
    // What an adapter before hashing wrote: the token itself.
    let hashed = flotilla_core::token::token_hash_hex("old-plain");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&format!("sha256:{hashed}"), "old-plain");
    std::fs::write(&file, &text).unwrap();
    assert!(
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("old-plain")
    );
    let _reopened = h.open();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("old-plain") && text.contains(&hashed),
        "{text}"
    );
}
