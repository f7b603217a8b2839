//! The cluster a chaos scenario runs against: private PostgreSQL and NATS,
//! the simulated cloud with injected faults, and every Flotilla service as
//! its own process (two replicas of scheduler, terminator and watchdog),
//! with shortened tunings so that convergence takes seconds; plus the
//! convergence wait and the invariant check every scenario ends with.
//!
//! It is shared by the storm (`run`) and the lifecycle scenario
//! (`lifecycle`), so both judge the same production code paths the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::v1;
use flotilla_sim_provider::{ErrorRates, Faults};
use sha2::{Digest, Sha256};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};

use crate::infra::{PrivateNats, PrivatePostgres, free_port};
use crate::invariants::{self, Ledger, Violation};
use crate::proxy::FaultProxy;
use crate::run::ChaosConfig;
use crate::storm::Fleet;
use crate::supervisor::{ServiceSpec, Supervisor};
use crate::truth::{self, SimAdmin};

/// The service binaries a run starts, by package.
pub const SERVICE_BINARIES: &[(&str, &str)] = &[
    ("flotilla-api", "api"),
    ("flotilla-scheduler", "scheduler"),
    ("flotilla-terminator", "terminator"),
    ("flotilla-watchdog", "watchdog"),
    ("flotilla-provider-adapter", "provider-adapter"),
    ("flotilla-sim-provider", "flotilla-sim"),
];

pub const API_TOKEN: &str = "chaos-token";
pub const SIM_TOKEN: &str = "sim-token";
/// The service token between the adapter and its callers.
pub const SERVICE_TOKEN: &str = "chaos-service-token";
pub const SIM_APP: &str = "flotilla";
pub const POOL: &str = "chaos";
/// A second pool, without volumes: its teardown has no volume whose
/// binding to a live machine would refuse to let a wrong `terminated`
/// through, so it shows what the terminator itself believes.
pub const POOL_BARE: &str = "chaos-bare";

/// Where cargo put this build's binaries: next to the running executable
/// (`target/<profile>/` for a binary, its parent for a test in `deps/`).
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("CHAOS_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable without a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    Ok(dir.to_path_buf())
}

/// `cargo build --bins` for every service package (a no-op when they are
/// fresh), so a test works on a clean checkout.
pub fn build_service_binaries(release: bool) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--bins", "--locked", "--quiet"]);
    if release {
        cmd.arg("--release");
    }
    for (package, _) in SERVICE_BINARIES {
        cmd.args(["-p", package]);
    }
    let status = cmd.status().context("running cargo build")?;
    anyhow::ensure!(
        status.success(),
        "cargo build of the service binaries failed"
    );
    Ok(())
}

fn sim_faults(rate: f64) -> Faults {
    // The rate is split among the kinds the issue names; creates that
    // succeed but answer 500 come on top (they only touch creates).
    let rates = ErrorRates {
        rate_429: rate * 0.3,
        rate_500: rate * 0.3,
        rate_503: rate * 0.2,
        rate_timeout: rate * 0.2,
    };
    Faults {
        latency_ms: 2,
        latency_jitter_ms: 10,
        error_rate_all: rates,
        retry_after_secs: 1,
        timeout_ms: 1_000,
        create_succeeds_but_errors_rate: rate * 0.5,
        start_delay_ms: 50,
        stop_delay_ms: 50,
        destroy_delay_ms: 20,
        destroyed_linger_ms: 500,
        ..Faults::default()
    }
}

fn env(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// The scheduler's and terminator's lease: a replica paused for longer
/// has lost its claims when it resumes.
pub const LEASE_SECONDS: u64 = 5;

/// The links that run through a fault proxy, one per kind of dependency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    /// scheduler-1 → PostgreSQL.
    SchedulerPostgres,
    /// provider-adapter → the simulated cloud.
    AdapterProvider,
    /// terminator-1 → NATS (its seed node).
    TerminatorNats,
}

impl Link {
    pub const ALL: [Link; 3] = [
        Link::SchedulerPostgres,
        Link::AdapterProvider,
        Link::TerminatorNats,
    ];
}

