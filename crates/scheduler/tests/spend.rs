//! Spend caps in pool capacity: the loop fills a pool only as far as its
//! cap allows, marks and reports the episode once however many ticks it
//! lasts, and fills the rest once the cap is lifted.

use flotilla_store::pool::{PoolUpdate, pool_get, pool_update};
use flotilla_store::pool_pause::pool_events_of;
use flotilla_test_utils::stack::instant;

use super::{env, request, rows, scheduler, tuning};

/// The reasons of the pool's audit-log rows of `action`.
async fn said(conn: &mut sqlx::PgConnection, action: &str) -> Vec<String> {
    pool_events_of(conn, "gpu")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.0 == action)
        .map(|e| e.3.unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_stops_at_the_spend_cap_says_so_once_and_fills_once_the_cap_is_lifted() {
    let env = env(instant()).await;
    // shared-cpu-1x at 1.50 an hour; the pool may spend 5 an hour.
    let s = scheduler(
        &env,
        "s1",
        None,
        tuning(&["--instance-prices", "shared-cpu-1x=1.5"]),
    );
    let mut conn = env.db.pool.acquire().await.unwrap();
    // An explicit instance costs too: 1.50 spent before capacity acts.
    request(&env, 1).await;
    pool_update(
        &mut conn,
        "gpu",
        &PoolUpdate {
            desired_capacity: Some(6),
            spend_cap_per_hour_micros: Some(5_000_000),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        s.capacity_once().await;
    }
    assert_eq!(
        rows(&env).await.len(),
        3,
        "4.50 of 5: two more fit, not five"
    );
    let pool = pool_get(&mut conn, "gpu").await.unwrap().unwrap();
    assert!(pool.spend_capped_since.is_some(), "the pool is marked");
    let started = said(&mut conn, "spend_capped").await;
    assert_eq!(started.len(), 1, "one episode, said once: {started:?}");
    assert!(
        started[0].contains("4.5/h") && started[0].contains("5/h"),
        "{}",
        started[0]
    );

    // A terminated instance no longer costs: one more fits, still short.
    sqlx::query(
        "UPDATE instances SET state = 'terminated', desired_state = 'terminated'
         WHERE id = (SELECT id FROM instances ORDER BY id LIMIT 1)",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    s.capacity_once().await;
    let live = rows(&env)
        .await
        .iter()
        .filter(|r| !r.state.is_terminal())
        .count();
    assert_eq!(live, 3, "3 of 5 an hour again: 4.50");
    assert_eq!(said(&mut conn, "spend_capped").await.len(), 1);

    // Lifted: the pool fills and the episode ends, said once.
    pool_update(
        &mut conn,
        "gpu",
        &PoolUpdate {
            spend_cap_per_hour_micros: Some(0),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    s.capacity_once().await;
    s.capacity_once().await;
    let live = rows(&env)
        .await
        .iter()
        .filter(|r| !r.state.is_terminal())
        .count();
    assert_eq!(live, 6);
    let pool = pool_get(&mut conn, "gpu").await.unwrap().unwrap();
    assert!(pool.spend_capped_since.is_none(), "the mark is cleared");
    assert_eq!(said(&mut conn, "spend_cap_cleared").await.len(), 1);
    assert_eq!(said(&mut conn, "spend_capped").await.len(), 1);
}
