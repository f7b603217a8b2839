//! What a row runs against: its own database (created, migrated, dropped),
//! its own NATS namespace (streams deleted at the end), the simulated cloud
//! at zero latency behind a real provider-adapter, in-process services
//! wired as in tests/provision_path.rs, and service binaries run as
//! processes for the memory and kill -9 rows.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_api::{ApiState, ApiToken, Limits};
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_bus::{Bus, OutboxRelay};
use flotilla_proto::client::{AdapterClient, ServiceToken, adapter_client};
use flotilla_provider_adapter::AdapterArgs;
use flotilla_sim_provider::{Faults, SimConfig, SimHandle};
use flotilla_store::PgPool;
use flotilla_telemetry::CancellationToken;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::Ctx;

/// The API token every bench client uses.
pub const API_TOKEN: &str = "bench-token";
/// The pool every row provisions into.
pub const POOL: &str = "bench";

/// The directory of the running binary, or its parent for a test binary
/// under `deps/`: where cargo puts the service binaries of the same profile.
pub fn default_bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.to_path_buf();
    if dir.ends_with("deps") {
        dir.parent().map(PathBuf::from)
    } else {
        Some(dir)
    }
}

fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if url[..i].contains("://") && i > url.find("://").map_or(0, |p| p + 2) => {
            format!("{}/{}", &url[..i], db)
        }
        _ => format!("{url}/{db}"),
    }
}

/// A database created and migrated for one row; dropped (with FORCE) when
/// this is dropped, also on an early return.
pub struct BenchDb {
    pub url: String,
    pub name: String,
    admin: String,
    /// A pool for the bench's own setup and reads.
    pub pool: PgPool,
}

impl BenchDb {
    pub async fn new(ctx: &Ctx) -> anyhow::Result<BenchDb> {
        let name = format!("flotilla_bench_{}", Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&ctx.admin_url)
            .await
            .with_context(|| format!("PostgreSQL at {}", ctx.admin_url))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        let url = with_database(&ctx.admin_url, &name);
        let db = BenchDb {
            pool: flotilla_store::connect_url(&url, 16, Duration::from_secs(30)).await?,
            url,
            name,
            admin: ctx.admin_url.clone(),
        };
        flotilla_store::migrate(&db.pool).await?;
        Ok(db)
    }

    /// A separate pool, as a service process would have (default size 10).
    pub async fn service_pool(&self) -> anyhow::Result<PgPool> {
        Ok(flotilla_store::connect_url(&self.url, 10, Duration::from_secs(30)).await?)
    }

