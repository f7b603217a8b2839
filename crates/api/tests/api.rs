//! The api over real gRPC, on a real PostgreSQL and `nats-server -js`:
//! provisioning with its idempotency and all-or-nothing validation,
//! authentication of both APIs, listing, history, the event watch, pools,
//! and boot phases reported by workers.

#[path = "fuzz.rs"]
mod fuzz;
#[path = "security.rs"]
mod security;
#[path = "shutdown.rs"]
mod shutdown;

use std::collections::HashSet;
use std::time::Duration;

use flotilla_api::{ApiState, ApiToken, Limits, serve};
use flotilla_bus::Bus;
use flotilla_bus::relay::OutboxRelay;
use flotilla_bus::streams::{BusConfig, CMD};
use flotilla_bus::subjects::{Namespace, PROVISION, RECONCILE};
use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{Transition, instance_get, instance_transition};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{TestDb, TestNats};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "fleet-token-for-tests";

struct Api {
    db: TestDb,
    bus: Bus,
    addr: std::net::SocketAddr,
    fleet: FleetServiceClient<Channel>,
    worker: WorkerServiceClient<Channel>,
    stop: CancellationToken,
    _nats: TestNats,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Api {
    start_with(Limits::default()).await
}

async fn start_with(limits: Limits) -> Api {
    start_full(limits, None).await
}

/// An api whose CreatePool checks pools against `provider`.
async fn start_checked(provider: flotilla_proto::client::AdapterClient) -> Api {
    start_full(Limits::default(), Some(provider)).await
}

async fn start_full(
    limits: Limits,
    provider: Option<flotilla_proto::client::AdapterClient>,
) -> Api {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).expect("namespace"),
        BusConfig::default(),
    );
    bus.ensure_streams().await.expect("streams");
    let state = ApiState {
        pool: db.pool.clone(),
        bus: bus.clone(),
        tokens: vec![ApiToken::from_plain("ci", TOKEN)].into(),
        limits,
        provider,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(serve(state, listener, stop.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    Api {
        db,
        bus,
        addr,
        fleet: FleetServiceClient::new(channel.clone()),
        worker: WorkerServiceClient::new(channel),
        stop,
        _nats: nats,
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ascii");
    req.metadata_mut().insert("authorization", value);
    req
}

fn authed<T>(msg: T) -> Request<T> {
    with_token(msg, TOKEN)
}

/// The field an INVALID_ARGUMENT names (the text before the first colon).
fn field_of(s: &Status) -> &str {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    s.message().split(':').next().unwrap_or_default()
}

impl Api {
    async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .expect("count")
    }

    async fn instances(&self) -> i64 {
        self.count("SELECT count(*) FROM instances").await
    }

    async fn outbox(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox").await
    }

    async fn create_pool(&self, name: &str) -> v1::Pool {
        self.fleet
            .clone()
            .create_pool(authed(v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: name.into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    ..Default::default()
                }),
            }))
            .await
            .expect("create pool")
            .into_inner()
    }

    async fn provision(&self, req: v1::ProvisionRequest) -> Result<v1::ProvisionResponse, Status> {
        self.fleet
            .clone()
            .provision(authed(req))
            .await
            .map(|r| r.into_inner())
    }

    async fn relay(&self) {
        OutboxRelay::new(self.db.pool.clone(), self.bus.clone())
            .run_once()
            .await
            .expect("relay");
    }

    /// Moves an instance along the table as the scheduler would.
    async fn walk(&self, id: &str, path: &[InstanceState]) {
        let id: InstanceId = id.parse().expect("id");
        let mut conn = self.db.pool.acquire().await.expect("conn");
        for pair in path.windows(2) {
            let row = instance_get(&mut conn, id)
                .await
                .expect("get")
                .expect("row");
            instance_transition(
                &mut conn,
                &WriteCtx::new("scheduler"),
                &Transition {
                    id,
                    from: pair[0],
                    to: pair[1],
                    expected_version: row.version,
                    error: None,
                    reason: None,
                },
            )
            .await
            .expect("transition");
        }
    }

    async fn state_of(&self, id: &str) -> (InstanceState, i64, i64) {
        let id: InstanceId = id.parse().expect("id");
        let mut conn = self.db.pool.acquire().await.expect("conn");
        let row = instance_get(&mut conn, id)
            .await
            .expect("get")
            .expect("row");
        let logs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM action_logs WHERE instance_id = $1")
                .bind(id.0)
                .fetch_one(&self.db.pool)
                .await
                .expect("logs");
        (row.state, row.version, logs)
    }

    async fn set_worker_token(&self, id: &str, token: &str) {
        sqlx::query("UPDATE instances SET worker_token_hash = $2 WHERE id = $1")
            .bind(id.parse::<uuid::Uuid>().expect("uuid"))
            .bind(Sha256::digest(token.as_bytes()).to_vec())
            .execute(&self.db.pool)
            .await
            .expect("set token");
    }
}

fn count(pool: &str, n: u32) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        pool: pool.into(),
        count: n,
        ..Default::default()
    }
}

fn named(pool: &str, names: &[&str]) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        pool: pool.into(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

fn keyed(req: v1::ProvisionRequest, key: &str) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        idempotency_key: key.into(),
        ..req
    }
}

fn ids(r: &v1::ProvisionResponse) -> Vec<String> {
    r.instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn provisioning_200_with_a_key_creates_200_requested_instances_and_one_relayed_command() {
    let api = start().await;
    api.create_pool("gpu").await;
    let mut req = authed(keyed(count("gpu", 200), "batch-1"));
    req.metadata_mut()
        .insert("x-correlation-id", MetadataValue::from_static("corr-200"));
    let answer = api
        .fleet
        .clone()
        .provision(req)
        .await
        .expect("provision")
        .into_inner();

    assert_eq!(answer.instances.len(), 200);
    assert!(!answer.replayed && !answer.dry_run);
    for i in &answer.instances {
        assert_eq!(i.state, v1::InstanceState::Requested as i32);
        assert_eq!(i.pool, "gpu");
        assert!(
            i.name.starts_with("gpu-") && i.name.len() == 12,
            "{}",
            i.name
        );
    }
    let names: HashSet<_> = answer.instances.iter().map(|i| &i.name).collect();
    assert_eq!(names.len(), 200);
    assert_eq!(api.instances().await, 200);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        1
    );
    let actors: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT actor, correlation_id FROM action_logs")
            .fetch_all(&api.db.pool)
            .await
            .expect("actors");
    assert_eq!(actors, [("api:ci".to_owned(), "corr-200".to_owned())]);

    api.relay().await;
    let stream = api
        .bus
        .jetstream()
        .get_stream(api.bus.namespace().stream(CMD))
        .await
        .expect("stream");
    let msg = stream.get_raw_message(1).await.expect("command relayed");
    assert_eq!(msg.subject.as_str(), api.bus.namespace().subject(PROVISION));
    let cmd = v1::ProvisionCommand::decode(msg.payload).expect("decodes");
    assert_eq!(cmd.pool, "gpu");
    assert_eq!(cmd.instance_ids, ids(&answer));
}

