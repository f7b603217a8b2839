//! Durable pull consumers: explicit ack, nak with backoff, bounded
//! redelivery, and a dead-letter path.
//!
//! Design notes: a handler answers with an [`Outcome`]. `Retry` naks with a
//! delay; on the last allowed delivery a `Retry` is dead-lettered instead,
//! because JetStream would otherwise silently stop delivering it and leave
//! it in the work queue forever. `Reject` (a poison message, a permanent
//! error) is dead-lettered at once. Dead-lettering copies the message to
//! `DLQ.<subject>` and only then terminates the original; if the copy fails
//! the original is nak'ed, so nothing is dropped. Handlers must be
//! idempotent: redelivery after a crash is normal.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::BusError;
use crate::error::nats_error;
use crate::streams::{Bus, CMD, Outgoing, header_pairs};
use crate::subjects::headers;

/// What a handler decided about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or already done): remove it.
    Ack,
    /// Not now: redeliver after the delay (dead-lettered after the last delivery).
    Retry(Duration),
    /// Can never succeed: dead-letter it with this reason.
    Reject(String),
}

/// One received message, as handlers see it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Logical subject (`CMD.provision`).
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// 1 on first delivery.
    pub delivered: i64,
    pub stream_sequence: u64,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn msg_id(&self) -> Option<&str> {
        self.header(headers::MSG_ID)
    }
}

/// A durable consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Durable name, shared by every replica of a service.
    pub durable: String,
    /// Logical filter subject (`CMD.provision`).
    pub filter: String,
    /// Messages handled at once by one replica.
    pub concurrency: usize,
    /// Redelivery delays by attempt when a handler does not answer in time.
    pub backoff: Vec<Duration>,
}

impl ConsumerSpec {
    pub fn new(durable: impl Into<String>, filter: impl Into<String>) -> Self {
        ConsumerSpec {
            durable: durable.into(),
            filter: filter.into(),
            concurrency: 16,
            backoff: Vec::new(),
        }
    }
}

/// A bound durable pull consumer on the `CMD` stream.
pub struct Consumer {
    bus: Bus,
    spec: ConsumerSpec,
    inner: jetstream::consumer::Consumer<pull::Config>,
}

/// What [`Consumer::run_once`] handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumeStats {
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

impl Bus {
    /// Creates (or updates) the durable consumer and binds to it.
    pub async fn consumer(&self, spec: ConsumerSpec) -> Result<Consumer, BusError> {
        let stream = self
            .jetstream()
            .get_stream(self.namespace().stream(CMD))
            .await
            .map_err(nats_error)?;
        let max_deliver = self.config().max_deliver;
        let config = pull::Config {
            durable_name: Some(spec.durable.clone()),
            filter_subject: self.namespace().subject(&spec.filter),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.config().ack_wait,
            max_deliver,
            // The server requires backoff to be no longer than max_deliver.
            backoff: spec
                .backoff
                .iter()
                .take(usize::try_from(max_deliver).unwrap_or(0))
                .copied()
                .collect(),
            max_ack_pending: (spec.concurrency as i64).max(1) * 4,
            ..Default::default()
        };
        // Re-creating a durable updates its editable settings. A change the
        // server cannot apply in place (say, the filter) is applied by
        // deleting and re-creating it: on a work queue the unacked messages
        // stay in the stream and are delivered to the new consumer.
        let inner = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            Err(first) => {
                if stream.consumer_info(spec.durable.as_str()).await.is_err() {
                    return Err(nats_error(first));
                }
                tracing::warn!(durable = %spec.durable, error = %first, "re-creating consumer with new settings");
                stream
                    .delete_consumer(spec.durable.as_str())
                    .await
                    .map_err(nats_error)?;
                stream.create_consumer(config).await.map_err(nats_error)?
            }
        };
        Ok(Consumer {
            bus: self.clone(),
            spec,
            inner,
        })
    }
}

