//! Row: dead worker → `worker_dead` latency, p50/p99, against the configured
//! heartbeat timeout.
//!
//! Instances are provisioned and made ready through the real path; the bench
//! heartbeats every one of them through the worker gRPC API, then kills
//! them one at a time (stops its heartbeats and kills its machine at the
//! simulated cloud, as a crashed worker would), spaced so the storm guard
//! does not hold. The watchdog runs with its default tick; latency runs
//! from the kill to the `worker_dead` (or `lost`) action log row.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Parser;
use flotilla_proto::v1;
use flotilla_watchdog::{Watchdog, WatchdogTuning};

use crate::env::authed;
use crate::ready::Pipeline;
use crate::stats::Samples;
use crate::table::{Line, ms};
use crate::{Ctx, Row};

const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

#[derive(Parser)]
struct W {
    #[command(flatten)]
    t: WatchdogTuning,
}

struct Worker {
    id: String,
    token: String,
    machine: String,
}

/// Runs once with the default watchdog tick (1 s) and once with 250 ms:
/// detection is the timeout plus the wait for the next tick.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let ticks: &[u64] = if ctx.quick { &[250] } else { &[1000, 250] };
    let mut lines = Vec::new();
    for &tick_ms in ticks {
        lines.push(match one(ctx, tick_ms).await {
            Ok(l) => l,
            Err(e) => Line::not_measured(
                format!("{} (tick {tick_ms} ms)", Row::Detection.label()),
                format!("{e:#}"),
            ),
        });
    }
    Ok(lines)
}