#[tokio::test]
async fn the_same_key_twice_creates_the_batch_once_and_replays_the_first_answer() {
    let api = start().await;
    api.create_pool("gpu").await;
    let first = api
        .provision(keyed(count("gpu", 200), "k1"))
        .await
        .expect("first");
    let second = api
        .provision(keyed(count("gpu", 200), "k1"))
        .await
        .expect("second");
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(api.instances().await, 200);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_key_reused_with_a_different_request_is_refused_and_creates_nothing() {
    let api = start().await;
    api.create_pool("gpu").await;
    let mut labelled = keyed(count("gpu", 2), "k2");
    labelled.labels = (0..10).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    api.provision(labelled.clone()).await.expect("first");
    let outbox = api.outbox().await;

    // The same labels again (in whatever map order) are the same request.
    assert!(
        api.provision(labelled.clone())
            .await
            .expect("replay")
            .replayed
    );
    for different in [
        keyed(count("gpu", 3), "k2"),
        v1::ProvisionRequest {
            labels: [("k0".to_owned(), "other".to_owned())].into(),
            ..labelled.clone()
        },
    ] {
        let err = api.provision(different).await.expect_err("refused");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(
            err.message(),
            "idempotency_key: reused with a different request"
        );
    }
    assert_eq!(api.instances().await, 2);
    assert_eq!(api.outbox().await, outbox);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_one_batch_and_all_get_its_answer() {
    let api = start().await;
    api.create_pool("gpu").await;
    // Several rounds: the windows between a racer's reads and the winner's
    // commit are narrow, and each round is another chance to land in one.
    const ROUNDS: usize = 5;
    for round in 0..ROUNDS {
        let names = [
            format!("a-{round}"),
            format!("b-{round}"),
            format!("c-{round}"),
        ];
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        for (key, req) in [
            (format!("gen-{round}"), count("gpu", 5)),
            (format!("names-{round}"), named("gpu", &names)),
        ] {
            let calls = (0..8).map(|_| api.provision(keyed(req.clone(), &key)));
            let answers: Vec<v1::ProvisionResponse> = futures::future::join_all(calls)
                .await
                .into_iter()
                .map(|r| r.expect("every racer is answered"))
                .collect();
            let first = ids(&answers[0]);
            assert!(
                answers.iter().all(|a| ids(a) == first),
                "{key}: answers differ"
            );
            assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1, "{key}");
        }
    }
    assert_eq!(api.instances().await, 8 * ROUNDS as i64);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        2 * ROUNDS as i64
    );
}

#[tokio::test]
async fn a_batch_repeating_a_name_inside_it_is_rejected_whole() {
    let api = start().await;
    api.create_pool("gpu").await;
    let err = api
        .provision(named("gpu", &["w-1", "w-2", "w-3", "w-2"]))
        .await
        .expect_err("refused");
    assert_eq!(field_of(&err), "names[3]");
    assert_eq!(api.instances().await, 0);
    assert_eq!(api.outbox().await, 0);
}

#[tokio::test]
async fn a_batch_using_the_name_of_a_live_instance_is_rejected_whole_until_it_is_terminated() {
    let api = start().await;
    api.create_pool("gpu").await;
    let live = api.provision(named("gpu", &["w-1"])).await.expect("first");
    let outbox = api.outbox().await;

    let err = api
        .provision(named("gpu", &["w-2", "w-1"]))
        .await
        .expect_err("refused");
    assert_eq!(field_of(&err), "names[1]");
    assert_eq!(api.instances().await, 1);
    assert_eq!(api.outbox().await, outbox);

    // The name is only taken while its instance lives.
    api.walk(
        &live.instances[0].id,
        &[InstanceState::Requested, InstanceState::Terminated],
    )
    .await;
    api.provision(named("gpu", &["w-2", "w-1"]))
        .await
        .expect("accepted");
    assert_eq!(api.instances().await, 3);
}

#[tokio::test]
async fn a_dry_run_returns_the_would_be_instances_and_writes_nothing() {
    let api = start().await;
    api.create_pool("gpu").await;
    let answer = api
        .provision(v1::ProvisionRequest {
            dry_run: true,
            ..keyed(count("gpu", 3), "dry")
        })
        .await
        .expect("dry run");
    assert!(answer.dry_run);
    assert_eq!(answer.instances.len(), 3);
    for i in &answer.instances {
        assert_eq!(i.state, v1::InstanceState::Requested as i32);
        assert!(i.id.parse::<InstanceId>().is_ok());
    }
    assert_eq!(api.instances().await, 0);
    assert_eq!(api.outbox().await, 0);
    assert_eq!(
        api.count("SELECT count(*) FROM idempotency_records").await,
        0
    );

    let err = api
        .provision(v1::ProvisionRequest {
            dry_run: true,
            ..count("nope", 3)
        })
        .await
        .expect_err("still validated");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "pool nope does not exist");
}

#[tokio::test]
async fn calls_without_a_valid_api_token_are_unauthenticated_and_write_nothing() {
    let api = start().await;
    let pool = v1::CreatePoolRequest {
        pool: Some(v1::Pool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "x".into(),
            region: "ams".into(),
            ..Default::default()
        }),
    };
    let mut fleet = api.fleet.clone();
    let refusals = [
        fleet
            .create_pool(Request::new(pool.clone()))
            .await
            .expect_err("no token"),
        fleet
            .create_pool(with_token(pool.clone(), "wrong"))
            .await
            .expect_err("wrong"),
        fleet
            .provision(with_token(count("gpu", 1), "wrong"))
            .await
            .expect_err("wrong"),
        fleet
            .list_pools(with_token(v1::ListPoolsRequest {}, &format!("{TOKEN}x")))
            .await
            .expect_err("longer"),
    ];
    for err in refusals {
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "missing or invalid API token");
    }
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    assert_eq!(api.instances().await, 0);
    assert_eq!(api.outbox().await, 0);
}

#[tokio::test]
async fn each_bad_provision_field_is_named_and_nothing_is_written() {
    let api = start_with(Limits {
        max_provision_count: 50,
        ..Limits::default()
    })
    .await;
    api.create_pool("gpu").await;
    let many_labels = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
    let cases = [
        ("pool", count("", 1)),
        ("count", count("gpu", 0)),
        ("count", count("gpu", 51)),
        ("names[1]", named("gpu", &["ok", "Not-Ok"])),
        ("names[0]", named("gpu", &["9lives"])),
        ("names", named("gpu", &vec!["a"; 51])),
        (
            "labels",
            v1::ProvisionRequest {
                labels: [("Bad Key".to_owned(), "v".to_owned())].into(),
                ..count("gpu", 1)
            },
        ),
        (
            "labels",
            v1::ProvisionRequest {
                labels: many_labels,
                ..count("gpu", 1)
            },
        ),
        ("idempotency_key", keyed(count("gpu", 1), &"k".repeat(129))),
        ("idempotency_key", keyed(count("gpu", 1), "new\nline")),
    ];
    for (field, req) in cases {
        let err = api.provision(req).await.expect_err(field);
        assert_eq!(field_of(&err), field, "{}", err.message());
    }
    assert_eq!(api.instances().await, 0);
    assert_eq!(api.outbox().await, 0);
}

