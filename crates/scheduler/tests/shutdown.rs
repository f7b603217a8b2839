//! Graceful shutdown of the scheduler as the binary runs it
//! (`flotilla_scheduler::run`): cancelled while provider calls are in
//! flight, it returns within its grace period, gives back every lease, does
//! nothing more afterwards, and the next replica resumes the work at once
//! without creating a second machine for anyone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_core::InstanceId;
use flotilla_scheduler::{Scheduler, SchedulerArgs};
use flotilla_sim_provider::model::MachineState;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{NewInstance, instance_insert_requested};
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::stack::{instant, provider_stack};
use flotilla_test_utils::{DEADLINE, TestDb, TestNats, connections_closed, eventually_ok};

type Snapshot = Vec<(uuid::Uuid, String, i64, Option<String>)>;

async fn snapshot(db: &TestDb) -> Snapshot {
    sqlx::query_as("SELECT id, state, version, lease_owner FROM instances ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_mid_provisioning_it_returns_in_its_grace_releases_its_leases_and_the_next_replica_resumes()
 {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let stack = provider_stack(instant(), &[]).await;
    let (sim, adapter_url) = (&stack.sim, stack.url.clone());
    let mut conn = db.pool.acquire().await.expect("conn");
    pool_create(
        &mut conn,
        &NewPool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            image: "registry/worker:1".into(),
            ..Default::default()
        },
    )
    .await
    .expect("pool");
    let new: Vec<NewInstance> = (0..4)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: "gpu".into(),
            name: format!("w-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .expect("requested");
    // Every provider answer takes 5 s: the first step is in flight when
    // the stop comes, and cannot finish inside a 1 s grace.
    sim.sim()
        .update_faults(|f| f.latency_ms = 5_000)
        .expect("faults");

    let args = SchedulerArgs::try_parse_from([
        "scheduler",
        "--provider-adapter-url",
        &adapter_url,
        "--provider-adapter-token",
        flotilla_test_utils::stack::SERVICE_TOKEN,
        "--database-url",
        &db.url_as("stopped-scheduler"),
        "--nats-url",
        &nats.url,
        "--nats-namespace",
        &nats.namespace,
        "--metrics-addr=",
        "--scheduler-tick-ms",
        "50",
        // Far longer than the test: only a release lets another replica in.
        "--scheduler-lease-seconds",
        "600",
        "--shutdown-grace-seconds",
        "1",
    ])
    .expect("flags");
    let stop = CancellationToken::new();
    let service = tokio::spawn(flotilla_scheduler::run(args, stop.clone()));

    // Wait until every instance is claimed, its intent committed.
    eventually_ok("every instance claimed", DEADLINE, || async {
        let rows = snapshot(&db).await;
        if rows
            .iter()
            .all(|(_, state, _, owner)| state == "provisioning" && owner.is_some())
        {
            Ok(())
        } else {
            Err(rows)
        }
    })
    .await;

    let cancelled = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), service)
        .await
        .expect("run returns within the grace period (1 s), not after the 5 s calls")
        .expect("no panic")
        .expect("run succeeds");
    println!("scheduler stopped {:?} after cancel", cancelled.elapsed());

    let after = snapshot(&db).await;
    assert!(
        after.iter().all(|(_, _, _, owner)| owner.is_none()),
        "every lease given back: {after:?}"
    );
    // Nothing of the stopped replica acts any more: once it holds no
    // connection, nothing of it can write.
    connections_closed(&db.pool, "stopped-scheduler").await;
    assert_eq!(snapshot(&db).await, after, "no write after run returned");

    // The next replica takes over at once (the leases would hold it off
    // for 10 minutes) and creates no second machine for anyone.
    sim.sim()
        .update_faults(|f| f.latency_ms = 0)
        .expect("faults");
    let next = Scheduler {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: SchedulerArgs::try_parse_from([
            "scheduler",
            "--provider-adapter-url",
            "http://unused",
            "--scheduler-tick-ms",
            "50",
            "--scheduler-lease-seconds",
            "600",
        ])
        .map(|a| a.tuning)
        .unwrap_or_else(|e| panic!("{e}")),
        owner: "next-replica".into(),
        worker_api_url: "http://127.0.0.1:1".into(),
        crash_after: None,
    };
    let stop_next = CancellationToken::new();
    let next_task = tokio::spawn(next.run(None, stop_next.clone()));
    eventually_ok("the next replica to finish", DEADLINE, || async {
        let rows = snapshot(&db).await;
        if rows.iter().all(|(_, state, _, _)| state == "booting") {
            Ok(())
        } else {
            Err(rows)
        }
    })
    .await;

    let live = sim
        .sim()
        .machines()
        .into_iter()
        .filter(|m| m.machine.state != MachineState::Destroyed)
        .count();
    assert_eq!(live, 4, "one machine per instance, none duplicated");
    stop_next.cancel();
    let _ = next_task.await;
}
