//! Row: time for a provisioning backlog to resume after `kill -9` of the
//! scheduler and its restart, beside the same binary's cold start on the
//! same backlog.
//!
//! A backlog of `requested` instances is written to the database; the
//! scheduler binary is started (cold start: spawn → first instance
//! `booting`), killed with SIGKILL once a quarter of the backlog is through,
//! and started again. Resume: restart → the first instance the new process
//! moves to `booting`. The instances the killed process had claimed keep its
//! lease until it expires; how many is printed with the figure.

use std::time::{Duration, Instant};

use flotilla_core::InstanceId;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{NewInstance, instance_insert_requested};

use crate::env::{BenchDb, BenchNats, POOL, ProviderSide, Service, common_env, count_state};
use crate::table::{Line, ms};
use crate::{Ctx, Row};

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    // More than one claim batch (256 by default): what the killed process
    // had claimed waits for its lease, the rest shows when work resumes.
    let backlog = if ctx.quick { 1000 } else { 4000 };
    let db = BenchDb::new(ctx).await?;
    db.create_pool().await?;
    let nats = BenchNats::new(ctx).await?;
    nats.bus().await?;
    let provider = ProviderSide::start().await?;
    {
        let mut conn = db.pool.acquire().await?;
        let wctx = WriteCtx::new("bench");
        for chunk in (0..backlog).collect::<Vec<_>>().chunks(1000) {
            let new: Vec<NewInstance> = chunk
                .iter()
                .map(|i| NewInstance {
                    id: InstanceId::new(),
                    pool: POOL.into(),
                    name: format!("b-{i}"),
                    provider: "sim".into(),
                    labels: Default::default(),
                    idempotency_key: None,
                    worker_token_hash: None,
                })
                .collect();
            instance_insert_requested(&mut conn, &wctx, &new).await?;
        }
    }
    let mut env = common_env(&db, &nats);
    env.push(("PROVIDER_ADAPTER_URL", provider.url()));
    env.push(("WORKER_API_URL", "http://127.0.0.1:1".into()));

    // Cold start.
    let started = Instant::now();
    let mut first = Service::spawn(ctx, "scheduler", &env)?;
    let booting = |min: i64| {
        let pool = db.pool.clone();
        move || {
            let pool = pool.clone();
            async move { Ok(count_state(&pool, "booting").await? > min) }
        }
    };
    crate::env::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(5),
        booting(0),
    )
    .await?;
    let cold = started.elapsed();
    crate::env::wait_until(
        Duration::from_secs(120),
        Duration::from_millis(5),
        booting(backlog as i64 / 4),
    )
    .await?;

    // kill -9, then restart at once.
    first.child.start_kill()?;
    first.child.wait().await?;
    // A statement the dead process had already sent still commits in its
    // PostgreSQL backend: let those land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_kill = count_state(&db.pool, "booting").await?;
    let stranded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances
         WHERE state IN ('requested', 'provisioning') AND lease_until > now()",
    )
    .fetch_one(&db.pool)
    .await?;
    let restarted = Instant::now();
    let _second = Service::spawn(ctx, "scheduler", &env)?;
    crate::env::wait_until(
        Duration::from_secs(60),
        Duration::from_millis(5),
        booting(at_kill),
    )
    .await?;
    let resume = restarted.elapsed();
    // The rest of the backlog, except what the dead process still holds.
    let rest = backlog as i64 - stranded;
    crate::env::wait_until(
        Duration::from_secs(120),
        Duration::from_millis(20),
        booting(rest - 1),
    )
    .await?;
    let drained = restarted.elapsed();

    Ok(vec![Line::new(
        Row::Resume.label(),
        format!(
            "{} to first progress; unclaimed backlog done in {:.2} s; {stranded} held by the dead lease",
            ms(resume),
            drained.as_secs_f64()
        ),
        format!("cold start {}", ms(cold)),
        format!(
            "{:.2}x of cold start",
            resume.as_secs_f64() / cold.as_secs_f64().max(1e-6)
        ),
        "<= 2 s",
        Some(resume <= Duration::from_secs(2)),
    )])
}
