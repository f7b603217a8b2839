//! The event watch: new instances' events in order, resumed from a
//! sequence.

use std::time::Duration;

use flotilla_proto::v1;
use futures::StreamExt;

use crate::common::*;

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
