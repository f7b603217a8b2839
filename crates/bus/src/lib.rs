//! Flotilla's bus over NATS JetStream.
//!
//! It owns the stream layout (`CMD` work queue, `EVT` history, `DLQ` dead
//! letters), subject names, message headers (`Nats-Msg-Id`, W3C trace
//! context, correlation id), durable pull consumers with bounded redelivery
//! and a dead-letter path, and the outbox relay that moves committed outbox
//! rows to JetStream.

pub mod consumer;
pub mod error;
pub mod relay;
pub mod streams;
pub mod subjects;

pub use consumer::{ConsumerSpec, Delivery, Outcome};
pub use error::BusError;
pub use relay::OutboxRelay;
pub use streams::{Bus, Outgoing};
