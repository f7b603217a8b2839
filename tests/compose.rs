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

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
}

impl Compose {
    fn new() -> Compose {
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
            .args(["-f", "deploy/compose-test/docker-compose.yml"])
            .args(args);
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

    /// The container of `service` (one replica each in this file).
    fn container(&self, service: &str) -> Option<String> {
        let out = self.run(&["ps", "-a", "-q", service]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(str::to_owned)
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
    let started = Instant::now();
    let images = Command::new("bash")
        .arg(repo_root().join("scripts/images.sh"))
        .output()
        .expect("scripts/images.sh runs");
    assert!(
        images.status.success(),
        "scripts/images.sh failed:\n{}",
        text(&images)
    );
    println!("images ready in {:?}", started.elapsed());

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
    let image = std::env::var("FLOTILLA_IMAGE").unwrap_or_else(|_| "flotilla:dev".into());
    compose.cli_ok(&[
        "pools",
        "create",
        "fleet",
        "--provider",
        "docker",
        "--instance-type",
        "container",
        "--region",
        "local",
        "--image",
        &format!("{image} agent"),
    ]);
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