#[tokio::test]
async fn instances_are_listed_in_pages_and_filtered_by_pool_state_and_labels() {
    let api = start().await;
    api.create_pool("a").await;
    api.create_pool("b").await;
    let in_a = api
        .provision(v1::ProvisionRequest {
            labels: [("team".to_owned(), "x".to_owned())].into(),
            ..count("a", 5)
        })
        .await
        .expect("a");
    api.provision(v1::ProvisionRequest {
        labels: [("team".to_owned(), "y".to_owned())].into(),
        ..count("b", 3)
    })
    .await
    .expect("b");

    let mut fleet = api.fleet.clone();
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = fleet
            .list_instances(authed(v1::ListInstancesRequest {
                pool: "a".into(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .expect("page")
            .into_inner();
        sizes.push(page.instances.len());
        seen.extend(page.instances.into_iter().map(|i| i.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sizes, [2, 2, 1]);
    let mut expected = ids(&in_a);
    expected.sort();
    assert_eq!(seen, expected);

    let list = |req: v1::ListInstancesRequest| {
        let mut fleet = api.fleet.clone();
        async move { fleet.list_instances(authed(req)).await }
    };
    let by_label = list(v1::ListInstancesRequest {
        labels: [("team".to_owned(), "y".to_owned())].into(),
        ..Default::default()
    })
    .await
    .expect("labels")
    .into_inner();
    assert_eq!(by_label.instances.len(), 3);
    assert!(by_label.instances.iter().all(|i| i.pool == "b"));
    let requested = list(v1::ListInstancesRequest {
        states: vec![v1::InstanceState::Requested as i32],
        ..Default::default()
    })
    .await
    .expect("states")
    .into_inner();
    assert_eq!(requested.instances.len(), 8);
    assert!(requested.next_page_token.is_empty());
    let ready = list(v1::ListInstancesRequest {
        states: vec![v1::InstanceState::Ready as i32],
        ..Default::default()
    })
    .await
    .expect("states")
    .into_inner();
    assert!(ready.instances.is_empty());

    for (field, req) in [
        (
            "page_size",
            v1::ListInstancesRequest {
                page_size: 1001,
                ..Default::default()
            },
        ),
        (
            "page_token",
            v1::ListInstancesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
        ),
        (
            "states[0]",
            v1::ListInstancesRequest {
                states: vec![0],
                ..Default::default()
            },
        ),
    ] {
        let err = list(req).await.expect_err(field);
        assert_eq!(field_of(&err), field);
    }
}

#[tokio::test]
async fn an_instance_and_its_history_are_readable_with_transitions_oldest_first() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["w-1"]))
        .await
        .expect("created");
    let id = created.instances[0].id.clone();
    use InstanceState::*;
    api.walk(&id, &[Requested, Provisioning, Booting]).await;

    let mut fleet = api.fleet.clone();
    let got = fleet
        .get_instance(authed(v1::GetInstanceRequest { id: id.clone() }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (got.name.as_str(), got.state),
        ("w-1", v1::InstanceState::Booting as i32)
    );

    let history = fleet
        .get_instance_history(authed(v1::GetInstanceHistoryRequest { id: id.clone() }))
        .await
        .expect("history")
        .into_inner()
        .entries;
    let steps: Vec<(i32, i32, &str)> = history
        .iter()
        .map(|e| (e.from_state, e.to_state, e.actor.as_str()))
        .collect();
    use v1::InstanceState as P;
    assert_eq!(
        steps,
        [
            (P::Unspecified as i32, P::Requested as i32, "api:ci"),
            (P::Requested as i32, P::Provisioning as i32, "scheduler"),
            (P::Provisioning as i32, P::Booting as i32, "scheduler"),
        ]
    );

    let bad = fleet
        .get_instance(authed(v1::GetInstanceRequest { id: "nope".into() }))
        .await
        .expect_err("bad id");
    assert_eq!(field_of(&bad), "id");
    let unknown = InstanceId::new().to_string();
    for err in [
        fleet
            .get_instance(authed(v1::GetInstanceRequest {
                id: unknown.clone(),
            }))
            .await
            .expect_err("unknown"),
        fleet
            .get_instance_history(authed(v1::GetInstanceHistoryRequest { id: unknown }))
            .await
            .expect_err("unknown"),
    ] {
        assert_eq!(err.code(), Code::NotFound);
    }
}

async fn next_event(stream: &mut tonic::Streaming<v1::InstanceEvent>) -> v1::InstanceEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10s")
        .expect("stream open")
        .expect("event")
}

#[tokio::test]
async fn watch_delivers_requested_events_of_new_instances_in_order_and_resumes_from_a_sequence() {
    let api = start().await;
    api.create_pool("a").await;
    api.create_pool("b").await;
    let mut fleet = api.fleet.clone();
    let mut live = fleet
        .watch_events(authed(v1::WatchEventsRequest {
            pool: "a".into(),
            ..Default::default()
        }))
        .await
        .expect("watch")
        .into_inner();

    api.provision(named("b", &["other"])).await.expect("b");
    let created = api
        .provision(named("a", &["w-1", "w-2", "w-3"]))
        .await
        .expect("a");
    api.relay().await;

    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(next_event(&mut live).await);
    }
    let got: Vec<&str> = events.iter().map(|e| e.instance_id.as_str()).collect();
    assert_eq!(got, ids(&created));
    for e in &events {
        assert_eq!(e.pool, "a");
        assert_eq!(e.to_state, v1::InstanceState::Requested as i32);
        assert_eq!(e.actor, "api:ci");
    }
    assert!(
        events
            .windows(2)
            .all(|w| w[0].stream_sequence < w[1].stream_sequence)
    );

    // Resuming from the second event replays it and what followed.
    let mut resumed = fleet
        .watch_events(authed(v1::WatchEventsRequest {
            start_sequence: events[1].stream_sequence,
            pool: "a".into(),
            ..Default::default()
        }))
        .await
        .expect("resume")
        .into_inner();
    let replayed = [
        next_event(&mut resumed).await,
        next_event(&mut resumed).await,
    ];
    assert_eq!(replayed[0].instance_id, events[1].instance_id);
    assert_eq!(replayed[1].instance_id, events[2].instance_id);

    // An instance filter narrows further.
    let mut one = fleet
        .watch_events(authed(v1::WatchEventsRequest {
            start_sequence: 1,
            instance_ids: vec![events[2].instance_id.clone()],
            ..Default::default()
        }))
        .await
        .expect("by id")
        .into_inner();
    assert_eq!(
        next_event(&mut one).await.instance_id,
        events[2].instance_id
    );

    // The server's shutdown ends open watches.
    api.stop.cancel();
    let end = tokio::time::timeout(Duration::from_secs(10), live.next())
        .await
        .expect("the stream ends on shutdown");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
}

#[tokio::test]
async fn pools_are_unique_and_updated_under_a_version_check_that_wakes_the_scheduler() {
    let api = start().await;
    let created = api.create_pool("gpu").await;
    assert_eq!((created.version, created.desired_capacity), (1, 0));
    let mut fleet = api.fleet.clone();

    let dup = fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(created.clone()),
        }))
        .await
        .expect_err("duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists);
    let bad = fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "cpu".into(),
                provider: "aws".into(),
                ..created.clone()
            }),
        }))
        .await
        .expect_err("bad provider");
    assert_eq!(field_of(&bad), "pool.provider");

    let updated = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(5),
            expected_version: 1,
            ..Default::default()
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!((updated.version, updated.desired_capacity), (2, 5));
    let wake: Vec<u8> = sqlx::query_scalar("SELECT payload FROM outbox WHERE subject = $1")
        .bind(RECONCILE)
        .fetch_one(&api.db.pool)
        .await
        .expect("one reconcile queued");
    assert_eq!(
        v1::ReconcileCommand::decode(wake.as_slice())
            .expect("decodes")
            .pool,
        "gpu"
    );

    let stale = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(9),
            expected_version: 1,
            ..Default::default()
        }))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);

    let priced = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            price_per_hour_micros: Some(1_500_000),
            timeouts: Some(v1::PoolTimeouts {
                booting_seconds: 90,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("price")
        .into_inner();
    assert_eq!(
        (
            priced.version,
            priced.desired_capacity,
            priced.price_per_hour_micros
        ),
        (3, 5, 1_500_000)
    );
    assert_eq!(priced.timeouts.map(|t| t.booting_seconds), Some(90));
    // Only a capacity change wakes the scheduler.
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.reconcile'")
            .await,
        1
    );

    let missing = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "nope".into(),
            desired_capacity: Some(1),
            ..Default::default()
        }))
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    let too_big = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(10_001),
            ..Default::default()
        }))
        .await
        .expect_err("too big");
    assert_eq!(field_of(&too_big), "desired_capacity");

    let got = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.version, 3);
    let all = fleet
        .list_pools(authed(v1::ListPoolsRequest {}))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.pools.len(), 1);
    let absent = fleet
        .get_pool(authed(v1::GetPoolRequest {
            name: "nope".into(),
        }))
        .await
        .expect_err("absent");
    assert_eq!(absent.code(), Code::NotFound);
}

fn by_ids(ids: &[String]) -> Option<v1::InstanceSelector> {
    Some(v1::InstanceSelector {
        instance_ids: ids.to_vec(),
        ..Default::default()
    })
}

