//! The operator's side of the quickstart, with real processes: `flotilla
//! watch` kept running across a real restart of the api process (killed,
//! then started again by hand), printing every event once; `quickstart.sh
//! status` after the supervisor was killed with its services still
//! running; `quickstart.sh stop` saying what it waits for.
//!
//! Design notes: a child module of [`super`] (the story test), for its
//! [`Stack`], [`Cli`] and process helpers. The api is restarted from what
//! the killed process ran with (`/proc/<pid>/exe` and `environ`), so it is
//! the same binary with the same settings, as a supervisor would restart it.
//! The events "during" the restart come from the other services while the
//! api is down: an agent killed then is declared dead by the watchdog,
//! which starts its replacement, and the terminator removes it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_test_utils::{DEADLINE, TestDb, TestNats, eventually_blocking, eventually_ok};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::{
    Cli, SERVICES, Stack, agent_pids, field, free_port, free_port_run, instances, repo, runs,
    service_pids,
};

/// A quickstart started and ready, with its CLI.
struct Started {
    stack: Stack,
    cli: Cli,
    data_dir: PathBuf,
    api_port: u16,
    _dir: tempfile::TempDir,
}

/// Starts `scripts/quickstart.sh` (one agent) on `db` and `nats`, as the
/// story test does, and waits until it is ready.
fn quickstart(db: &TestDb, nats: &TestNats) -> Started {
    quickstart_with(db, nats, &[])
}

/// [`quickstart`] with settings of its own (any variable set in the
/// environment wins over the quickstart's defaults).
fn quickstart_with(db: &TestDb, nats: &TestNats, settings: &[(&str, &str)]) -> Started {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("flotilla");
    let output = dir.path().join("quickstart.out");
    let api_port = free_port();
    let out_file = std::fs::File::create(&output).expect("output file");
    let mut script = Command::new("bash");
    script
        .arg(repo().join("scripts/quickstart.sh"))
        .current_dir(repo())
        .env("QUICKSTART_DATA_DIR", &data_dir)
        .env("QUICKSTART_DATABASE", &db.name)
        .env("QUICKSTART_NATS_NAMESPACE", &nats.namespace)
        .env("QUICKSTART_API_PORT", api_port.to_string())
        .env("QUICKSTART_ADAPTER_PORT", free_port().to_string())
        .env("QUICKSTART_METRICS_PORT", free_port_run(5).to_string())
        .env("QUICKSTART_AGENTS", "1")
        .env("QUICKSTART_SERVICES", "0")
        .env("NATS_URL", &nats.url)
        .envs(settings.iter().copied())
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().expect("dup"))
        .stderr(out_file);
    std::os::unix::process::CommandExt::process_group(&mut script, 0);
    let mut stack = Stack {
        script: script.spawn().expect("start quickstart.sh"),
        data_dir: data_dir.clone(),
        output,
        seen_pids: Vec::new(),
    };
    // Cold, this includes a build of the workspace's binaries.
    eventually_blocking(
        "the quickstart ready",
        Duration::from_secs(1800),
        Duration::from_millis(200),
        || {
            let log = stack.log();
            if log.contains("[quickstart] ready") {
                return Ok(());
            }
            if let Ok(Some(status)) = stack.script.try_wait() {
                panic!(
                    "quickstart exited with {status}:\n{log}\n{}",
                    stack.service_logs()
                );
            }
            Err(log)
        },
    );
    stack.remember_pids();
    let token = std::fs::read_to_string(data_dir.join("token")).expect("token");
    let cli = Cli {
        binary: data_dir.join("bin/flotilla"),
        url: format!("http://127.0.0.1:{api_port}"),
        token: token.trim().to_owned(),
    };
    Started {
        stack,
        cli,
        data_dir,
        api_port,
        _dir: dir,
    }
}

