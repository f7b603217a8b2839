//! `docker compose up` for real: the user's `docker-compose.yml` with the
//! test override `deploy/compose-test/docker-compose.yml` (stand-ins for
//! the images no registry can give us here), images built by
//! `scripts/images.sh` from Debian's packages and this build's binaries.
//! From the host, the `flotilla` CLI talks to the published api port:
//!
//! - every service becomes healthy and the migration step ran once;
//! - 5 workers (real agents, the adapter's `local` provider) reach `ready`;
//! - `docker-compose kill scheduler` in the middle of a provision and
//!   `start` again: nothing lost, nothing duplicated;
//! - `docker-compose restart postgres`: the cluster converges;
//! - a pool of the `docker` provider: 3 workers become ready as containers
//!   of the engine labelled with the project's control plane; `docker
//!   kill` of one: a new container replaces it and its instance is
//!   terminated; terminating the pool leaves no worker container;
//! - everything terminated, no worker left; `down -v` leaves no container,
//!   network or volume of the project.
//!
//! It needs a Docker Engine and `docker-compose`; like PostgreSQL and NATS
//! for the other tests, they are part of the machine the suite runs on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const TOKEN: &str = "dev-token";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `docker ARGS`: its standard output, trimmed (empty when it fails).
fn docker(args: &[&str]) -> String {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `docker ARGS`, which must succeed.
fn docker_ok(args: &[&str]) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
}

/// Builds the images once per test binary (`scripts/images.sh`, cached):
/// both compose tests use them, and two builds at once would share
/// `.docker-bin/`. It also holds the two tests apart: a compose cluster
/// each at once on two cores would stretch the fault windows the second
/// one times.
fn images() -> std::sync::MutexGuard<'static, ()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let built = BUILT.get_or_init(|| {
        let started = Instant::now();
        let images = Command::new("bash")
            .arg(repo_root().join("scripts/images.sh"))
            .output()
            .expect("scripts/images.sh runs");
        println!("images ready in {:?}", started.elapsed());
        images
            .status
            .success()
            .then_some(())
            .ok_or_else(|| text(&images))
    });
    if let Err(e) = built {
        panic!("scripts/images.sh failed:\n{e}");
    }
    turn
}

/// One compose project of this test, taken down (with its volumes and
/// the worker containers its adapter made) on drop.
struct Compose {
    project: String,
    root: PathBuf,
    ports: Vec<(&'static str, u16)>,
    /// The group owning the Docker socket, given to the adapter.
    docker_gid: String,
    /// The CA the `certs` service made, which the CLI verifies the api with.
    ca: std::sync::Mutex<String>,
    /// Compose files layered on the user's file and the test override.
    extra_files: Vec<&'static str>,
}

impl Compose {
    fn new() -> Compose {
        Compose::with_files(&[])
    }