/// Everything a scenario talks to; dropped in [`Cluster::shutdown`].
pub struct Cluster {
    pub pg: PrivatePostgres,
    pub nats: PrivateNats,
    pub supervisor: Supervisor,
    pub admin: SimAdmin,
    pub fleet: Fleet,
    /// The harness's own read-only connections to the installation's database.
    pub db: PgPool,
    /// The fault proxies, in [`Link::ALL`]'s order.
    links: [FaultProxy; 3],
}

impl Cluster {
    /// Starts the servers and every service, and creates the pool [`POOL`].
    pub async fn start(config: &ChaosConfig, work_dir: &Path) -> anyhow::Result<Cluster> {
        let bin = |name: &str| config.bin_dir.join(name);
        for (_, name) in SERVICE_BINARIES {
            anyhow::ensure!(
                bin(name).exists(),
                "{} not found: build the services first (cargo build --bins)",
                bin(name).display()
            );
        }
        let pg = PrivatePostgres::start(&work_dir.join("pg")).await?;
        {
            let mut conn = PgConnection::connect(&pg.url("postgres")).await?;
            sqlx::query("CREATE DATABASE flotilla")
                .execute(&mut conn)
                .await?;
            let _ = conn.close().await;
        }
        let db_url = pg.url("flotilla");
        let nats = PrivateNats::start(work_dir, config.nats_nodes).await?;
        let supervisor = Supervisor::new(&work_dir.join("logs"))?;

        let sim_addr = format!("127.0.0.1:{}", free_port()?);
        let sim_url = format!("http://{sim_addr}");
        // One link of each kind runs through a fault proxy the chaos can
        // partition; the other replicas keep their direct links.
        let localhost = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let links = [
            FaultProxy::start("scheduler-1 → PostgreSQL", localhost(pg.port)).await?,
            FaultProxy::start("provider-adapter → cloud", sim_addr.parse()?).await?,
            FaultProxy::start("terminator-1 → NATS", localhost(nats.client_port(0))).await?,
        ];
        let [pg_link, cloud_link, nats_link] = links.each_ref().map(FaultProxy::addr);
        supervisor.add(ServiceSpec {
            name: "flotilla-sim".into(),
            program: bin("flotilla-sim"),
            env: env(&[
                ("SIM_LISTEN", sim_addr.clone()),
                ("SIM_TOKEN", SIM_TOKEN.into()),
                (
                    "SIM_FAULTS",
                    serde_json::to_string(&sim_faults(config.fault_rate))?,
                ),
                ("RUST_LOG", "warn".into()),
            ]),
            // The sim is the cloud, and the cloud's memory is the truth.
            killable: false,
        })?;
        let admin = SimAdmin::new(&sim_url)?;
        wait_for("the simulated cloud", Duration::from_secs(30), || async {
            admin.stats().await.map(|_| ())
        })
        .await?;

        let common = env(&[
            ("DATABASE_URL", db_url.clone()),
            ("DATABASE_MAX_CONNECTIONS", "8".into()),
            ("NATS_NAMESPACE", "chaos".into()),
            // On the cluster every stream keeps a copy on each node, so the
            // node killed mid-storm takes no stream with it.
            (
                "NATS_STREAM_REPLICAS",
                if config.nats_nodes >= 3 { "3" } else { "1" }.into(),
            ),
            ("NATS_ACK_WAIT_SECONDS", "5".into()),
            ("METRICS_ADDR", String::new()),
            ("SHUTDOWN_GRACE_SECONDS", "2".into()),
            ("LOG_LEVEL", config.log_level.clone()),
            ("LOG_FORMAT", "json".into()),
            // The adapter serves callers holding this service token only.
            (
                "PROVIDER_ADAPTER_TOKENS",
                format!(
                    "chaos:{}",
                    hex::encode(Sha256::digest(SERVICE_TOKEN.as_bytes()))
                ),
            ),
            ("PROVIDER_ADAPTER_TOKEN", SERVICE_TOKEN.into()),
        ]);
        // Each process gets one node as its seed (NATS_URL takes one URL),
        // spread over the cluster, so whichever node dies some services lose
        // their server and must fail over to the members they learnt of.
        let nats_urls = nats.urls();
        let seed = std::cell::Cell::new(0usize);
        let with = |extra: &[(&str, String)]| {
            let mut e = common.clone();
            let n = seed.get();
            seed.set(n + 1);
            e.insert("NATS_URL".into(), nats_urls[n % nats_urls.len()].clone());
            e.extend(env(extra));
            e
        };
        let adapter_addr = format!("127.0.0.1:{}", free_port()?);
        let adapter_url = format!("http://{adapter_addr}");
        let api_addr = format!("127.0.0.1:{}", free_port()?);
        let api_url = format!("http://{api_addr}");
        let token_hash = hex::encode(Sha256::digest(API_TOKEN.as_bytes()));

        supervisor.add(ServiceSpec {
            name: "provider-adapter".into(),
            program: bin("provider-adapter"),
            env: with(&[
                ("PROVIDER_ADAPTER_LISTEN", adapter_addr.clone()),
                ("SIM_API_BASE_URL", format!("http://{cloud_link}")),
                ("SIM_API_TOKEN", SIM_TOKEN.into()),
                ("SIM_APP_NAME", SIM_APP.into()),
                ("PROVIDER_REQUEST_TIMEOUT_SECONDS", "5".into()),
                ("PROVIDER_START_TIMEOUT_SECONDS", "5".into()),
                ("PROVIDER_RATE_LIMIT_PER_SECOND", "100000".into()),
                ("PROVIDER_RATE_LIMIT_BURST", "100000".into()),
                ("CIRCUIT_BREAKER_RESET_TIMEOUT_SECONDS", "2".into()),
            ]),
            killable: true,
        })?;
        supervisor.add(ServiceSpec {
            name: "api".into(),
            program: bin("api"),
            env: with(&[
                ("API_LISTEN", api_addr.clone()),
                ("API_TOKENS", format!("chaos:{token_hash}")),
            ]),
            killable: true,
        })?;
        let fleet = Fleet::new(&api_url, API_TOKEN)?;
        // The api migrates on start; the other services need the schema.
        for (name, volume_size_gb) in [(POOL, 1), (POOL_BARE, 0)] {
            let what = format!("the api and its pool {name}");
            wait_for(&what, Duration::from_secs(60), || async {
                match fleet
                    .create_pool(v1::Pool {
                        name: name.into(),
                        provider: "sim".into(),
                        instance_type: "shared-cpu-1x".into(),
                        region: "ams".into(),
                        image: "registry/worker:1".into(),
                        volume_size_gb,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
                    Err(s) => Err(anyhow::anyhow!("{s}")),
                }
            })
            .await?;
        }
        for n in 1..=2 {
            let mut env = with(&[
                ("PROVIDER_ADAPTER_URL", adapter_url.clone()),
                ("WORKER_API_URL", api_url.clone()),
                ("SCHEDULER_TICK_MS", "300".into()),
                // Short, as in production: renewed while a step runs,
                // so a paused or killed replica's rows move on soon.
                ("SCHEDULER_LEASE_SECONDS", LEASE_SECONDS.to_string()),
                // Attempts are not to run out through ~10 % faults: an
                // acknowledged Provision must end with a machine.
                ("PROVISION_MAX_ATTEMPTS", "1000".into()),
                ("PROVISION_RETRY_BASE_MS", "200".into()),
                ("PROVISION_RETRY_MAX_MS", "2000".into()),
                // Longer than the storm's lying listings last and lag, so
                // a create whose answer was lost is found, not made again.
                (
                    "PROVISION_LISTING_SETTLE_SECONDS",
                    (2 * config.fault_window.as_secs() + 2).to_string(),
                ),
                // Nothing plays the workers: instances stay `booting`.
                ("RECOVERY_BOOTING_TIMEOUT_SECONDS", "86400".into()),
            ]);
            if n == 1 {
                env.insert(
                    "DATABASE_URL".into(),
                    format!("postgres://postgres@{pg_link}/flotilla"),
                );
            }
            supervisor.add(ServiceSpec {
                name: format!("scheduler-{n}"),
                program: bin("scheduler"),
                env,
                killable: true,
            })?;
            let mut env = with(&[
                ("PROVIDER_ADAPTER_URL", adapter_url.clone()),
                ("TERMINATOR_TICK_MS", "300".into()),
                ("TERMINATOR_LEASE_SECONDS", LEASE_SECONDS.to_string()),
                ("TERMINATOR_POLL_MS", "200".into()),
                ("DRAIN_TIMEOUT_SECONDS", "1".into()),
                ("STOP_GRACE_SECONDS", "1".into()),
                ("PROVIDER_WAIT_SECONDS", "3".into()),
                ("TERMINATE_RETRY_BASE_MS", "200".into()),
                ("TERMINATE_RETRY_MAX_MS", "2000".into()),
            ]);
            if n == 1 {
                env.insert("NATS_URL".into(), format!("nats://{nats_link}"));
            }
            supervisor.add(ServiceSpec {
                name: format!("terminator-{n}"),
                program: bin("terminator"),
                env,
                killable: true,
            })?;
            supervisor.add(ServiceSpec {
                name: format!("watchdog-{n}"),
                program: bin("watchdog"),
                env: with(&[
                    ("PROVIDER_ADAPTER_URL", adapter_url.clone()),
                    ("WATCHDOG_TICK_MS", "500".into()),
                    ("WATCHDOG_LEASE_SECONDS", "20".into()),
                    ("ORPHAN_SCAN_INTERVAL_SECONDS", "3".into()),
                    ("ORPHAN_GRACE_SECONDS", "10".into()),
                    // Young enough that the storm's instances are judged
                    // while the listings lie (the default is 30 s).
                    ("WATCHDOG_LOST_MIN_AGE_SECONDS", "5".into()),
                    ("RECOVERY_PROVISIONING_TIMEOUT_SECONDS", "60".into()),
                    ("RECOVERY_STOPPING_TIMEOUT_SECONDS", "60".into()),
                    ("RECOVERY_DELETING_TIMEOUT_SECONDS", "60".into()),
                    ("RECOVERY_DRAINING_TIMEOUT_SECONDS", "60".into()),
                ]),
                killable: true,
            })?;
        }

        let db = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&db_url)
            .await?;
        Ok(Cluster {
            pg,
            nats,
            supervisor,
            admin,
            fleet,
            db,
            links,
        })
    }

