//! Drain and uncordon as an operator sees them: a drained instance keeps
//! its state but is found by the `cordoned` filter, each act is an event a
//! watcher gets and a history row, and an uncordon that has nothing to
//! undo (or would undo a termination's drain) is refused and writes nothing.

use std::time::Duration;

use flotilla_core::InstanceState;
use flotilla_proto::v1;
use futures::StreamExt;
use tonic::Code;

use crate::common::*;

async fn next_event(stream: &mut tonic::Streaming<v1::InstanceEvent>) -> v1::InstanceEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10s")
        .expect("stream open")
        .expect("event")
}

async fn list_cordoned(api: &Api, cordoned: Option<bool>) -> Vec<String> {
    api.fleet
        .clone()
        .list_instances(authed(v1::ListInstancesRequest {
            pool: "gpu".into(),
            cordoned,
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect()
}

fn uncordon(id: &str, reason: &str) -> v1::UncordonRequest {
    v1::UncordonRequest {
        id: id.into(),
        reason: reason.into(),
    }
}

#[tokio::test]
async fn a_drain_is_listed_watched_and_audited_and_an_uncordon_undoes_it() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = ids(&api
        .provision(named("gpu", &["w-1", "w-2"]))
        .await
        .expect("provisioned"));
    let path = [
        InstanceState::Requested,
        InstanceState::Provisioning,
        InstanceState::Booting,
        InstanceState::Installing,
        InstanceState::Starting,
        InstanceState::Ready,
    ];
    api.walk(&created[0], &path).await;
    api.relay().await;
    let mut fleet = api.fleet.clone();
    let mut watch = fleet
        .watch_events(authed(v1::WatchEventsRequest {
            pool: "gpu".into(),
            ..Default::default()
        }))
        .await
        .expect("watch")
        .into_inner();

    let drained = fleet
        .drain(authed(v1::DrainRequest {
            selector: by_ids(&created[..1]),
            reason: "kernel upgrade".into(),
        }))
        .await
        .expect("drain")
        .into_inner();
    assert_eq!(drained.accepted_ids, created[..1].to_vec());
    api.relay().await;
    let event = next_event(&mut watch).await;
    assert_eq!(event.instance_id, created[0]);
    assert_eq!(event.action, "cordoned");
    assert_eq!(event.from_state, v1::InstanceState::Ready as i32);
    assert_eq!(event.to_state, v1::InstanceState::Ready as i32);
    assert_eq!(event.reason, "kernel upgrade");
    assert_eq!(event.actor, "api:ci");

    // The instance is still ready, and the filter finds it (and only it).
    let got = fleet
        .get_instance(authed(v1::GetInstanceRequest {
            id: created[0].clone(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.state, v1::InstanceState::Ready as i32);
    assert!(got.cordoned);
    assert_eq!(list_cordoned(&api, Some(true)).await, created[..1].to_vec());
    assert_eq!(
        list_cordoned(&api, Some(false)).await,
        created[1..].to_vec()
    );
    assert_eq!(list_cordoned(&api, None).await.len(), 2);

    // Draining it again changes nothing and publishes nothing.
    let outbox = api.outbox().await;
    let again = fleet
        .drain(authed(v1::DrainRequest {
            selector: by_ids(&created[..1]),
            reason: String::new(),
        }))
        .await
        .expect("drain again")
        .into_inner();
    assert!(again.accepted_ids.is_empty());
    assert_eq!(again.unchanged_ids, created[..1].to_vec());
    assert_eq!(api.outbox().await, outbox);

    let undone = fleet
        .uncordon(authed(uncordon(&created[0], "upgrade done")))
        .await
        .expect("uncordon")
        .into_inner()
        .instance
        .expect("instance");
    assert!(!undone.cordoned);
    assert_eq!(undone.state, v1::InstanceState::Ready as i32);
    assert!(list_cordoned(&api, Some(true)).await.is_empty());
    api.relay().await;
    let event = next_event(&mut watch).await;
    assert_eq!(event.instance_id, created[0]);
    assert_eq!(event.action, "uncordoned");
    assert_eq!(event.reason, "upgrade done");

    let history = fleet
        .get_instance_history(authed(v1::GetInstanceHistoryRequest {
            id: created[0].clone(),
        }))
        .await
        .expect("history")
        .into_inner()
        .entries;
    let acts: Vec<(&str, &str)> = history
        .iter()
        .filter(|e| !e.action.is_empty())
        .map(|e| (e.action.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        acts,
        [
            ("drain_requested", "kernel upgrade"),
            ("uncordoned", "upgrade done")
        ]
    );
    assert!(
        history
            .iter()
            .all(|e| e.actor.starts_with("api:") || e.action.is_empty())
    );
}

/// What an uncordon could write: outbox rows, history rows, cordons.
async fn writes(api: &Api) -> (i64, i64, i64) {
    (
        api.outbox().await,
        api.count("SELECT count(*) FROM action_logs").await,
        api.count("SELECT count(*) FROM instances WHERE cordoned")
            .await,
    )
}

#[tokio::test]
async fn an_uncordon_with_nothing_to_undo_is_refused_and_writes_nothing() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = ids(&api
        .provision(named("gpu", &["w-1", "w-2"]))
        .await
        .expect("provisioned"));
    let mut fleet = api.fleet.clone();
    // Never cordoned.
    let before = writes(&api).await;
    let err = fleet
        .uncordon(authed(uncordon(&created[0], "")))
        .await
        .expect_err("not cordoned");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.message(),
        format!("instance {} is not cordoned: nothing to undo", created[0])
    );
    assert_eq!(writes(&api).await, before);

    // Cordoned, then terminated: its drain belongs to the termination.
    fleet
        .drain(authed(v1::DrainRequest {
            selector: by_ids(&created[1..]),
            reason: String::new(),
        }))
        .await
        .expect("drain");
    fleet
        .terminate(authed(v1::TerminateRequest {
            selector: by_ids(&created[1..]),
            ..Default::default()
        }))
        .await
        .expect("terminate");
    let before = writes(&api).await;
    let err = fleet
        .uncordon(authed(uncordon(&created[1], "")))
        .await
        .expect_err("terminating");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is being terminated"),
        "{}",
        err.message()
    );
    assert_eq!(writes(&api).await, before);

    // Unknown and malformed ids.
    let unknown = uuid::Uuid::now_v7().to_string();
    let err = fleet
        .uncordon(authed(uncordon(&unknown, "")))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = fleet
        .uncordon(authed(uncordon("nope", "")))
        .await
        .expect_err("malformed");
    assert_eq!(field_of(&err), "id");
    assert_eq!(writes(&api).await, before);
}