    fn with_files(extra_files: &[&'static str]) -> Compose {
        let project = format!(
            "flotilla-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let ports = [
            "FLOTILLA_NATS_PORT",
            "FLOTILLA_POSTGRES_PORT",
            "FLOTILLA_SIM_PORT",
            "FLOTILLA_API_PORT",
            "FLOTILLA_JAEGER_PORT",
            "FLOTILLA_PROMETHEUS_PORT",
            "FLOTILLA_GRAFANA_PORT",
        ]
        .into_iter()
        .map(|name| (name, free_port()))
        .collect();
        let docker_gid = Command::new("stat")
            .args(["-c", "%g", "/var/run/docker.sock"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        Compose {
            project,
            root: repo_root(),
            ports,
            docker_gid,
            ca: std::sync::Mutex::default(),
            extra_files: extra_files.to_vec(),
        }
    }

    /// The adapter's control-plane id: the project's name, so the worker
    /// containers of this run are told apart from any other's.
    fn control_plane(&self) -> &str {
        &self.project
    }

    /// Worker containers (running or not) of `pool` the engine holds for
    /// this project's control plane, by the docker CLI.
    fn worker_containers(&self, pool: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "ps".to_owned(),
            "-aq".to_owned(),
            "--no-trunc".to_owned(),
            "--filter".to_owned(),
            format!("label=flotilla_control_plane={}", self.control_plane()),
        ];
        if let Some(pool) = pool {
            args.push("--filter".into());
            args.push(format!("label=flotilla_pool={pool}"));
        }
        let out = Command::new("docker")
            .args(&args)
            .output()
            .expect("docker runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Worker containers of `pool` that run.
    fn running_workers(&self, pool: &str) -> Vec<String> {
        self.worker_containers(Some(pool))
            .into_iter()
            .filter(|id| {
                Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Running}}", id])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
            })
            .collect()
    }

    fn port(&self, name: &str) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .expect("a known port")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&self.root)
            .args(["-p", &self.project])
            .args(["-f", "docker-compose.yml"])
            .args(["-f", "deploy/compose-test/docker-compose.yml"]);
        for file in &self.extra_files {
            cmd.args(["-f", file]);
        }
        cmd.args(args);
        for (name, port) in &self.ports {
            cmd.env(name, port.to_string());
        }
        cmd.env("FLOTILLA_NETWORK", &self.project)
            .env("FLOTILLA_CONTROL_PLANE_ID", &self.project)
            .env("FLOTILLA_DOCKER_GID", &self.docker_gid);
        cmd.output().expect("docker-compose runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed:\n{}",
            text(&out)
        );
        text(&out)
    }

    /// The container of `service` (its first replica).
    fn container(&self, service: &str) -> Option<String> {
        self.containers(service).into_iter().next()
    }

    /// Every replica's container of `service`, in replica order.
    fn containers(&self, service: &str) -> Vec<String> {
        let out = self.run(&["ps", "-a", "-q", service]);
        let mut ids: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|id| {
                let number = docker(&[
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"com.docker.compose.container-number\"}}",
                    id,
                ]);
                (format!("{number:0>4}"), id.to_owned())
            })
            .collect();
        ids.sort();
        ids.into_iter().map(|(_, id)| id).collect()
    }

