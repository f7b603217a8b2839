//! The connection, the three streams and publishing.
//!
//! Design notes: `CMD` uses work-queue retention (a command is gone once a
//! consumer acks it) with file storage and a duplicate window, so a command
//! republished by the outbox relay after a crash is stored once. `EVT` keeps
//! history by limits so `WatchEvents` can resume from a sequence. `DLQ` keeps
//! what could not be handled, for an operator. Setup is idempotent
//! (create-or-update), so every replica runs it at start.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use flotilla_core::config::NatsArgs;

use crate::BusError;
use crate::error::nats_error;
use crate::subjects::{self, Namespace, headers};

/// Stream settings; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub duplicate_window: Duration,
    /// How long an unconsumed command is kept. Commands are wake-ups (the
    /// intent is in PostgreSQL and the reconcile loops carry it out anyway),
    /// so one nobody consumed for this long is dropped rather than kept
    /// forever.
    pub commands_max_age: Duration,
    /// How long instance events are kept for replay.
    pub events_max_age: Duration,
    /// How long dead letters are kept.
    pub dead_letter_max_age: Duration,
    pub max_deliver: i64,
    pub ack_wait: Duration,
    /// Copies of each stream across a JetStream cluster.
    pub replicas: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            duplicate_window: Duration::from_secs(600),
            commands_max_age: Duration::from_secs(24 * 3600),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            dead_letter_max_age: Duration::from_secs(14 * 24 * 3600),
            max_deliver: 8,
            ack_wait: Duration::from_secs(30),
            replicas: 1,
        }
    }
}

/// A message to publish: logical subject, payload, id and headers.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub payload: Bytes,
    /// Becomes `Nats-Msg-Id`; republishing the same id within the duplicate
    /// window is dropped by the server.
    pub msg_id: String,
    /// Extra headers (trace context, correlation id).
    pub headers: Vec<(String, String)>,
}

/// What the server said about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// The server had this `Nats-Msg-Id` already and did not store it again.
    pub duplicate: bool,
}

/// The servers of `NATS_URL`: one URL, or a comma-separated list of a
/// cluster's nodes. With one seed only, a service that starts while that
/// node is down cannot join the cluster at all; with all of them it takes
/// whichever answers.
pub fn seed_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    let seeds = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::InvalidConfig(format!("NATS_URL {u:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if seeds.is_empty() {
        return Err(BusError::InvalidConfig(
            "NATS_URL: no server given".to_owned(),
        ));
    }
    Ok(seeds)
}

/// A JetStream connection in one namespace.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    ns: Namespace,
    config: BusConfig,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("namespace", &self.ns).finish()
    }
}

pub const CMD: &str = "CMD";
pub const EVT: &str = "EVT";
pub const DLQ: &str = "DLQ";

impl Bus {
    /// Connects, retrying the initial connection in the background, as
    /// services start before NATS in compose and Kubernetes.
    pub async fn connect(args: &NatsArgs) -> Result<Bus, BusError> {
        let ns = Namespace::new(&args.nats_namespace).ok_or_else(|| {
            BusError::InvalidConfig(format!(
                "NATS_NAMESPACE {:?}: letters, digits and _ only",
                args.nats_namespace
            ))
        })?;
        let seeds = seed_addrs(&args.nats_url)?;
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(seeds)
            .await
            .map_err(nats_error)?;
        let config = BusConfig {
            duplicate_window: Duration::from_secs(args.nats_duplicate_window_seconds),
            max_deliver: args.nats_max_deliver,
            ack_wait: Duration::from_secs(args.nats_ack_wait_seconds),
            replicas: usize::from(args.nats_stream_replicas),
            ..BusConfig::default()
        };
        Ok(Bus::new(client, ns, config))
    }

