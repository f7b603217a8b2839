//! Bus errors, classified like every other layer's.

use flotilla_core::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS could not be reached, or did not answer in time.
    #[error("nats unavailable: {0}")]
    Unavailable(String),
    /// JetStream refused the request (bad config, no such stream).
    #[error("jetstream refused: {0}")]
    Refused(String),
    /// The namespace or a subject is malformed.
    #[error("invalid bus configuration: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Store(#[from] flotilla_store::StoreError),
}

impl Classify for BusError {
    fn class(&self) -> ErrorClass {
        match self {
            BusError::Unavailable(_) => ErrorClass::Retryable,
            BusError::Refused(_) | BusError::InvalidConfig(_) => ErrorClass::Permanent,
            BusError::Store(e) => e.class(),
        }
    }
}

impl From<sqlx::Error> for BusError {
    fn from(e: sqlx::Error) -> Self {
        BusError::Store(e.into())
    }
}

/// Maps any async-nats error by its text: async-nats has one error type per
/// call, all of which are either "could not talk to the server" or "the
/// server said no".
pub(crate) fn nats_error(e: impl std::fmt::Display) -> BusError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("timed out")
        || lower.contains("timeout")
        || lower.contains("no responders")
        || lower.contains("disconnected")
        || lower.contains("connection")
        || lower.contains("broken pipe")
    {
        BusError::Unavailable(text)
    } else {
        BusError::Refused(text)
    }
}
