//! Spend in the watchdog's gauges: each pool's spend rate and cap sampled
//! with the fleet gauges, and orphan machines priced by the pool that made
//! them, else the price table, else (as before the table) the pools of
//! their instance type.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use flotilla_core::InstanceId;
use flotilla_core::price::PriceTable;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{NewInstance, instance_insert_requested};
use flotilla_store::pool::{NewPool, pool_create, pool_list};
use flotilla_test_utils::stack::documented;
use flotilla_watchdog::{OrphanReport, orphan_cost_micros};

use super::{env, watchdog};

/// The value of one series in a Prometheus rendering.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn pool(conn: &mut sqlx::PgConnection, name: &str, ty: &str, price: i64, cap: i64) {
    pool_create(
        conn,
        &NewPool {
            name: name.into(),
            provider: "sim".into(),
            instance_type: ty.into(),
            region: "ams".into(),
            price_per_hour_micros: price,
            spend_cap_per_hour_micros: cap,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn each_pools_spend_rate_and_cap_are_sampled_with_the_fleet_gauges() {
    let metrics = flotilla_telemetry::metrics::install();
    let env = env(documented()).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    // Named for this test alone: the recorder is the whole binary's.
    pool(&mut conn, "spendy", "shared-cpu-1x", 0, 3_000_000).await;
    let new: Vec<NewInstance> = (0..3)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: "spendy".into(),
            name: format!("s-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .unwrap();
    // A terminated instance costs nothing.
    sqlx::query("UPDATE instances SET state = 'terminated' WHERE id = $1")
        .bind(new[0].id.0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let w = watchdog(&env, "w1", &["--instance-prices", "shared-cpu-1x=0.75"]);
    let status = w.fleet_metrics_once(&Mutex::new(HashSet::new())).await;
    assert!(status.errors.is_empty(), "{status:?}");
    let text = metrics.render();
    assert_eq!(
        sample(&text, r#"flotilla_pool_spend_per_hour{pool="spendy"}"#),
        Some(1.5),
        "two live instances at 0.75:\n{text}"
    );
    assert_eq!(
        sample(&text, r#"flotilla_pool_spend_cap_per_hour{pool="spendy"}"#),
        Some(3.0),
        "{text}"
    );
}

#[tokio::test]
async fn orphan_machines_are_priced_by_their_pool_then_the_table_then_the_pools_of_their_type() {
    let env = env(documented()).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    // `gpu` (shared-cpu-1x, no price of its own) comes with the env.
    pool(&mut conn, "own", "a10", 2_000_000, 0).await;
    pool(&mut conn, "legacy", "old-1x", 300_000, 0).await;
    let pools = pool_list(&mut conn).await.unwrap();
    let table = PriceTable::parse("shared-cpu-1x=0.5,a10=1").unwrap();
    let orphans = [
        ("shared-cpu-1x", "gpu", 500_000), // the table: gpu has no price
        ("a10", "own", 2_000_000),         // its pool's own price
        ("a10", "deleted-long-ago", 1_000_000), // no such pool: the table
        ("old-1x", "gone", 300_000),       // unpriced by the table: pools of its type
        ("mystery-1x", "gone", 0),         // priced by nobody: free
    ];
    let report = OrphanReport {
        orphan_machine_types: orphans.iter().map(|o| o.0.to_owned()).collect(),
        orphan_machine_pools: orphans.iter().map(|o| o.1.to_owned()).collect(),
        ..Default::default()
    };
    let expected: i64 = orphans.iter().map(|o| o.2).sum();
    assert_eq!(orphan_cost_micros(&report, &pools, &table), expected);
    // Without the table, prices come from the pools as before it existed.
    assert_eq!(
        orphan_cost_micros(&report, &pools, &PriceTable::default()),
        2_000_000 + 2_000_000 + 300_000
    );
}