#[tokio::test]
async fn terminate_by_ids_records_intent_and_reason_and_answers_unknown_and_repeated_cleanly() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = ids(&api.provision(count("gpu", 3)).await.expect("provisioned"));
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut fleet = api.fleet.clone();
    let mut wanted = created[..2].to_vec();
    wanted.push(unknown.clone());
    let answer = fleet
        .terminate(authed(v1::TerminateRequest {
            selector: by_ids(&wanted),
            force: false,
            reason: "scale down after the batch".into(),
        }))
        .await
        .expect("terminate")
        .into_inner();
    let mut accepted = answer.accepted_ids.clone();
    accepted.sort();
    let mut expected = created[..2].to_vec();
    expected.sort();
    assert_eq!(accepted, expected);
    assert_eq!(answer.unknown_ids, std::slice::from_ref(&unknown));
    assert!(answer.unchanged_ids.is_empty());
    let desired: i64 = api
        .count("SELECT count(*) FROM instances WHERE desired_state = 'terminated'")
        .await;
    assert_eq!(desired, 2);
    let logged: i64 = api
        .count(
            "SELECT count(*) FROM action_logs WHERE reason = 'scale down after the batch' AND actor = 'api:ci'",
        )
        .await;
    assert_eq!(logged, 2);
    let commands = api
        .count("SELECT count(*) FROM outbox WHERE subject = 'CMD.terminate'")
        .await;
    assert_eq!(commands, 1);

    // Asking again changes nothing and is not an error.
    let again = fleet
        .terminate(authed(v1::TerminateRequest {
            selector: by_ids(&created[..2]),
            force: false,
            reason: String::new(),
        }))
        .await
        .expect("terminate again")
        .into_inner();
    assert!(again.accepted_ids.is_empty());
    assert_eq!(again.unchanged_ids.len(), 2);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.terminate'")
            .await,
        1
    );
    // Forcing an instance already on its way upgrades it.
    let forced = fleet
        .terminate(authed(v1::TerminateRequest {
            selector: by_ids(&created[..1]),
            force: true,
            reason: String::new(),
        }))
        .await
        .expect("force")
        .into_inner();
    assert_eq!(forced.accepted_ids, created[..1].to_vec());
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE force_terminate")
            .await,
        1
    );
    // Only unknown ids: nothing written at all.
    let before = api.outbox().await;
    let none = fleet
        .terminate(authed(v1::TerminateRequest {
            selector: by_ids(std::slice::from_ref(&unknown)),
            ..Default::default()
        }))
        .await
        .expect("unknown only")
        .into_inner();
    assert_eq!(none.unknown_ids, [unknown]);
    assert_eq!(api.outbox().await, before);
}

