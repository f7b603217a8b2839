//! Reading the fleet: instances listed in pages and filtered, one instance
//! and its history (the audit trail of its transitions).

use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use tonic::Code;

use crate::common::*;

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
