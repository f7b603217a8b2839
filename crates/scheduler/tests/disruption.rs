//! Voluntary disruption in pool capacity: the disruption budget bounds
//! scale-down of serving instances, max lifetime surges (the replacement is
//! `ready` before the old instance is drained) and idle stop reclaims idle
//! instances above the desired capacity, never below it. Dead workers are
//! replaced whatever the budget says.

use flotilla_core::disruption::{Budget, REPLACES_LABEL};
use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_scheduler::Scheduler;
use flotilla_store::action_log::action_log_for_instance;
use flotilla_store::instance::InstanceRow;
use flotilla_store::pool::{PoolUpdate, pool_set_desired_capacity, pool_update};
use flotilla_store::worker::{HEARTBEAT_MARK_EVERY, worker_heartbeat_batch};
use flotilla_test_utils::fleet::step;
use flotilla_test_utils::metrics::value;
use flotilla_test_utils::stack::instant;
use prost::Message;

use super::{Env, age, env, provision_all, request, rows, scheduler, tuning};

async fn set(env: &Env, u: PoolUpdate) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_update(&mut conn, "gpu", &u, None).await.unwrap();
}

/// Moves every booting instance to `ready`, as a worker's report would.
async fn ready_all(env: &Env) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    for r in rows(env).await {
        if InstanceState::BOOT_PHASES.contains(&r.state) {
            step(&mut conn, &r, InstanceState::Ready).await;
        }
    }
}

/// Ends an instance as the terminator would once the provider confirmed
/// its machine gone.
async fn terminated(env: &Env, ids: &[InstanceId]) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    sqlx::query("UPDATE instances SET state = 'terminated' WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&env.db.pool)
        .await
        .unwrap();
}

fn marked(rows: &[InstanceRow], why: &str) -> Vec<InstanceId> {
    rows.iter()
        .filter(|r| r.disruption.as_deref() == Some(why) && !r.state.is_terminal())
        .map(|r| r.id)
        .collect()
}

/// The `action` of each `EVT.instance.disrupted` event in the outbox.
async fn disrupted_events(env: &Env) -> Vec<(String, String)> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE subject = 'EVT.instance.disrupted' ORDER BY id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    payloads
        .iter()
        .map(|p| {
            let e = v1::InstanceEvent::decode(p.as_slice()).unwrap();
            (e.instance_id, e.action)
        })
        .collect()
}

/// `(action, reason)` of every act in the instance's history.
async fn acts(env: &Env, id: InstanceId) -> Vec<(String, String)> {
    let mut conn = env.db.pool.acquire().await.unwrap();
    action_log_for_instance(&mut conn, id.0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| Some((r.action?, r.reason.unwrap_or_default())))
        .collect()
}

/// A pool of `n` ready instances capacity manages.
async fn ready_pool(env: &Env, s: &Scheduler, n: i32) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_set_desired_capacity(&mut conn, "gpu", n, None)
        .await
        .unwrap();
    tick(s).await;
    provision_all(s, env).await;
    ready_all(env).await;
}

