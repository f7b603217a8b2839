//! Warm pools in the scheduler: the refill keeps `warm_size` machines
//! created and never started (the sim follows Fly: a create with
//! `skip_launch` leaves the machine `created` until `POST
//! /machines/{id}/start`, Fly Machines API OpenAPI document), a take
//! starts instead of creating, crashes around a take leave one machine per
//! instance, and the refill respects pauses and the spend cap.

use std::collections::BTreeMap;

use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_scheduler::CrashPoint;
use flotilla_sim_provider::Operation;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{InstanceRow, NewInstance, instance_insert_with_provision};
use flotilla_store::pool::{PoolUpdate, pool_update};
use flotilla_store::pool_pause::{pool_events_of, pool_pause};
use flotilla_store::spend::spend_room;
use flotilla_store::warm::{TAKEN_REASON, WarmTake, warm_stock, warm_take};
use flotilla_test_utils::stack::instant;
use flotilla_test_utils::{DEADLINE, eventually_ok, run_out_leases};
use sqlx::Acquire;

use super::{Env, assert_one_machine_each, env, provision_all, request, rows, scheduler, tuning};

async fn set_warm(env: &Env, n: i32) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_update(
        &mut conn,
        "gpu",
        &PoolUpdate {
            warm_size: Some(n),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
}

fn calls(env: &Env, op: Operation) -> u64 {
    env.stack.sim.sim().stats().total(op)
}

async fn warm_rows(env: &Env) -> Vec<InstanceRow> {
    rows(env)
        .await
        .into_iter()
        .filter(|r| r.state == InstanceState::Warm)
        .collect()
}

/// Capacity and provisioning activations until the pool holds `n` warm
/// machines and nothing of it is still provisioning.
async fn fill(s: &flotilla_scheduler::Scheduler, env: &Env, n: usize) {
    eventually_ok("warm stock filled", DEADLINE, || async {
        s.capacity_once().await;
        provision_all(s, env).await;
        match warm_rows(env).await.len() {
            have if have == n => Ok(()),
            have => Err(format!("{have} of {n} warm")),
        }
    })
    .await
}

/// What `Provision` does in its transaction: warm stock first, the rest
/// created cold; the ids, taken first.
async fn take(env: &Env, names: &[&str]) -> (Vec<InstanceRow>, Vec<InstanceId>) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let ctx = WriteCtx::new("api:test");
    let takes: Vec<WarmTake> = names
        .iter()
        .map(|n| WarmTake {
            name: (*n).to_owned(),
            labels: BTreeMap::from([("team".to_owned(), "ml".to_owned())]),
            idempotency_key: Some("k1".into()),
        })
        .collect();
    let taken = warm_take(&mut tx, &ctx, "gpu", &takes).await.unwrap();
    let cold: Vec<NewInstance> = names[taken.len()..]
        .iter()
        .map(|n| NewInstance {
            id: InstanceId::new(),
            pool: "gpu".into(),
            name: (*n).to_owned(),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let created = instance_insert_with_provision(&mut tx, &ctx, &cold)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (taken, created.iter().map(|r| r.id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refill_creates_warm_size_machines_never_started_and_no_further() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    set_warm(&env, 3).await;
    fill(&s, &env, 3).await;
    for _ in 0..3 {
        s.capacity_once().await;
        s.provision_once().await;
    }
    let warm = warm_rows(&env).await;
    assert_eq!(warm.len(), 3);
    assert_eq!(rows(&env).await.len(), 3, "no further");
    assert!(warm.iter().all(|r| r.desired_state == DesiredState::Warm));
    assert_eq!(calls(&env, Operation::Create), 3);
    assert_eq!(
        calls(&env, Operation::Start),
        0,
        "a warm machine is never started"
    );
    for m in env.stack.sim.sim().machines() {
        assert_eq!(m.machine.state.to_string(), "created", "{:?}", m.machine.id);
    }
    let ids: Vec<InstanceId> = warm.iter().map(|r| r.id).collect();
    assert_one_machine_each(&env, &ids).await;
    // Warm stock does not serve: capacity of 0 requests nothing, and the
    // stock costs nothing against a cap.
    let mut conn = env.db.pool.acquire().await.unwrap();
    let room = spend_room(
        &mut conn,
        "gpu",
        &flotilla_core::price::PriceTable::parse("shared-cpu-1x=1.5").unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(room.rate, 0, "warm machines are priced stopped");
    let events: Vec<_> = pool_events_of(&mut conn, "gpu")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.0 == "warm_refilled")
        .collect();
    assert_eq!(events.len(), 1, "one event per refill batch: {events:?}");

    // Shrunk: the surplus is let go (the terminator deletes it).
    set_warm(&env, 1).await;
    s.capacity_once().await;
    let stock = warm_stock(&mut conn, "gpu").await.unwrap();
    assert_eq!(stock.total(), 1);
    let let_go = rows(&env)
        .await
        .into_iter()
        .filter(|r| r.desired_state == DesiredState::Terminated)
        .count();
    assert_eq!(let_go, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_takes_warm_first_the_provider_sees_starts_not_creates_and_the_rest_is_cold() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    set_warm(&env, 2).await;
    fill(&s, &env, 2).await;
    let machines_before: BTreeMap<InstanceId, String> = warm_rows(&env)
        .await
        .into_iter()
        .map(|r| (r.id, r.provider_machine_id.unwrap()))
        .collect();
    assert_eq!(calls(&env, Operation::Create), 2);

    // Three asked for, two warm: two taken, one created cold.
    let (taken, cold) = take(&env, &["a", "b", "c"]).await;
    assert_eq!(taken.len(), 2);
    assert_eq!(cold.len(), 1);
    for r in &taken {
        assert_eq!(r.state, InstanceState::Provisioning);
        assert_eq!(r.desired_state, DesiredState::Running);
        assert!(r.warm_taken_at.is_some());
        assert_eq!(r.labels.0.get("team").map(String::as_str), Some("ml"));
        assert!(
            machines_before.contains_key(&r.id),
            "a warm row keeps its id"
        );
    }
    assert_eq!(
        taken.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    provision_all(&s, &env).await;
    let all = rows(&env).await;
    for r in &taken {
        let now = all.iter().find(|x| x.id == r.id).unwrap();
        assert_eq!(now.state, InstanceState::Booting);
        assert_eq!(
            now.provider_machine_id.as_ref(),
            machines_before.get(&r.id),
            "started the warm machine, not a new one"
        );
    }
    assert_eq!(
        calls(&env, Operation::Create),
        3,
        "only the cold one was created"
    );
    assert_eq!(
        calls(&env, Operation::Start),
        3,
        "two warm starts, one cold"
    );
    let history: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT to_state, reason FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id",
    )
    .bind(taken[0].id.0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let states: Vec<&str> = history.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        states,
        [
            "requested",
            "provisioning",
            "warm",
            "provisioning",
            "booting"
        ]
    );
    assert_eq!(history[3].1.as_deref(), Some(TAKEN_REASON));

    // The pool refills in the background.
    fill(&s, &env, 2).await;
    assert_eq!(calls(&env, Operation::Create), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_starting_a_taken_warm_machine_or_creating_one_leaves_one_machine_per_instance()
 {
    let env = env(instant()).await;
    // Dies right after the create of a warm machine, before recording it.
    let crashing = scheduler(&env, "s1", Some(CrashPoint::AfterCreate), tuning(&[]));
    set_warm(&env, 1).await;
    crashing.capacity_once().await;
    crashing.provision_once().await;
    assert_eq!(calls(&env, Operation::Create), 1);
    assert!(warm_rows(&env).await.is_empty(), "died before recording");
    run_out_leases(&env.db.pool, "s1").await;
    // The next attempt adopts the machine by its tag: still one create.
    let s2 = scheduler(
        &env,
        "s2",
        None,
        tuning(&["--provision-listing-settle-seconds", "0"]),
    );
    fill(&s2, &env, 1).await;
    assert_eq!(
        calls(&env, Operation::Create),
        1,
        "adopted, not created again"
    );

    // Dies right after starting the taken machine, before `booting`.
    let (taken, _) = take(&env, &["a"]).await;
    assert_eq!(taken.len(), 1);
    let crashing = scheduler(&env, "s3", Some(CrashPoint::AfterStart), tuning(&[]));
    crashing.provision_once().await;
    run_out_leases(&env.db.pool, "s3").await;
    let s4 = scheduler(&env, "s4", None, tuning(&[]));
    provision_all(&s4, &env).await;
    let row = rows(&env)
        .await
        .into_iter()
        .find(|r| r.id == taken[0].id)
        .unwrap();
    assert_eq!(row.state, InstanceState::Booting);
    assert_eq!(
        calls(&env, Operation::Create),
        1,
        "the take created nothing"
    );
    let ids: Vec<InstanceId> = rows(&env).await.iter().map(|r| r.id).collect();
    assert_one_machine_each(&env, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_pool_is_not_refilled_and_gives_no_warm_machine() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    set_warm(&env, 1).await;
    fill(&s, &env, 1).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_pause(&mut conn, &WriteCtx::new("test"), "gpu", "operator")
        .await
        .unwrap();
    let (taken, cold) = take(&env, &["a"]).await;
    assert!(taken.is_empty(), "a paused pool's machines fail to start");
    assert_eq!(cold.len(), 1);
    set_warm(&env, 3).await;
    for _ in 0..3 {
        s.capacity_once().await;
    }
    assert_eq!(warm_stock(&mut conn, "gpu").await.unwrap().total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_stock_stops_at_what_the_spend_cap_could_start() {
    let env = env(instant()).await;
    let s = scheduler(
        &env,
        "s1",
        None,
        tuning(&["--instance-prices", "shared-cpu-1x=1.5"]),
    );
    // 1.50 spent by a running instance; the cap of 4 leaves room to
    // start one more (3.00), not two (4.50): one warm machine, not five.
    request(&env, 1).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_update(
        &mut conn,
        "gpu",
        &PoolUpdate {
            spend_cap_per_hour_micros: Some(4_000_000),
            warm_size: Some(5),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    for _ in 0..3 {
        s.capacity_once().await;
        provision_all(&s, &env).await;
    }
    assert_eq!(warm_stock(&mut conn, "gpu").await.unwrap().total(), 1);
    let refilled: Vec<String> = pool_events_of(&mut conn, "gpu")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.0 == "warm_refilled")
        .map(|e| e.3.unwrap_or_default())
        .collect();
    assert!(
        refilled.iter().any(|r| r.contains("spend cap")),
        "{refilled:?}"
    );
}
