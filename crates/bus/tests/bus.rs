//! The bus's promises on a real `nats-server -js` and PostgreSQL: streams,
//! de-duplication, the outbox relay under crashes and concurrency,
//! redelivery and dead letters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use bytes::Bytes;
use flotilla_bus::relay::{OutboxRelay, outgoing};
use flotilla_bus::streams::{BusConfig, CMD, DLQ, EVT};
use flotilla_bus::subjects::{Namespace, PROVISION, headers};
use flotilla_bus::{Bus, ConsumerSpec, Outcome, Outgoing};
use flotilla_core::{CorrelationId, InstanceId};
use flotilla_proto::v1;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{NewInstance, instance_insert_requested};
use flotilla_store::outbox::{outbox_claim_unsent, outbox_insert, outbox_try_lock_relay};
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_test_utils::{DEADLINE, TestDb, TestNats, eventually};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

async fn bus(nats: &TestNats, config: BusConfig) -> Bus {
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).unwrap(),
        config,
    );
    bus.ensure_streams().await.unwrap();
    bus
}

async fn stream_len(bus: &Bus, base: &str) -> u64 {
    let mut s = bus
        .jetstream()
        .get_stream(bus.namespace().stream(base))
        .await
        .unwrap();
    s.info().await.unwrap().state.messages
}

