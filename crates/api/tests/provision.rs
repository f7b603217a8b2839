//! Provisioning: idempotency keys, names, dry runs, every bad field named,
//! and big batches split into commands.

use std::collections::HashSet;

use flotilla_api::Limits;
use flotilla_bus::streams::CMD;
use flotilla_bus::subjects::PROVISION;
use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::common::*;

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
    // Well formed, but what it would create exists: ALREADY_EXISTS.
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().starts_with("names[1]:"), "{err:?}");
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