#[tokio::test]
async fn terminate_and_drain_select_by_pool_and_labels() {
    let api = start().await;
    api.create_pool("gpu").await;
    api.create_pool("cpu").await;
    let mut labelled = count("gpu", 2);
    labelled.labels.insert("team".into(), "ml".into());
    api.provision(labelled).await.expect("gpu ml");
    api.provision(count("gpu", 1)).await.expect("gpu");
    api.provision(count("cpu", 2)).await.expect("cpu");
    let mut fleet = api.fleet.clone();
    let drained = fleet
        .drain(authed(v1::DrainRequest {
            selector: Some(v1::InstanceSelector {
                labels: [("team".to_owned(), "ml".to_owned())].into(),
                ..Default::default()
            }),
            reason: String::new(),
        }))
        .await
        .expect("drain")
        .into_inner();
    assert_eq!(drained.accepted_ids.len(), 2);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE cordoned")
            .await,
        2
    );
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE desired_state = 'terminated'")
            .await,
        0,
        "drain does not terminate"
    );
    let terminated = fleet
        .terminate(authed(v1::TerminateRequest {
            selector: Some(v1::InstanceSelector {
                pool: "gpu".into(),
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("terminate pool")
        .into_inner();
    assert_eq!(terminated.accepted_ids.len(), 3);
    assert_eq!(
        api.count(
            "SELECT count(*) FROM instances WHERE desired_state = 'terminated' AND pool = 'cpu'"
        )
        .await,
        0,
        "other pools untouched"
    );
}

#[tokio::test]
async fn bad_selectors_are_invalid_arguments_naming_the_field_and_write_nothing() {
    let api = start().await;
    api.create_pool("gpu").await;
    api.provision(count("gpu", 1)).await.expect("provisioned");
    let before = (
        api.outbox().await,
        api.count("SELECT count(*) FROM action_logs").await,
    );
    let mut fleet = api.fleet.clone();
    let cases: Vec<(&str, v1::TerminateRequest)> = vec![
        ("selector", v1::TerminateRequest::default()),
        (
            "selector",
            v1::TerminateRequest {
                selector: Some(v1::InstanceSelector::default()),
                ..Default::default()
            },
        ),
        (
            "selector",
            v1::TerminateRequest {
                selector: Some(v1::InstanceSelector {
                    instance_ids: vec![uuid::Uuid::now_v7().to_string()],
                    pool: "gpu".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        (
            "selector.instance_ids[1]",
            v1::TerminateRequest {
                selector: by_ids(&[uuid::Uuid::now_v7().to_string(), "nope".into()]),
                ..Default::default()
            },
        ),
        (
            "reason",
            v1::TerminateRequest {
                selector: Some(v1::InstanceSelector {
                    pool: "gpu".into(),
                    ..Default::default()
                }),
                reason: "x".repeat(2000),
                ..Default::default()
            },
        ),
    ];
    for (field, req) in cases {
        let err = fleet.terminate(authed(req)).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(field_of(&err), field, "{}", err.message());
    }
    assert_eq!(
        (
            api.outbox().await,
            api.count("SELECT count(*) FROM action_logs").await
        ),
        before
    );
    let err = fleet
        .terminate(with_token(v1::TerminateRequest::default(), "wrong"))
        .await
        .expect_err("unauthenticated");
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// Two instances in `booting`, each with its own worker token.
async fn two_booting_workers(api: &Api) -> (String, String) {
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["w-a", "w-b"]))
        .await
        .expect("created");
    let (a, b) = (
        created.instances[0].id.clone(),
        created.instances[1].id.clone(),
    );
    use InstanceState::*;
    for id in [&a, &b] {
        api.walk(id, &[Requested, Provisioning, Booting]).await;
    }
    api.set_worker_token(&a, "token-a").await;
    api.set_worker_token(&b, "token-b").await;
    (a, b)
}

fn phase(id: &str, phase: v1::WorkerPhase) -> v1::ReportPhaseRequest {
    v1::ReportPhaseRequest {
        instance_id: id.into(),
        phase: phase as i32,
        message: String::new(),
    }
}

fn beat(id: &str) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        instance_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_worker_token_is_good_only_for_its_own_instance_and_a_refusal_writes_nothing() {
    let api = start().await;
    let (a, b) = two_booting_workers(&api).await;
    let before = api.state_of(&b).await;
    let mut worker = api.worker.clone();

    let denied = [
        worker
            .report_phase(with_token(phase(&b, v1::WorkerPhase::Ready), "token-a"))
            .await
            .expect_err("a's token for b"),
        worker
            .heartbeat(with_token(beat(&b), "token-a"))
            .await
            .expect_err("a's token for b"),
    ];
    for err in denied {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    let unknown = InstanceId::new().to_string();
    let unauthenticated = [
        worker
            .report_phase(Request::new(phase(&b, v1::WorkerPhase::Ready)))
            .await
            .expect_err("no token"),
        worker
            .report_phase(with_token(phase(&b, v1::WorkerPhase::Ready), "made-up"))
            .await
            .expect_err("no such token"),
        worker
            .heartbeat(with_token(beat(&unknown), "token-a"))
            .await
            .expect_err("unknown instance"),
        worker
            .heartbeat(with_token(beat(&b), TOKEN))
            .await
            .expect_err("an API token is no worker token"),
    ];
    for err in unauthenticated {
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    assert_eq!(api.state_of(&b).await, before);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        0
    );

    // An instance with no token issued yet cannot be spoken for at all.
    sqlx::query("UPDATE instances SET worker_token_hash = NULL WHERE id = $1")
        .bind(a.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&api.db.pool)
        .await
        .expect("clear");
    let err = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect_err("no token issued");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn reported_phases_drive_a_booting_instance_to_ready_and_a_repeat_writes_nothing() {
    let api = start().await;
    let (_, b) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let registered = worker
        .register(with_token(
            v1::RegisterRequest {
                instance_id: b.clone(),
                agent_version: "0.1.0".into(),
                hostname: "w-b".into(),
            },
            "token-b",
        ))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(registered.heartbeat_interval_ms, 5000);
    assert!(!registered.cordoned);
    let (_, _, logs_at_boot) = api.state_of(&b).await;

    for p in [
        v1::WorkerPhase::Installing,
        v1::WorkerPhase::Starting,
        v1::WorkerPhase::Ready,
    ] {
        worker
            .report_phase(with_token(phase(&b, p), "token-b"))
            .await
            .expect("phase accepted");
    }
    let (state, version, logs) = api.state_of(&b).await;
    assert_eq!(state, InstanceState::Ready);
    assert_eq!(logs, logs_at_boot + 3);
    let tail: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT from_state, to_state, actor FROM action_logs WHERE instance_id = $1 ORDER BY id DESC LIMIT 3",
    )
    .bind(b.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_all(&api.db.pool)
    .await
    .expect("logs");
    let tail: Vec<(&str, &str, &str)> = tail
        .iter()
        .rev()
        .map(|(f, t, a)| (f.as_deref().unwrap_or(""), t.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("booting", "installing", "worker"),
            ("installing", "starting", "worker"),
            ("starting", "ready", "worker"),
        ]
    );
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        1
    );

    for p in [v1::WorkerPhase::Ready, v1::WorkerPhase::Installing] {
        worker
            .report_phase(with_token(phase(&b, p), "token-b"))
            .await
            .expect("a repeat is fine");
    }
    assert_eq!(
        api.state_of(&b).await,
        (InstanceState::Ready, version, logs)
    );
}

#[tokio::test]
async fn ready_for_an_instance_not_yet_booting_is_a_failed_precondition() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["w-1"]))
        .await
        .expect("created");
    let id = created.instances[0].id.clone();
    api.set_worker_token(&id, "token-1").await;
    let before = api.state_of(&id).await;
    let err = api
        .worker
        .clone()
        .report_phase(with_token(phase(&id, v1::WorkerPhase::Ready), "token-1"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(api.state_of(&id).await, before);
    let bad = api
        .worker
        .clone()
        .report_phase(with_token(
            phase(&id, v1::WorkerPhase::Unspecified),
            "token-1",
        ))
        .await
        .expect_err("no phase");
    assert_eq!(field_of(&bad), "phase");
}

#[tokio::test]
async fn a_heartbeat_records_liveness_and_tells_the_worker_what_to_do() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let answer = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("beat")
        .into_inner();
    assert_eq!(answer.heartbeat_interval_ms, 5000);
    assert!(!answer.cordoned && !answer.shutdown);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        1
    );
    let (state, version, logs) = api.state_of(&a).await;

    sqlx::query("UPDATE instances SET cordoned = true, desired_state = 'terminated' WHERE id = $1")
        .bind(a.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&api.db.pool)
        .await
        .expect("cordon");
    let answer = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("beat")
        .into_inner();
    assert!(answer.cordoned && answer.shutdown);
    // A heartbeat is not a transition.
    assert_eq!(api.state_of(&a).await, (state, version, logs));

    let too_many = v1::HeartbeatRequest {
        gpus: vec![v1::GpuStats::default(); 17],
        ..beat(&a)
    };
    let err = worker
        .heartbeat(with_token(too_many, "token-a"))
        .await
        .expect_err("too many gpus");
    assert_eq!(field_of(&err), "gpus");
}

#[tokio::test]
async fn a_heartbeat_older_than_the_last_written_changes_nothing_until_the_agent_registers_again() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let idle_of = |api: &Api| {
        let pool = api.db.pool.clone();
        let id: uuid::Uuid = a.parse().expect("uuid");
        async move {
            sqlx::query_scalar::<_, bool>("SELECT worker_idle FROM instances WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("idle")
        }
    };
    let send = |sequence: u64, idle: bool| v1::HeartbeatRequest {
        sequence,
        idle,
        ..beat(&a)
    };
    worker
        .heartbeat(with_token(send(10, false), "token-a"))
        .await
        .expect("busy beat");
    assert!(!idle_of(&api).await);
    // A beat sent earlier (sequence 9, idle) arrives late, after the cordon:
    // it must not end the drain of a worker that is busy.
    let answer = worker
        .heartbeat(with_token(send(9, true), "token-a"))
        .await
        .expect("a late beat is answered")
        .into_inner();
    assert!(!answer.shutdown);
    assert!(
        !idle_of(&api).await,
        "a late heartbeat overwrote a newer one"
    );
    worker
        .heartbeat(with_token(send(11, true), "token-a"))
        .await
        .expect("newer beat");
    assert!(idle_of(&api).await);
    // A restarted agent registers and counts anew.
    worker
        .register(with_token(
            v1::RegisterRequest {
                instance_id: a.clone(),
                ..Default::default()
            },
            "token-a",
        ))
        .await
        .expect("register");
    worker
        .heartbeat(with_token(send(1, false), "token-a"))
        .await
        .expect("first beat of the new process");
    assert!(
        !idle_of(&api).await,
        "the new process's first beat was dropped"
    );
}

#[tokio::test]
async fn a_terminating_worker_is_told_to_exit_only_after_its_drain() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let worker = api.worker.clone();
    let id: uuid::Uuid = a.parse().expect("uuid");
    let answer_in = |state: &'static str| {
        let pool = api.db.pool.clone();
        let mut worker = worker.clone();
        let a = a.clone();
        async move {
            sqlx::query(
                "UPDATE instances SET state = $2, cordoned = true, desired_state = 'terminated' \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(state)
            .execute(&pool)
            .await
            .expect("set state");
            worker
                .heartbeat(with_token(beat(&a), "token-a"))
                .await
                .expect("beat")
                .into_inner()
        }
    };
    // Told to exit while ready or draining, the worker would never send the
    // idle heartbeat after the cordon that ends its drain.
    for state in ["ready", "draining"] {
        let answer = answer_in(state).await;
        assert!(answer.cordoned, "{state}: not told it is cordoned");
        assert!(
            !answer.shutdown,
            "{state}: told to exit before its drain ended"
        );
    }
    for state in ["stopping", "booting"] {
        assert!(answer_in(state).await.shutdown, "{state}: not told to exit");
    }
}

#[tokio::test]
async fn a_pool_may_ask_for_block_volumes_of_up_to_10_tb() {
    let api = start().await;
    let pool = api
        .fleet
        .clone()
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "big-disks".into(),
                provider: "scaleway".into(),
                instance_type: "GP1-XS".into(),
                region: "fr-par-1".into(),
                volume_size_gb: 10_000,
                ..Default::default()
            }),
        }))
        .await
        .expect("a 10 TB Block Storage volume is a valid pool")
        .into_inner();
    assert_eq!(pool.volume_size_gb, 10_000);
}

#[tokio::test]
async fn a_batch_over_1000_instances_is_queued_as_commands_of_at_most_1000_ids() {
    let api = start_with(Limits {
        max_provision_count: 2500,
        ..Limits::default()
    })
    .await;
    api.create_pool("gpu").await;
    let answer = api.provision(count("gpu", 2001)).await.expect("provision");
    let payloads: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM outbox WHERE subject = $1 ORDER BY id")
            .bind(PROVISION)
            .fetch_all(&api.db.pool)
            .await
            .expect("commands");
    let commands: Vec<v1::ProvisionCommand> = payloads
        .iter()
        .map(|p| v1::ProvisionCommand::decode(p.as_slice()).expect("decodes"))
        .collect();
    let sizes: Vec<usize> = commands.iter().map(|c| c.instance_ids.len()).collect();
    assert_eq!(sizes, [1000, 1000, 1]);
    let queued: Vec<String> = commands.into_iter().flat_map(|c| c.instance_ids).collect();
    assert_eq!(queued, ids(&answer));
}

