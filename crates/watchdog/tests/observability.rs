//! What the watchdog leaves for on-call: dead verdicts the storm guard
//! held and machines its orphan scan adopted, in each instance's history;
//! the heartbeats the fleet should send, in its metrics.

use flotilla_core::InstanceState;
use flotilla_store::worker::worker_registered;
use flotilla_test_utils::metrics::value;
use flotilla_test_utils::stack::documented;

use super::{PAST_TIMEOUT, age, env, get, heartbeat, instance_in, machine, ready, watchdog};

/// `(instance, reason)` of the history rows with `action`, by instance.
async fn acts(env: &super::Env, action: &str) -> Vec<(uuid::Uuid, String)> {
    sqlx::query_as(
        "SELECT instance_id, reason FROM action_logs WHERE action = $1 ORDER BY instance_id, id",
    )
    .bind(action)
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_dead_verdict_is_in_each_instances_history_once_per_hold_not_per_tick() {
    let env = env(documented()).await;
    let ids = ready(&env, 8).await;
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "0.4"]);
    // Half the pool goes silent at once: held, pass after pass.
    age(&env, &ids, PAST_TIMEOUT).await;
    heartbeat(&env, &ids[4..]).await;
    for _ in 0..3 {
        w.dead_workers_once().await;
    }
    let mut silent: Vec<uuid::Uuid> = ids[..4].iter().map(|i| i.0).collect();
    silent.sort();
    let held = acts(&env, "dead_verdict_held").await;
    assert_eq!(
        held.iter().map(|h| h.0).collect::<Vec<_>>(),
        silent,
        "one row per held instance, not one per pass: {held:?}"
    );
    assert!(
        held.iter().all(|h| h
            .1
            .starts_with("storm guard: 4 of 8 ready workers of pool gpu")),
        "{held:?}"
    );
    // One more goes silent while the hold lasts: only it is added.
    age(&env, &ids[4..5], PAST_TIMEOUT).await;
    w.dead_workers_once().await;
    let held = acts(&env, "dead_verdict_held").await;
    assert_eq!(held.len(), 5, "{held:?}");
    assert_eq!(held.iter().filter(|h| h.0 == ids[4].0).count(), 1);
    for id in &ids {
        assert_eq!(get(&env, *id).await.state, InstanceState::Ready, "held");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_the_orphan_scan_adopts_is_in_the_instances_history() {
    let env = env(documented()).await;
    // The create's answer was lost: the row has no machine, the provider
    // has one tagged with it.
    let id = instance_in(&env.db, &[InstanceState::Provisioning]).await;
    let m = machine(&env, id).await;
    let (_, report) = watchdog(&env, "w1", &[]).orphans_once().await;
    assert_eq!(report.adopted_machines, std::slice::from_ref(&m.id));
    assert_eq!(get(&env, id).await.provider_machine_id, Some(m.id.clone()));
    let adopted: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, reason FROM action_logs WHERE instance_id = $1 AND action = 'machine_adopted'",
    )
    .bind(id.0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].0, "watchdog");
    assert!(adopted[0].1.contains(&m.id), "{adopted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeats_expected_are_one_per_interval_of_each_registered_ready_worker() {
    // The recorder is installed before the watchdog sets the gauge.
    flotilla_test_utils::metrics::scrape();
    let env = env(documented()).await;
    let ids = ready(&env, 3).await;
    let booting = instance_in(
        &env.db,
        &[InstanceState::Provisioning, InstanceState::Booting],
    )
    .await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    // Two ready agents told 500 ms and 2 s; the third ready worker never
    // registered (known by its health checks); a booting agent does not
    // heartbeat yet.
    worker_registered(&mut conn, ids[0], 500).await.unwrap();
    worker_registered(&mut conn, ids[1], 2000).await.unwrap();
    worker_registered(&mut conn, booting, 1000).await.unwrap();
    let status = watchdog(&env, "w1", &[])
        .fleet_metrics_once(&Default::default())
        .await;
    assert!(status.errors.is_empty(), "{status:?}");
    // No other test of this binary samples the fleet gauges.
    let expected = value("flotilla_heartbeats_expected_per_second");
    assert!(
        (expected - 2.5).abs() < 1e-9,
        "2 + 0.5 per second: {expected}"
    );
    // A worker that stops being ready is no longer expected to beat.
    sqlx::query("UPDATE instances SET state = 'worker_dead' WHERE id = $1")
        .bind(ids[0].0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    watchdog(&env, "w1", &[])
        .fleet_metrics_once(&Default::default())
        .await;
    let expected = value("flotilla_heartbeats_expected_per_second");
    assert!((expected - 0.5).abs() < 1e-9, "{expected}");
}
