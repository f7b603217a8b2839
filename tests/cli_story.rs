//! The README's quickstart story, replayed with real processes: the stack is
//! started by `scripts/quickstart.sh` itself (its own database, NATS
//! namespace, ports and data dir), and every step is the `flotilla` CLI run
//! as a subprocess: provision and wait for ready, list as a table and as
//! JSON, kill -9 one agent and see it replaced (in `watch` and in `list`),
//! `get` its history, drain and uncordon one (in `list` and `watch`), the
//! error paths (wrong token, unreachable api, invalid field), a Ctrl-C
//! during `provision`'s wait, terminate everything, and a Ctrl-C of the
//! quickstart that leaves no process behind.
//!
//! Design notes: the script builds the binaries with cargo as a user's
//! first run does (cargo test has released the build lock by then); on a
//! warm target dir that is a link step, cold it is minutes, so only the
//! "ready" wait around it is generous. Whatever happens, [`Stack`]'s drop
//! kills the script's process group, every service named in its pid files
//! and every agent the local provider recorded.

#[path = "operator_story.rs"]
mod operator_story;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flotilla_test_utils::{TestDb, TestNats, eventually_blocking};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const SERVICES: [&str; 5] = [
    "provider-adapter",
    "api",
    "scheduler",
    "terminator",
    "watchdog",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// A free port below the kernel's ephemeral range: one the kernel never
/// hands out by itself (to a `bind` to port 0 or an outgoing connection),
/// so no socket of the other tests, in this process or another, takes it
/// in the minutes between this choice and the quickstart's bind (the
/// build runs in between).
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(1024), low);
    for _ in 0..1000 {
        let port = from + (uuid::Uuid::new_v4().as_u128() % u128::from(to - from)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {from}..{to}");
}

/// The first of `n` consecutive free ports (the script numbers its
/// /metrics ports from a base).
fn free_port_run(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base > u16::MAX - n {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no run of {n} free ports");
}

/// Process ids from the local provider's bookkeeping, by machine id.
fn agent_pids(data_dir: &Path) -> HashMap<String, i32> {
    let Ok(text) = std::fs::read_to_string(data_dir.join("local/machines.json")) else {
        return HashMap::new();
    };
    let json: Value = serde_json::from_str(&text).unwrap_or_default();
    json["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["id"].as_str()?.to_owned(),
                i32::try_from(m["pid"].as_i64()?).ok()?,
            ))
        })
        .collect()
}

/// Whether `pid` is a running (not zombie) process whose command line
/// contains `what`.
fn runs(pid: i32, what: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains(what)
}

fn service_pids(data_dir: &Path) -> Vec<(String, i32)> {
    SERVICES
        .iter()
        .chain(&["quickstart"])
        .filter_map(|name| {
            let text = std::fs::read_to_string(data_dir.join(format!("run/{name}.pid"))).ok()?;
            Some(((*name).to_owned(), text.trim().parse().ok()?))
        })
        .collect()
}

/// The quickstart, running. Dropping it kills whatever is left.
struct Stack {
    script: Child,
    data_dir: PathBuf,
    output: PathBuf,
    /// Every pid seen, so a failing test still kills them all.
    seen_pids: Vec<(String, i32)>,
}

