//! Row: resident memory of each service binary with 100k instances tracked,
//! beside the same process's memory before any instance existed.
//!
//! The five services run as the release binaries do in production (env
//! configuration, one process each) against one database; the simulated
//! cloud runs in the bench. Memory is read once with an empty database,
//! then 100k `ready` instances are inserted, every one of them heartbeats
//! once through the api process (so its worker-token cache holds them
//! all), the loops tick over them for a few seconds, and memory is read
//! again: VmRSS now and VmHWM (the peak).

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use sha2::{Digest, Sha256};

use crate::env::{API_TOKEN, BenchDb, BenchNats, ProviderSide, Service, common_env, free_port};
use crate::table::{Line, thousands};
use crate::{Ctx, Row};

const SERVICES: [&str; 5] = [
    "api",
    "scheduler",
    "terminator",
    "watchdog",
    "provider-adapter",
];

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let db = BenchDb::new(ctx).await?;
    db.create_pool().await?;
    let nats = BenchNats::new(ctx).await?;
    nats.bus().await?;
    let provider = ProviderSide::start().await?;
    let api_port = free_port()?;
    let adapter_port = free_port()?;
    let adapter_url = format!("http://127.0.0.1:{adapter_port}");
    let api_hash = hex::encode(Sha256::digest(API_TOKEN.as_bytes()));

    let mut procs = Vec::new();
    for name in SERVICES {
        let mut env = common_env(&db, &nats);
        match name {
            "api" => {
                env.push(("API_LISTEN", format!("127.0.0.1:{api_port}")));
                env.push(("API_TOKENS", format!("bench:{api_hash}")));
            }
            "provider-adapter" => {
                env.push((
                    "PROVIDER_ADAPTER_LISTEN",
                    format!("127.0.0.1:{adapter_port}"),
                ));
                env.push(("SIM_API_BASE_URL", provider.sim.url().to_owned()));
                env.push(("SIM_API_TOKEN", provider.sim.token().to_owned()));
            }
            _ => {
                env.push(("PROVIDER_ADAPTER_URL", adapter_url.clone()));
                env.push(("WORKER_API_URL", format!("http://127.0.0.1:{api_port}")));
            }
        }
        procs.push(Service::spawn(ctx, name, &env)?);
    }
    // Let every service connect and run its first ticks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut idle = Vec::new();
    for p in &mut procs {
        p.check_alive()?;
        idle.push(p.rss_kib()?.0);
    }

    let n = ctx.memory_instances;
    let workers = Arc::new(db.insert_ready(n).await?);
    let api = format!("127.0.0.1:{api_port}").parse()?;
    let clients = vec![WorkerServiceClient::new(crate::env::channel(api).await?); 8];
    crate::heartbeats::beat_each_once(&clients, &workers).await?;
    // A few ticks of every loop over the full table.
    tokio::time::sleep(Duration::from_secs(if ctx.quick { 2 } else { 5 })).await;

    let limit_kib = 64 * 1024;
    let mut lines = Vec::new();
    for (p, idle) in procs.iter_mut().zip(idle) {
        p.check_alive()?;
        let (rss, hwm) = p.rss_kib()?;
        lines.push(Line::new(
            format!("{} {}", Row::Memory.label(), p.name),
            format!(
                "{} (peak {}) at {} instances",
                mib(rss),
                mib(hwm),
                thousands(n as f64)
            ),
            format!("{} with 0 instances", mib(idle)),
            format!("{:.2}x of empty", rss as f64 / idle.max(1) as f64),
            "<= 64 MiB",
            Some(hwm <= limit_kib),
        ));
    }
    Ok(lines)
}
