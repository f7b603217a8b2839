//! Row: heartbeats ingested per second and their p99 latency, beside the
//! raw rate of PostgreSQL's 1,000-row `UPDATE … FROM UNNEST(…)` on the same
//! table.
//!
//! Two lines: the whole path (gRPC `Heartbeat` with a worker token per
//! instance, the token cache, the batcher, the batched write), with the load
//! generator in the same process and on the same cores as the api; and the
//! api's batcher alone (`HeartbeatBatcher::beat`), which shows how much of
//! the cost is the write path and how much is gRPC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::heartbeat::HeartbeatBatcher;
use flotilla_core::InstanceId;
use flotilla_proto::v1;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_telemetry::CancellationToken;
use uuid::Uuid;

use crate::env::{BenchDb, BenchNats, authed, channel, start_api};
use crate::stats::Samples;
use crate::table::{Line, ms, thousands};
use crate::{Ctx, Row, raw};

/// HTTP/2 connections of the load generator, and callers per connection
/// (below the server's concurrent stream limit).
const CONNECTIONS: usize = 16;
const CALLERS_PER_CONNECTION: usize = 64;

struct Outcome {
    rate: f64,
    lat: Samples,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let db = BenchDb::new(ctx).await?;
    db.create_pool().await?;
    let workers = Arc::new(db.insert_ready(ctx.instances.max(1000)).await?);
    let ids: Vec<Uuid> = workers.iter().map(|(id, _)| *id).collect();

    let raw = raw::batched_update_rate(&db.pool, &ids, ctx.measure).await?;

    let nats = BenchNats::new(ctx).await?;
    let stop = CancellationToken::new();
    let api = start_api(db.service_pool().await?, nats.bus().await?, 1000, &stop).await?;
    let grpc = grpc_load(api, workers.clone(), ctx.measure).await;
    stop.cancel();
    let grpc = grpc?;

    let batcher = batcher_load(db.service_pool().await?, &ids, ctx.measure).await?;

    let target = 100_000.0;
    let line = |label: &str, o: &Outcome| {
        Line::new(
            label,
            format!(
                "{}/s, p50 {} / p99 {}",
                thousands(o.rate),
                ms(o.lat.median()),
                ms(o.lat.pct(99.0))
            ),
            format!("batched UPDATE {} rows/s (1 conn)", thousands(raw)),
            format!("{:.2}x of raw", o.rate / raw),
            ">= 100,000/s",
            Some(o.rate >= target),
        )
    };
    Ok(vec![
        line(&format!("{} (gRPC)", Row::Heartbeats.label()), &grpc),
        line(
            &format!("{} (batcher only)", Row::Heartbeats.label()),
            &batcher,
        ),
    ])
}

async fn grpc_load(
    api: std::net::SocketAddr,
    workers: Arc<Vec<(Uuid, String)>>,
    run: Duration,
) -> anyhow::Result<Outcome> {
    let callers = CONNECTIONS * CALLERS_PER_CONNECTION;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(WorkerServiceClient::new(channel(api).await?));
    }
    // Warm-up: every worker beats once, so its token is verified and
    // cached as it is after a worker's first heartbeat.
    beat_each_once(&clients, &workers).await?;
    let started = Instant::now();
    let (n, lat) = drive_grpc(&clients, &workers, callers, started + run, false).await?;
    Ok(Outcome {
        rate: n as f64 / started.elapsed().as_secs_f64(),
        lat: Samples::new(lat),
    })
}

/// Every worker heartbeats once (their tokens verified and cached).
pub async fn beat_each_once(
    clients: &[WorkerServiceClient<tonic::transport::Channel>],
    workers: &Arc<Vec<(Uuid, String)>>,
) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(600);
    drive_grpc(
        clients,
        workers,
        CONNECTIONS * CALLERS_PER_CONNECTION,
        end,
        true,
    )
    .await?;
    Ok(())
}

/// `callers` loops sending heartbeats until `end` (or, with `once`, until
/// every worker beat once); returns successes and their latencies.
async fn drive_grpc(
    clients: &[WorkerServiceClient<tonic::transport::Channel>],
    workers: &Arc<Vec<(Uuid, String)>>,
    callers: usize,
    end: Instant,
    once: bool,
) -> anyhow::Result<(u64, Vec<Duration>)> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..callers {
        let mut client = clients[c % clients.len()].clone();
        let workers = workers.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            let mut errors = 0u64;
            let mut i = c;
            while Instant::now() < end {
                if i >= workers.len() {
                    if once {
                        break;
                    }
                    i = c % workers.len();
                }
                let (id, token) = &workers[i];
                let t = Instant::now();
                let r = client
                    .heartbeat(authed(
                        v1::HeartbeatRequest {
                            instance_id: id.to_string(),
                            idle: true,
                            ..Default::default()
                        },
                        token,
                    ))
                    .await;
                if r.is_ok() {
                    n += 1;
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
                i += callers;
            }
            (n, errors, lat)
        });
    }
    let (mut n, mut errors, mut lat) = (0, 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (a, e, l) = r?;
        n += a;
        errors += e;
        lat.extend(l);
    }
    anyhow::ensure!(
        errors * 100 <= n.max(1),
        "{errors} heartbeats failed ({n} ok)"
    );
    Ok((n, lat))
}

async fn batcher_load(
    pool: flotilla_store::PgPool,
    ids: &[Uuid],
    run: Duration,
) -> anyhow::Result<Outcome> {
    let batcher = HeartbeatBatcher::spawn(pool);
    let ids = Arc::new(ids.to_vec());
    let callers = CONNECTIONS * CALLERS_PER_CONNECTION;
    let started = Instant::now();
    let end = started + run;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..callers {
        let b = batcher.clone();
        let ids = ids.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut i = c % ids.len();
            while Instant::now() < end {
                let t = Instant::now();
                if let Ok(Some(_)) = b.beat(InstanceId(ids[i]), true, 0).await {
                    lat.push(t.elapsed());
                }
                i = (i + callers) % ids.len();
            }
            lat
        });
    }
    let mut lat = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat.extend(r?);
    }
    Ok(Outcome {
        rate: lat.len() as f64 / started.elapsed().as_secs_f64(),
        lat: Samples::new(lat),
    })
}