/// Inserts `n` instances; each writes one `EVT.instance.requested` outbox row.
async fn outbox_rows(db: &TestDb, n: usize) {
    let mut conn = db.pool.acquire().await.unwrap();
    if flotilla_store::pool::pool_get(&mut conn, "p")
        .await
        .unwrap()
        .is_none()
    {
        pool_create(
            &mut conn,
            &NewPool {
                name: "p".into(),
                provider: "sim".into(),
                instance_type: "x".into(),
                region: "r".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let new: Vec<NewInstance> = (0..n)
        .map(|_| NewInstance {
            id: InstanceId::new(),
            pool: "p".into(),
            name: format!("w-{}", uuid::Uuid::new_v4().simple()),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .unwrap();
}

async fn unsent(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn cmd(id: &str, payload: &'static str) -> Outgoing {
    Outgoing {
        subject: PROVISION.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        msg_id: id.into(),
        headers: vec![],
    }
}

#[tokio::test]
async fn stream_setup_is_idempotent_and_namespaced() {
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    bus.ensure_streams().await.unwrap();
    let mut cmd = bus
        .jetstream()
        .get_stream(format!("{}_CMD", nats.namespace))
        .await
        .unwrap();
    let info = cmd.info().await.unwrap().config.clone();
    assert_eq!(info.retention, RetentionPolicy::WorkQueue);
    assert_eq!(info.storage, StorageType::File);
    assert_eq!(info.duplicate_window, Duration::from_secs(600));
    assert_eq!(info.subjects, vec![format!("{}.CMD.>", nats.namespace)]);
    let mut evt = bus
        .jetstream()
        .get_stream(bus.namespace().stream(EVT))
        .await
        .unwrap();
    assert_eq!(
        evt.info().await.unwrap().config.retention,
        RetentionPolicy::Limits
    );
}

#[tokio::test]
async fn a_message_id_published_twice_is_stored_once() {
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    let first = bus.publish(&cmd("c-1", "a")).await.unwrap();
    let again = bus.publish(&cmd("c-1", "a")).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(stream_len(&bus, CMD).await, 1);
}

#[tokio::test]
async fn a_relay_killed_between_publish_and_mark_sent_still_delivers_each_row_once() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    outbox_rows(&db, 50).await;

    // A relay publishes the batch, then dies before its transaction commits.
    {
        let mut tx = db.pool.begin().await.unwrap();
        assert!(outbox_try_lock_relay(&mut tx).await.unwrap());
        let rows = outbox_claim_unsent(&mut tx, 500).await.unwrap();
        assert_eq!(rows.len(), 50);
        let msgs: Vec<Outgoing> = rows.iter().map(outgoing).collect();
        for r in bus.publish_batch(&msgs).await {
            r.unwrap();
        }
        // What the server does when the relay's connection dies. (A plain
        // drop only queues the rollback, so the relay lock could still be
        // held when the next relay looks, and this test would race.)
        tx.rollback().await.unwrap();
    }
    assert_eq!(unsent(&db).await, 50, "nothing was marked sent");
    assert_eq!(stream_len(&bus, EVT).await, 50);

    // The next relay publishes them again; the stream keeps one copy each.
    let relay = OutboxRelay::new(db.pool.clone(), bus.clone());
    let stats = relay.run_once().await.unwrap();
    assert_eq!((stats.sent, stats.duplicates, stats.failed), (50, 50, 0));
    assert_eq!(unsent(&db).await, 0);
    assert_eq!(stream_len(&bus, EVT).await, 50);
    assert_eq!(relay.run_once().await.unwrap().sent, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn several_relays_at_once_deliver_every_row_once_and_in_commit_order() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    for _ in 0..6 {
        outbox_rows(&db, 100).await;
    }
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let mut relay = OutboxRelay::new(db.pool.clone(), bus.clone());
        relay.batch = 40;
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            loop {
                let s = relay.run_once().await.unwrap();
                sent += s.sent;
                let left: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                if left == 0 {
                    return sent;
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 600);
    assert_eq!(stream_len(&bus, EVT).await, 600);

    // Stream order is commit order: event ids (action log ids) increase.
    let consumer = bus
        .jetstream()
        .get_stream(bus.namespace().stream(EVT))
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut msgs = consumer.fetch().max_messages(600).messages().await.unwrap();
    let mut last = 0;
    let mut n = 0;
    while let Some(m) = msgs.next().await {
        let ev = v1::InstanceEvent::decode(m.unwrap().payload.as_ref()).unwrap();
        assert!(ev.event_id > last, "{} after {last}", ev.event_id);
        last = ev.event_id;
        n += 1;
    }
    assert_eq!(n, 600);
}

#[tokio::test]
async fn the_relay_wakes_on_commit_without_waiting_for_its_poll() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    let mut relay = OutboxRelay::new(db.pool.clone(), bus.clone());
    relay.poll = Duration::from_secs(3600);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    // The relay is listening once its connection has run its LISTEN.
    eventually("the relay to LISTEN", DEADLINE, || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query ILIKE 'LISTEN%flotilla_outbox%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
            > 0
    })
    .await;
    outbox_rows(&db, 1).await;
    // Well short of the hour's poll: only the NOTIFY can wake it this soon.
    eventually("the relay to wake on NOTIFY", DEADLINE, || async {
        stream_len(&bus, EVT).await > 0
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("relay stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn trace_context_and_correlation_id_travel_from_the_outbox_to_the_handler() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ctx = WriteCtx::new("api")
        .with_correlation(CorrelationId::parse("req-9").unwrap())
        .with_trace_headers(vec![("traceparent".into(), traceparent.into())]);
    let mut conn = db.pool.acquire().await.unwrap();
    let msg_id = outbox_insert(&mut conn, &ctx, PROVISION, b"cmd")
        .await
        .unwrap();
    OutboxRelay::new(db.pool.clone(), bus.clone())
        .run_once()
        .await
        .unwrap();

    let consumer = bus
        .consumer(ConsumerSpec::new("scheduler", PROVISION))
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stats = consumer
        .run_once(
            |d| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(d);
                    Outcome::Ack
                }
            },
            10,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    assert_eq!(stats.acked, 1);
    let d = seen.lock().unwrap().remove(0);
    assert_eq!(d.subject, PROVISION);
    assert_eq!(d.header("traceparent"), Some(traceparent));
    assert_eq!(d.header(headers::CORRELATION), Some("req-9"));
    assert_eq!(d.msg_id(), Some(msg_id.to_string().as_str()));
    // Work-queue retention: an acked command is gone (once the server has
    // processed the ack).
    eventually("the acked command gone", DEADLINE, || async {
        stream_len(&bus, CMD).await == 0
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_fails_is_redelivered_until_it_succeeds() {
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    bus.publish(&cmd("c-1", "work")).await.unwrap();
    let consumer = bus
        .consumer(ConsumerSpec::new("scheduler", PROVISION))
        .await
        .unwrap();
    let deliveries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = |d: flotilla_bus::Delivery| {
        let deliveries = deliveries.clone();
        async move {
            deliveries.lock().unwrap().push(d.delivered);
            if d.delivered < 3 {
                Outcome::Retry(Duration::from_millis(50))
            } else {
                Outcome::Ack
            }
        }
    };
    let mut acked = 0;
    for _ in 0..10 {
        acked += consumer
            .run_once(handler, 10, Duration::from_millis(300))
            .await
            .unwrap()
            .acked;
        if acked == 1 {
            break;
        }
    }
    assert_eq!(acked, 1);
    assert_eq!(*deliveries.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(stream_len(&bus, DLQ).await, 0);
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_without_blocking_the_rest() {
    let nats = TestNats::new().await;
    let bus = bus(&nats, BusConfig::default()).await;
    bus.publish(&cmd("poison", "poison")).await.unwrap();
    for i in 0..5 {
        bus.publish(&cmd(&format!("good-{i}"), "good"))
            .await
            .unwrap();
    }
    let consumer = bus
        .consumer(ConsumerSpec::new("scheduler", PROVISION))
        .await
        .unwrap();
    let good = Arc::new(AtomicUsize::new(0));
    let stats = consumer
        .run_once(
            |d| {
                let good = good.clone();
                async move {
                    if d.payload.as_ref() == b"poison" {
                        Outcome::Reject("cannot decode".into())
                    } else {
                        good.fetch_add(1, Ordering::SeqCst);
                        Outcome::Ack
                    }
                }
            },
            10,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!((stats.acked, stats.dead_lettered), (5, 1));
    assert_eq!(good.load(Ordering::SeqCst), 5);
    assert_eq!(stream_len(&bus, DLQ).await, 1);
    eventually("the queue emptied", DEADLINE, || async {
        stream_len(&bus, CMD).await == 0
    })
    .await;

    let dead = bus
        .jetstream()
        .get_stream(bus.namespace().stream(DLQ))
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(dead.payload.as_ref(), b"poison");
    let h = dead.headers;
    assert_eq!(
        h.get(headers::DEAD_REASON).map(|v| v.as_str()),
        Some("cannot decode")
    );
    assert_eq!(
        h.get(headers::ORIGINAL_SUBJECT).map(|v| v.as_str()),
        Some(PROVISION)
    );
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_dead_lettered_at_max_deliver() {
    let nats = TestNats::new().await;
    let bus = bus(
        &nats,
        BusConfig {
            max_deliver: 3,
            ..BusConfig::default()
        },
    )
    .await;
    bus.publish(&cmd("c-1", "flaky")).await.unwrap();
    let consumer = bus
        .consumer(ConsumerSpec::new("scheduler", PROVISION))
        .await
        .unwrap();
    let mut dead = 0;
    let mut rounds = 0;
    while dead == 0 && rounds < 20 {
        rounds += 1;
        dead += consumer
            .run_once(
                |_| async { Outcome::Retry(Duration::from_millis(20)) },
                10,
                Duration::from_millis(200),
            )
            .await
            .unwrap()
            .dead_lettered;
    }
    assert_eq!(dead, 1);
    assert_eq!(stream_len(&bus, DLQ).await, 1);
    eventually("nothing left stuck in the queue", DEADLINE, || async {
        stream_len(&bus, CMD).await == 0
    })
    .await;
}
