//! Row: instances requested → `ready` per second, for one batch (10k by
//! default), beside the raw single-row commit rate of PostgreSQL.
//!
//! The pipeline is production's, in one process: gRPC `Provision` at the api
//! → outbox relay → JetStream `CMD.provision` → scheduler (default tuning)
//! → provider-adapter → simulated cloud at zero latency. The bench plays the
//! workers: as soon as a machine exists at the simulator it reports READY
//! with the token the machine was given, as the agent would, through the
//! worker gRPC API (that report is the proof `ready` requires).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_telemetry::CancellationToken;
use tokio::sync::Semaphore;

use crate::env::{
    API_TOKEN, BenchDb, BenchNats, POOL, ProviderSide, authed, channel, count_state, start_api,
};
use crate::table::{Line, thousands};
use crate::{Ctx, Row, raw};

/// Worker READY reports in flight at once (agents on many machines).
const REPORTERS: usize = 64;

/// The whole provision path in one process, with its own database and
/// NATS namespace.
pub struct Pipeline {
    pub db: BenchDb,
    pub nats: BenchNats,
    pub provider: ProviderSide,
    pub api: SocketAddr,
    pub fleet: FleetServiceClient<tonic::transport::Channel>,
    pub worker: WorkerServiceClient<tonic::transport::Channel>,
    pub stop: CancellationToken,
}

impl Pipeline {
    pub async fn start(ctx: &Ctx, scheduler_flags: &[&str]) -> anyhow::Result<Pipeline> {
        Self::start_with(ctx, scheduler_flags, crate::env::instant()).await
    }

    /// [`Pipeline::start`] with the sim's latencies set by `faults`.
    pub async fn start_with(
        ctx: &Ctx,
        scheduler_flags: &[&str],
        faults: flotilla_sim_provider::Faults,
    ) -> anyhow::Result<Pipeline> {
        let db = BenchDb::new(ctx).await?;
        db.create_pool().await?;
        let nats = BenchNats::new(ctx).await?;
        let bus = nats.bus().await?;
        let provider = ProviderSide::start_with(faults).await?;
        let stop = CancellationToken::new();
        let api = start_api(db.service_pool().await?, bus.clone(), 1000, &stop).await?;
        let mut flags: Vec<&str> = ctx.scheduler_flags.iter().map(String::as_str).collect();
        flags.extend_from_slice(scheduler_flags);
        let scheduler = crate::env::scheduler(
            db.service_pool().await?,
            provider.client.clone(),
            api,
            &flags,
        )?;
        tokio::spawn(scheduler.run(Some(bus), stop.clone()));
        let ch = channel(api).await?;
        Ok(Pipeline {
            db,
            nats,
            provider,
            api,
            fleet: FleetServiceClient::new(ch.clone()),
            worker: WorkerServiceClient::new(ch),
            stop,
        })
    }

    /// Sends `Provision` requests of at most 1,000 (the api's limit) for
    /// `n` instances, all at once.
    pub async fn provision(&self, n: usize, key: &str) -> anyhow::Result<()> {
        let mut calls = Vec::new();
        let mut left = n;
        let mut i = 0;
        while left > 0 {
            let count = left.min(1000);
            left -= count;
            let mut fleet = self.fleet.clone();
            let key = format!("{key}-{i}");
            i += 1;
            calls.push(async move {
                fleet
                    .provision(authed(
                        v1::ProvisionRequest {
                            pool: POOL.into(),
                            count: count as u32,
                            idempotency_key: key,
                            ..Default::default()
                        },
                        API_TOKEN,
                    ))
                    .await
            });
        }
        for r in futures::future::join_all(calls).await {
            r.context("Provision")?;
        }
        Ok(())
    }

    /// Plays the workers until `n` instances are `ready`: every machine
    /// that appears at the simulator reports READY once, with its token.
    pub async fn report_ready_until(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let mut cursor = 0;
        let permits = Arc::new(Semaphore::new(REPORTERS));
        let deadline = Instant::now() + limit;
        loop {
            let (created, next) = self.provider.sim.sim().machines_created_after(cursor);
            cursor = next;
            for m in created {
                let env = &m.machine.config.env;
                let (Some(id), Some(token)) = (
                    env.get("FLOTILLA_INSTANCE_ID").cloned(),
                    env.get("FLOTILLA_WORKER_TOKEN").cloned(),
                ) else {
                    continue;
                };
                let permit = permits.clone().acquire_owned().await?;
                let mut worker = self.worker.clone();
                tokio::spawn(async move {
                    // A report that races the scheduler's own `booting`
                    // write is answered by the api as it would be for an
                    // agent; one retry covers it.
                    for _ in 0..20 {
                        let r = worker
                            .report_phase(authed(
                                v1::ReportPhaseRequest {
                                    instance_id: id.clone(),
                                    phase: v1::WorkerPhase::Ready as i32,
                                    message: String::new(),
                                },
                                &token,
                            ))
                            .await;
                        if r.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    drop(permit);
                });
            }
            if count_state(&self.db.pool, "ready").await? >= n as i64 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} ready after {limit:?}",
                count_state(&self.db.pool, "ready").await?
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn commits(pool: &flotilla_store::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let n = ctx.instances;
    // Raw limits first, on an otherwise idle database.
    let scratch = BenchDb::new(ctx).await?;
    let raw1 = raw::commit_rate(&scratch.url, 1, ctx.measure).await?;
    let raw8 = raw::commit_rate(&scratch.url, 8, ctx.measure).await?;
    drop(scratch);

    let p = Pipeline::start(ctx, &[]).await?;
    let before = commits(&p.db.pool).await?;
    let started = Instant::now();
    p.provision(n, "bench-ready").await?;
    let accepted = started.elapsed();
    p.report_ready_until(n, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    // Statistics are flushed by each backend within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let per_instance = (commits(&p.db.pool).await? - before) as f64 / n as f64;
    let rate = n as f64 / elapsed.as_secs_f64();
    let target = 2000.0;
    let label = if ctx.scheduler_flags.is_empty() {
        Row::Ready.label().to_owned()
    } else {
        format!("{} ({})", Row::Ready.label(), ctx.scheduler_flags.join(" "))
    };
    Ok(vec![Line::new(
        label,
        format!(
            "{}/s ({} in {:.2} s; accepted in {:.2} s; ~{per_instance:.1} commits/instance)",
            thousands(rate),
            thousands(n as f64),
            elapsed.as_secs_f64(),
            accepted.as_secs_f64()
        ),
        format!(
            "PG commits {}/s (1 client), {}/s (8)",
            thousands(raw1),
            thousands(raw8)
        ),
        format!("{:.3}x of 8-client commits", rate / raw8),
        ">= 2,000/s",
        Some(rate >= target),
    )])
}