/// `quickstart.sh <command>` against `data_dir`: (exit code, stderr).
fn script(data_dir: &Path, command: &str) -> (i32, String) {
    let out = Command::new("bash")
        .arg(repo().join("scripts/quickstart.sh"))
        .arg(command)
        .env("QUICKSTART_DATA_DIR", data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("quickstart.sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pid_of(data_dir: &Path, name: &str) -> i32 {
    service_pids(data_dir)
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no pid file for {name}"))
        .1
}

fn ids(cli: &Cli) -> HashSet<String> {
    instances(&cli.json(&["list", "--pool", "demo", "--all", "-o", "json"]))
        .iter()
        .map(|i| field(i, "id").to_owned())
        .collect()
}

/// `flotilla watch … -o json` running, its events and stderr lines read
/// as they come.
struct Watch {
    child: std::process::Child,
    events: mpsc::Receiver<Value>,
    notes: mpsc::Receiver<String>,
    seen: Vec<Value>,
    said: Vec<String>,
}

impl Watch {
    fn start(cli: &Cli, args: &[&str]) -> Watch {
        let mut argv = vec!["watch", "--pool", "demo", "-o", "json"];
        argv.extend_from_slice(args);
        let mut child = cli
            .command(&argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("watch");
        let (notes_tx, notes) = mpsc::channel();
        let err = child.stderr.take().expect("watch stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if notes_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (events_tx, events) = mpsc::channel();
        let out = child.stdout.take().expect("watch stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("watch printed {line:?}: {e}"));
                if events_tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut watch = Watch {
            child,
            events,
            notes,
            seen: Vec::new(),
            said: Vec::new(),
        };
        watch.wait_said("watching instance events", DEADLINE);
        watch
    }

    /// Waits until stderr has a line starting with `prefix`.
    fn wait_said(&mut self, prefix: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.said.iter().any(|l| l.starts_with(prefix)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.notes.recv_timeout(left) {
                Ok(line) => self.said.push(line),
                Err(_) => panic!(
                    "watch did not say {prefix:?}; it said {:#?}; events {:#?}",
                    self.said, self.seen
                ),
            }
        }
    }

    /// Waits until an event matching `wanted` was printed.
    fn wait_event(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !self.seen.iter().any(&wanted) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!(
                    "watch did not print {what}; events {:#?}; it said {:#?}",
                    self.seen, self.said
                ),
            }
        }
    }

    fn sequences(&self) -> Vec<u64> {
        self.seen
            .iter()
            .map(|e| e["stream_sequence"].as_u64().expect("stream_sequence"))
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(id: &str, to: &str) -> impl Fn(&Value) -> bool {
    let (id, to) = (id.to_owned(), to.to_owned());
    move |e| field(e, "instance_id") == id && field(e, "to_state") == to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_real_api_restart_printing_every_event_once() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let Started {
        mut stack,
        cli,
        data_dir,
        api_port,
        _dir,
    } = quickstart_with(
        &db,
        &nats,
        // The surviving agent cannot heartbeat while the api is down
        // either: its machine runs, so it is declared dead only after the
        // confirm grace. A long one keeps it out of the story however
        // slowly a loaded machine brings the victim's verdict.
        &[("WORKER_DEAD_CONFIRM_SECONDS", "600")],
    );
    let mut watch = Watch::start(&cli, &[]);

    // Before the restart: a second agent, up to ready.
    let first = ids(&cli);
    let victim = cli.ok(&["provision", "--pool", "demo", "--count", "1", "-o", "ids"]);
    let victim = victim.stdout.trim().to_owned();
    watch.wait_event("the new agent ready", is(&victim, "ready"));

    // The supervisor is killed; its services and agents go on, and
    // `status` says so instead of "not running".
    stack.remember_pids();
    stack.script.kill().expect("kill -9 the supervisor");
    stack.script.wait().expect("reaped");
    let (code, said) = script(&data_dir, "status");
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains("the quickstart supervisor is not running, but these still run: "),
        "{said}"
    );
    for name in SERVICES {
        let shown = format!("{name} (pid {})", pid_of(&data_dir, name));
        assert!(said.contains(&shown), "status names {shown}:\n{said}");
    }
    assert!(said.contains("2 agents"), "{said}");
    assert!(!said.contains("not running\n"), "{said}");

    // The real api process dies, with what it ran with kept to restart it.
    let api_pid = pid_of(&data_dir, "api");
    let exe = std::fs::read_link(format!("/proc/{api_pid}/exe")).expect("api binary");
    let environ = std::fs::read(format!("/proc/{api_pid}/environ")).expect("api environment");
    let env: Vec<(String, String)> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    kill(Pid::from_raw(api_pid), Signal::SIGKILL).expect("kill -9 the api");
    eventually_blocking("the api gone", DEADLINE, Duration::from_millis(50), || {
        if runs(api_pid, "api") {
            Err("still runs")
        } else {
            Ok(())
        }
    });

    // During: an agent killed while the api is down is declared dead and
    // replaced by the watchdog (the replacement cannot register yet).
    let machine: String =
        sqlx::query_scalar("SELECT provider_machine_id FROM instances WHERE id = $1::uuid")
            .bind(&victim)
            .fetch_one(&db.pool)
            .await
            .expect("victim's machine");
    let agent = agent_pids(&data_dir)[&machine];
    assert!(runs(agent, "agent"), "the victim's agent runs");
    kill(Pid::from_raw(agent), Signal::SIGKILL).expect("kill -9 the agent");
    let replacement = eventually_ok(
        "the victim dead and replaced while the api is down",
        // Within the surviving agent's dead-man time (60 s, the agent's
        // default: AGENT_* settings never reach the quickstart's agents),
        // after which an idle agent out of contact exits.
        Duration::from_secs(50),
        || async {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT id::text, state FROM instances WHERE pool = 'demo'")
                    .fetch_all(&db.pool)
                    .await
                    .expect("instances");
            let dead = rows
                .iter()
                .any(|(id, state)| *id == victim && state != "ready");
            let new = rows
                .iter()
                .find(|(id, _)| !first.contains(id) && *id != victim)
                .map(|(id, _)| id.clone());
            match (dead, new) {
                (true, Some(id)) => Ok(id),
                _ => Err(format!("{rows:?}")),
            }
        },
    )
    .await;
    assert!(!runs(api_pid, "api"), "the api was down all along");

    // The api is started again, as it ran before.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(data_dir.join("logs/api.log"))
        .expect("api log");
    let mut api = Command::new(&exe);
    api.env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut api, 0);
    let mut api = api.spawn().expect("restart the api");
    let new_api = api.id() as i32;
    // Reaped as soon as it exits, so `stop` sees it gone (a zombie still
    // answers `kill -0`).
    std::thread::spawn(move || api.wait());
    std::fs::write(data_dir.join("run/api.pid"), new_api.to_string()).expect("pid file");
    stack.seen_pids.push(("api".into(), new_api));
    eventually_blocking(
        "the api listening again",
        DEADLINE,
        Duration::from_millis(100),
        || std::net::TcpStream::connect(("127.0.0.1", api_port)).map(|_| ()),
    );

    // After: the watch reconnected by itself and resumed where it was.
    watch.wait_said("reconnected; resuming from sequence", DEADLINE);
    watch.wait_event("the replacement ready", is(&replacement, "ready"));
    let late = cli.ok(&["provision", "--pool", "demo", "--count", "1", "-o", "ids"]);
    let late = late.stdout.trim().to_owned();
    watch.wait_event(
        "an agent provisioned after the restart ready",
        is(&late, "ready"),
    );
    watch.wait_event("the victim terminated", is(&victim, "terminated"));
    assert!(
        watch.child.try_wait().expect("wait").is_none(),
        "watch kept running; it said {:#?}",
        watch.said
    );

    // Every event once: no sequence twice, and the same events as a replay
    // of the stream from the first one shown to the last.
    let shown = watch.sequences();
    assert!(
        shown.windows(2).all(|w| w[0] < w[1]),
        "no duplicate, in order: {shown:?}"
    );
    let (from, to) = (shown[0], *shown.last().expect("events"));
    let mut replay = Watch::start(&cli, &["--from-sequence", &from.to_string()]);
    replay.wait_event("the replay up to the last event shown", |e| {
        e["stream_sequence"].as_u64() >= Some(to)
    });
    let replayed: Vec<u64> = replay
        .sequences()
        .into_iter()
        .filter(|s| *s <= to)
        .collect();
    assert_eq!(
        shown, replayed,
        "no gap: the watch showed what the stream holds"
    );
    let during = watch
        .seen
        .iter()
        .filter(|e| field(e, "instance_id") == replacement)
        .count();
    assert!(during > 0, "{:#?}", watch.seen);

    // stop, with no supervisor, stops what it left; then nothing runs.
    drop(replay);
    drop(watch);
    stack.remember_pids();
    let (code, said) = script(&data_dir, "stop");
    assert_eq!(code, 0, "{said}");
    let (code, said) = script(&data_dir, "status");
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("not running"), "{said}");
    for (what, pid) in &stack.seen_pids {
        assert!(!runs(*pid, what), "{what} ({pid}) still runs after stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_stop_says_what_it_waits_for_until_everything_stopped() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let Started {
        mut stack,
        data_dir,
        _dir,
        ..
    } = quickstart(&db, &nats);
    let supervisor = stack.script.id();
    stack.remember_pids();

    let (code, said) = script(&data_dir, "stop");
    assert_eq!(code, 0, "{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "[quickstart] stopping the quickstart running as pid {supervisor} (up to "
        )),
        "{said}"
    );
    let waiting: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("[quickstart] waiting ("))
        .collect();
    // It names what it waits for: the api (which terminates the fleet)
    // and the agent, at first.
    assert!(
        waiting
            .first()
            .is_some_and(|l| l.contains("api (pid ") && l.contains("1 agent")),
        "{said}"
    );
    assert!(
        waiting.iter().all(|l| l.ends_with("still running")),
        "{said}"
    );
    assert_eq!(lines.last(), Some(&"[quickstart] stopped"), "{said}");

    let status = stack.script.wait().expect("supervisor");
    assert_eq!(status.code(), Some(143), "stopped by SIGTERM: {status}");
    for (what, pid) in &stack.seen_pids {
        assert!(!runs(*pid, what), "{what} ({pid}) still runs after stop");
    }
    let (code, said) = script(&data_dir, "status");
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("not running"), "{said}");
}
