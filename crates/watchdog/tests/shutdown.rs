//! Graceful shutdown of the watchdog as the binary runs it
//! (`flotilla_watchdog::run`): cancelled while it confirms silent workers
//! with a slow provider, it returns within its grace period, gives back
//! every lease, does nothing more afterwards, and the next replica can
//! claim the same instances at once.

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_proto::client::AdapterClient;

use flotilla_store::pool::{NewPool, pool_create};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::fleet::{ReadySpec, ready_instances};
use flotilla_test_utils::stack::{instant, provider_stack};
use flotilla_test_utils::{DEADLINE, TestDb, TestNats, connections_closed, eventually_ok};
use flotilla_watchdog::{Watchdog, WatchdogArgs};

/// `n` ready instances with started machines, silent for an hour. Fewer
/// than the storm guard's minimum, so the watchdog confirms each with the
/// provider.
async fn silent_ready(db: &TestDb, client: &AdapterClient, n: usize) {
    ready_instances(&db.pool, client, n, &ReadySpec::default()).await;
    sqlx::query(
        "UPDATE instances SET last_heartbeat = now() - interval '1 hour',
                              state_entered_at = now() - interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .expect("silence");
}

type Snapshot = Vec<(sqlx::types::Uuid, String, i64, Option<String>)>;

async fn snapshot(db: &TestDb) -> Snapshot {
    sqlx::query_as("SELECT id, state, version, lease_owner FROM instances ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .expect("rows")
}

fn args(adapter_url: &str, db: &TestDb, nats: &TestNats) -> WatchdogArgs {
    WatchdogArgs::try_parse_from([
        "watchdog",
        "--provider-adapter-url",
        adapter_url,
        "--provider-adapter-token",
        flotilla_test_utils::stack::SERVICE_TOKEN,
        "--database-url",
        &db.url_as("stopped-watchdog"),
        "--nats-url",
        &nats.url,
        "--nats-namespace",
        &nats.namespace,
        "--metrics-addr=",
        "--watchdog-tick-ms",
        "50",
        "--worker-heartbeat-timeout-seconds",
        "1",
        // Far longer than the test: only a release lets another replica in.
        "--watchdog-lease-seconds",
        "600",
        "--shutdown-grace-seconds",
        "1",
    ])
    .expect("flags")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_while_confirming_silent_workers_it_returns_in_its_grace_and_releases_its_leases()
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
    silent_ready(&db, &client, 3).await;
    // Every provider answer takes 5 s: the confirmation is in flight when
    // the stop comes, and cannot finish inside a 1 s grace.
    sim.sim()
        .update_faults(|f| f.latency_ms = 5_000)
        .expect("faults");

    let stop = CancellationToken::new();
    let service = tokio::spawn(flotilla_watchdog::run(
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

    let cancelled = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), service)
        .await
        .expect("run returns within the grace period (1 s), not after the 5 s calls")
        .expect("no panic")
        .expect("run succeeds");
    println!("watchdog stopped {:?} after cancel", cancelled.elapsed());

    let after = snapshot(&db).await;
    assert!(
        after.iter().all(|(_, _, _, owner)| owner.is_none()),
        "every lease given back: {after:?}"
    );
    assert!(
        after.iter().all(|(_, state, _, _)| state == "ready"),
        "nothing declared without the provider's answer: {after:?}"
    );
    // Once the stopped replica holds no connection, nothing of it can write.
    connections_closed(&db.pool, "stopped-watchdog").await;
    assert_eq!(snapshot(&db).await, after, "no write after run returned");

    // The next replica claims them at once (the leases would hold it off
    // for 10 minutes).
    sim.sim()
        .update_faults(|f| f.latency_ms = 0)
        .expect("faults");
    let next = Watchdog {
        db: db.pool.clone(),
        provider: client.clone(),
        tuning: args(&adapter_url, &db, &nats).tuning,
        owner: "next-replica".into(),
    };
    let status = next.dead_workers_once().await;
    assert_eq!(status.found, 3, "{status:?}");
}
