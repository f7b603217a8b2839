//! Graceful shutdown of the terminator as the binary runs it
//! (`flotilla_terminator::run`): cancelled while provider calls are in
//! flight, it returns within its grace period, gives back every lease, does
//! nothing more afterwards, and the next replica takes every instance down
//! at once, leaving nothing at the provider.

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_core::DesiredState;
use flotilla_proto::client::AdapterClient;
use flotilla_sim_provider::MachineState;
use flotilla_store::instance::instance_set_desired;
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_telemetry::CancellationToken;
use flotilla_terminator::{Terminator, TerminatorArgs};
use flotilla_test_utils::fleet::{ReadySpec, ready_instances};
use flotilla_test_utils::stack::{instant, provider_stack};
use flotilla_test_utils::{
    DEADLINE, TestDb, TestNats, connections_closed, eventually, eventually_ok,
};

/// `n` ready instances, each with a started machine at the provider,
/// asked to terminate (forced: no drain to wait for).
async fn ready_then_terminating(db: &TestDb, client: &AdapterClient, n: usize) {
    let mut conn = db.pool.acquire().await.expect("conn");
    for r in ready_instances(&db.pool, client, n, &ReadySpec::default()).await {
        instance_set_desired(&mut conn, r.id, DesiredState::Terminated, true)
            .await
            .expect("desired");
    }
}

type Snapshot = Vec<(sqlx::types::Uuid, String, i64, Option<String>)>;

async fn snapshot(db: &TestDb) -> Snapshot {
    sqlx::query_as("SELECT id, state, version, lease_owner FROM instances ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("rows")
}

fn args(adapter_url: &str, db: &TestDb, nats: &TestNats) -> TerminatorArgs {
    TerminatorArgs::try_parse_from([
        "terminator",
        "--provider-adapter-url",
        adapter_url,
        "--provider-adapter-token",
        flotilla_test_utils::stack::SERVICE_TOKEN,
        "--database-url",
        &db.url_as("stopped-terminator"),
        "--nats-url",
        &nats.url,
        "--nats-namespace",
        &nats.namespace,
        "--metrics-addr=",
        "--terminator-tick-ms",
        "50",
        "--terminator-poll-ms",
        "50",
        "--terminate-retry-base-ms",
        "50",
        // Far longer than the test: only a release lets another replica in.
        "--terminator-lease-seconds",
        "600",
        "--shutdown-grace-seconds",
        "1",
    ])
    .expect("flags")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_mid_termination_it_returns_in_its_grace_releases_its_leases_and_the_next_replica_finishes()
 {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let stack = provider_stack(instant(), &[]).await;
    let (sim, adapter_url, client) = (&stack.sim, stack.url.clone(), stack.client.clone());
    let mut conn = db.pool.acquire().await.expect("conn");
    pool_create(
        &mut conn,
        &NewPool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            image: "img".into(),
            ..Default::default()
        },
    )
    .await
    .expect("pool");
    ready_then_terminating(&db, &client, 3).await;
    // Every provider answer takes 5 s: a step is in flight when the stop
    // comes, and cannot finish inside a 1 s grace.
    sim.sim()
        .update_faults(|f| f.latency_ms = 5_000)
        .expect("faults");

    let stop = CancellationToken::new();
    let service = tokio::spawn(flotilla_terminator::run(
        args(&adapter_url, &db, &nats),
        stop.clone(),
    ));
    eventually_ok("every instance claimed", DEADLINE, || async {
        let rows = snapshot(&db).await;
        if rows.iter().all(|(_, _, _, owner)| owner.is_some()) {
            Ok(())
        } else {
            Err(rows)
        }
    })
    .await;
    // Wait until the claimed steps are in their (slow) provider calls: the
    // simulator is answering one.
    eventually("a provider call in flight", DEADLINE, || async {
        sim.sim().in_flight() > 0
    })
    .await;

    let cancelled = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), service)
        .await
        .expect("run returns within the grace period (1 s), not after the 5 s calls")
        .expect("no panic")
        .expect("run succeeds");
    println!("terminator stopped {:?} after cancel", cancelled.elapsed());

    let after = snapshot(&db).await;
    assert!(
        after.iter().all(|(_, _, _, owner)| owner.is_none()),
        "every lease given back: {after:?}"
    );
    assert!(
        after.iter().all(|(_, state, _, _)| state != "terminated"),
        "nothing claimed terminated before the provider confirmed: {after:?}"
    );
    // Once the stopped replica holds no connection, nothing of it can write.
    connections_closed(&db.pool, "stopped-terminator").await;
    assert_eq!(snapshot(&db).await, after, "no write after run returned");

    // The next replica takes over at once (the leases would hold it off
    // for 10 minutes) and leaves nothing at the provider.
    sim.sim()
        .update_faults(|f| f.latency_ms = 0)
        .expect("faults");
    let next = Terminator {
        db: db.pool.clone(),
        provider: client.clone(),
        tuning: args(&adapter_url, &db, &nats).tuning,
        owner: "next-replica".into(),
    };
    let stop_next = CancellationToken::new();
    let next_task = tokio::spawn(next.run(None, stop_next.clone()));
    eventually_ok("the next replica to finish", DEADLINE, || async {
        let rows = snapshot(&db).await;
        if rows.iter().all(|(_, state, _, _)| state == "terminated") {
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
    assert_eq!(live, 0, "no machine left at the provider");
    stop_next.cancel();
    let _ = next_task.await;
}