    pub fn new(client: async_nats::Client, ns: Namespace, config: BusConfig) -> Bus {
        let js = jetstream::new(client.clone());
        Bus {
            client,
            js,
            ns,
            config,
        }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates or updates the `CMD`, `EVT` and `DLQ` streams.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let configs = [
            stream::Config {
                name: self.ns.stream(CMD),
                subjects: vec![self.ns.subject("CMD.>")],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.commands_max_age,
                num_replicas: self.config.replicas,
                ..Default::default()
            },
            stream::Config {
                name: self.ns.stream(EVT),
                subjects: vec![self.ns.subject(subjects::EVENTS)],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.events_max_age,
                num_replicas: self.config.replicas,
                ..Default::default()
            },
            stream::Config {
                name: self.ns.stream(DLQ),
                subjects: vec![self.ns.subject("DLQ.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                max_age: self.config.dead_letter_max_age,
                num_replicas: self.config.replicas,
                ..Default::default()
            },
        ];
        for config in configs {
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(nats_error)?;
        }
        Ok(())
    }

    /// Sends one message without waiting for the ack.
    async fn send(&self, msg: &Outgoing) -> Result<PublishAckFuture, BusError> {
        let mut map = HeaderMap::new();
        for (k, v) in &msg.headers {
            map.insert(k.as_str(), v.as_str());
        }
        map.insert(headers::MSG_ID, msg.msg_id.as_str());
        let publish = PublishMessage::build()
            .payload(msg.payload.clone())
            .headers(map);
        self.js
            .send_publish(self.ns.subject(&msg.subject), publish)
            .await
            .map_err(nats_error)
    }

    /// Publishes and waits for the server's ack.
    pub async fn publish(&self, msg: &Outgoing) -> Result<Published, BusError> {
        let ack = self.send(msg).await?.await.map_err(nats_error)?;
        count_published(&msg.subject, ack.duplicate);
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Publishes many messages pipelined (all sent, then all acks awaited),
    /// in order. One result per message.
    pub async fn publish_batch(&self, msgs: &[Outgoing]) -> Vec<Result<Published, BusError>> {
        let mut pending = Vec::with_capacity(msgs.len());
        for m in msgs {
            pending.push(self.send(m).await);
        }
        let mut out = Vec::with_capacity(msgs.len());
        for (p, m) in pending.into_iter().zip(msgs) {
            out.push(match p {
                Ok(fut) => match fut.await {
                    Ok(ack) => {
                        count_published(&m.subject, ack.duplicate);
                        Ok(Published {
                            sequence: ack.sequence,
                            duplicate: ack.duplicate,
                        })
                    }
                    Err(e) => Err(nats_error(e)),
                },
                Err(e) => Err(e),
            });
        }
        out
    }
}

fn count_published(subject: &str, duplicate: bool) {
    let root = subject.split('.').next().unwrap_or("");
    let root = match root {
        "CMD" => "CMD",
        "EVT" => "EVT",
        "DLQ" => "DLQ",
        _ => "other",
    };
    metrics::counter!(
        "flotilla_bus_published_total",
        "stream" => root,
        "duplicate" => if duplicate { "true" } else { "false" }
    )
    .increment(1);
}

/// Headers of a received message as `(name, value)` pairs.
pub fn header_pairs(map: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(map) = map else { return Vec::new() };
    map.iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| (k.to_string(), v.as_str().to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_takes_one_server_or_a_cluster_seed_list() {
        let one = seed_addrs("nats://127.0.0.1:4222").expect("one URL");
        assert_eq!(one.len(), 1);
        let three = seed_addrs("nats://nats:4222, nats://nats-1:4222,nats://nats-2:4222")
            .expect("a seed list");
        let hosts: Vec<String> = three.iter().map(|a| a.host().to_owned()).collect();
        assert_eq!(hosts, ["nats", "nats-1", "nats-2"]);
    }

    #[test]
    fn a_bad_nats_url_names_the_entry_at_fault() {
        let err = seed_addrs("nats://ok:4222,nats://bad:port").expect_err("a bad port");
        assert!(
            matches!(&err, BusError::InvalidConfig(m) if m.contains("nats://bad:port")),
            "{err:?}"
        );
        assert!(matches!(seed_addrs(" , "), Err(BusError::InvalidConfig(_))));
    }
}
