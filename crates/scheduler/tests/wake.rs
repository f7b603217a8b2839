//! `CMD.reconcile` is a real wake-up: a capacity loop that ticks once an
//! hour fills its pool as soon as the command committed with a desired
//! capacity change (what the api's UpdatePool writes) reaches it through
//! the outbox relay and JetStream.

use std::time::Duration;

use flotilla_bus::relay::OutboxRelay;
use flotilla_bus::streams::{Bus, BusConfig};
use flotilla_bus::subjects::{Namespace, RECONCILE};
use flotilla_proto::v1;
use flotilla_runtime::loops::Loops;
use flotilla_store::WriteCtx;
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::pool_set_desired_capacity;
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::TestNats;
use flotilla_test_utils::stack::instant;
use flotilla_test_utils::wait::eventually;
use prost::Message;

use super::{env, rows, scheduler, tuning};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_command_wakes_the_capacity_loop_before_its_tick() {
    let env = env(instant()).await;
    let nats = TestNats::new().await;
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).unwrap(),
        BusConfig::default(),
    );
    bus.ensure_streams().await.unwrap();
    let stop = CancellationToken::new();
    let relay = OutboxRelay::new(env.db.pool.clone(), bus.clone());
    let relaying = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });

    // Every loop ticks once an hour: only the command can move the pool.
    let mut t = tuning(&[]);
    t.scheduler_tick_ms = 3_600_000;
    let s = scheduler(&env, "s1", None, t);
    let mut loops = Loops::new(stop.clone());
    s.register(&mut loops, Some(bus));
    let statuses = loops.statuses();
    let running = tokio::spawn(loops.run(Duration::from_secs(5)));
    // Each loop runs once at start; after that the capacity loop waits an
    // hour for its next tick, so a fill can only come from the wake-up.
    eventually("the capacity loop's first pass", WAIT, || {
        let statuses = statuses.clone();
        async move {
            statuses
                .snapshot()
                .get("scheduler_capacity")
                .is_some_and(|s| s.runs >= 1)
        }
    })
    .await;
    assert!(rows(&env).await.is_empty());

    let mut tx = env.db.pool.begin().await.unwrap();
    pool_set_desired_capacity(&mut tx, "gpu", 3, None)
        .await
        .unwrap();
    let wake = v1::ReconcileCommand {
        pool: "gpu".into(),
        reason: "desired capacity 0 -> 3".into(),
    };
    outbox_insert(
        &mut tx,
        &WriteCtx::new("test"),
        RECONCILE,
        &wake.encode_to_vec(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    eventually(
        "the pool filled to 3 by the wake-up, an hour before its tick",
        WAIT,
        || async { rows(&env).await.len() == 3 },
    )
    .await;
    stop.cancel();
    running.await.unwrap();
    relaying.await.unwrap();
}