#[tokio::test]
async fn racing_reports_of_one_phase_all_succeed_and_move_the_instance_once() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let calls = (0..8).map(|_| {
        let mut worker = api.worker.clone();
        let req = with_token(phase(&a, v1::WorkerPhase::Ready), "token-a");
        async move { worker.report_phase(req).await }
    });
    for answer in futures::future::join_all(calls).await {
        answer.expect("a report that lost the race is re-decided, not refused");
    }
    let moves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM action_logs WHERE instance_id = $1 AND to_state = 'ready'",
    )
    .bind(a.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_one(&api.db.pool)
    .await
    .expect("count");
    assert_eq!(moves, 1);
}

#[tokio::test]
async fn the_service_refuses_to_start_without_any_api_token() {
    use clap::Parser;
    let args = flotilla_api::ApiArgs::try_parse_from(["api", "--metrics-addr", ""]).expect("args");
    let err = flotilla_api::run(args, CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("API_TOKENS"), "{err}");
}

#[tokio::test]
async fn a_cached_worker_token_never_lets_a_wrong_token_through() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("good token, now cached");
    for wrong in ["token-b", "nonsense"] {
        let before = api
            .count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await;
        sqlx::query("UPDATE instances SET last_heartbeat = NULL")
            .execute(&api.db.pool)
            .await
            .expect("reset");
        let err = worker
            .heartbeat(with_token(beat(&a), wrong))
            .await
            .expect_err("refused");
        assert!(
            matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{err:?}"
        );
        assert_eq!(
            api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
                .await,
            0,
            "nothing written (was {before})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_heartbeats_are_written_in_batches_and_none_is_lost() {
    use flotilla_api::heartbeat::HeartbeatBatcher;
    let api = start().await;
    api.create_pool("gpu").await;
    let ids: Vec<flotilla_core::InstanceId> =
        ids(&api.provision(count("gpu", 200)).await.expect("200"))
            .iter()
            .map(|s| s.parse().expect("uuid"))
            .collect();
    let batcher = HeartbeatBatcher::spawn(api.db.pool.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..10 {
        for id in &ids {
            let (b, id) = (batcher.clone(), *id);
            tasks.spawn(async move { b.beat(id, round % 2 == 0, 0).await });
        }
    }
    let mut answered = 0;
    while let Some(r) = tasks.join_next().await {
        let view = r.expect("task").expect("written").expect("instance exists");
        assert_eq!(view.state, InstanceState::Requested);
        answered += 1;
    }
    assert_eq!(answered, 2000);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        200
    );
    let stats = batcher.stats();
    let statements = stats.statements.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stats.heartbeats.load(std::sync::atomic::Ordering::Relaxed),
        2000
    );
    assert!(
        statements < 400,
        "{statements} statements for 2000 heartbeats"
    );
    println!("2000 concurrent heartbeats written with {statements} statements");
    // A heartbeat for an instance that does not exist is answered as such.
    assert!(
        batcher
            .beat(flotilla_core::InstanceId::new(), true, 0)
            .await
            .expect("answered")
            .is_none()
    );
}

#[tokio::test]
async fn a_worker_reporting_before_its_start_was_recorded_moves_the_instance_through_booting() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["early"]))
        .await
        .expect("created");
    let id = created.instances[0].id.clone();
    use InstanceState::*;
    api.walk(&id, &[Requested, Provisioning]).await;
    api.set_worker_token(&id, "token-early").await;
    let mut worker = api.worker.clone();
    worker
        .report_phase(with_token(
            phase(&id, v1::WorkerPhase::Ready),
            "token-early",
        ))
        .await
        .expect("an early report is accepted");
    let history: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT from_state, to_state, actor FROM action_logs WHERE instance_id = $1 ORDER BY id",
    )
    .bind(id.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_all(&api.db.pool)
    .await
    .expect("history");
    let tail: Vec<(String, String)> = history[history.len() - 2..]
        .iter()
        .map(|(f, t, _)| (f.clone().unwrap_or_default(), t.clone()))
        .collect();
    assert_eq!(
        tail,
        [
            ("provisioning".to_owned(), "booting".to_owned()),
            ("booting".to_owned(), "ready".to_owned())
        ]
    );
    assert!(
        history[history.len() - 2..]
            .iter()
            .all(|(_, _, a)| a == "worker")
    );
}