impl Stack {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The last lines of each service's log (in the data dir, which is
    /// gone once the test ends).
    fn service_logs(&self) -> String {
        let mut out = String::new();
        let Ok(dir) = std::fs::read_dir(self.data_dir.join("logs")) else {
            return out;
        };
        for entry in dir.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            out += &format!("--- {}\n{tail}\n", entry.path().display());
        }
        out
    }

    fn remember_pids(&mut self) {
        for p in service_pids(&self.data_dir) {
            if !self.seen_pids.contains(&p) {
                self.seen_pids.push(p);
            }
        }
        for (_, pid) in agent_pids(&self.data_dir) {
            let p = ("agent".to_owned(), pid);
            if !self.seen_pids.contains(&p) {
                self.seen_pids.push(p);
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.remember_pids();
        let _ = kill(Pid::from_raw(-(self.script.id() as i32)), Signal::SIGKILL);
        let _ = self.script.kill();
        let _ = self.script.wait();
        for (what, pid) in &self.seen_pids {
            let binary = if what == "quickstart" {
                "quickstart"
            } else {
                what
            };
            if runs(*pid, binary) {
                if what == "agent" {
                    let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                }
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
}

/// One CLI run's outcome.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

struct Cli {
    binary: PathBuf,
    url: String,
    token: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(args)
            .env("FLOTILLA_API_URL", &self.url)
            .env("FLOTILLA_API_TOKEN", &self.token)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        outcome(&mut self.command(args))
    }

    /// A run that takes its connection from the config file `config` only
    /// (no FLOTILLA_API_URL or FLOTILLA_API_TOKEN), with `env` added.
    fn run_configured(&self, config: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
        let mut c = self.command(args);
        c.env_remove("FLOTILLA_API_URL")
            .env_remove("FLOTILLA_API_TOKEN")
            .env_remove("FLOTILLA_CONTEXT")
            .env("FLOTILLA_CONFIG", config)
            .envs(env.iter().copied());
        outcome(&mut c)
    }

    fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args);
        assert_eq!(run.code, 0, "flotilla {args:?} failed: {run:?}");
        run
    }

    fn json(&self, args: &[&str]) -> Value {
        let run = self.ok(args);
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"))
    }
}

fn outcome(c: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("run flotilla");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn instances(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn field<'a>(i: &'a Value, key: &str) -> &'a str {
    i[key].as_str().unwrap_or_default()
}

/// Polls `check` every half second (each check runs the CLI); on timeout
/// fails with `what` and the quickstart's output.
fn wait_until(stack: &Stack, what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    eventually_blocking(what, within, Duration::from_millis(500), || {
        if check() {
            Ok(())
        } else {
            Err(format!("--- quickstart output\n{}", stack.log()))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_story_works_with_real_processes() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("flotilla");
    let output = dir.path().join("quickstart.out");
    let api_port = free_port();
    let metrics_port = free_port_run(5);
    let out_file = std::fs::File::create(&output).expect("output file");

    // The one command, isolated from everything else on this machine.
    let started = Instant::now();
    let mut script = Command::new("bash");
    script
        .arg(repo().join("scripts/quickstart.sh"))
        .current_dir(repo())
        .env("QUICKSTART_DATA_DIR", &data_dir)
        .env("QUICKSTART_DATABASE", &db.name)
        .env("QUICKSTART_NATS_NAMESPACE", &nats.namespace)
        .env("QUICKSTART_API_PORT", api_port.to_string())
        .env("QUICKSTART_ADAPTER_PORT", free_port().to_string())
        .env("QUICKSTART_METRICS_PORT", metrics_port.to_string())
        .env("QUICKSTART_AGENTS", "1")
        // The servers are up (scripts/test.sh); the test must not install anything.
        .env("QUICKSTART_SERVICES", "0")
        .env("NATS_URL", &nats.url)
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

    // Cold, this includes a full build of the workspace's binaries.
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
    println!(
        "quickstart (build included) ready after {:.1?}",
        started.elapsed()
    );
    let log = stack.log();
    for shown in [
        format!("http://127.0.0.1:{api_port}"),
        format!("http://127.0.0.1:{metrics_port}/metrics"),
        data_dir.join("logs").display().to_string(),
    ] {
        assert!(log.contains(&shown), "the banner shows {shown}:\n{log}");
    }

    // Running it again while it runs changes nothing and says so.
    let again = Command::new("bash")
        .arg(repo().join("scripts/quickstart.sh"))
        .env("QUICKSTART_DATA_DIR", &data_dir)
        .env("QUICKSTART_SERVICES", "0")
        .output()
        .expect("second quickstart");
    let again_err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{again_err}");
    assert!(again_err.contains("already running"), "{again_err}");

    let token = std::fs::read_to_string(data_dir.join("token")).expect("token");
    // Every file holding a token is the owner's only.
    for file in ["token", "service-token", "env", "local/machines.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data_dir.join(file))
            .expect(file)
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is readable by others: {mode:o}");
    }
    let cli = Cli {
        binary: data_dir.join("bin/flotilla"),
        url: format!("http://127.0.0.1:{api_port}"),
        token: token.trim().to_owned(),
    };

    // The quickstart's own agent is ready.
    let fleet = instances(&cli.json(&["list", "-o", "json"]));
    assert_eq!(fleet.len(), 1, "{fleet:#?}");
    assert_eq!(field(&fleet[0], "state"), "ready");

    // provision: waits until ready, then shows them.
    let t = Instant::now();
    let provisioned = cli.ok(&["provision", "--pool", "demo", "--count", "2"]);
    println!("provision of 2 to ready: {:.1?}", t.elapsed());
    assert!(provisioned.stderr.contains("2/2 ready"), "{provisioned:?}");
    assert_eq!(
        provisioned
            .stdout
            .lines()
            .filter(|l| l.contains(" ready "))
            .count(),
        2,
        "{provisioned:?}"
    );

    // list as a table: a header and aligned columns.
    let table = cli.ok(&["list"]).stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    for header in ["ID", "POOL", "STATE", "AGE", "HEARTBEAT", "PROVIDER ID"] {
        assert!(lines[0].contains(header), "{table}");
    }
    let state_col = lines[0].find("STATE").expect("STATE column");
    for line in &lines[1..] {
        assert_eq!(line.get(state_col..state_col + 5), Some("ready"), "{table}");
    }

    // list as JSON: three ready instances, each with its machine.
    let fleet = instances(&cli.json(&["list", "--pool", "demo", "-o", "json"]));
    assert_eq!(fleet.len(), 3, "{fleet:#?}");
    assert!(fleet.iter().all(|i| field(i, "state") == "ready"));
    assert!(
        fleet
            .iter()
            .all(|i| !field(i, "provider_machine_id").is_empty())
    );

    // watch, in the background, while one agent is killed.
    let mut watch = cli
        .command(&["watch", "--pool", "demo", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch");
    // It says so on stderr once its stream is open (the api subscribed).
    let (watching_tx, watching) = mpsc::channel::<()>();
    let watch_err = watch.stderr.take().expect("watch stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(watch_err).lines().map_while(Result::ok) {
            if line.starts_with("watching instance events") {
                let _ = watching_tx.send(());
            }
        }
    });
    let (events_tx, events) = mpsc::channel::<Value>();
    let watch_out = watch.stdout.take().expect("watch stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(watch_out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && events_tx.send(v).is_err()
            {
                break;
            }
        }
    });
    watching
        .recv_timeout(flotilla_test_utils::DEADLINE)
        .expect("watch opened its stream");

    let victim = fleet[0].clone();
    let victim_id = field(&victim, "id").to_owned();
    let pids = agent_pids(&data_dir);
    let victim_pid = pids[field(&victim, "provider_machine_id")];
    assert!(runs(victim_pid, "agent"), "the agent process runs");
    stack.remember_pids();
    let killed = Instant::now();
    kill(Pid::from_raw(victim_pid), Signal::SIGKILL).expect("kill -9 the agent");

    let mut replacement = String::new();
    wait_until(
        &stack,
        "the killed agent replaced",
        Duration::from_secs(90),
        || {
            let now = instances(&cli.json(&["list", "--pool", "demo", "-o", "json"]));
            let gone = now.iter().all(|i| field(i, "id") != victim_id);
            let new = now.iter().find(|i| {
                i["labels"]["flotilla.dev/replaces"].as_str() == Some(victim_id.as_str())
                    && field(i, "state") == "ready"
            });
            if let Some(new) = new {
                replacement = field(new, "id").to_owned();
            }
            gone && new.is_some()
                && now.len() == 3
                && now.iter().all(|i| field(i, "state") == "ready")
        },
    );
    println!(
        "kill -9 of an agent to its replacement ready and the dead one terminated: {:.1?}",
        killed.elapsed()
    );

    // watch saw it live: the victim leave ready, the replacement reach it.
    let mut seen: Vec<Value> = Vec::new();
    let watch_deadline = Instant::now() + flotilla_test_utils::DEADLINE;
    let saw = |seen: &[Value], id: &str, to: &str| {
        seen.iter()
            .any(|e| field(e, "instance_id") == id && field(e, "to_state") == to)
    };
    while !(saw(&seen, &victim_id, "worker_dead") && saw(&seen, &replacement, "ready")) {
        let left = watch_deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(e) => seen.push(e),
            Err(_) => panic!("watch did not show the replacement; events: {seen:#?}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();

    // get: the victim's history, from creation to terminated.
    let got = cli.ok(&["get", &victim_id]).stdout;
    assert!(got.contains("HISTORY"), "{got}");
    assert!(got.contains("worker_dead"), "{got}");
    let got = cli.json(&["get", &victim_id, "-o", "json"]);
    assert_eq!(field(&got["instance"], "state"), "terminated");
    let steps: Vec<&str> = got["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|e| field(e, "to_state"))
        .collect();
    for step in ["requested", "ready", "worker_dead", "terminated"] {
        assert!(steps.contains(&step), "history has {step}: {steps:?}");
    }
    assert_eq!(field(&got["history"][0], "actor"), "api:quickstart");

    // An instance reference is also a unique id prefix or a name; a prefix
    // shared by several instances is refused with the candidates (exit 2).
    let ids: Vec<String> = instances(&cli.json(&["list", "--all", "-o", "json"]))
        .iter()
        .map(|i| field(i, "id").to_owned())
        .collect();
    let shared = |len: usize| {
        ids.iter()
            .filter(|id| id.starts_with(&victim_id[..len]))
            .count()
    };
    let unique = (4..victim_id.len())
        .find(|&len| shared(len) == 1)
        .expect("some prefix is unique");
    let by_prefix = cli.json(&["get", &victim_id[..unique], "-o", "json"]);
    assert_eq!(field(&by_prefix["instance"], "id"), victim_id);
    if unique > 4 {
        let ambiguous = cli.run(&["get", &victim_id[..unique - 1]]);
        assert_eq!(ambiguous.code, 2, "{ambiguous:?}");
        assert!(ambiguous.stderr.contains(&victim_id), "{ambiguous:?}");
    }
    let victim_name = field(&got["instance"], "name").to_owned();
    let by_name = cli.json(&["get", &victim_name, "-o", "json"]);
    assert_eq!(field(&by_name["instance"], "id"), victim_id);
    let nobody = cli.run(&["get", "no-such-instance"]);
    assert_eq!(nobody.code, 5, "{nobody:?}");
    // -o wide shows the replacement's labels; -o yaml is the json document.
    let wide = cli.ok(&["list", "--pool", "demo", "-o", "wide"]).stdout;
    assert!(wide.contains("LABELS"), "{wide}");
    assert!(
        wide.contains(&format!("flotilla.dev/replaces={victim_id}")),
        "{wide}"
    );
    let yaml = cli.ok(&["get", &victim_name, "-o", "yaml"]).stdout;
    let yaml: Value = serde_norway::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
    assert_eq!(yaml, got);

    // drain cordons: the instance stays ready, `list` shows it cordoned and
    // `--cordoned` finds it; uncordon (by name) undoes it, once; `watch`
    // replays both acts.
    let last_seq = seen
        .iter()
        .filter_map(|e| e["stream_sequence"].as_u64())
        .max()
        .unwrap_or(0);
    let replacement_name = instances(&cli.json(&["list", "--pool", "demo", "-o", "json"]))
        .iter()
        .find(|i| field(i, "id") == replacement)
        .map(|i| field(i, "name").to_owned())
        .expect("the replacement is listed");
    let drained = cli.ok(&["drain", &replacement, "--reason", "story"]).stdout;
    assert!(drained.contains("cordoned"), "{drained}");
    let table = cli.ok(&["list", "--pool", "demo"]).stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&replacement) && l.contains(" ready,cordoned ")),
        "{table}"
    );
    assert_eq!(
        cli.ok(&["list", "--cordoned", "-o", "ids"]).stdout.trim(),
        replacement
    );
    let draining = cli.ok(&["list", "--state", "draining"]);
    assert!(draining.stderr.contains("--cordoned"), "{draining:?}");
    let uncordoned = cli.ok(&["uncordon", &replacement_name, "--reason", "story done"]);
    assert!(uncordoned.stdout.contains("uncordoned"), "{uncordoned:?}");
    assert_eq!(cli.ok(&["list", "--cordoned", "-o", "ids"]).stdout, "");
    let again = cli.run(&["uncordon", &replacement_name]);
    assert_eq!(again.code, 7, "{again:?}");
    assert!(again.stderr.contains("is not cordoned"), "{again:?}");
    let history = cli.json(&["get", &replacement, "-o", "json"]);
    let acts: Vec<&str> = history["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .filter(|a| ["drain_requested", "uncordoned"].contains(a))
        .collect();
    assert_eq!(acts, ["drain_requested", "uncordoned"], "{history:#}");
    let mut replay = cli
        .command(&[
            "watch",
            "--pool",
            "demo",
            "-o",
            "json",
            "--from-sequence",
            &(last_seq + 1).to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    let (acts_tx, acts_seen) = mpsc::channel::<Value>();
    let replay_out = replay.stdout.take().expect("watch stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(replay_out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && acts_tx.send(v).is_err()
            {
                break;
            }
        }
    });
    let mut watched: Vec<String> = Vec::new();
    let replay_deadline = Instant::now() + flotilla_test_utils::DEADLINE;
    while watched.len() < 2 {
        let left = replay_deadline.saturating_duration_since(Instant::now());
        match acts_seen.recv_timeout(left) {
            Ok(e) if field(&e, "instance_id") == replacement => {
                if let Some(act) = e["action"].as_str() {
                    assert_eq!(field(&e, "from_state"), "ready", "{e:#}");
                    watched.push(act.to_owned());
                }
            }
            Ok(_) => {}
            Err(_) => panic!("watch did not show the cordon acts; saw {watched:?}"),
        }
    }
    assert_eq!(watched, ["cordoned", "uncordoned"]);
    let _ = replay.kill();
    let _ = replay.wait();

    // Error paths, each with its message and exit code.
    let wrong = Cli {
        token: "not-the-token".into(),
        ..cli_clone(&cli)
    }
    .run(&["list"]);
    assert_eq!(wrong.code, 4, "{wrong:?}");
    assert!(wrong.stderr.contains("FLOTILLA_API_TOKEN"), "{wrong:?}");
    let unreachable = Cli {
        url: format!("http://127.0.0.1:{}", free_port()),
        ..cli_clone(&cli)
    }
    .run(&["list"]);
    assert_eq!(unreachable.code, 3, "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("cannot reach"),
        "{unreachable:?}"
    );
    let invalid = cli.run(&["provision", "--pool", "demo", "--count", "0"]);
    assert_eq!(invalid.code, 2, "{invalid:?}");
    assert!(invalid.stderr.contains("count"), "{invalid:?}");
    let unknown = cli.run(&["get", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(unknown.code, 5, "{unknown:?}");
    let unknown = cli.run(&["drain", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(unknown.code, 5, "{unknown:?}");
    assert!(unknown.stderr.contains("no such instance"), "{unknown:?}");
    let no_pool = cli.run(&["provision", "--pool", "nope", "--count", "1"]);
    assert_eq!(no_pool.code, 5, "{no_pool:?}");
    assert!(no_pool.stderr.contains("nope"), "{no_pool:?}");
    // A name a live instance holds: well formed, but it exists (7).
    let taken = cli.run(&["provision", "--pool", "demo", "--name", &replacement_name]);
    assert_eq!(taken.code, 7, "{taken:?}");
    assert!(taken.stderr.contains("names[0]"), "{taken:?}");
    // An api that accepts connections and never answers: the request
    // timeout ends the call with 3 and says what to do.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung = Cli {
        url: format!("http://{}", silent.local_addr().expect("addr")),
        ..cli_clone(&cli)
    }
    .run(&["--request-timeout", "1", "list"]);
    assert_eq!(hung.code, 3, "{hung:?}");
    assert!(hung.stderr.contains("did not answer in time"), "{hung:?}");
    assert!(hung.stderr.contains("--request-timeout"), "{hung:?}");

    // A config file of named contexts: --context picks one, use-context
    // makes one current, a variable still wins over it, and a token file
    // others can read is refused. Paths are relative to the file.
    let config = data_dir.join("cli-config.yaml");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!(
            "current-context: nowhere\ncontexts:\n  nowhere:\n    api_url: {nowhere}\n    \
             token_file: token\n  story:\n    api_url: {url}\n    token_file: token\n  open:\n    api_url: {url}\n    \
             token_file: open.token\n",
            url = cli.url
        ),
    )
    .expect("config file");
    let open_token = data_dir.join("open.token");
    std::fs::write(&open_token, &token).expect("open token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_token, std::fs::Permissions::from_mode(0o644))
            .expect("chmod 644");
    }
    let live = cli.ok(&["list", "-o", "ids"]).stdout;
    let by_context = cli.run_configured(&config, &[], &["--context", "story", "list", "-o", "ids"]);
    assert_eq!(by_context.code, 0, "{by_context:?}");
    assert_eq!(by_context.stdout, live);
    let current = cli.run_configured(&config, &[], &["list"]);
    assert_eq!(current.code, 3, "{current:?}");
    assert!(current.stderr.contains(&nowhere), "{current:?}");
    let switched = cli.run_configured(&config, &[], &["config", "use-context", "story"]);
    assert_eq!(switched.code, 0, "{switched:?}");
    assert_eq!(
        cli.run_configured(&config, &[], &["list", "-o", "ids"])
            .stdout,
        live
    );
    let contexts = cli
        .run_configured(&config, &[], &["config", "get-contexts"])
        .stdout;
    assert!(
        contexts
            .lines()
            .any(|l| l.starts_with('*') && l.contains("story")),
        "{contexts}"
    );
    let env_wins = cli.run_configured(&config, &[("FLOTILLA_API_URL", &nowhere)], &["list"]);
    assert_eq!(env_wins.code, 3, "{env_wins:?}");
    let open = cli.run_configured(&config, &[], &["--context", "open", "list"]);
    assert_eq!(open.code, 2, "{open:?}");
    assert!(open.stderr.contains("chmod 600"), "{open:?}");

    // pools: the demo pool the quickstart made; a second one by that name conflicts.
    let pools = cli.json(&["pools", "list", "-o", "json"]);
    assert_eq!(pools[0]["name"], "demo", "{pools:#}");
    assert_eq!(pools[0]["provider"], "local", "{pools:#}");
    let again = cli.run(&[
        "pools",
        "create",
        "demo",
        "--provider",
        "local",
        "--instance-type",
        "process",
        "--region",
        "local",
    ]);
    assert_eq!(again.code, 7, "{again:?}");
    // A pool's health check and phase deadlines are set when it is made.
    let demo_image = pools[0]["image"].as_str().expect("demo image").to_owned();
    let probed = cli.json(&[
        "pools",
        "create",
        "probed",
        "--provider",
        "local",
        "--instance-type",
        "process",
        "--region",
        "local",
        "--image",
        &demo_image,
        "--health-check-url",
        "http://{private_ip}:8080/healthz",
        "--booting-timeout",
        "90",
        "--installing-timeout",
        "600",
        "--starting-timeout",
        "120",
        "--draining-timeout",
        "300",
        "-o",
        "json",
    ]);
    let stored = cli.json(&["pools", "get", "probed", "-o", "json"]);
    assert_eq!(stored["timeouts"], probed["timeouts"], "{probed:#}");
    assert_eq!(stored["health_check_url"], probed["health_check_url"]);
    assert_eq!(
        stored["health_check_url"],
        "http://{private_ip}:8080/healthz"
    );
    assert_eq!(
        stored["timeouts"],
        serde_json::json!({"booting_seconds": 90, "installing_seconds": 600,
                           "starting_seconds": 120, "draining_seconds": 300}),
        "{stored:#}"
    );
    let too_long = cli.run(&[
        "pools",
        "create",
        "too-long",
        "--provider",
        "local",
        "--instance-type",
        "process",
        "--region",
        "local",
        "--image",
        &demo_image,
        "--booting-timeout",
        "99999999",
    ]);
    assert_eq!(too_long.code, 2, "{too_long:?}");
    assert!(
        too_long.stderr.contains("timeouts.booting_seconds"),
        "{too_long:?}"
    );
    cli.ok(&["pools", "delete", "probed"]);

    // Ctrl-C while provision waits: only the waiting stops; it says the
    // instance goes on and how to follow it, and exits 130.
    let mut waiting = cli
        .command(&["provision", "--pool", "demo", "--count", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("provision");
    let (said_tx, said) = mpsc::channel::<String>();
    let waiting_err = waiting.stderr.take().expect("provision stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(waiting_err).lines().map_while(Result::ok) {
            if said_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    while !lines.iter().any(|l| l.starts_with("accepted 1 instance")) {
        match said.recv_timeout(flotilla_test_utils::DEADLINE) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("provision did not say it was accepted: {lines:#?}"),
        }
    }
    kill(Pid::from_raw(waiting.id() as i32), Signal::SIGINT).expect("Ctrl-C provision");
    let status = eventually_blocking(
        "provision to stop on Ctrl-C",
        flotilla_test_utils::DEADLINE,
        Duration::from_millis(50),
        || match waiting.try_wait().expect("wait") {
            Some(status) => Ok(status),
            None => Err("still running"),
        },
    );
    lines.extend(said.iter());
    let told = lines.join("\n");
    assert_eq!(status.code(), Some(130), "{told}");
    assert!(
        told.contains("the 1 accepted instance keeps being provisioned"),
        "{told}"
    );
    assert!(told.contains("flotilla watch --pool demo"), "{told}");
    assert!(told.contains("flotilla list --pool demo"), "{told}");

    // terminate: everything goes, and so do the agent processes.
    stack.remember_pids();
    let t = Instant::now();
    cli.ok(&[
        "terminate",
        "--pool",
        "demo",
        "--wait",
        "--wait-timeout",
        "120",
    ]);
    println!("terminate of 4 to all terminated: {:.1?}", t.elapsed());
    assert_eq!(cli.ok(&["list", "-o", "ids"]).stdout, "");
    let all = instances(&cli.json(&["list", "--all", "-o", "json"]));
    assert_eq!(
        all.len(),
        5,
        "three, the interrupted one's and the killed one: {all:#?}"
    );
    assert!(all.iter().all(|i| field(i, "state") == "terminated"));
    assert!(agent_pids(&data_dir).is_empty(), "no machine left");
    for (what, pid) in &stack.seen_pids {
        if what == "agent" {
            assert!(!runs(*pid, "agent"), "agent {pid} still runs");
        }
    }

    // Ctrl-C stops every service.
    stack.remember_pids();
    let script_pid = Pid::from_raw(stack.script.id() as i32);
    kill(script_pid, Signal::SIGINT).expect("Ctrl-C");
    let status = eventually_blocking(
        "the quickstart to stop",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || match stack.script.try_wait().expect("wait") {
            Some(status) => Ok(status),
            None => Err(stack.log()),
        },
    );

    assert_eq!(status.code(), Some(130), "{}", stack.log());
    for (what, pid) in &stack.seen_pids {
        assert!(!runs(*pid, what), "{what} ({pid}) still runs after Ctrl-C");
    }
    assert!(service_pids(&data_dir).is_empty(), "pid files removed");
}

fn cli_clone(cli: &Cli) -> Cli {
    Cli {
        binary: cli.binary.clone(),
        url: cli.url.clone(),
        token: cli.token.clone(),
    }
}