    /// Inserts the bench pool (provider `sim`).
    pub async fn create_pool(&self) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO pools (name, provider, instance_type, region, image)
             VALUES ($1, 'sim', 'shared-cpu-1x', 'ams', 'registry/worker:1')",
        )
        .bind(POOL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Inserts `n` `ready` instances that heartbeated just now, with worker
    /// token `tok-<i>` each (its SHA-256 stored, as the scheduler does);
    /// returns `(id, token)`. Fixture SQL, not the product's write path.
    pub async fn insert_ready(&self, n: usize) -> anyhow::Result<Vec<(Uuid, String)>> {
        let mut out = Vec::with_capacity(n);
        let mut from = 0usize;
        while from < n {
            let to = (from + 50_000).min(n);
            let rows: Vec<(Uuid, i32)> = sqlx::query_as(
                "INSERT INTO instances (id, pool, name, provider, state, last_heartbeat, heartbeat_mark,
                                        worker_token_hash)
                 SELECT gen_random_uuid(), $1, 'w-' || i, 'sim', 'ready', now(), now(),
                        sha256(convert_to('tok-' || i, 'UTF8'))
                 FROM generate_series($2::int, $3::int) AS i
                 RETURNING id, substr(name, 3)::int",
            )
            .bind(POOL)
            .bind(from as i32)
            .bind(to as i32 - 1)
            .fetch_all(&self.pool)
            .await?;
            out.extend(rows.into_iter().map(|(id, i)| (id, format!("tok-{i}"))));
            from = to;
        }
        sqlx::query("VACUUM ANALYZE instances")
            .execute(&self.pool)
            .await?;
        Ok(out)
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await, and the row's runtime is busy in this drop:
        // clean up on a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A private NATS namespace; its streams are deleted when this is dropped.
pub struct BenchNats {
    pub url: String,
    pub namespace: String,
    pub client: async_nats::Client,
}

impl BenchNats {
    pub async fn new(ctx: &Ctx) -> anyhow::Result<BenchNats> {
        let client = async_nats::connect(&ctx.nats_url)
            .await
            .with_context(|| format!("NATS at {}", ctx.nats_url))?;
        Ok(BenchNats {
            url: ctx.nats_url.clone(),
            namespace: format!("b{}", &Uuid::new_v4().simple().to_string()[..12]),
            client,
        })
    }

    pub async fn bus(&self) -> anyhow::Result<Bus> {
        let ns = Namespace::new(&self.namespace).context("namespace")?;
        let bus = Bus::new(self.client.clone(), ns, BusConfig::default());
        bus.ensure_streams().await?;
        Ok(bus)
    }
}

impl Drop for BenchNats {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = format!("{}_", self.namespace);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use futures::StreamExt;
                let Ok(client) = async_nats::connect(&url).await else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                let mut names = js.stream_names();
                let mut ours = Vec::new();
                while let Some(Ok(name)) = names.next().await {
                    if name.starts_with(&prefix) {
                        ours.push(name);
                    }
                }
                for name in ours {
                    let _ = js.delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

/// Faults with every state change immediate: the provider costs nothing,
/// so what is measured is the control plane.
pub fn instant() -> Faults {
    Faults {
        start_delay_ms: 0,
        stop_delay_ms: 0,
        destroy_delay_ms: 0,
        destroyed_linger_ms: 0,
        ..Faults::default()
    }
}

/// The simulated cloud and a real provider-adapter in front of it (limits
/// and retries out of the way), served on loopback; stopped on drop.
pub struct ProviderSide {
    pub sim: SimHandle,
    pub addr: std::net::SocketAddr,
    pub client: AdapterClient,
    stop: CancellationToken,
}

impl ProviderSide {
    pub async fn start() -> anyhow::Result<ProviderSide> {
        Self::start_with(instant()).await
    }

    /// [`ProviderSide::start`] with the sim's latencies set by `faults`
    /// (e.g. `Faults::published_typical()`).
    pub async fn start_with(faults: Faults) -> anyhow::Result<ProviderSide> {
        let sim = flotilla_sim_provider::start(SimConfig {
            faults,
            ..SimConfig::default()
        })
        .await?;
        let args = AdapterArgs::try_parse_from(adapter_flags(&sim))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(flotilla_provider_adapter::serve(
            Arc::new(flotilla_provider_adapter::registry(&args)?),
            flotilla_provider_adapter::Access::tokens(vec![
                flotilla_core::token::HashedToken::from_plain("bench", SERVICE_TOKEN),
            ]),
            listener,
            stop.clone(),
        ));
        let client = adapter_client(
            channel(addr).await?,
            ServiceToken::new(SERVICE_TOKEN).map_err(anyhow::Error::msg)?,
        );
        Ok(ProviderSide {
            sim,
            addr,
            client,
            stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ProviderSide {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Adapter flags: the sim, no retries, rate limits and breakers out of the way.
pub fn adapter_flags(sim: &SimHandle) -> Vec<String> {
    [
        "provider-adapter",
        "--sim-api-base-url",
        sim.url(),
        "--sim-api-token",
        sim.token(),
        "--provider-retry-max-attempts",
        "0",
        "--provider-rate-limit-per-second",
        "1000000",
        "--provider-rate-limit-burst",
        "1000000",
        "--circuit-breaker-failure-threshold",
        "1000000",
        "--provider-start-timeout-seconds",
        "10",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The api served in-process on loopback, with its outbox relay.
pub async fn start_api(
    pool: PgPool,
    bus: Bus,
    heartbeat_interval_ms: u32,
    stop: &CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(flotilla_api::serve(
        ApiState {
            pool: pool.clone(),
            bus: bus.clone(),
            tokens: vec![ApiToken::from_plain("bench", API_TOKEN)].into(),
            limits: Limits {
                heartbeat_interval_ms,
                ..Limits::default()
            },
            provider: None,
        },
        listener,
        stop.clone(),
    ));
    let relay = OutboxRelay::new(pool, bus);
    let s = stop.clone();
    tokio::spawn(async move { relay.run(s).await });
    Ok(addr)
}

/// A gRPC channel to `addr`.
pub async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

/// `Bearer <token>` on a request.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}")) {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// The in-process scheduler with its default tuning except `flags`.
pub fn scheduler(
    db: PgPool,
    provider: AdapterClient,
    api: std::net::SocketAddr,
    flags: &[&str],
) -> anyhow::Result<flotilla_scheduler::Scheduler> {
    #[derive(Parser)]
    struct S {
        #[command(flatten)]
        t: flotilla_scheduler::SchedulerTuning,
    }
    let mut argv = vec!["scheduler"];
    argv.extend_from_slice(flags);
    Ok(flotilla_scheduler::Scheduler {
        db,
        provider,
        tuning: S::try_parse_from(argv)?.t,
        owner: "scheduler-bench".into(),
        worker_api_url: format!("http://{api}"),
        crash_after: None,
    })
}

/// A free loopback port (bound, then released for a child process).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A service binary run as a process; killed when dropped.
pub struct Service {
    pub name: &'static str,
    pub child: tokio::process::Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Service {
    /// Starts `bin_dir/<name>` with `env` (plus quiet logs, no /metrics).
    pub fn spawn(ctx: &Ctx, name: &'static str, env: &[(&str, String)]) -> anyhow::Result<Service> {
        let Some(dir) = &ctx.bin_dir else {
            bail!("no binary directory (set FLOTILLA_BIN_DIR)");
        };
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "{} not built (cargo build --release -p flotilla-{})",
                path.display(),
                if name == "provider-adapter" {
                    "provider-adapter"
                } else {
                    name
                }
            );
        }
        // Service logs go to a file, named in any error about the process.
        let log_dir = std::env::temp_dir().join("flotilla-bench-logs");
        std::fs::create_dir_all(&log_dir)?;
        let log = log_dir.join(format!("{name}-{}.log", Uuid::new_v4().simple()));
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.env_clear()
            .env("LOG_LEVEL", "warn")
            .env("LOG_FORMAT", "json")
            .env("METRICS_ADDR", "")
            .env("SHUTDOWN_GRACE_SECONDS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", path.display()))?;
        Ok(Service { name, child, log })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident and peak resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.pid().context("process exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// Fails when the process has already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early: {status} (log: {})",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }
}

/// Environment shared by every service process of a row.
pub fn common_env(db: &BenchDb, nats: &BenchNats) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.url.clone()),
        ("NATS_URL", nats.url.clone()),
        ("NATS_NAMESPACE", nats.namespace.clone()),
        // The adapter accepts it, its callers send it.
        (
            "PROVIDER_ADAPTER_TOKENS",
            format!(
                "bench:{}",
                flotilla_core::token::token_hash_hex(SERVICE_TOKEN)
            ),
        ),
        ("PROVIDER_ADAPTER_TOKEN", SERVICE_TOKEN.into()),
    ]
}

/// The service token of the bench's adapters (in-process and spawned).
pub const SERVICE_TOKEN: &str = "bench-service-token";

/// Polls `f` every `every` until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, every: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("gave up after {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Instances in `state`.
pub async fn count_state(pool: &PgPool, state: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE state = $1")
            .bind(state)
            .fetch_one(pool)
            .await?,
    )
}