fn pool_of(provider: &str, instance_type: &str, image: &str) -> v1::CreatePoolRequest {
    v1::CreatePoolRequest {
        pool: Some(v1::Pool {
            name: "gpu".into(),
            provider: provider.into(),
            instance_type: instance_type.into(),
            region: "ams".into(),
            image: image.into(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_pool_is_checked_against_the_provider_adapter_and_nothing_is_written_on_refusal() {
    // An adapter with only the simulated cloud configured.
    let stack =
        flotilla_test_utils::stack::provider_stack(flotilla_test_utils::stack::instant(), &[])
            .await;
    let api = start_checked(stack.client.clone()).await;
    let mut fleet = api.fleet.clone();
    let cases = [
        // Valid by the api's own rules, but no Fly account in this adapter.
        (
            "pool.provider",
            pool_of("fly", "shared-cpu-1x", "registry/worker:1"),
        ),
        (
            "pool.instance_type",
            pool_of("sim", "a100", "registry/worker:1"),
        ),
        ("pool.image", pool_of("sim", "shared-cpu-1x", "")),
    ];
    for (field, req) in cases {
        let err = fleet.create_pool(authed(req)).await.expect_err(field);
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    assert_eq!(api.count("SELECT count(*) FROM action_logs").await, 0);
    assert_eq!(api.outbox().await, 0);
    // A valid one goes through.
    let created = fleet
        .create_pool(authed(pool_of("sim", "shared-cpu-1x", "registry/worker:1")))
        .await
        .expect("valid pool")
        .into_inner();
    assert_eq!(created.provider, "sim");
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 1);
    // A second pool by that name conflicts, as without an adapter.
    let again = fleet
        .create_pool(authed(pool_of("sim", "shared-cpu-1x", "")))
        .await
        .expect_err("name taken");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
}

#[tokio::test]
async fn a_fly_pool_with_a_size_fly_does_not_have_is_refused_naming_instance_type() {
    // Fly configured in the adapter (its size rules are decided locally, so
    // the API address is never called).
    let stack = flotilla_test_utils::stack::provider_stack(
        flotilla_test_utils::stack::instant(),
        &[
            "--fly-api-token",
            "fly-token",
            "--fly-app-name",
            "flotilla-test",
            "--fly-api-base-url",
            "http://127.0.0.1:1",
        ],
    )
    .await;
    let api = start_checked(stack.client.clone()).await;
    let mut fleet = api.fleet.clone();
    for size in ["a100", "gpu-xl", "shared-cpu-99x"] {
        let err = fleet
            .create_pool(authed(pool_of("fly", size, "registry/worker:1")))
            .await
            .expect_err(size);
        assert_eq!(field_of(&err), "pool.instance_type", "{size}: {err:?}");
    }
    let err = fleet
        .create_pool(authed(pool_of("fly", "shared-cpu-1x", "")))
        .await
        .expect_err("no image");
    assert_eq!(field_of(&err), "pool.image", "{err:?}");
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    fleet
        .create_pool(authed(pool_of("fly", "a100-40gb", "registry/worker:1")))
        .await
        .expect("a100-40gb is one of Fly's sizes (fly-go machine_types.go presets)");
}

#[tokio::test]
async fn without_an_adapter_pools_keep_the_api_s_own_rules() {
    let api = start().await;
    let mut fleet = api.fleet.clone();
    let err = fleet
        .create_pool(authed(pool_of("aws", "x", "img")))
        .await
        .expect_err("unknown provider kind");
    assert_eq!(field_of(&err), "pool.provider");
    fleet
        .create_pool(authed(pool_of("fly", "a100", "img")))
        .await
        .expect("not checked against any adapter");
}

#[tokio::test]
async fn a_paused_pool_is_shown_and_resumed_by_update_pool_with_an_audit_row_and_a_wake_up() {
    use flotilla_store::pool_pause::{FailureKind, PausePolicy, pool_record_failure};
    let api = start().await;
    api.create_pool("gpu").await;
    let mut fleet = api.fleet.clone();
    let waiting = api
        .provision(v1::ProvisionRequest {
            pool: "gpu".into(),
            count: 2,
            ..Default::default()
        })
        .await
        .expect("provision");
    // The scheduler's failures pause the pool (one is enough here).
    let mut conn = api.db.pool.acquire().await.expect("conn");
    let failing: InstanceId = waiting.instances[0].id.parse().expect("id");
    pool_record_failure(
        &mut conn,
        &WriteCtx::new("scheduler"),
        "gpu",
        failing,
        FailureKind::StartupFailed,
        "no progress from booting",
        &PausePolicy {
            failures: 1,
            window: std::time::Duration::from_secs(600),
            cooloff: std::time::Duration::from_secs(300),
        },
    )
    .await
    .expect("failure recorded");

    let shown = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    assert!(shown.paused_at.is_some());
    assert!(
        shown.paused_reason.contains("no progress from booting"),
        "{}",
        shown.paused_reason
    );
    assert!(shown.pause_probe_after.is_some(), "a cool-off is set");

    // Bad input names the field; an unknown pool is NOT_FOUND naming it.
    for bad in ["", "Not A Pool"] {
        let e = fleet
            .update_pool(authed(v1::UpdatePoolRequest {
                name: bad.into(),
                paused: Some(false),
                ..Default::default()
            }))
            .await
            .expect_err("bad name");
        assert_eq!(field_of(&e), "name");
    }
    let missing = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "nope".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect_err("unknown pool");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("pool nope"),
        "{}",
        missing.message()
    );
    // A stale version refuses the whole call: the pool stays paused.
    let stale = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            expected_version: 99,
            ..Default::default()
        }))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);

    let wakes_before = api
        .count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
        .await;
    let resumed = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect("resume")
        .into_inner();
    assert!(resumed.paused_at.is_none());
    assert_eq!(resumed.paused_reason, "");
    assert!(resumed.pause_probe_after.is_none());
    // The waiting instances are woken by a command committed with the resume.
    let wake: Vec<u8> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE subject = 'CMD.provision' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&api.db.pool)
    .await
    .expect("wake");
    let mut woken = v1::ProvisionCommand::decode(wake.as_slice())
        .expect("decodes")
        .instance_ids;
    woken.sort();
    let mut expected: Vec<String> = waiting.instances.iter().map(|i| i.id.clone()).collect();
    expected.sort();
    assert_eq!(woken, expected);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        wakes_before + 1
    );
    assert_eq!(api.count("SELECT count(*) FROM pool_failures").await, 0);
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM pool_events WHERE pool = 'gpu' ORDER BY id")
            .fetch_all(&api.db.pool)
            .await
            .expect("audit");
    assert_eq!(
        audit,
        [
            ("paused".to_owned(), "scheduler".to_owned()),
            ("resumed".to_owned(), "api:ci".to_owned())
        ]
    );

    // Resuming a pool that runs changes nothing and wakes nothing.
    fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect("resume again");
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        wakes_before + 1
    );
    assert_eq!(api.count("SELECT count(*) FROM pool_events").await, 2);

    // An operator's pause has no cool-off probe.
    let paused = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(true),
            ..Default::default()
        }))
        .await
        .expect("pause")
        .into_inner();
    assert!(paused.paused_at.is_some());
    assert_eq!(paused.paused_reason, "paused by api:ci");
    assert!(paused.pause_probe_after.is_none());
}

/// The api as callers outside Flotilla's code see it: through reflection
/// only, with the bytes a client may send, and with what every answer
/// carries.
mod grpc_surface {
    use flotilla_core::CorrelationId;
    use flotilla_core::ids::CORRELATION_METADATA;
    use flotilla_test_utils::python_client::reflection_client;
    use serde_json::json;

    use super::*;

