//! Raw limits of this machine, measured in the same run as the figures they
//! stand beside: what PostgreSQL alone does with the simplest statement of
//! the same shape, without any Flotilla code in the way.

use std::time::{Duration, Instant};

use flotilla_store::PgPool;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::stats::Samples;

/// Single-row autocommit INSERTs per second with `clients` connections in
/// parallel: every commit is a WAL flush, the floor under any state
/// transition.
pub async fn commit_rate(url: &str, clients: usize, run: Duration) -> anyhow::Result<f64> {
    let mut setup = PgConnection::connect(url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_raw_commit (id BIGSERIAL PRIMARY KEY, v BIGINT NOT NULL)",
    )
    .execute(&mut setup)
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let url = url.to_owned();
        tasks.spawn(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let end = Instant::now() + run;
            let mut n = 0u64;
            while Instant::now() < end {
                sqlx::query("INSERT INTO bench_raw_commit (v) VALUES ($1)")
                    .bind(c as i64)
                    .execute(&mut conn)
                    .await?;
                n += 1;
            }
            anyhow::Ok(n)
        });
    }
    let started = Instant::now();
    let mut total = 0;
    while let Some(r) = tasks.join_next().await {
        total += r??;
    }
    let elapsed = started.elapsed();
    sqlx::query("DROP TABLE bench_raw_commit")
        .execute(&mut setup)
        .await?;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Rows per second moved by back-to-back 1,000-row
/// `UPDATE … FROM UNNEST(…)` of `last_heartbeat` on the instances table,
/// one connection: what one heartbeat flusher could do at best.
pub async fn batched_update_rate(
    pool: &PgPool,
    ids: &[Uuid],
    run: Duration,
) -> anyhow::Result<f64> {
    let mut conn = pool.acquire().await?;
    let end = Instant::now() + run;
    let started = Instant::now();
    let mut rows = 0u64;
    let mut chunks = ids.chunks(1000).cycle();
    while Instant::now() < end {
        let Some(chunk) = chunks.next() else { break };
        let idle: Vec<bool> = vec![true; chunk.len()];
        rows += sqlx::query(
            "UPDATE instances i SET last_heartbeat = now(), worker_idle = v.idle
             FROM UNNEST($1::uuid[], $2::bool[]) AS v(id, idle) WHERE i.id = v.id",
        )
        .bind(chunk)
        .bind(&idle)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// Median time of the ideal stale-heartbeat lookup: a narrow table of `n`
/// rows (0.1% stale) with a covering index on the heartbeat, answered by
/// an index-only scan. The floor for any watchdog scan.
pub async fn ideal_scan(pool: &PgPool, n: usize, limit: i64) -> anyhow::Result<Duration> {
    sqlx::query("CREATE TABLE bench_raw_scan (id UUID PRIMARY KEY, hb TIMESTAMPTZ NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO bench_raw_scan
         SELECT gen_random_uuid(),
                CASE WHEN i % 1000 = 0 THEN now() - interval '1 day'
                     ELSE now() - random() * interval '5 seconds' END
         FROM generate_series(1, $1) AS i",
    )
    .bind(n as i64)
    .execute(pool)
    .await?;
    sqlx::query("CREATE INDEX bench_raw_scan_hb ON bench_raw_scan (hb) INCLUDE (id)")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE bench_raw_scan")
        .execute(pool)
        .await?;
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        let _: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM bench_raw_scan WHERE hb < now() - interval '30 minutes'
             ORDER BY hb LIMIT $1",
        )
        .bind(limit)
        .fetch_all(pool)
        .await?;
        times.push(t.elapsed());
    }
    sqlx::query("DROP TABLE bench_raw_scan")
        .execute(pool)
        .await?;
    Ok(Samples::new(times).median())
}