async fn one(ctx: &Ctx, tick_ms: u64) -> anyhow::Result<Line> {
    // Kills are fewer than half the pool, so the storm guard never holds.
    let (n, kills, timeout_s) = if ctx.quick {
        (20usize, 6usize, 2u64)
    } else {
        (200, 100, 5)
    };
    let p = Pipeline::start(ctx, &[]).await?;
    p.provision(n, "bench-detect").await?;
    p.report_ready_until(n, Duration::from_secs(120)).await?;
    let workers: Vec<Worker> = p
        .provider
        .sim
        .sim()
        .machines()
        .into_iter()
        .filter_map(|m| {
            let env = &m.machine.config.env;
            Some(Worker {
                id: env.get("FLOTILLA_INSTANCE_ID")?.clone(),
                token: env.get("FLOTILLA_WORKER_TOKEN")?.clone(),
                machine: m.machine.id.clone(),
            })
        })
        .collect();
    anyhow::ensure!(
        workers.len() == n,
        "{} machines for {n} instances",
        workers.len()
    );
    let workers = Arc::new(workers);

    // Every live worker heartbeats through the api.
    let alive: Arc<Mutex<HashSet<usize>>> = Arc::new(Mutex::new((0..n).collect()));
    let beating = {
        let (alive, workers, worker, stop) = (
            alive.clone(),
            workers.clone(),
            p.worker.clone(),
            p.stop.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            while !stop.is_cancelled() {
                tick.tick().await;
                let now: Vec<usize> = alive
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect();
                let calls = now.into_iter().map(|i| {
                    let mut worker = worker.clone();
                    let w = &workers[i];
                    async move {
                        let _ = worker
                            .heartbeat(authed(
                                v1::HeartbeatRequest {
                                    instance_id: w.id.clone(),
                                    idle: true,
                                    ..Default::default()
                                },
                                &w.token,
                            ))
                            .await;
                    }
                });
                futures::future::join_all(calls).await;
            }
        })
    };
    // Let every worker's first heartbeat land before the watchdog looks.
    tokio::time::sleep(HEARTBEAT_EVERY * 2).await;

    let tick_ms_s = tick_ms.to_string();
    let timeout_str = timeout_s.to_string();
    let watchdog = Watchdog {
        db: p.db.service_pool().await?,
        provider: p.provider.client.clone(),
        tuning: W::try_parse_from([
            "watchdog",
            "--watchdog-tick-ms",
            &tick_ms_s,
            "--worker-heartbeat-timeout-seconds",
            &timeout_str,
            // Measure detection only: no replacements competing for the
            // database while it is measured.
            "--worker-dead-recovery-enabled",
            "false",
        ])?
        .t,
        owner: "watchdog-bench".into(),
    };
    tokio::spawn(watchdog.run(p.stop.clone()));

    // A ready instance another loop still holds a lease on cannot be
    // claimed by the watchdog until that lease expires: those are counted
    // and reported, and not killed, so the figure is the watchdog's.
    let leased: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT id, lease_owner FROM instances WHERE state = 'ready' AND lease_until > now()",
    )
    .fetch_all(&p.db.pool)
    .await?;
    let leased_ids: HashSet<String> = leased.iter().map(|(id, _)| id.to_string()).collect();
    let owners: HashSet<&str> = leased.iter().map(|(_, o)| o.as_str()).collect();

    // Kill one worker at a time, spaced so only a few are silent at once.
    let spacing = Duration::from_millis(if ctx.quick { 50 } else { 150 });
    let mut killed_at: HashMap<String, DateTime<Utc>> = HashMap::new();
    let victims = workers
        .iter()
        .enumerate()
        .filter(|(_, w)| !leased_ids.contains(&w.id))
        .take(kills);
    for (i, w) in victims {
        alive.lock().unwrap_or_else(|e| e.into_inner()).remove(&i);
        killed_at.insert(w.id.clone(), Utc::now());
        p.provider.sim.sim().kill(&w.machine);
        tokio::time::sleep(spacing).await;
    }

    let limit = Duration::from_secs(timeout_s + 60);
    let expected = kills.min(n - leased_ids.len());
    let pool = p.db.pool.clone();
    let waited = crate::env::wait_until(limit, Duration::from_millis(100), || {
        let pool = pool.clone();
        async move {
            let c: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM action_logs WHERE to_state IN ('worker_dead', 'lost')",
            )
            .fetch_one(&pool)
            .await?;
            Ok(c as usize >= expected)
        }
    })
    .await;
    if let Err(e) = waited {
        let now = states(&p.db.pool).await.unwrap_or_default();
        return Err(e.context(format!("waiting for {kills} dead workers; states: {now}")));
    }
    beating.abort();
    let rows: Vec<(uuid::Uuid, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT instance_id, at, to_state FROM action_logs WHERE to_state IN ('worker_dead', 'lost')",
    )
    .fetch_all(&p.db.pool)
    .await?;
    let mut wrongly = 0;
    let mut lost = 0;
    let mut lat = Vec::new();
    for (id, at, to) in rows {
        match killed_at.get(&id.to_string()) {
            Some(k) => {
                lat.push((at - *k).to_std().unwrap_or_default());
                if to == "lost" {
                    lost += 1;
                }
            }
            None => wrongly += 1,
        }
    }
    anyhow::ensure!(wrongly == 0, "{wrongly} live workers declared dead");
    let lat = Samples::new(lat);
    let timeout = Duration::from_secs(timeout_s);
    let p99 = lat.pct(99.0);
    Ok(Line::new(
        format!("{} (tick {tick_ms} ms)", Row::Detection.label()),
        format!(
            "p50 {} / p99 {} (max {}), {} kills{}",
            ms(lat.median()),
            ms(p99),
            ms(lat.max()),
            lat.len(),
            if lost > 0 {
                format!(", {lost} as lost")
            } else {
                String::new()
            },
        ) + &if leased.is_empty() {
            String::new()
        } else {
            format!(
                "; {} of {n} ready rows still leased by {} (unclaimable until expiry)",
                leased.len(),
                owners.into_iter().collect::<Vec<_>>().join(",")
            )
        },
        format!(
            "timeout {timeout_s} s (tick {tick_ms} ms, beats every {} ms)",
            HEARTBEAT_EVERY.as_millis()
        ),
        format!(
            "p99 {:.2}x of timeout",
            p99.as_secs_f64() / timeout.as_secs_f64()
        ),
        "p99 <= timeout + 1 s",
        Some(p99 <= timeout + Duration::from_secs(1)),
    ))
}

async fn states(pool: &flotilla_store::PgPool) -> anyhow::Result<String> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as(
            "SELECT state || '/' || COALESCE(lease_owner, '-') || '/' || COALESCE(suspect_since::text, '-'), count(*)
             FROM instances GROUP BY 1 ORDER BY 1",
        )
            .fetch_all(pool)
            .await?;
    Ok(rows
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>()
        .join(" "))
}
