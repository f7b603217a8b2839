//! Warm stock let go: a pool deleted with warm machines (no `force`
//! needed, the stock is the pool's own) has each deleted directly — never
//! started, so nothing to stop, and Fly's refusal to delete a started
//! machine (the sim's 412, from the Machines API `Machines_delete`) never
//! applies — and the simulator holds no machine afterwards. An idle
//! instance of a pool whose idle action is `stop` is drained and stopped
//! like a termination, then returned to warm stock instead of deleted.

use flotilla_core::InstanceState;
use flotilla_sim_provider::Operation;
use flotilla_store::WriteCtx;
use flotilla_store::pool_delete::{
    DeletionProgress, PoolDeletion, pool_delete, pool_finish_deletion,
};
use flotilla_test_utils::fleet::warm_instances;
use flotilla_test_utils::stack::documented;

use flotilla_core::DesiredState;
use flotilla_store::disruption::disruption_mark_then;
use flotilla_test_utils::{DEADLINE, eventually_ok};

use super::{env, get, left_at_provider, ready, terminate_all, terminator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_deleted_with_warm_stock_deletes_each_warm_machine_and_leaves_none_behind() {
    let env = env(documented(), None).await;
    let warm = warm_instances(&env.db.pool, &env.stack.client, 3).await;
    assert!(warm.iter().all(|r| r.state == InstanceState::Warm));
    assert_eq!(left_at_provider(&env).0, 3);
    let mut conn = env.db.pool.acquire().await.unwrap();
    let ctx = WriteCtx::new("api:test");
    // Not forced: warm stock does not hold a deletion back.
    match pool_delete(&mut conn, &ctx, "gpu", false, "test")
        .await
        .unwrap()
    {
        PoolDeletion::Deleting { requested, .. } => assert_eq!(requested.len(), 3),
        other => panic!("{other:?}"),
    }
    let t = terminator(&env, "t1");
    terminate_all(&t, &env, 3).await;
    assert_eq!(left_at_provider(&env), (0, 0), "no leak");
    assert_eq!(
        env.stack.sim.sim().stats().total(Operation::Stop),
        0,
        "a warm machine was never started: nothing to stop"
    );
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT to_state FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id",
    )
    .bind(warm[0].id.0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        [
            "requested",
            "provisioning",
            "warm",
            "deleting",
            "terminated"
        ]
    );
    assert_eq!(
        pool_finish_deletion(&mut conn, &ctx, "gpu").await.unwrap(),
        DeletionProgress::Deleted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_sent_back_to_warm_stock_is_drained_stopped_and_kept_not_deleted() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 1, false).await;
    // What the worker last said, and what pool capacity decided.
    sqlx::query("UPDATE instances SET heartbeat_sequence = 42, last_heartbeat = now()")
        .execute(&env.db.pool)
        .await
        .unwrap();
    let mut conn = env.db.pool.acquire().await.unwrap();
    let marked = disruption_mark_then(
        &mut conn,
        &WriteCtx::new("scheduler"),
        &[ids[0].0],
        flotilla_core::disruption::Disruption::Idle,
        DesiredState::Warm,
    )
    .await
    .unwrap();
    assert_eq!(marked.len(), 1);
    let t = terminator(&env, "t1");
    eventually_ok("back in warm stock", DEADLINE, || async {
        t.terminate_once().await;
        match get(&env, ids[0]).await.state {
            InstanceState::Warm => Ok(()),
            s => Err(format!("still {s}")),
        }
    })
    .await;
    let row = get(&env, ids[0]).await;
    assert_eq!(row.desired_state, DesiredState::Warm);
    assert!(!row.cordoned, "its next run takes work");
    assert_eq!(row.disruption, None, "no longer spends the budget");
    assert_eq!(row.last_heartbeat, None);
    let seq: i64 = sqlx::query_scalar("SELECT heartbeat_sequence FROM instances")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(seq, 0, "the agent counts from 1 again on its next run");
    assert_eq!(left_at_provider(&env).0, 1, "the machine is kept");
    let sim = env.stack.sim.sim();
    assert_eq!(sim.stats().total(Operation::Stop), 1);
    assert_eq!(sim.stats().total(Operation::Delete), 0);
    let history: Vec<String> = sqlx::query_scalar(
        "SELECT to_state FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id",
    )
    .bind(ids[0].0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        &history[history.len() - 4..],
        ["draining", "stopping", "stopped", "warm"]
    );
    // Resting: further activations leave it alone.
    t.terminate_once().await;
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Warm);
}