    /// The fault proxy of `link`.
    pub fn link(&self, link: Link) -> &FaultProxy {
        let i = Link::ALL.iter().position(|l| *l == link).unwrap_or(0);
        &self.links[i]
    }

    /// Connections each fault proxy carried so far, by its name.
    pub fn link_connections(&self) -> BTreeMap<String, u64> {
        self.links
            .iter()
            .map(|p| (p.name().to_owned(), p.connections()))
            .collect()
    }

    /// Polls until every service is up and the checker finds nothing, or
    /// `limit` passes: the time it took, and the violations found last.
    pub async fn converge(
        &self,
        ledger: &Ledger,
        limit: Duration,
    ) -> (Option<Duration>, Vec<Violation>) {
        let started = Instant::now();
        let mut last = Vec::new();
        while started.elapsed() < limit {
            if self.supervisor.all_up()
                && let (Ok(d), Ok(p)) = (
                    truth::db_snapshot(&self.db).await,
                    self.admin.snapshot().await,
                )
            {
                last = invariants::check(&d, &p, ledger);
                if last.is_empty() {
                    return (Some(started.elapsed()), last);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        (None, last)
    }

    /// Stops every service, then the servers.
    pub async fn shutdown(self) {
        self.db.close().await;
        self.supervisor.shutdown().await;
        drop(self.links);
        drop(self.nats);
        drop(self.pg);
    }
}

/// Retries `probe` until it succeeds or `limit` passes.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(()) => return Ok(()),
            Err(e) if started.elapsed() > limit => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
