//! Warm stock let go: a pool deleted with warm machines (no `force`
//! needed, the stock is the pool's own) has each deleted directly — never
//! started, so nothing to stop, and Fly's refusal to delete a started
//! machine (the sim's 412, from the Machines API `Machines_delete`) never
//! applies — and the simulator holds no machine afterwards.

use flotilla_core::InstanceState;
use flotilla_sim_provider::Operation;
use flotilla_store::WriteCtx;
use flotilla_store::pool_delete::{
    DeletionProgress, PoolDeletion, pool_delete, pool_finish_deletion,
};
use flotilla_test_utils::fleet::warm_instances;
use flotilla_test_utils::stack::documented;

use super::{env, left_at_provider, terminate_all, terminator};

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
