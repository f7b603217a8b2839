//! `WatchEvents`: instance events from the `EVT` stream, live or replayed
//! from a stream sequence, filtered per caller.
//!
//! Design notes: each watch reads through its own ephemeral ordered
//! consumer (no acks, recreated by the client library on a gap), so a
//! watcher holds no server state beyond its stream and a slow watcher
//! delays nobody else. Every event carries its stream sequence; a client
//! that lost its stream resumes by asking for `last + 1`. Filtering happens
//! here rather than in the subject because events are published by state,
//! not by pool or instance. The stream ends when the client goes away or
//! the server shuts down: a watch must never hold a graceful shutdown open.

use std::collections::HashSet;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_bus::Bus;
use flotilla_bus::streams::EVT;
use flotilla_bus::subjects::INSTANCE_EVENTS;
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_telemetry::CancellationToken;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::validate;

/// Events buffered per watcher before reading from JetStream pauses.
const BUFFER: usize = 256;

pub type EventStream = ReceiverStream<Result<v1::InstanceEvent, Status>>;

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    pool: Option<String>,
    /// Canonical (lowercase, hyphenated) ids, as events carry them.
    ids: HashSet<String>,
}

impl Filter {
    fn from_request(req: &v1::WatchEventsRequest) -> Result<Filter, Status> {
        let pool = if req.pool.is_empty() {
            None
        } else {
            validate::name("pool", &req.pool)?;
            Some(req.pool.clone())
        };
        if req.instance_ids.len() > validate::MAX_IDS {
            return Err(invalid_field(
                "instance_ids",
                format!("at most {} ids", validate::MAX_IDS),
            ));
        }
        let ids = req
            .instance_ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                validate::instance_id(&format!("instance_ids[{i}]"), id).map(|id| id.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(Filter { pool, ids })
    }

    fn matches(&self, ev: &v1::InstanceEvent) -> bool {
        self.pool.as_ref().is_none_or(|p| *p == ev.pool)
            && (self.ids.is_empty() || self.ids.contains(&ev.instance_id))
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    tracing::warn!(error = %e, "cannot read the event stream");
    Status::unavailable("event stream unavailable, retry later")
}

/// Starts a watch; the returned stream ends on disconnect or `shutdown`.
pub async fn watch(
    bus: &Bus,
    shutdown: CancellationToken,
    req: v1::WatchEventsRequest,
) -> Result<EventStream, Status> {
    let filter = Filter::from_request(&req)?;
    let stream = bus
        .jetstream()
        .get_stream(bus.namespace().stream(EVT))
        .await
        .map_err(unavailable)?;
    let deliver_policy = if req.start_sequence > 0 {
        DeliverPolicy::ByStartSequence {
            start_sequence: req.start_sequence,
        }
    } else {
        DeliverPolicy::New
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: bus.namespace().subject(INSTANCE_EVENTS),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let mut messages = consumer.messages().await.map_err(unavailable)?;

    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                next = messages.next() => next,
            };
            let msg = match next {
                None => break,
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    // The client resumes from the last sequence it saw.
                    let _ = tx.try_send(Err(unavailable(e)));
                    break;
                }
            };
            let sequence = match msg.info() {
                Ok(info) => info.stream_sequence,
                Err(e) => {
                    tracing::warn!(error = %e, "event without stream metadata skipped");
                    continue;
                }
            };
            let mut event = match v1::InstanceEvent::decode(msg.payload.as_ref()) {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(sequence, error = %e, "undecodable instance event skipped");
                    continue;
                }
            };
            if !filter.matches(&event) {
                continue;
            }
            event.stream_sequence = sequence;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                sent = tx.send(Ok(event)) => if sent.is_err() { break },
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_keeps_only_the_pool_and_ids_asked_for() {
        let id = "0190a4f0-0000-7000-8000-000000000001";
        let ev = |pool: &str, instance_id: &str| v1::InstanceEvent {
            pool: pool.into(),
            instance_id: instance_id.into(),
            ..Default::default()
        };
        let all = Filter::from_request(&v1::WatchEventsRequest::default()).expect("ok");
        assert!(all.matches(&ev("a", id)));
        let f = Filter::from_request(&v1::WatchEventsRequest {
            pool: "a".into(),
            instance_ids: vec![id.to_uppercase()],
            ..Default::default()
        })
        .expect("ok");
        assert!(f.matches(&ev("a", id)));
        assert!(!f.matches(&ev("b", id)));
        assert!(!f.matches(&ev("a", "0190a4f0-0000-7000-8000-000000000002")));
        let bad = Filter::from_request(&v1::WatchEventsRequest {
            instance_ids: vec![id.into(), "nope".into()],
            ..Default::default()
        })
        .expect_err("refused");
        assert!(
            bad.message().starts_with("instance_ids[1]:"),
            "{}",
            bad.message()
        );
    }
}
