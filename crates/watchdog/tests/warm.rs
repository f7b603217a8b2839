//! Warm stock in the orphan scan: a live warm instance's machine (created,
//! never started: Fly's `skip_launch`, which the sim follows) is expected
//! and stopped, so it is never an orphan; the warm machine of an instance
//! the database has as terminated is one; and a warm machine gone from the
//! provider makes its instance `lost` like any other (not replaced: the
//! refill makes new stock).

use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_test_utils::fleet::warm_instances;
use flotilla_test_utils::stack::documented;
use flotilla_test_utils::{DEADLINE, eventually_some};

use super::{age_rows, count, destroy_behind_our_back, env, get, watchdog};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_machine_of_a_terminated_instance_is_an_orphan_but_a_live_warm_one_never_is() {
    let env = env(documented()).await;
    let warm = warm_instances(&env.db.pool, &env.stack.client, 3).await;
    let gone = &warm[0];
    // The database says it is done, but its machine is still there.
    sqlx::query(
        "UPDATE instances SET state = 'terminated', desired_state = 'terminated' WHERE id = $1",
    )
    .bind(gone.id.0)
    .execute(&env.db.pool)
    .await
    .unwrap();
    let ids: Vec<InstanceId> = warm.iter().map(|r| r.id).collect();
    age_rows(&env, &ids, 3600.0, true).await;
    let dry = watchdog(&env, "w0", &["--watchdog-dry-run", "true"]);
    let report = eventually_some("the orphan past its grace age", DEADLINE, || async {
        let (_, report) = dry.orphans_once().await;
        (!report.orphan_machines.is_empty()).then_some(report)
    })
    .await;
    assert_eq!(
        report.orphan_machines,
        [gone.provider_machine_id.clone().unwrap()],
        "only the terminated instance's warm machine"
    );
    assert!(report.missing_instances.is_empty(), "{report:?}");
    let w = watchdog(&env, "w1", &[]);
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.deleted_machines, report.orphan_machines);
    assert!(report.lost_instances.is_empty());
    for r in &warm[1..] {
        assert_eq!(get(&env, r.id).await.state, InstanceState::Warm);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_machine_gone_from_the_provider_makes_its_instance_lost_without_a_replacement() {
    let env = env(documented()).await;
    let warm = warm_instances(&env.db.pool, &env.stack.client, 2).await;
    let ids: Vec<InstanceId> = warm.iter().map(|r| r.id).collect();
    age_rows(&env, &ids, 3600.0, true).await;
    destroy_behind_our_back(&env, ids[0]).await;
    let w = watchdog(&env, "w1", &[]);
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.lost_instances, [ids[0]]);
    let lost = get(&env, ids[0]).await;
    assert_eq!(lost.state, InstanceState::Lost);
    assert_eq!(lost.desired_state, DesiredState::Terminated);
    assert_eq!(get(&env, ids[1]).await.state, InstanceState::Warm);
    assert_eq!(
        count(&env, "SELECT count(*) FROM instances").await,
        2,
        "warm stock is refilled by the scheduler, not replaced here"
    );
}