    fn correlation_id(md: &tonic::metadata::MetadataMap) -> String {
        let cid = md
            .get(CORRELATION_METADATA)
            .expect("a correlation id in the answer")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(CorrelationId::parse(&cid).is_some(), "{cid}");
        cid
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reflection_only_client_lists_exactly_the_served_services_and_calls_them() {
        let api = start().await;
        api.create_pool("gpu").await;
        let created = api
            .provision(named("gpu", &["w-1"]))
            .await
            .expect("created");
        let id = created.instances[0].id.clone();
        let bearer = format!("Bearer {TOKEN}");
        let Some(answer) = reflection_client(&json!({
            "target": api.addr.to_string(),
            "metadata": [["authorization", bearer]],
            "calls": [
                {"method": "flotilla.v1.FleetService/ListPools", "request": {}},
                {"method": "flotilla.v1.FleetService/GetInstance", "request": {"id": id}},
                {"method": "flotilla.v1.FleetService/ListInstances",
                 "request": {"pool": "gpu", "states": ["INSTANCE_STATE_REQUESTED"]}},
                {"method": "flotilla.v1.FleetService/GetPool", "request": {"name": "nope"}},
                {"method": "grpc.health.v1.Health/Check",
                 "request": {"service": "flotilla.v1.FleetService"}},
            ],
        }))
        .await
        else {
            return;
        };
        let mut services: Vec<&str> = answer["services"]
            .as_array()
            .expect("services")
            .iter()
            .map(|v| v.as_str().expect("name"))
            .collect();
        services.sort();
        assert_eq!(
            services,
            [
                "flotilla.v1.FleetService",
                "flotilla.v1.WorkerService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        );
        // Every listed service resolved to its file over reflection.
        assert_eq!(
            answer["files"]["flotilla.v1.FleetService"],
            "flotilla/v1/fleet.proto"
        );
        assert_eq!(
            answer["files"]["flotilla.v1.WorkerService"],
            "flotilla/v1/worker.proto"
        );
        let calls = answer["calls"].as_array().expect("calls");
        for (i, code) in ["OK", "OK", "OK", "NOT_FOUND", "OK"].iter().enumerate() {
            assert_eq!(calls[i]["code"], *code, "call {i}: {:?}", calls[i]);
            // Sent none: told the one minted, success or refusal.
            let cid = calls[i]["metadata"][CORRELATION_METADATA]
                .as_str()
                .expect("a correlation id");
            assert!(CorrelationId::parse(cid).is_some(), "{cid}");
        }
        assert_eq!(calls[0]["response"]["pools"][0]["name"], "gpu");
        assert_eq!(calls[1]["response"]["id"], id.as_str());
        assert_eq!(calls[1]["response"]["name"], "w-1");
        assert_eq!(calls[1]["response"]["state"], "INSTANCE_STATE_REQUESTED");
        assert_eq!(calls[2]["response"]["instances"][0]["id"], id.as_str());
        assert_eq!(calls[3]["details"], "pool nope does not exist");
        assert_eq!(calls[4]["response"]["status"], "SERVING");
    }

    /// Requests with their string fields re-declared as bytes, so they can
    /// carry bytes that are not UTF-8; tags match `fleet.proto`/`types.proto`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawGet {
        #[prost(bytes = "vec", tag = "1")]
        id: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct RawPool {
        #[prost(bytes = "vec", tag = "1")]
        name: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct RawCreatePool {
        #[prost(message, optional, tag = "1")]
        pool: Option<RawPool>,
    }

    async fn raw<E, D>(api: &Api, path: &'static str, msg: E) -> Result<D, Status>
    where
        E: prost::Message + Send + 'static,
        D: prost::Message + Default + Send + 'static,
    {
        let channel = Channel::from_shared(format!("http://{}", api.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        grpc.unary(
            authed(msg),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::<E, D>::default(),
        )
        .await
        .map(tonic::Response::into_inner)
    }

    #[tokio::test]
    async fn a_string_that_is_not_utf8_is_invalid_argument_naming_the_field() {
        let api = start().await;
        let err = raw::<_, v1::Instance>(
            &api,
            "/flotilla.v1.FleetService/GetInstance",
            RawGet {
                id: b"\xff\xfe".to_vec(),
            },
        )
        .await
        .expect_err("not UTF-8");
        assert_eq!(field_of(&err), "id", "{}", err.message());
        assert_eq!(
            err.message(),
            "id: cannot be decoded: invalid string value: data is not UTF-8 encoded"
        );
        correlation_id(err.metadata());

        let err = raw::<_, v1::Pool>(
            &api,
            "/flotilla.v1.FleetService/CreatePool",
            RawCreatePool {
                pool: Some(RawPool {
                    name: b"gpu-\xc3".to_vec(),
                }),
            },
        )
        .await
        .expect_err("not UTF-8");
        assert_eq!(field_of(&err), "pool.name", "{}", err.message());
        assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    }

    #[tokio::test]
    async fn every_answer_carries_the_correlation_id_minted_when_the_caller_sent_none() {
        let api = start().await;
        let mut fleet = api.fleet.clone();
        let ok = fleet
            .create_pool(authed(v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: "gpu".into(),
                    provider: "sim".into(),
                    instance_type: "x".into(),
                    region: "ams".into(),
                    ..Default::default()
                }),
            }))
            .await
            .expect("created");
        correlation_id(ok.metadata());

        // The id a caller is told is the one its request is recorded under.
        let provisioned = fleet
            .provision(authed(count("gpu", 1)))
            .await
            .expect("provisioned");
        let cid = correlation_id(provisioned.metadata());
        let recorded: String =
            sqlx::query_scalar("SELECT correlation_id FROM action_logs ORDER BY id LIMIT 1")
                .fetch_one(&api.db.pool)
                .await
                .expect("history");
        assert_eq!(recorded, cid);

        // Refusals too: by a handler, by the auth interceptor, for no route.
        let bad = fleet
            .get_instance(authed(v1::GetInstanceRequest { id: "nope".into() }))
            .await
            .expect_err("bad id");
        correlation_id(bad.metadata());
        let unauthenticated = fleet
            .list_pools(Request::new(v1::ListPoolsRequest {}))
            .await
            .expect_err("no token");
        assert_eq!(unauthenticated.code(), Code::Unauthenticated);
        correlation_id(unauthenticated.metadata());
        let unrouted = raw::<_, v1::Instance>(
            &api,
            "/flotilla.v1.NoSuchService/Get",
            RawGet { id: Vec::new() },
        )
        .await
        .expect_err("unimplemented");
        assert_eq!(unrouted.code(), Code::Unimplemented);
        correlation_id(unrouted.metadata());

        // A caller's own id comes back as sent.
        let mut req = authed(v1::ListPoolsRequest {});
        req.metadata_mut()
            .insert(CORRELATION_METADATA, MetadataValue::from_static("mine-42"));
        let listed = fleet.list_pools(req).await.expect("listed");
        assert_eq!(correlation_id(listed.metadata()), "mine-42");
    }

    #[tokio::test]
    async fn an_unknown_pool_is_not_found_naming_it_in_every_call_that_takes_a_pool() {
        let api = start().await;
        api.create_pool("gpu").await;
        let mut fleet = api.fleet.clone();
        let selector = Some(v1::InstanceSelector {
            pool: "nope".into(),
            ..Default::default()
        });
        let refusals = [
            (
                "ListInstances",
                fleet
                    .list_instances(authed(v1::ListInstancesRequest {
                        pool: "nope".into(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "WatchEvents",
                fleet
                    .watch_events(authed(v1::WatchEventsRequest {
                        pool: "nope".into(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "Terminate",
                fleet
                    .terminate(authed(v1::TerminateRequest {
                        selector: selector.clone(),
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "Drain",
                fleet
                    .drain(authed(v1::DrainRequest {
                        selector,
                        ..Default::default()
                    }))
                    .await
                    .map(|_| ()),
            ),
            (
                "Provision",
                fleet.provision(authed(count("nope", 1))).await.map(|_| ()),
            ),
        ];
        for (call, answer) in refusals {
            let err = answer.expect_err(call);
            assert_eq!(err.code(), Code::NotFound, "{call}: {err:?}");
            assert_eq!(err.message(), "pool nope does not exist", "{call}");
        }
        // A name that cannot be a pool is still a bad argument, and a known
        // pool with no instances an empty page.
        let bad = fleet
            .list_instances(authed(v1::ListInstancesRequest {
                pool: "Not A Pool".into(),
                ..Default::default()
            }))
            .await
            .expect_err("bad name");
        assert_eq!(field_of(&bad), "pool");
        let empty = fleet
            .list_instances(authed(v1::ListInstancesRequest {
                pool: "gpu".into(),
                ..Default::default()
            }))
            .await
            .expect("known pool")
            .into_inner();
        assert!(empty.instances.is_empty());
        assert_eq!(api.outbox().await, 0);
    }

    #[tokio::test]
    async fn a_terminate_request_is_recorded_as_the_request_it_is_not_as_a_transition() {
        let api = start().await;
        api.create_pool("gpu").await;
        let id = ids(&api.provision(count("gpu", 1)).await.expect("provisioned"))[0].clone();
        use InstanceState::*;
        api.walk(&id, &[Requested, Provisioning, Booting, Ready])
            .await;
        let mut fleet = api.fleet.clone();
        fleet
            .drain(authed(v1::DrainRequest {
                selector: by_ids(std::slice::from_ref(&id)),
                reason: "maintenance".into(),
            }))
            .await
            .expect("drain");
        fleet
            .terminate(authed(v1::TerminateRequest {
                selector: by_ids(std::slice::from_ref(&id)),
                force: true,
                reason: "stuck".into(),
            }))
            .await
            .expect("terminate");
        let history = fleet
            .get_instance_history(authed(v1::GetInstanceHistoryRequest { id: id.clone() }))
            .await
            .expect("history")
            .into_inner()
            .entries;
        use v1::InstanceState as P;
        // No row pretends the instance went from a state to itself.
        assert!(
            history
                .iter()
                .all(|e| e.from_state != e.to_state || e.to_state == P::Unspecified as i32),
            "{history:?}"
        );
        let requests: Vec<(&str, bool, i32, i32, &str, &str)> = history
            .iter()
            .filter(|e| !e.action.is_empty())
            .map(|e| {
                (
                    e.action.as_str(),
                    e.force,
                    e.from_state,
                    e.to_state,
                    e.actor.as_str(),
                    e.reason.as_str(),
                )
            })
            .collect();
        let none = P::Unspecified as i32;
        assert_eq!(
            requests,
            [
                (
                    "drain_requested",
                    false,
                    none,
                    none,
                    "api:ci",
                    "maintenance"
                ),
                ("terminate_requested", true, none, none, "api:ci", "stuck"),
            ]
        );
        // The transitions are only the ones that happened.
        let steps: Vec<i32> = history
            .iter()
            .filter(|e| e.action.is_empty())
            .map(|e| e.to_state)
            .collect();
        assert_eq!(
            steps,
            [
                P::Requested as i32,
                P::Provisioning as i32,
                P::Booting as i32,
                P::Ready as i32
            ]
        );
    }
}
