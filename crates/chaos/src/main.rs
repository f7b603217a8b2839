//! `flotilla-chaos`: the full-size chaos run from the command line
//! (`scripts/chaos.sh` builds the services and calls this).

use std::time::Duration;

use clap::Parser;
use flotilla_chaos::{ChaosConfig, default_bin_dir, run};

/// Runs every Flotilla service as a process against the faulty simulated
/// cloud, storms it while killing processes and restarting NATS and
/// PostgreSQL, then checks that no command was lost and nothing leaked.
#[derive(Debug, Parser)]
#[command(name = "flotilla-chaos", version)]
struct Args {
    /// Instances asked for during the storm.
    #[arg(long, default_value_t = 2000)]
    size: u64,
    /// Seconds the storm lasts.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Run NATS as a 3-node cluster and kill one node mid-storm.
    #[arg(long)]
    cluster: bool,
    /// kill -9s of random services during the storm (default: one per 5 s).
    #[arg(long)]
    kills: Option<u32>,
    /// Share of provider calls answered with an injected fault.
    #[arg(long, default_value_t = 0.10)]
    fault_rate: f64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds each partition, lying-provider window and connection
    /// exhaustion lasts.
    #[arg(long, default_value_t = 10)]
    fault_window: u64,
    /// Seconds to wait for convergence after the storm.
    #[arg(long, default_value_t = 600)]
    converge_timeout: u64,
    /// Directory of the service binaries (default: next to this one).
    #[arg(long, env = "CHAOS_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Keep logs and data even when the run passes.
    #[arg(long)]
    keep: bool,
    /// LOG_LEVEL of the services.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => default_bin_dir()?,
    };
    let config = ChaosConfig {
        instances: args.size,
        duration: Duration::from_secs(args.duration),
        nats_nodes: if args.cluster { 3 } else { 1 },
        kills: args
            .kills
            .unwrap_or_else(|| u32::try_from(args.duration / 5).unwrap_or(u32::MAX).max(1)),
        fault_rate: args.fault_rate,
        terminate_percent: 50,
        concurrency: args.concurrency,
        fault_window: Duration::from_secs(args.fault_window),
        converge_timeout: Duration::from_secs(args.converge_timeout),
        bin_dir,
        keep_dir: args.keep,
        plant_violations: true,
        log_level: args.log_level,
    };
    let report = run(config).await?;
    println!("{report}");
    anyhow::ensure!(report.passed(), "the chaos run broke an invariant");
    Ok(())
}
