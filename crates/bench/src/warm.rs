//! Row: `Provision` → `ready` for one instance taken from warm stock (a
//! created, stopped machine: started) against one created cold, p50/p99,
//! with the simulated cloud at the providers' published typical latencies
//! (`Faults::published_typical`: create 2 s, start 300 ms, and where each
//! figure comes from). The provider's cost is the point of this row, so
//! unlike the others it does not run at zero latency.
//!
//! The pipeline is production's in one process (api, relay, JetStream,
//! scheduler with its warm refill, provider-adapter, sim). The bench plays
//! the agents: once an instance is `booting` and its machine `started` at
//! the simulator, it reports READY with the machine's token. Requests are
//! sent one every 100 ms (open loop), each measured from the send to its
//! row reading `ready`. Warm first: the pool's `warm_size` is the number of
//! requests and the stock is full before the first is sent, so every
//! request is served warm (the refill running meanwhile, as in
//! production); then `warm_size` 0, the stock let go, and the same number
//! cold.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_sim_provider::Faults;
use tokio::task::JoinSet;

use crate::env::{API_TOKEN, POOL, authed, wait_until};
use crate::ready::Pipeline;
use crate::stats::Samples;
use crate::table::{Line, ms};
use crate::{Ctx, Row};

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let n: usize = if ctx.quick { 3 } else { 20 };
    let typical = Faults::published_typical();
    let p = Arc::new(
        Pipeline::start_with(ctx, &["--scheduler-tick-ms", "100"], typical.clone()).await?,
    );
    let stop = p.stop.clone();
    let reporter = tokio::spawn(report_ready(p.clone()));

    // Warm: fill the stock, then take it.
    set_warm(&p, n as i32).await?;
    let pool = p.db.pool.clone();
    wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
        let pool = pool.clone();
        async move {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM instances WHERE state = 'warm' AND desired_state = 'warm'",
            )
            .fetch_one(&pool)
            .await?;
            Ok(held >= n as i64)
        }
    })
    .await?;
    let warm = measure(&p, n, "warm").await?;
    let taken: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE warm_taken_at IS NOT NULL")
            .fetch_one(&p.db.pool)
            .await?;
    anyhow::ensure!(taken as usize == n, "only {taken} of {n} served warm");

    // Cold: no stock left (the refill lets it go), then the same calls.
    set_warm(&p, 0).await?;
    let pool = p.db.pool.clone();
    wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
        let pool = pool.clone();
        async move {
            let stock: i64 =
                sqlx::query_scalar("SELECT count(*) FROM instances WHERE desired_state = 'warm'")
                    .fetch_one(&pool)
                    .await?;
            Ok(stock == 0)
        }
    })
    .await?;
    let cold = measure(&p, n, "cold").await?;
    stop.cancel();
    reporter.abort();

    let ratio = cold.median().as_secs_f64() / warm.median().as_secs_f64().max(1e-6);
    Ok(vec![Line::new(
        Row::Warm.label(),
        format!(
            "warm p50 {} / p99 {}; cold p50 {} / p99 {} ({n} each)",
            ms(warm.median()),
            ms(warm.pct(99.0)),
            ms(cold.median()),
            ms(cold.pct(99.0)),
        ),
        format!(
            "sim at published typical: create {} ms, start {} ms",
            typical.create_delay_ms, typical.start_delay_ms
        ),
        format!("cold p50 {ratio:.1}x of warm"),
        "warm p50 < cold p50",
        Some(warm.median() < cold.median()),
    )])
}

async fn set_warm(p: &Pipeline, n: i32) -> anyhow::Result<()> {
    sqlx::query("UPDATE pools SET warm_size = $2 WHERE name = $1")
        .bind(POOL)
        .bind(n)
        .execute(&p.db.pool)
        .await?;
    Ok(())
}

/// `n` Provision calls of one instance, 100 ms apart; each one's time
/// from its send to its row reading `ready`.
async fn measure(p: &Arc<Pipeline>, n: usize, tag: &str) -> anyhow::Result<Samples> {
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..n {
        tick.tick().await;
        let (p, lat) = (p.clone(), lat.clone());
        let key = format!("bench-{tag}-{i}");
        tasks.spawn(async move {
            let sent = Instant::now();
            let answer = p
                .fleet
                .clone()
                .provision(authed(
                    v1::ProvisionRequest {
                        pool: POOL.into(),
                        count: 1,
                        idempotency_key: key,
                        ..Default::default()
                    },
                    API_TOKEN,
                ))
                .await?
                .into_inner();
            let id: uuid::Uuid = answer
                .instances
                .first()
                .ok_or_else(|| anyhow::anyhow!("no instance"))?
                .id
                .parse()?;
            let deadline = sent + Duration::from_secs(60);
            loop {
                let state: String = sqlx::query_scalar("SELECT state FROM instances WHERE id = $1")
                    .bind(id)
                    .fetch_one(&p.db.pool)
                    .await?;
                if state == "ready" {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "{id} {state} after 60 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lat.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(sent.elapsed());
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let v = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Samples::new(v))
}

/// Plays the agents: an instance `booting` whose machine is `started` at
/// the simulator reports READY once, with the machine's token.
async fn report_ready(p: Arc<Pipeline>) -> anyhow::Result<()> {
    let mut reported: HashSet<uuid::Uuid> = HashSet::new();
    loop {
        let booting: Vec<(uuid::Uuid, String)> = sqlx::query_as(
            "SELECT id, provider_machine_id FROM instances
             WHERE state = 'booting' AND provider_machine_id IS NOT NULL",
        )
        .fetch_all(&p.db.pool)
        .await?;
        for (id, machine) in booting {
            if reported.contains(&id) {
                continue;
            }
            let Some(m) = p.provider.sim.sim().machine(&machine) else {
                continue;
            };
            if m.machine.state.to_string() != "started" {
                continue;
            }
            let Some(token) = m.machine.config.env.get("FLOTILLA_WORKER_TOKEN").cloned() else {
                continue;
            };
            let r = p
                .worker
                .clone()
                .report_phase(authed(
                    v1::ReportPhaseRequest {
                        instance_id: id.to_string(),
                        phase: v1::WorkerPhase::Ready as i32,
                        message: String::new(),
                    },
                    &token,
                ))
                .await;
            if r.is_ok() {
                reported.insert(id);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
