//! The orphan scan and abandoned instances: an instance an operator gave
//! up (its provider gone for good) may have left its machine and volumes,
//! and the scan deletes what it still finds of them one orphan grace after
//! the abandon; abandoning itself calls no provider; a pool deleted while
//! it held an abandoned instance is still scanned where its machines lived.

use std::time::{Duration, Instant};

use flotilla_core::{InstanceId, InstanceState};
use flotilla_sim_provider::{ErrorRates, Operation, Stats};
use flotilla_store::WriteCtx;
use flotilla_store::instance::{Abandon, InstanceRow, instance_abandon};
use flotilla_store::pool_delete::{PoolDeletion, pool_delete};
use flotilla_test_utils::fleet::{ReadySpec, ready_instances};
use flotilla_test_utils::metrics::value;
use flotilla_test_utils::stack::documented;

use super::{Env, count, env, get, scheduler, watchdog};

/// Longer than the tests' `--orphan-grace-seconds 1`. The sleeps of it are
/// lower bounds (the scan must see resources older than the grace), which a
/// busy machine only exceeds further, not waits for something to happen.
const PAST_GRACE: Duration = Duration::from_millis(1100);

async fn one_ready(env: &Env, volume: bool) -> InstanceRow {
    let spec = ReadySpec {
        volume,
        ..ReadySpec::default()
    };
    ready_instances(&env.db.pool, &env.stack.client, 1, &spec)
        .await
        .remove(0)
}

async fn abandon(env: &Env, id: InstanceId) -> InstanceRow {
    let mut conn = env.db.pool.acquire().await.unwrap();
    match instance_abandon(
        &mut conn,
        &WriteCtx::new("api:ops"),
        id,
        "the provider account was closed",
    )
    .await
    .unwrap()
    {
        Abandon::Abandoned { row, .. } => *row,
        Abandon::AlreadyTerminal(row) => panic!("{} was terminal already", row.state),
    }
}

fn machine_state(env: &Env, id: &str) -> String {
    env.stack
        .sim
        .sim()
        .machine(id)
        .map_or_else(|| "gone".to_owned(), |m| m.machine.state.to_string())
}

fn provider_calls(stats: &Stats) -> u64 {
    Operation::ALL.iter().map(|op| stats.total(*op)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_instances_machine_and_volume_are_orphans_one_grace_after_the_abandon() {
    let env = env(documented()).await;
    let row = one_ready(&env, true).await;
    let machine = row.provider_machine_id.clone().unwrap();
    let volume: String = sqlx::query_scalar(
        "SELECT provider_volume_id FROM instance_volumes WHERE instance_id = $1",
    )
    .bind(row.id.0)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    let w = watchdog(&env, "w1", &[]);
    // Both older than the grace: only the abandonment can hold them back.
    tokio::time::sleep(PAST_GRACE).await;
    let (_, owned) = w.orphans_once().await;
    assert!(
        owned.orphan_machines.is_empty() && owned.orphan_volumes.is_empty(),
        "a live instance's: {owned:?}"
    );

    let abandoned = abandon(&env, row.id).await;
    let (_, first) = w.orphans_once().await;
    assert!(
        first.deleted_machines.is_empty() && first.deleted_volumes.is_empty(),
        "not on the listing of the moment it was given up: {first:?}"
    );
    assert_eq!(machine_state(&env, &machine), "started");

    // A grace later the scan still finds them: a second look, and they go.
    let volumes_deleted = r#"flotilla_volume_deletes_total{service="watchdog",outcome="deleted"}"#;
    let deleted_before = value(volumes_deleted);
    tokio::time::sleep(PAST_GRACE).await;
    let (_, second) = w.orphans_once().await;
    assert_eq!(second.deleted_machines, std::slice::from_ref(&machine));
    let state = machine_state(&env, &machine);
    assert!(
        ["destroying", "destroyed", "gone"].contains(&state.as_str()),
        "{state}"
    );
    assert!(second.lost_instances.is_empty() && second.missing_instances.is_empty());
    // The volume follows once the destroyed machine lets go of it (Fly
    // keeps it bound a moment and refuses its delete until then).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut deleted = second.deleted_volumes;
    while !deleted.contains(&volume) {
        assert!(Instant::now() < deadline, "volume {volume} never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
        deleted.extend(w.orphans_once().await.1.deleted_volumes);
    }
    // The scan wrote nothing on the row: it says what the operator did.
    let after = get(&env, row.id).await;
    assert_eq!(after.state, InstanceState::Abandoned);
    assert_eq!(after.version, abandoned.version);
    // Its history says what the scan deleted of it, and why.
    let orphans: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, reason FROM action_logs
         WHERE instance_id = $1 AND action = 'orphan_deleted' ORDER BY id",
    )
    .bind(row.id.0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        orphans.len(),
        2,
        "the machine, then the volume: {orphans:?}"
    );
    assert!(orphans.iter().all(|(actor, _)| actor == "watchdog"));
    assert!(
        orphans[0].1.contains(&machine) && orphans[0].1.contains("abandoned"),
        "{orphans:?}"
    );
    assert!(orphans[1].1.contains(&volume), "{orphans:?}");
    assert!(
        value(volumes_deleted) >= deleted_before + 1.0,
        "the delete counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_calls_no_provider_and_the_scan_deletes_the_machine_once_the_provider_answers() {
    let env = env(documented()).await;
    let row = one_ready(&env, false).await;
    let machine = row.provider_machine_id.clone().unwrap();
    let sim = env.stack.sim.sim();
    // The provider is gone: every call fails.
    sim.update_faults(|f| {
        f.error_rate_all = ErrorRates {
            rate_503: 1.0,
            ..ErrorRates::default()
        }
    })
    .unwrap();
    let before = provider_calls(&sim.stats());
    abandon(&env, row.id).await;
    assert_eq!(
        provider_calls(&sim.stats()),
        before,
        "abandoning makes no provider call"
    );
    assert_eq!(get(&env, row.id).await.state, InstanceState::Abandoned);

    // While the provider is down the scan sees nothing and deletes nothing.
    let w = watchdog(&env, "w1", &[]);
    tokio::time::sleep(PAST_GRACE).await;
    let (status, down) = w.orphans_once().await;
    assert!(!status.errors.is_empty(), "the listing failed");
    assert!(down.deleted_machines.is_empty(), "{down:?}");

    // It answers again, and still has the machine: an orphan now.
    sim.update_faults(|f| f.error_rate_all = ErrorRates::default())
        .unwrap();
    let (_, back) = w.orphans_once().await;
    assert_eq!(back.deleted_machines, [machine]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_deleted_while_it_held_an_abandoned_instance_is_still_scanned_where_it_lived() {
    let env = env(documented()).await;
    let row = one_ready(&env, false).await;
    let machine = row.provider_machine_id.clone().unwrap();
    let mut conn = env.db.pool.acquire().await.unwrap();
    let deletion = pool_delete(
        &mut conn,
        &WriteCtx::new("api:ops"),
        "gpu",
        true,
        "region closed",
    )
    .await
    .unwrap();
    assert!(
        matches!(deletion, PoolDeletion::Deleting { live: 1, .. }),
        "{deletion:?}"
    );
    // Its teardown can never finish there: the operator gives it up, and
    // the scheduler's capacity loop deletes the pool, nothing of it live.
    abandon(&env, row.id).await;
    scheduler(&env).capacity_once().await;
    assert_eq!(count(&env, "SELECT count(*) FROM pools").await, 0);

    let w = watchdog(&env, "w1", &[]);
    tokio::time::sleep(PAST_GRACE).await;
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.deleted_machines, [machine]);
}
