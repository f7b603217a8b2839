//! The api as callers outside Flotilla's code see it: through reflection
//! only, with the bytes a client may send, and with what every answer
//! carries.

use flotilla_core::InstanceState;
use flotilla_proto::v1;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use flotilla_core::CorrelationId;
use flotilla_core::ids::CORRELATION_METADATA;
use flotilla_test_utils::python_client::reflection_client;
use serde_json::json;

use crate::common::*;

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

/// The checks above, made by the third-party client that knows the api
/// only through v1alpha reflection: a string field that is not UTF-8 is
/// INVALID_ARGUMENT naming the field, an unknown pool is NOT_FOUND naming
/// it (in a unary call, a stream and a selector), and an instance's
/// history holds the requests as requests and only the transitions that
/// happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflection_only_client_is_told_bad_bytes_unknown_pools_and_history_as_they_are() {
    let api = start().await;
    api.create_pool("gpu").await;
    let id = ids(&api.provision(count("gpu", 1)).await.expect("provisioned"))[0].clone();
    use InstanceState::*;
    api.walk(&id, &[Requested, Provisioning, Booting, Ready])
        .await;
    // What no protobuf library builds: `id` (field 1) and `pool.name`
    // (field 1 of field 1) holding bytes that are not UTF-8.
    let get_not_utf8 = "0a02fffe";
    let create_not_utf8 = "0a070a056770752dc3";
    let bearer = format!("Bearer {TOKEN}");
    let selector = json!({"instance_ids": [id]});
    let Some(answer) = reflection_client(&json!({
        "target": api.addr.to_string(),
        "metadata": [["authorization", bearer]],
        "calls": [
            {"method": "flotilla.v1.FleetService/GetInstance", "raw_request_hex": get_not_utf8},
            {"method": "flotilla.v1.FleetService/CreatePool", "raw_request_hex": create_not_utf8},
            {"method": "flotilla.v1.FleetService/ListInstances", "request": {"pool": "nope"}},
            {"method": "flotilla.v1.FleetService/WatchEvents", "request": {"pool": "nope"},
             "stream": true, "max_responses": 1},
            {"method": "flotilla.v1.FleetService/Terminate",
             "request": {"selector": {"pool": "nope"}}},
            {"method": "flotilla.v1.FleetService/Drain",
             "request": {"selector": selector, "reason": "maintenance"}},
            {"method": "flotilla.v1.FleetService/Terminate",
             "request": {"selector": selector, "force": true, "reason": "stuck"}},
            {"method": "flotilla.v1.FleetService/GetInstanceHistory", "request": {"id": id}},
        ],
    }))
    .await
    else {
        return;
    };
    let calls = answer["calls"].as_array().expect("calls");
    let code = |i: usize| calls[i]["code"].as_str().unwrap_or_default();
    let details = |i: usize| calls[i]["details"].as_str().unwrap_or_default();

    assert_eq!(code(0), "INVALID_ARGUMENT", "{:?}", calls[0]);
    assert_eq!(
        details(0),
        "id: cannot be decoded: invalid string value: data is not UTF-8 encoded"
    );
    assert_eq!(code(1), "INVALID_ARGUMENT", "{:?}", calls[1]);
    assert!(details(1).starts_with("pool.name: "), "{:?}", calls[1]);
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 1, "gpu only");

    for (i, call) in [(2, "ListInstances"), (3, "WatchEvents"), (4, "Terminate")] {
        assert_eq!(code(i), "NOT_FOUND", "{call}: {:?}", calls[i]);
        assert_eq!(details(i), "pool nope does not exist", "{call}");
    }
    assert_eq!(
        calls[3]["responses"],
        json!([]),
        "no event of a pool that is not"
    );

    assert_eq!(code(5), "OK", "{:?}", calls[5]);
    assert_eq!(code(6), "OK", "{:?}", calls[6]);
    assert_eq!(code(7), "OK", "{:?}", calls[7]);
    let history = calls[7]["response"]["entries"]
        .as_array()
        .expect("history entries");
    let s = |e: &serde_json::Value, k: &str| e[k].as_str().unwrap_or_default().to_owned();
    // No row pretends the instance went from a state to itself.
    assert!(
        history
            .iter()
            .all(|e| e.get("to_state").is_none() || s(e, "from_state") != s(e, "to_state")),
        "{history:#?}"
    );
    let requests: Vec<(String, bool, String, String)> = history
        .iter()
        .filter(|e| !s(e, "action").is_empty())
        .map(|e| {
            (
                s(e, "action"),
                e["force"].as_bool().unwrap_or(false),
                s(e, "actor"),
                s(e, "reason"),
            )
        })
        .collect();
    let row = |a: &str, force, r: &str| (a.to_owned(), force, "api:ci".to_owned(), r.to_owned());
    assert_eq!(
        requests,
        [
            row("drain_requested", false, "maintenance"),
            row("terminate_requested", true, "stuck"),
        ],
        "{history:#?}"
    );
    for e in history.iter().filter(|e| !s(e, "action").is_empty()) {
        assert!(
            e.get("from_state").is_none() && e.get("to_state").is_none(),
            "a request is no transition: {e:?}"
        );
    }
    let steps: Vec<String> = history
        .iter()
        .filter(|e| s(e, "action").is_empty())
        .map(|e| s(e, "to_state"))
        .collect();
    assert_eq!(
        steps,
        [
            "INSTANCE_STATE_REQUESTED",
            "INSTANCE_STATE_PROVISIONING",
            "INSTANCE_STATE_BOOTING",
            "INSTANCE_STATE_READY"
        ],
        "{history:#?}"
    );
}
