//! Row: the watchdog's per-tick stale-heartbeat scan at 100k and 1M
//! instances with 0.1% stale, beside the ideal lookup (an index-only scan of
//! a narrow table holding only ids and heartbeats).
//!
//! What is timed is what every watchdog tick runs before it looks at any
//! suspect: `watchdog_clear_recovered` and `watchdog_claim_silent` with the
//! default batch (500), through the store functions themselves. Between
//! repetitions the claimed leases are given back so each repetition finds
//! the same work; the median of 9 is reported.

use std::time::{Duration, Instant};

use flotilla_store::watchdog::{watchdog_claim_silent, watchdog_clear_recovered};

use crate::env::{BenchDb, POOL};
use crate::stats::Samples;
use crate::table::{Line, ms, thousands};
use crate::{Ctx, Row, raw};

/// The heartbeat timeout of the scan. Not the default 30 s: inserting 1M
/// fixture rows takes about a minute here, and the fresh heartbeats must not
/// age past the timeout during the setup. The scan's work is the same (the
/// stale rows are a day old, the fresh ones seconds old).
const TIMEOUT: Duration = Duration::from_secs(1800);
const BATCH: i64 = 500;
const OWNER: &str = "watchdog-bench";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let mut lines = Vec::new();
    for &size in &ctx.scan_sizes {
        lines.push(match one(ctx, size).await {
            Ok(l) => l,
            Err(e) => Line::not_measured(
                format!("{} @ {}", Row::Scan.label(), thousands(size as f64)),
                format!("{e:#}"),
            ),
        });
    }
    Ok(lines)
}

async fn one(ctx: &Ctx, size: usize) -> anyhow::Result<Line> {
    let db = BenchDb::new(ctx).await?;
    db.create_pool().await?;
    // Fresh heartbeats spread over the last 5 s; every 1000th is a day old.
    // The mark is what a heartbeat write leaves (see flotilla_store::worker).
    let mut from = 0usize;
    while from < size {
        let to = (from + 200_000).min(size);
        sqlx::query(
            "INSERT INTO instances (id, pool, name, provider, state, last_heartbeat, heartbeat_mark)
             SELECT gen_random_uuid(), $1, 'w-' || i, 'sim', 'ready', hb, hb
             FROM (SELECT i, CASE WHEN i % 1000 = 0 THEN now() - interval '1 day'
                                  ELSE now() - random() * interval '5 seconds' END AS hb
                   FROM generate_series($2::int, $3::int) AS i) AS s",
        )
        .bind(POOL)
        .bind(from as i32)
        .bind(to as i32 - 1)
        .execute(&db.pool)
        .await?;
        from = to;
    }
    sqlx::query("VACUUM ANALYZE instances")
        .execute(&db.pool)
        .await?;
    let stale = size.div_ceil(1000);

    let mut total = Vec::new();
    let mut claim_only = Vec::new();
    let mut found = 0;
    for _ in 0..9 {
        let t = Instant::now();
        {
            let mut conn = db.pool.acquire().await?;
            watchdog_clear_recovered(&mut conn, TIMEOUT).await?;
        }
        let c = Instant::now();
        let rows =
            watchdog_claim_silent(&db.pool, TIMEOUT, OWNER, Duration::from_secs(30), BATCH).await?;
        claim_only.push(c.elapsed());
        total.push(t.elapsed());
        found = rows.len();
        sqlx::query(
            "UPDATE instances SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
        )
        .bind(OWNER)
        .execute(&db.pool)
        .await?;
    }
    anyhow::ensure!(
        found == stale.min(BATCH as usize),
        "claimed {found}, expected {}",
        stale.min(BATCH as usize)
    );
    let total = Samples::new(total).median();
    let claim = Samples::new(claim_only).median();
    let ideal = raw::ideal_scan(&db.pool, size, BATCH).await?;
    let target = Duration::from_millis(5);
    Ok(Line::new(
        format!("{} @ {}", Row::Scan.label(), thousands(size as f64)),
        format!(
            "{} per tick (claim {}, clear {}), {} stale",
            ms(total),
            ms(claim),
            ms(total.saturating_sub(claim)),
            thousands(stale as f64)
        ),
        format!("ideal index-only scan {}", ms(ideal)),
        format!(
            "{:.1}x of ideal",
            total.as_secs_f64() / ideal.as_secs_f64().max(1e-6)
        ),
        "<= 5 ms at 1M",
        Some(total <= target),
    ))
}
