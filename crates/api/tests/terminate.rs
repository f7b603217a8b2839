//! Terminate and drain: by ids, pool or labels, with intent and reason
//! recorded, and bad selectors refused naming the field.

use flotilla_proto::v1;
use tonic::Code;

use crate::common::*;

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