    /// `docker inspect -f <format>` of a service's container.
    fn inspect(&self, service: &str, format: &str) -> String {
        let Some(id) = self.container(service) else {
            return String::new();
        };
        let out = Command::new("docker")
            .args(["inspect", "-f", format, &id])
            .output()
            .expect("docker inspect runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Everything Docker holds with this project's label: containers,
    /// networks, volumes.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for what in [
            vec!["ps", "-a", "-q", "--filter", &label],
            vec!["network", "ls", "-q", "--filter", &label],
            vec!["volume", "ls", "-q", "--filter", &label],
        ] {
            let out = Command::new("docker")
                .args(&what)
                .output()
                .expect("docker runs");
            left.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(|l| format!("{} {l}", what[0])),
            );
        }
        left
    }

    /// The `flotilla` CLI of this build against the published api port,
    /// over TLS, trusting the CA of the project's `certs` step.
    fn cli(&self, args: &[&str]) -> Output {
        let ca = {
            let mut ca = self.ca.lock().unwrap_or_else(|p| p.into_inner());
            if ca.is_empty() {
                let out = self.run(&["exec", "-T", "api", "cat", "/etc/flotilla/tls/ca.pem"]);
                *ca = String::from_utf8_lossy(&out.stdout).into_owned();
            }
            ca.clone()
        };
        Command::new(cli_binary())
            .args(args)
            .env(
                "FLOTILLA_API_URL",
                format!("https://127.0.0.1:{}", self.port("FLOTILLA_API_PORT")),
            )
            .env("FLOTILLA_API_CA", &ca)
            .env("FLOTILLA_API_TOKEN", TOKEN)
            .output()
            .expect("the CLI runs")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "flotilla {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ids of the demo pool's instances in `state`.
    fn instances(&self, state: &str) -> usize {
        self.count("demo", state)
    }

    /// Ids of `pool`'s instances in `state` (none when the CLI fails).
    fn pool_instances(&self, pool: &str, state: &str) -> Vec<String> {
        let out = self.cli(&["list", "--pool", pool, "--state", state, "-o", "ids"]);
        if !out.status.success() {
            return Vec::new();
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Ids of `pool`'s instances in `state`, counted.
    fn count(&self, pool: &str, state: &str) -> usize {
        let out = self.cli(&["list", "--pool", pool, "--state", state, "-o", "ids"]);
        if !out.status.success() {
            return usize::MAX;
        }
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// Worker processes the adapter's local provider runs right now.
    fn agents(&self) -> usize {
        let out = self.run(&[
            "exec",
            "-T",
            "provider-adapter",
            "pgrep",
            "-c",
            "-x",
            "agent",
        ]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("FLOTILLA_COMPOSE_KEEP").is_some() {
            eprintln!(
                "FLOTILLA_COMPOSE_KEEP: project {} left up for a post-mortem (ports {:?})",
                self.project, self.ports
            );
            return;
        }
        // Worker containers are the engine's, not the project's: removed
        // first, or the network they are on would outlive `down`.
        for id in self.worker_containers(None) {
            let _ = Command::new("docker")
                .args(["rm", "-f", "-v", &id])
                .output();
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

fn cli_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("flotilla")
}

/// Polls `done` until it holds, or fails after `limit` with `what` and
/// what `status` says then.
fn wait(what: &str, limit: Duration, done: impl Fn() -> bool, status: impl Fn() -> String) {
    // Every half second: each look runs docker-compose or the CLI.
    flotilla_test_utils::eventually_blocking(what, limit, Duration::from_millis(500), || {
        if done() { Ok(()) } else { Err(status()) }
    })
}

const SERVICES_WITH_HEALTH: &[&str] = &[
    "nats",
    "postgres",
    "flotilla-sim",
    "provider-adapter",
    "api",
    "scheduler",
    "terminator",
    "watchdog",
    "otel-collector",
    "jaeger",
    "prometheus",
    "grafana",
];

fn all_healthy(c: &Compose) -> bool {
    SERVICES_WITH_HEALTH
        .iter()
        .all(|s| c.inspect(s, "{{.State.Health.Status}}") == "healthy")
}

fn health_report(c: &Compose) -> String {
    SERVICES_WITH_HEALTH
        .iter()
        .map(|s| {
            format!(
                "{s}={}",
                c.inspect(s, "{{.State.Status}}/{{.State.Health.Status}}")
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn docker_compose_up_runs_a_real_fleet_through_kills_and_restarts_and_down_leaves_nothing() {
    let _turn = images();
    let started = Instant::now();
    let compose = Compose::new();
    let up = Instant::now();
    compose.ok(&["up", "-d", "--no-build"]);
    wait(
        "every service healthy",
        Duration::from_secs(180),
        || all_healthy(&compose),
        || health_report(&compose),
    );
    println!(
        "docker-compose up -> every service healthy in {:?}",
        up.elapsed()
    );
    assert_eq!(
        compose.inspect(
            "migrate",
            "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}"
        ),
        "exited 0 0",
        "the migration step runs once and succeeds"
    );

    compose.cli_ok(&[
        "pools",
        "create",
        "demo",
        "--provider",
        "local",
        "--instance-type",
        "process",
        "--region",
        "local",
        "--image",
        "agent",
    ]);
    let t = Instant::now();
    compose.cli_ok(&[
        "provision",
        "--pool",
        "demo",
        "--count",
        "5",
        "--wait-timeout",
        "120",
    ]);
    println!("5 workers ready in {:?}", t.elapsed());
    assert_eq!(compose.instances("ready"), 5);
    assert_eq!(compose.agents(), 5, "one worker process per instance");

    // The scheduler dies in the middle of a provision and comes back.
    compose.cli_ok(&[
        "provision",
        "--pool",
        "demo",
        "--count",
        "5",
        "--idempotency-key",
        "compose-second",
        "--no-wait",
    ]);
    compose.ok(&["kill", "scheduler"]);
    compose.ok(&["start", "scheduler"]);
    wait(
        "10 ready after the scheduler's kill",
        Duration::from_secs(120),
        || compose.instances("ready") == 10,
        || {
            format!(
                "ready {}, agents {}",
                compose.instances("ready"),
                compose.agents()
            )
        },
    );
    assert_eq!(compose.agents(), 10, "a worker was lost or duplicated");

    // PostgreSQL restarts under the running cluster.
    compose.ok(&["restart", "postgres"]);
    wait(
        "healthy again after the PostgreSQL restart",
        Duration::from_secs(120),
        || all_healthy(&compose),
        || health_report(&compose),
    );
    let t = Instant::now();
    compose.cli_ok(&[
        "provision",
        "--pool",
        "demo",
        "--count",
        "2",
        "--idempotency-key",
        "compose-third",
        "--wait-timeout",
        "120",
    ]);
    println!(
        "2 more ready after the PostgreSQL restart in {:?}",
        t.elapsed()
    );
    assert_eq!(compose.instances("ready"), 12);

    compose.cli_ok(&[
        "terminate",
        "--pool",
        "demo",
        "--wait",
        "--wait-timeout",
        "120",
    ]);
    assert_eq!(compose.instances("terminated"), 12);
    wait(
        "no worker process left",
        Duration::from_secs(30),
        || compose.agents() == 0,
        || format!("agents {}", compose.agents()),
    );

    // The demo fleet of the docker provider: each worker a container of
    // this engine, running the agent of the Flotilla image.
    compose.create_docker_pool("fleet");
    let t = Instant::now();
    compose.cli_ok(&[
        "provision",
        "--pool",
        "fleet",
        "--count",
        "3",
        "--idempotency-key",
        "compose-docker",
        "--wait-timeout",
        "120",
    ]);
    println!("3 container workers ready in {:?}", t.elapsed());
    let ready = compose.pool_instances("fleet", "ready");
    assert_eq!(ready.len(), 3, "{ready:?}");
    let workers = compose.running_workers("fleet");
    assert_eq!(
        workers.len(),
        3,
        "one running container per instance, labelled with our control plane"
    );
    let instance_of = |id: &str| {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{index .Config.Labels \"flotilla_instance_id\"}}",
                id,
            ])
            .output()
            .expect("docker inspect runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let mut owners: Vec<String> = workers.iter().map(|w| instance_of(w)).collect();
    owners.sort();
    let mut expected = ready.clone();
    expected.sort();
    assert_eq!(owners, expected, "each container carries its instance's id");

    // Kill one worker container: a new container replaces it, and its
    // instance is terminated (its container removed).
    let victim = workers[0].clone();
    let victim_instance = instance_of(&victim);
    let killed = Instant::now();
    let out = Command::new("docker")
        .args(["kill", &victim])
        .output()
        .expect("docker kill runs");
    assert!(out.status.success(), "docker kill: {}", text(&out));
    wait(
        "the killed worker container replaced",
        Duration::from_secs(180),
        || {
            let running = compose.running_workers("fleet");
            running.len() == 3
                && !compose.worker_containers(Some("fleet")).contains(&victim)
                && compose.count("fleet", "ready") == 3
                && compose
                    .pool_instances("fleet", "terminated")
                    .contains(&victim_instance)
        },
        || {
            format!(
                "running containers {}, ready {}, terminated {:?}, victim still there: {}",
                compose.running_workers("fleet").len(),
                compose.count("fleet", "ready"),
                compose.pool_instances("fleet", "terminated"),
                compose.worker_containers(Some("fleet")).contains(&victim)
            )
        },
    );
    println!("killed worker container replaced in {:?}", killed.elapsed());

    compose.cli_ok(&[
        "terminate",
        "--pool",
        "fleet",
        "--wait",
        "--wait-timeout",
        "120",
    ]);
    assert_eq!(compose.count("fleet", "terminated"), 4);
    wait(
        "no worker container left",
        Duration::from_secs(60),
        || compose.worker_containers(None).is_empty(),
        || format!("containers {:?}", compose.worker_containers(None)),
    );

    compose.ok(&["down", "-v", "--remove-orphans", "-t", "10"]);
    let left = compose.leftovers();
    assert!(left.is_empty(), "docker-compose down -v left {left:?}");
    println!("whole compose run in {:?}", started.elapsed());
}

/// The scheduler's and terminator's lease in the compose file (their
/// defaults): the fault windows below are measured in it.
const LEASE: Duration = Duration::from_secs(15);
/// The compose test's `WORKER_HEARTBEAT_TIMEOUT_SECONDS` and the chaos
/// file's `WORKER_DEAD_CONFIRM_SECONDS`: a silent worker whose container
/// still runs is declared dead no sooner than their sum after its last
/// heartbeat.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
const DEAD_CONFIRM: Duration = Duration::from_secs(20);

const CHAOS_SERVICES: &[&str] = &[
    "nats",
    "nats-1",
    "nats-2",
    "postgres",
    "flotilla-sim",
    "provider-adapter",
    "api",
    "scheduler",
    "terminator",
    "watchdog",
];

/// Every replica of every service in `CHAOS_SERVICES` healthy.
fn replicas_healthy(c: &Compose) -> Result<(), String> {
    let mut report = Vec::new();
    let mut healthy = true;
    for service in CHAOS_SERVICES {
        let ids = c.containers(service);
        healthy &= !ids.is_empty();
        for id in ids {
            let status = docker(&["inspect", "-f", "{{.State.Health.Status}}", &id]);
            healthy &= status == "healthy";
            report.push(format!("{service}/{}={status}", &id[..8]));
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(report.join(" "))
    }
}

/// What the engine did with the worker containers of one control plane,
/// as `docker events` streamed it from the start: the provider's own
/// record, read by the invariants (a container created and removed
/// between two looks is still in it).
struct EngineEvents {
    child: Child,
    path: PathBuf,
}

impl EngineEvents {
    fn follow(control_plane: &str) -> EngineEvents {
        let path = std::env::temp_dir().join(format!("{control_plane}-events.log"));
        let file = std::fs::File::create(&path).expect("events file");
        let child = Command::new("docker")
            .args([
                "events",
                "--filter",
                &format!("label=flotilla_control_plane={control_plane}"),
                "--filter",
                "type=container",
                "--format",
                "{{.Action}} {{.Actor.ID}} {{index .Actor.Attributes \"flotilla_instance_id\"}}",
            ])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("docker events runs");
        EngineEvents { child, path }
    }

    /// `(action, container, instance)` in the order the engine did them.
    fn read(&self) -> Vec<(String, String, String)> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((
                    f.next()?.to_owned(),
                    f.next()?.to_owned(),
                    f.next()?.to_owned(),
                ))
            })
            .collect()
    }
}

impl Drop for EngineEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Instances that ever had two containers at once, from the engine's
/// events: a `create` while an earlier container of the same instance was
/// not yet destroyed.
fn duplicated(events: &[(String, String, String)]) -> Vec<String> {
    let mut live: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut twice = BTreeSet::new();
    for (action, container, instance) in events {
        match action.as_str() {
            "create" => {
                let held = live.entry(instance).or_default();
                if !held.is_empty() {
                    twice.insert(instance.clone());
                }
                held.insert(container);
            }
            "destroy" => {
                if let Some(held) = live.get_mut(instance.as_str()) {
                    held.remove(container.as_str());
                }
            }
            _ => {}
        }
    }
    twice.into_iter().collect()
}

#[test]
fn duplicated_finds_a_second_container_only_while_the_first_exists() {
    let e = |a: &str, c: &str, i: &str| (a.to_owned(), c.to_owned(), i.to_owned());
    let replaced_in_turn = [
        e("create", "c1", "i1"),
        e("start", "c1", "i1"),
        e("destroy", "c1", "i1"),
        e("create", "c2", "i1"),
    ];
    assert!(duplicated(&replaced_in_turn).is_empty());
    let two_at_once = [
        e("create", "c1", "i1"),
        e("create", "c3", "i2"),
        e("create", "c2", "i1"),
    ];
    assert_eq!(duplicated(&two_at_once), ["i1"]);
}

impl Compose {
    /// One value per line of `psql -Atc QUERY` in the postgres container.
    fn sql(&self, query: &str) -> Vec<String> {
        let out = self.run(&[
            "exec",
            "-T",
            "-e",
            "PGPASSWORD=flotilla",
            "postgres",
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "flotilla",
            "-d",
            "flotilla",
            "-Atc",
            query,
        ]);
        assert!(out.status.success(), "psql {query}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `provision --no-wait`, the ids it acknowledged.
    fn provision(&self, pool: &str, count: u32, key: &str) -> Vec<String> {
        let ids: Vec<String> = self
            .cli_ok(&[
                "provision",
                "--pool",
                pool,
                "--count",
                &count.to_string(),
                "--idempotency-key",
                key,
                "--no-wait",
                "-o",
                "ids",
            ])
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(ids.len(), count as usize, "acknowledged ids: {ids:?}");
        ids
    }

    /// The instance label of each running worker container of `pool`.
    fn running_instances(&self, pool: &str) -> BTreeSet<String> {
        self.running_workers(pool)
            .iter()
            .map(|id| {
                docker(&[
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"flotilla_instance_id\"}}",
                    id,
                ])
            })
            .collect()
    }

    /// A pool of the `docker` provider: its workers are containers of this
    /// engine running the agent of the Flotilla image.
    fn create_docker_pool(&self, pool: &str) {
        let image = std::env::var("FLOTILLA_IMAGE").unwrap_or_else(|_| "flotilla:dev".into());
        self.cli_ok(&[
            "pools",
            "create",
            pool,
            "--provider",
            "docker",
            "--instance-type",
            "container",
            "--region",
            "local",
            "--image",
            &format!("{image} agent"),
        ]);
    }

    /// The network the compose project and its workers are on.
    fn network(&self) -> &str {
        &self.project
    }
}

/// Services and workers as containers on a private network, the chaos
/// suite's faults played with the engine's own tools: a scheduler cut off
/// the network (a partition, not a kill) for longer than its lease, a
/// scheduler `docker pause`d for two leases, a worker cut off for less than
/// the confirmation and one cut off for good, one node of the 3-node NATS
/// cluster cut off while instances are provisioned and terminated. Judged
/// against the engine's record: 0 lost, 0 leaked, 0 duplicated, no live
/// worker replaced, the database equal to the engine.
#[test]
fn containers_as_hosts_partitions_pauses_and_a_lost_nats_node_lose_leak_and_duplicate_nothing() {
    let _turn = images();
    let started = Instant::now();
    let c = Compose::with_files(&["deploy/compose-test/chaos.yml"]);
    let events = EngineEvents::follow(c.control_plane());
    c.ok(&[
        "up",
        "-d",
        "--no-build",
        "--scale",
        "scheduler=2",
        "--scale",
        "terminator=2",
        "--scale",
        "watchdog=2",
    ]);
    flotilla_test_utils::eventually_blocking(
        "every replica healthy",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || replicas_healthy(&c),
    );
    println!("chaos cluster healthy in {:?}", started.elapsed());
    let schedulers = c.containers("scheduler");
    assert_eq!(schedulers.len(), 2, "two scheduler replicas");

    c.create_docker_pool("fleet");
    let mut acked: Vec<String> = Vec::new();
    let ready_is = |n: usize| {
        let ready = c.pool_instances("fleet", "ready").len();
        let running = c.running_instances("fleet").len();
        if ready == n && running == n {
            Ok(())
        } else {
            Err(format!(
                "ready {ready}, running containers {running}, want {n}"
            ))
        }
    };
    let limit = Duration::from_secs(180);
    let every = Duration::from_millis(500);

    acked.extend(c.provision("fleet", 6, "chaos-1"));
    flotilla_test_utils::eventually_blocking("6 ready", limit, every, || ready_is(6));

    // 1. A scheduler cut off the network for longer than its lease while
    //    six more are provisioned: the other takes its rows over, and what
    //    it had in flight is fenced when it comes back.
    let t = Instant::now();
    acked.extend(c.provision("fleet", 6, "chaos-2"));
    docker_ok(&["network", "disconnect", c.network(), &schedulers[0]]);
    std::thread::sleep(LEASE + Duration::from_secs(5));
    docker_ok(&[
        "network",
        "connect",
        "--alias",
        "scheduler",
        c.network(),
        &schedulers[0],
    ]);
    flotilla_test_utils::eventually_blocking("12 ready", limit, every, || ready_is(12));
    println!(
        "12 ready through a partitioned scheduler in {:?}",
        t.elapsed()
    );

    // 2. The other scheduler paused for two leases in the middle of four
    //    creates, then resumed: it wakes without its claims.
    let t = Instant::now();
    acked.extend(c.provision("fleet", 4, "chaos-3"));
    docker_ok(&["pause", &schedulers[1]]);
    std::thread::sleep(2 * LEASE);
    docker_ok(&["unpause", &schedulers[1]]);
    flotilla_test_utils::eventually_blocking("16 ready", limit, every, || ready_is(16));
    println!("16 ready through a paused scheduler in {:?}", t.elapsed());

    // 3. Two workers go quiet: one cut off for less than the confirmation
    //    (a network blip: it must survive), one cut off for good (it must
    //    be declared dead, only after the confirmation, and replaced).
    //    (Not `docker pause`: the engine reports a paused container as
    //    `paused`, which the docker provider maps to suspended, a machine
    //    that does not run, and that confirms at once.)
    let workers = c.running_workers("fleet");
    let instance_of = |id: &str| {
        docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"flotilla_instance_id\"}}",
            id,
        ])
    };
    let (paused, cut) = (workers[0].clone(), workers[1].clone());
    let (paused_instance, cut_instance) = (instance_of(&paused), instance_of(&cut));
    let t = Instant::now();
    docker_ok(&["network", "disconnect", c.network(), &cut]);
    docker_ok(&["network", "disconnect", c.network(), &paused]);
    // Past the heartbeat timeout, so it is suspect; well short of it
    // plus the confirmation.
    std::thread::sleep(HEARTBEAT_TIMEOUT + Duration::from_secs(2));
    docker_ok(&["network", "connect", c.network(), &paused]);
    flotilla_test_utils::eventually_blocking("the cut-off worker replaced", limit, every, || {
        let terminated = c.pool_instances("fleet", "terminated");
        if terminated.contains(&cut_instance) && ready_is(16).is_ok() {
            Ok(())
        } else {
            Err(format!("terminated {terminated:?}, {:?}", ready_is(16)))
        }
    });
    println!("cut-off worker replaced in {:?}", t.elapsed());
    let confirmed_after = c.sql(&format!(
        "SELECT extract(epoch FROM min(a.at) - i.last_heartbeat) FROM action_logs a \
         JOIN instances i ON i.id = a.instance_id \
         WHERE a.instance_id = '{cut_instance}' AND a.to_state = 'worker_dead' \
         GROUP BY i.last_heartbeat"
    ));
    let confirmed_after: f64 = confirmed_after
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!("no worker_dead verdict for {cut_instance}: {confirmed_after:?}")
        });
    assert!(
        confirmed_after >= (HEARTBEAT_TIMEOUT + DEAD_CONFIRM).as_secs_f64() - 1.0,
        "declared dead {confirmed_after:.1} s after its last heartbeat: before the provider's \
         confirmation could be had"
    );
    assert!(
        c.pool_instances("fleet", "ready")
            .contains(&paused_instance),
        "the worker cut off for less than the confirmation was replaced"
    );

    // 4. One node of the NATS cluster cut off while four are provisioned
    //    and four of the first are terminated; then it comes back.
    let t = Instant::now();
    let nats0 = c.container("nats").expect("the first NATS node");
    docker_ok(&["network", "disconnect", c.network(), &nats0]);
    acked.extend(c.provision("fleet", 4, "chaos-4"));
    let going: Vec<String> = c
        .pool_instances("fleet", "ready")
        .into_iter()
        .take(4)
        .collect();
    let mut terminate = vec!["terminate"];
    terminate.extend(going.iter().map(String::as_str));
    c.cli_ok(&terminate);
    flotilla_test_utils::eventually_blocking(
        "16 ready, the four terminated, with a NATS node gone",
        limit,
        every,
        || {
            let terminated = c.pool_instances("fleet", "terminated");
            let done = going.iter().all(|id| terminated.contains(id));
            match (done, ready_is(16)) {
                (true, Ok(())) => Ok(()),
                (done, ready) => Err(format!("four terminated: {done}, {ready:?}")),
            }
        },
    );
    docker_ok(&["network", "connect", "--alias", "nats", c.network(), &nats0]);
    println!(
        "provision and terminate with a NATS node cut off in {:?}",
        t.elapsed()
    );

    // The database says what the engine holds, and only the cut-off
    // worker was ever declared dead or lost.
    let ready: BTreeSet<String> = c.pool_instances("fleet", "ready").into_iter().collect();
    assert_eq!(
        ready,
        c.running_instances("fleet"),
        "database and engine differ"
    );
    let verdicts = c.sql(
        "SELECT DISTINCT instance_id FROM action_logs WHERE to_state IN ('worker_dead', 'lost')",
    );
    assert_eq!(
        verdicts,
        std::slice::from_ref(&cut_instance),
        "a live worker was replaced"
    );
    // 0 lost: every acknowledged instance became ready, and those still
    // live are the ones nobody terminated.
    let reached_ready: BTreeSet<String> = c
        .sql("SELECT DISTINCT instance_id FROM action_logs WHERE to_state = 'ready'")
        .into_iter()
        .collect();
    let never: Vec<&String> = acked
        .iter()
        .filter(|id| !reached_ready.contains(*id))
        .collect();
    assert!(never.is_empty(), "acknowledged but never ready: {never:?}");

    c.cli_ok(&[
        "terminate",
        "--pool",
        "fleet",
        "--wait",
        "--wait-timeout",
        "180",
    ]);
    flotilla_test_utils::eventually_blocking(
        "no worker container left, each one's removal seen",
        Duration::from_secs(60),
        every,
        || {
            let left = c.worker_containers(None);
            let seen = events.read();
            let created = seen.iter().filter(|e| e.0 == "create").count();
            let destroyed = seen.iter().filter(|e| e.0 == "destroy").count();
            if left.is_empty() && created == destroyed && created > 0 {
                Ok(())
            } else {
                Err(format!(
                    "left {left:?}, created {created}, destroyed {destroyed}"
                ))
            }
        },
    );
    let seen = events.read();
    assert_eq!(
        duplicated(&seen),
        Vec::<String>::new(),
        "two containers for one instance"
    );
    let live = c.sql("SELECT count(*) FROM instances WHERE state NOT IN ('terminated')");
    assert_eq!(
        live,
        ["0"],
        "instances left live after terminating the pool"
    );
    let created = seen.iter().filter(|e| e.0 == "create").count();
    println!(
        "containers as hosts: {} acknowledged, {created} worker containers created and removed, \
         0 lost, 0 leaked, 0 duplicated, in {:?}",
        acked.len(),
        started.elapsed()
    );

    c.ok(&["down", "-v", "--remove-orphans", "-t", "10"]);
    let left = c.leftovers();
    assert!(left.is_empty(), "docker-compose down -v left {left:?}");
}
