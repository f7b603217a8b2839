//! Private PostgreSQL and NATS servers for one chaos run, so that crashing
//! and restarting them never touches the shared servers other tests use.
//!
//! Design notes: PostgreSQL is driven with `pg_ctl` (start, and stop in
//! `immediate` mode, which is a crash: no checkpoint, WAL recovery on the
//! next start). Killing the postmaster with SIGKILL instead would leave its
//! backends holding shared memory and the restart would fail. PostgreSQL
//! refuses to run as root, so as root every command runs as the `postgres`
//! user through `runuser`, on a directory that user owns. NATS servers are
//! plain children killed with SIGKILL; their JetStream store directory
//! survives, as a node's disk would.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A port nobody listens on right now (bound then released; a small race
/// with other processes is accepted in a test harness).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `initdb`/`pg_ctl`: from `CHAOS_PG_BIN`, else the newest Debian
/// `/usr/lib/postgresql/<version>/bin`, else `PATH`.
fn pg_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("CHAOS_PG_BIN") {
        return Path::new(&dir).join(name);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin").join(name);
            bin.exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => bin,
        None => PathBuf::from(name),
    }
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `max_connections` of the private server.
pub const MAX_CONNECTIONS: usize = 100;

/// A PostgreSQL cluster in its own directory on its own port.
pub struct PrivatePostgres {
    dir: PathBuf,
    pub port: u16,
    as_postgres_user: bool,
    running: bool,
}

impl PrivatePostgres {
    /// `initdb` in `dir` (created) and start on a free port.
    pub async fn start(dir: &Path) -> anyhow::Result<PrivatePostgres> {
        std::fs::create_dir_all(dir)?;
        let as_postgres_user = running_as_root();
        if as_postgres_user {
            // The temp dirs above are root-only; postgres must reach this one.
            let mut p = dir.to_path_buf();
            while let Some(parent) = p.parent() {
                if parent == Path::new("/") || parent == std::env::temp_dir() {
                    break;
                }
                p = parent.to_path_buf();
                allow_traverse(&p)?;
            }
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir)
                .status()?;
            anyhow::ensure!(status.success(), "chown postgres {}", dir.display());
        }
        let mut pg = PrivatePostgres {
            dir: dir.to_path_buf(),
            port: free_port()?,
            as_postgres_user,
            running: false,
        };
        let data = pg.data_dir();
        pg.run(
            &pg_bin("initdb"),
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )
        .await
        .context("initdb")?;
        pg.start_server().await?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT/{db}`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn run(&self, program: &Path, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", program.display()))?;
        if !out.status.success() {
            bail!(
                "{} {:?} failed: {}{}",
                program.display(),
                args,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.join("postgres.log");
        // Room for every service's pool (7 processes of at most 8) with a
        // margin, and few enough that a holder fills the rest in a moment.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections={MAX_CONNECTIONS}",
            self.port,
            path_str(&self.dir)?
        );
        self.run(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
        .context("pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    /// Stops the server like a crash (`immediate`: no checkpoint).
    pub async fn crash(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            &pg_bin("pg_ctl"),
            &["-D", path_str(&data)?, "-m", "immediate", "-w", "stop"],
        )
        .await
        .context("pg_ctl stop")?;
        self.running = false;
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data_dir();
        let pg_ctl = pg_bin("pg_ctl");
        let mut cmd = if self.as_postgres_user {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        let _ = cmd
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn allow_traverse(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(dir)?.permissions();
    perms.set_mode(perms.mode() | 0o711);
    std::fs::set_permissions(dir, perms)?;
    Ok(())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// One `nats-server -js` process (alone or one node of a cluster).
struct NatsNode {
    name: String,
    client_port: u16,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(nats_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning nats-server")?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

fn nats_bin() -> String {
    std::env::var("CHAOS_NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned())
}

/// A private NATS with JetStream: one node, or a 3-node cluster.
pub struct PrivateNats {
    nodes: Vec<NatsNode>,
}

impl PrivateNats {
    /// Starts `nodes` servers (1, or 3 for a cluster) under `dir` and waits
    /// until JetStream answers.
    pub async fn start(dir: &Path, nodes: usize) -> anyhow::Result<PrivateNats> {
        anyhow::ensure!(
            nodes == 1 || nodes >= 3,
            "a JetStream cluster needs 3 nodes"
        );
        let client_ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect::<Result<_, _>>()?;
        let cluster_ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect::<Result<_, _>>()?;
        let mut list = Vec::new();
        for i in 0..nodes {
            let name = format!("n{i}");
            let store = dir.join(format!("nats-{name}"));
            std::fs::create_dir_all(&store)?;
            let mut args = vec![
                "-js".to_owned(),
                "-a".to_owned(),
                "127.0.0.1".to_owned(),
                "-p".to_owned(),
                client_ports[i].to_string(),
                "-sd".to_owned(),
                path_str(&store)?.to_owned(),
                "-n".to_owned(),
                name.clone(),
            ];
            if nodes > 1 {
                let routes: Vec<String> = (0..nodes)
                    .filter(|&j| j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", cluster_ports[j]))
                    .collect();
                args.extend([
                    "--cluster_name".to_owned(),
                    "chaos".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", cluster_ports[i]),
                    "--routes".to_owned(),
                    routes.join(","),
                ]);
            }
            let mut node = NatsNode {
                log: dir.join(format!("nats-{name}.log")),
                name,
                client_port: client_ports[i],
                args,
                child: None,
            };
            node.spawn()?;
            list.push(node);
        }
        let nats = PrivateNats { nodes: list };
        nats.wait_ready(Duration::from_secs(60)).await?;
        Ok(nats)
    }

    /// Every node's URL. `NATS_URL` takes one; a client learns the other
    /// cluster members from the server it reached and fails over to them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The client port of node `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.nodes[i].client_port
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// SIGKILL node `i`.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].kill().await;
    }

    /// Starts node `i` again on the same ports and store.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].spawn()
    }

    /// Waits until JetStream accepts a stream write through the live nodes
    /// (in a cluster: a meta leader is elected).
    pub async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let probe = format!("CHAOS_PROBE_{}", uuid::Uuid::new_v4().simple());
        let mut last = String::new();
        while started.elapsed() < limit {
            match self.probe(&probe).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        bail!("NATS JetStream not ready after {limit:?}: {last}")
    }

    async fn probe(&self, stream: &str) -> anyhow::Result<()> {
        let addrs = self
            .urls()
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        let client = tokio::time::timeout(
            Duration::from_secs(3),
            async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(2))
                .connect(addrs),
        )
        .await??;
        let js = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![format!("{stream}.>")],
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(3), js.get_or_create_stream(config)).await??;
        let _ = js.delete_stream(stream).await;
        Ok(())
    }
}