impl Consumer {
    /// Handles messages until `shutdown`; in-flight handlers finish first.
    pub async fn run<H, F>(&self, handler: H, shutdown: CancellationToken) -> Result<(), BusError>
    where
        H: Fn(Delivery) -> F + Clone,
        F: Future<Output = Outcome>,
    {
        let messages = self.inner.messages().await.map_err(nats_error)?;
        let concurrency = self.spec.concurrency.max(1);
        messages
            .take_until(shutdown.cancelled())
            .for_each_concurrent(concurrency, |msg| {
                let handler = handler.clone();
                async move {
                    match msg {
                        Ok(msg) => {
                            self.handle(msg, &handler).await;
                        }
                        Err(e) => {
                            tracing::warn!(consumer = %self.spec.durable, error = %e, "receive failed");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
            .await;
        Ok(())
    }

    /// Fetches up to `max` messages (waiting at most `wait` for the first)
    /// and handles them: lets tests drain the queue deterministically.
    pub async fn run_once<H, F>(
        &self,
        handler: H,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeStats, BusError>
    where
        H: Fn(Delivery) -> F,
        F: Future<Output = Outcome>,
    {
        let mut batch = self
            .inner
            .fetch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(nats_error)?;
        let mut stats = ConsumeStats::default();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(nats_error)?;
            match self.handle(msg, &handler).await {
                Handled::Acked => stats.acked += 1,
                Handled::Retried => stats.retried += 1,
                Handled::DeadLettered => stats.dead_lettered += 1,
            }
        }
        Ok(stats)
    }

    async fn handle<H, F>(&self, msg: jetstream::Message, handler: &H) -> Handled
    where
        H: Fn(Delivery) -> F,
        F: Future<Output = Outcome>,
    {
        let (delivered, stream_sequence) = msg
            .info()
            .map(|i| (i.delivered, i.stream_sequence))
            .unwrap_or((1, 0));
        let delivery = Delivery {
            subject: self.bus.namespace().logical(&msg.subject).to_owned(),
            payload: msg.payload.clone(),
            headers: header_pairs(msg.headers.as_ref()),
            delivered,
            stream_sequence,
        };
        let span = tracing::info_span!(
            "bus.consume",
            otel.name = %delivery.subject,
            otel.kind = "consumer",
            consumer = %self.spec.durable,
            delivered,
            correlation_id = delivery.header(headers::CORRELATION).unwrap_or(""),
        );
        flotilla_telemetry::propagation::set_parent_from_headers(&span, &delivery.headers);
        let outcome = handler(delivery.clone()).instrument(span.clone()).await;
        let _enter = span.enter();
        let last_chance = delivered >= self.bus.config().max_deliver;
        let handled = match outcome {
            Outcome::Ack => ack(&msg, AckKind::Ack).await.map(|_| Handled::Acked),
            Outcome::Retry(_) if last_chance => {
                let reason = format!("gave up after {delivered} deliveries");
                self.dead_letter(&msg, &delivery, &reason).await
            }
            Outcome::Retry(delay) => ack(&msg, AckKind::Nak(Some(delay)))
                .await
                .map(|_| Handled::Retried),
            Outcome::Reject(reason) => self.dead_letter(&msg, &delivery, &reason).await,
        };
        let handled = handled.unwrap_or_else(|e| {
            // The server will redeliver after ack_wait; nothing is lost.
            tracing::warn!(error = %e, "ack failed; message will be redelivered");
            Handled::Retried
        });
        metrics::counter!(
            "flotilla_bus_consumed_total",
            "consumer" => self.spec.durable.clone(),
            "outcome" => handled.as_str()
        )
        .increment(1);
        handled
    }

    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        d: &Delivery,
        reason: &str,
    ) -> Result<Handled, BusError> {
        let mut hdrs: Vec<(String, String)> = d
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(headers::MSG_ID))
            .cloned()
            .collect();
        hdrs.push((headers::DEAD_REASON.into(), reason.to_owned()));
        hdrs.push((headers::ORIGINAL_SUBJECT.into(), d.subject.clone()));
        hdrs.push((headers::DELIVERIES.into(), d.delivered.to_string()));
        let copy = Outgoing {
            subject: format!("DLQ.{}", d.subject),
            payload: d.payload.clone(),
            msg_id: format!(
                "dlq-{}",
                d.msg_id().unwrap_or(&d.stream_sequence.to_string())
            ),
            headers: hdrs,
        };
        if let Err(e) = self.bus.publish(&copy).await {
            tracing::error!(error = %e, subject = %d.subject, "dead-letter copy failed; retrying later");
            ack(msg, AckKind::Nak(Some(Duration::from_secs(5)))).await?;
            return Ok(Handled::Retried);
        }
        ack(msg, AckKind::Term).await?;
        tracing::error!(
            subject = %d.subject,
            consumer = %self.spec.durable,
            deliveries = d.delivered,
            reason,
            "message dead-lettered"
        );
        metrics::counter!(
            "flotilla_bus_dead_letters_total",
            "consumer" => self.spec.durable.clone()
        )
        .increment(1);
        Ok(Handled::DeadLettered)
    }
}

#[derive(Debug, Clone, Copy)]
enum Handled {
    Acked,
    Retried,
    DeadLettered,
}

impl Handled {
    fn as_str(self) -> &'static str {
        match self {
            Handled::Acked => "acked",
            Handled::Retried => "retried",
            Handled::DeadLettered => "dead_lettered",
        }
    }
}

async fn ack(msg: &jetstream::Message, kind: AckKind) -> Result<(), BusError> {
    msg.ack_with(kind).await.map_err(nats_error)
}

/// Binds a durable consumer on `subject` whose only job is to wake a
/// reconcile loop: the command's rows — with the trace and correlation id
/// of the request, on each instance row — are already in the database, so
/// each message is acked at once and `wake` notified. Runs until
/// `shutdown`; if the consumer cannot be bound the loop still runs on ticks.
pub async fn wake_on(
    bus: Bus,
    durable: &str,
    subject: &str,
    wake: std::sync::Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    match bus.consumer(ConsumerSpec::new(durable, subject)).await {
        Ok(consumer) => {
            let handler = |_: Delivery| {
                let wake = wake.clone();
                async move {
                    wake.notify_one();
                    Outcome::Ack
                }
            };
            if let Err(e) = consumer.run(handler, shutdown).await {
                tracing::error!(durable, error = %e, "wake-up consumer stopped");
            }
        }
        Err(e) => {
            tracing::error!(durable, error = %e, "cannot bind the wake-up consumer; ticks only")
        }
    }
}
