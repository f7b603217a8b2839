//! Graceful shutdown of the api as the binary runs it (`flotilla_api::run`):
//! once cancelled, open watch streams end, `run` returns within its grace
//! period, the outbox relay stops claiming rows (a row committed afterwards
//! stays for the next replica's relay), and no new call is accepted.

use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_api::ApiArgs;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_store::WriteCtx;
use flotilla_store::outbox::outbox_insert;
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{
    DEADLINE, TestDb, TestNats, connections_closed, eventually, eventually_some,
};
use sha2::{Digest, Sha256};
use tonic::Request;
use tonic::metadata::MetadataValue;

const TOKEN: &str = "shutdown-token";

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).expect("header"),
    );
    r
}

async fn unsent(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_it_ends_watch_streams_stops_relaying_and_returns_within_its_grace() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    // A free port for the server (the binary takes an address, not a socket).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let tokens = format!("shutdown:{}", hex::encode(Sha256::digest(TOKEN)));
    let args = ApiArgs::try_parse_from([
        "api",
        "--listen",
        &listen,
        "--api-tokens",
        &tokens,
        "--database-url",
        &db.url_as("stopped-api"),
        "--nats-url",
        &nats.url,
        "--nats-namespace",
        &nats.namespace,
        "--metrics-addr=",
        "--shutdown-grace-seconds",
        "2",
    ])
    .expect("flags");
    let stop = CancellationToken::new();
    let service = tokio::spawn(flotilla_api::run(args, stop.clone()));

    let mut fleet = eventually_some("the api to come up", DEADLINE, || async {
        FleetServiceClient::connect(format!("http://{listen}"))
            .await
            .ok()
    })
    .await;
    fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "gpu".into(),
                provider: "sim".into(),
                instance_type: "shared-cpu-1x".into(),
                region: "ams".into(),
                image: "img".into(),
                ..Default::default()
            }),
        }))
        .await
        .expect("pool");
    let mut watch = fleet
        .watch_events(authed(v1::WatchEventsRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    fleet
        .provision(authed(v1::ProvisionRequest {
            pool: "gpu".into(),
            count: 2,
            ..Default::default()
        }))
        .await
        .expect("provision");
    // The watcher sees the events, so the relay was running.
    for _ in 0..2 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("an event in time")
            .expect("stream open");
        assert!(event.is_some(), "an event, not the end");
    }
    eventually("the relay to send what is committed", DEADLINE, || async {
        unsent(&db).await == 0
    })
    .await;

    let cancelled = Instant::now();
    stop.cancel();
    // The open stream ends instead of holding the server past its grace.
    let end = tokio::time::timeout(Duration::from_secs(2), watch.message())
        .await
        .expect("the watch stream ends on shutdown");
    assert!(
        !matches!(end, Ok(Some(_))),
        "no more events after shutdown: {end:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), service)
        .await
        .expect("run returns within the grace period")
        .expect("no panic")
        .expect("run succeeds");
    println!("api stopped {:?} after cancel", cancelled.elapsed());

    // The relay claims nothing any more: a row committed now stays unsent,
    // for the next replica's relay. Once the stopped api holds no
    // connection, nothing of it can claim the row later either.
    let mut conn = db.pool.acquire().await.expect("conn");
    outbox_insert(&mut conn, &WriteCtx::new("test"), "CMD.provision", b"x")
        .await
        .expect("row");
    connections_closed(&db.pool, "stopped-api").await;
    assert_eq!(unsent(&db).await, 1, "the stopped relay left the row alone");

    // And no new call is accepted.
    let refused = FleetServiceClient::connect(format!("http://{listen}")).await;
    assert!(refused.is_err(), "the server no longer listens");
}
