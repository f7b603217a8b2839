//! `flotilla-bench`: measures the control plane against real PostgreSQL and
//! NATS with the simulated cloud at zero latency, and prints one table in
//! which every figure stands beside the raw limit of the same machine,
//! measured in the same run, and their ratio.
//!
//! Design notes: each row owns its environment (a fresh database, a NATS
//! namespace, its own services) and tears it down, so rows are independent
//! and a run never touches the databases or streams of the test suite. A
//! row that cannot be measured (a binary not built, a server unreachable)
//! prints "not measured" with the reason instead of failing the run: the
//! table always has every row. Absolute figures depend on the machine and
//! on whatever else runs on it; the raw limits beside them are there so the
//! ratios can be compared across machines.

pub mod detection;
pub mod env;
pub mod heartbeats;
pub mod memory;
pub mod provision_latency;
pub mod raw;
pub mod ready;
pub mod resume;
pub mod scan;
pub mod stats;
pub mod table;
pub mod warm;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub use table::{Line, Table};

/// One row of the table (one bullet of the issue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Row {
    /// Instances requested → `ready` per second.
    Ready,
    /// `Provision` accepted → provider create call latency.
    ProvisionLatency,
    /// Heartbeats ingested per second and their latency.
    Heartbeats,
    /// Dead worker → `worker_dead` latency.
    Detection,
    /// Watchdog stale-heartbeat scan time.
    Scan,
    /// Resident memory of each service with many instances tracked.
    Memory,
    /// Backlog resume after `kill -9` of the scheduler.
    Resume,
    /// `Provision` → `ready` from warm stock vs cold, at the providers'
    /// published typical latencies.
    Warm,
}

impl Row {
    pub const ALL: [Row; 8] = [
        Row::Ready,
        Row::ProvisionLatency,
        Row::Heartbeats,
        Row::Detection,
        Row::Scan,
        Row::Memory,
        Row::Resume,
        Row::Warm,
    ];

    /// The label the table prints in its first column.
    pub fn label(self) -> &'static str {
        match self {
            Row::Ready => "requested -> ready",
            Row::ProvisionLatency => "Provision -> provider create",
            Row::Heartbeats => "heartbeat ingest",
            Row::Detection => "dead worker -> worker_dead",
            Row::Scan => "watchdog stale scan",
            Row::Memory => "service RSS",
            Row::Resume => "backlog resume after kill -9",
            Row::Warm => "Provision -> ready, warm vs cold",
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "flotilla-bench",
    version,
    about = "Flotilla benchmarks: each figure beside the raw limit measured in the same run"
)]
pub struct BenchArgs {
    /// Instances in the requested -> ready batch.
    #[arg(long, default_value_t = 10_000)]
    pub instances: usize,
    /// Table sizes of the watchdog scan row (0.1% of each is stale).
    #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
    pub scan_sizes: Vec<usize>,
    /// Instances tracked while service memory is read.
    #[arg(long, default_value_t = 100_000)]
    pub memory_instances: usize,
    /// Provision requests per second of the latency row.
    #[arg(long, default_value_t = 200)]
    pub provision_rate: u32,
    /// Seconds each rate measurement runs.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Extra flags for the in-process scheduler (repeat), e.g.
    /// `--scheduler-flag=--scheduler-batch=1000`; default: its defaults.
    #[arg(long = "scheduler-flag", allow_hyphen_values = true)]
    pub scheduler_flags: Vec<String>,
    /// Run only these rows (repeat or comma-separate).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Row>,
    /// Tiny sizes and short runs: checks that every row works, not figures.
    #[arg(long)]
    pub quick: bool,
    /// PostgreSQL admin URL; each row creates and drops its own database.
    #[arg(
        long,
        env = "FLOTILLA_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// NATS URL; each row uses its own namespace and deletes its streams.
    #[arg(
        long,
        env = "FLOTILLA_BENCH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Directory holding the service binaries (api, scheduler, ...) for the
    /// memory and kill -9 rows; default: the directory of this binary.
    #[arg(long, env = "FLOTILLA_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
}

/// What every row reads: sizes (already scaled down in quick mode) and
/// where the servers and binaries are.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub instances: usize,
    pub scan_sizes: Vec<usize>,
    pub memory_instances: usize,
    pub provision_rate: u32,
    pub measure: Duration,
    pub quick: bool,
    pub admin_url: String,
    pub nats_url: String,
    pub bin_dir: Option<PathBuf>,
    pub scheduler_flags: Vec<String>,
}

impl Ctx {
    pub fn from_args(args: &BenchArgs) -> Ctx {
        let bin_dir = args.bin_dir.clone().or_else(env::default_bin_dir);
        if args.quick {
            Ctx {
                instances: args.instances.min(200),
                scan_sizes: args.scan_sizes.iter().map(|s| (*s).min(20_000)).collect(),
                memory_instances: args.memory_instances.min(2_000),
                provision_rate: args.provision_rate.min(50),
                measure: Duration::from_secs(1),
                quick: true,
                admin_url: args.database_url.clone(),
                nats_url: args.nats_url.clone(),
                bin_dir,
                scheduler_flags: args.scheduler_flags.clone(),
            }
        } else {
            Ctx {
                instances: args.instances,
                scan_sizes: args.scan_sizes.clone(),
                memory_instances: args.memory_instances,
                provision_rate: args.provision_rate,
                measure: Duration::from_secs(args.seconds.max(1)),
                quick: false,
                admin_url: args.database_url.clone(),
                nats_url: args.nats_url.clone(),
                bin_dir,
                scheduler_flags: args.scheduler_flags.clone(),
            }
        }
    }
}

/// Runs the selected rows one after the other and returns the table; a
/// row that fails becomes a "not measured" line with the reason.
pub async fn run(args: &BenchArgs) -> Table {
    let ctx = Ctx::from_args(args);
    let rows: Vec<Row> = if args.only.is_empty() {
        Row::ALL.to_vec()
    } else {
        Row::ALL
            .into_iter()
            .filter(|r| args.only.contains(r))
            .collect()
    };
    let mut table = Table::new(table::machine_note());
    for row in rows {
        eprintln!("bench: measuring {} ...", row.label());
        let started = std::time::Instant::now();
        let lines = match run_row(row, &ctx).await {
            Ok(lines) => lines,
            Err(e) => vec![Line::not_measured(row.label(), format!("{e:#}"))],
        };
        eprintln!("bench: {} done in {:.1?}", row.label(), started.elapsed());
        for l in &lines {
            eprintln!("  {}", l.summary());
        }
        table.lines.extend(lines);
    }
    table
}

async fn run_row(row: Row, ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    match row {
        Row::Ready => ready::run(ctx).await,
        Row::ProvisionLatency => provision_latency::run(ctx).await,
        Row::Heartbeats => heartbeats::run(ctx).await,
        Row::Detection => detection::run(ctx).await,
        Row::Scan => scan::run(ctx).await,
        Row::Memory => memory::run(ctx).await,
        Row::Resume => resume::run(ctx).await,
        Row::Warm => warm::run(ctx).await,
    }
}