/// One capacity activation, which must not fail.
async fn tick(s: &Scheduler) {
    let status = s.capacity_once().await;
    assert!(status.errors.is_empty(), "{:?}", status.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_of_serving_instances_takes_at_most_the_budget_at_once() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    ready_pool(&env, &s, 10).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_set_desired_capacity(&mut conn, "gpu", 0, None)
        .await
        .unwrap();

    // The default budget, 10 % of 10: one at a time, however many ticks.
    let held_before = value(r#"flotilla_disruptions_held_total{pool="gpu",reason="scale_down"}"#);
    tick(&s).await;
    tick(&s).await;
    let first = marked(&rows(&env).await, "scale_down");
    assert_eq!(first.len(), 1, "10% of 10 is one");
    assert!(
        value(r#"flotilla_disruptions_held_total{pool="gpu",reason="scale_down"}"#) > held_before,
        "what the budget held is counted"
    );
    assert_eq!(
        value(r#"flotilla_pool_disrupted_instances{pool="gpu"}"#),
        1.0
    );
    let row = rows(&env)
        .await
        .into_iter()
        .find(|r| r.id == first[0])
        .unwrap();
    assert_eq!(row.desired_state, DesiredState::Terminated);
    assert!(
        acts(&env, first[0])
            .await
            .contains(&("terminate_requested".into(), "scale down".into())),
        "the history says why"
    );
    assert_eq!(
        disrupted_events(&env).await,
        vec![(first[0].to_string(), "scale_down".to_owned())],
        "one event, naming the disruption"
    );

    // Once it is gone, the next one goes.
    terminated(&env, &first).await;
    tick(&s).await;
    let second = marked(&rows(&env).await, "scale_down");
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);

    // A larger budget lets more go at once; 0 holds them all.
    set(
        &env,
        PoolUpdate {
            disruption_budget: Some(Budget::Count(3)),
            ..Default::default()
        },
    )
    .await;
    tick(&s).await;
    assert_eq!(marked(&rows(&env).await, "scale_down").len(), 3);
    terminated(&env, &marked(&rows(&env).await, "scale_down")).await;
    set(
        &env,
        PoolUpdate {
            disruption_budget: Some(Budget::Count(0)),
            ..Default::default()
        },
    )
    .await;
    tick(&s).await;
    assert!(marked(&rows(&env).await, "scale_down").is_empty());
    let serving = rows(&env)
        .await
        .iter()
        .filter(|r| r.state == InstanceState::Ready && r.desired_state == DesiredState::Running)
        .count();
    assert_eq!(serving, 6, "10 - 1 - 3: the rest held by a budget of 0");

    // A dead worker is involuntary: its replacement is not held.
    pool_set_desired_capacity(&mut conn, "gpu", 6, None)
        .await
        .unwrap();
    let victim = rows(&env)
        .await
        .into_iter()
        .find(|r| r.state == InstanceState::Ready && r.desired_state == DesiredState::Running)
        .unwrap();
    step(&mut conn, &victim, InstanceState::WorkerDead).await;
    tick(&s).await;
    let requested = rows(&env)
        .await
        .iter()
        .filter(|r| r.state == InstanceState::Requested)
        .count();
    assert_eq!(
        requested, 1,
        "the dead worker is replaced under a budget of 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_not_serving_yet_are_scaled_down_without_the_budget() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_set_desired_capacity(&mut conn, "gpu", 4, None)
        .await
        .unwrap();
    tick(&s).await;
    set(
        &env,
        PoolUpdate {
            disruption_budget: Some(Budget::Count(0)),
            ..Default::default()
        },
    )
    .await;
    pool_set_desired_capacity(&mut conn, "gpu", 0, None)
        .await
        .unwrap();
    tick(&s).await;
    let all = rows(&env).await;
    assert_eq!(all.len(), 4);
    assert!(
        all.iter()
            .all(|r| r.desired_state == DesiredState::Terminated),
        "no work is disrupted by taking what is not serving: {all:?}"
    );
    assert!(marked(&all, "scale_down").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_instance_is_drained_only_once_its_replacement_is_ready() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    ready_pool(&env, &s, 3).await;
    set(
        &env,
        PoolUpdate {
            max_lifetime_seconds: Some(3600),
            ..Default::default()
        },
    )
    .await;
    // Not yet expired: nothing happens.
    tick(&s).await;
    assert!(marked(&rows(&env).await, "expiring").is_empty());
    let old: Vec<InstanceId> = rows(&env).await.iter().map(|r| r.id).collect();
    age(&env, &old, 7200).await;

    // 10 % of 3: one surge at a time, however many ticks.
    tick(&s).await;
    tick(&s).await;
    let all = rows(&env).await;
    let expiring = marked(&all, "expiring");
    assert_eq!(expiring.len(), 1);
    assert_eq!(all.len(), 4, "one replacement, requested once");
    let replacement = all.iter().find(|r| !old.contains(&r.id)).unwrap().clone();
    assert_eq!(
        replacement.labels.0.get(REPLACES_LABEL),
        Some(&expiring[0].to_string())
    );
    assert!(
        all.iter()
            .filter(|r| old.contains(&r.id))
            .all(|r| r.desired_state == DesiredState::Running && r.state == InstanceState::Ready),
        "every old instance still serves while its replacement boots"
    );
    assert_eq!(
        acts(&env, expiring[0]).await,
        vec![(
            "replacement_requested".into(),
            "max lifetime reached; replacement requested".into()
        )]
    );

    // The replacement boots: the old one still serves.
    provision_all(&s, &env).await;
    tick(&s).await;
    let old_row = |rows: &[InstanceRow]| rows.iter().find(|r| r.id == expiring[0]).unwrap().clone();
    assert_eq!(
        old_row(&rows(&env).await).desired_state,
        DesiredState::Running
    );
    // Ready: now the old one is drained, and only it.
    ready_all(&env).await;
    tick(&s).await;
    let all = rows(&env).await;
    let gone = old_row(&all);
    assert_eq!(gone.desired_state, DesiredState::Terminated);
    assert_eq!(gone.disruption.as_deref(), Some("expired"));
    assert_eq!(all.len(), 4, "no second replacement");
    let events: Vec<String> = disrupted_events(&env)
        .await
        .into_iter()
        .filter(|(id, _)| *id == expiring[0].to_string())
        .map(|(_, action)| action)
        .collect();
    assert_eq!(events, ["expiring", "expired"]);

    // The next one waits for the budget: until the drained one is gone.
    tick(&s).await;
    assert!(marked(&rows(&env).await, "expiring").is_empty());
    terminated(&env, &expiring).await;
    tick(&s).await;
    let next = marked(&rows(&env).await, "expiring");
    assert_eq!(next.len(), 1);
    assert_ne!(next, expiring);

    // Its replacement fails before it is ready: the old one is never
    // drained for it, and another replacement is asked for.
    let failed = rows(&env)
        .await
        .into_iter()
        .find(|r| r.labels.0.get(REPLACES_LABEL) == Some(&next[0].to_string()))
        .unwrap();
    sqlx::query("UPDATE instances SET state = 'provisioning_failed' WHERE id = $1")
        .bind(failed.id.0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    tick(&s).await;
    let all = rows(&env).await;
    let old_next = all.iter().find(|r| r.id == next[0]).unwrap();
    assert_eq!(old_next.desired_state, DesiredState::Running);
    tick(&s).await;
    let again: Vec<_> = rows(&env)
        .await
        .into_iter()
        .filter(|r| {
            r.labels.0.get(REPLACES_LABEL) == Some(&next[0].to_string())
                && r.state == InstanceState::Requested
                && r.desired_state == DesiredState::Running
        })
        .collect();
    assert_eq!(
        again.len(),
        1,
        "a new replacement for the still-serving instance"
    );
    let coming = rows(&env)
        .await
        .iter()
        .filter(|r| r.state == InstanceState::Requested && r.desired_state == DesiredState::Running)
        .count();
    assert_eq!(coming, 1, "and nothing else: the gap is not filled twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_above_the_desired_capacity_are_drained_never_below_it() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    // Four asked for explicitly, in a pool whose minimum is one.
    request(&env, 4).await;
    provision_all(&s, &env).await;
    ready_all(&env).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_set_desired_capacity(&mut conn, "gpu", 1, None)
        .await
        .unwrap();
    set(
        &env,
        PoolUpdate {
            idle_timeout_seconds: Some(300),
            disruption_budget: Some(Budget::Percent(100)),
            ..Default::default()
        },
    )
    .await;
    let all = rows(&env).await;
    let ids: Vec<uuid::Uuid> = all.iter().map(|r| r.id.0).collect();
    let db = env.db.pool.clone();
    let beat = |idle: bool, seq: i64| {
        let (ids, db) = (ids.clone(), db.clone());
        async move {
            let mut conn = db.acquire().await.unwrap();
            let n = ids.len();
            worker_heartbeat_batch(
                &mut conn,
                &ids,
                &vec![idle; n],
                &vec![seq; n],
                HEARTBEAT_MARK_EVERY,
            )
            .await
            .unwrap();
        }
    };
    beat(true, 1).await;
    // Idle, but not for long enough.
    tick(&s).await;
    assert!(marked(&rows(&env).await, "idle").is_empty());

    // A busy beat restarts the count; an idle one after it does not
    // go back to the first.
    let ids_typed: Vec<InstanceId> = all.iter().map(|r| r.id).collect();
    age(&env, &ids_typed, 600).await;
    beat(false, 2).await;
    beat(true, 3).await;
    tick(&s).await;
    assert!(
        marked(&rows(&env).await, "idle").is_empty(),
        "idle since the last busy beat only"
    );
    let row = rows(&env).await.remove(0);
    assert!(row.idle_since.is_some());

    age(&env, &ids_typed, 600).await;
    tick(&s).await;
    tick(&s).await;
    let all = rows(&env).await;
    let idle = marked(&all, "idle");
    assert_eq!(idle.len(), 3, "down to the desired capacity, not below");
    let serving = all
        .iter()
        .filter(|r| r.desired_state == DesiredState::Running)
        .count();
    assert_eq!(serving, 1);
    assert!(acts(&env, idle[0]).await.contains(&(
        "terminate_requested".into(),
        "idle for the pool's idle timeout".into()
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stop_spends_the_budget_too() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    request(&env, 4).await;
    provision_all(&s, &env).await;
    ready_all(&env).await;
    set(
        &env,
        PoolUpdate {
            idle_timeout_seconds: Some(60),
            ..Default::default()
        },
    )
    .await;
    let all = rows(&env).await;
    let ids: Vec<uuid::Uuid> = all.iter().map(|r| r.id.0).collect();
    let mut conn = env.db.pool.acquire().await.unwrap();
    worker_heartbeat_batch(&mut conn, &ids, &[true; 4], &[1; 4], HEARTBEAT_MARK_EVERY)
        .await
        .unwrap();
    let typed: Vec<InstanceId> = all.iter().map(|r| r.id).collect();
    age(&env, &typed, 120).await;
    tick(&s).await;
    tick(&s).await;
    assert_eq!(
        marked(&rows(&env).await, "idle").len(),
        1,
        "the default budget: 10 % of 4, rounded up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_taken_from_warm_stock_ages_from_its_take() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    ready_pool(&env, &s, 1).await;
    set(
        &env,
        PoolUpdate {
            max_lifetime_seconds: Some(3600),
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<InstanceId> = rows(&env).await.iter().map(|r| r.id).collect();
    // Made two hours ago, held warm, taken a minute ago.
    age(&env, &ids, 7200).await;
    sqlx::query("UPDATE instances SET warm_taken_at = now() - interval '1 minute'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    tick(&s).await;
    assert!(marked(&rows(&env).await, "expiring").is_empty());
    sqlx::query("UPDATE instances SET warm_taken_at = now() - interval '2 hours'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    tick(&s).await;
    assert_eq!(marked(&rows(&env).await, "expiring"), ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stop_with_the_stop_action_sends_idle_instances_back_to_warm_stock() {
    let env = env(instant()).await;
    let s = scheduler(&env, "s1", None, tuning(&[]));
    request(&env, 2).await;
    provision_all(&s, &env).await;
    ready_all(&env).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_update(
        &mut conn,
        "gpu",
        &PoolUpdate {
            idle_timeout_seconds: Some(60),
            idle_action: Some(flotilla_core::disruption::IdleAction::Stop),
            disruption_budget: Some(Budget::Percent(100)),
            warm_size: Some(2),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let all = rows(&env).await;
    let ids: Vec<uuid::Uuid> = all.iter().map(|r| r.id.0).collect();
    worker_heartbeat_batch(&mut conn, &ids, &[true; 2], &[1; 2], HEARTBEAT_MARK_EVERY)
        .await
        .unwrap();
    let typed: Vec<InstanceId> = all.iter().map(|r| r.id).collect();
    age(&env, &typed, 120).await;
    tick(&s).await;
    let after = rows(&env).await;
    let idle: Vec<&InstanceRow> = after
        .iter()
        .filter(|r| r.disruption.as_deref() == Some("idle"))
        .collect();
    assert_eq!(idle.len(), 2, "desired capacity 0: both go");
    assert!(
        idle.iter().all(|r| r.desired_state == DesiredState::Warm),
        "kept as warm stock, not terminated"
    );
    assert!(
        acts(&env, idle[0].id).await.contains(&(
            "drain_requested".into(),
            flotilla_store::disruption::IDLE_TO_WARM_REASON.into()
        )),
        "the history says where it goes"
    );
    // The warm refill counts them as coming: it creates nothing more.
    assert_eq!(after.len(), 2, "no new warm machine while these come back");
}
