//! Identifiers that cross service boundaries.
//!
//! Instance ids are UUIDv7 (time-ordered, so indexes stay compact) and are
//! also the ownership tag written into provider metadata: an orphan found at
//! a provider is tied back to its row by this id alone.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The id of one instance, in the database and in provider metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(pub Uuid);

impl InstanceId {
    pub fn new() -> Self {
        InstanceId(Uuid::now_v7())
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for InstanceId {
    fn from(u: Uuid) -> Self {
        InstanceId(u)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for InstanceId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(InstanceId)
    }
}

/// Ties together every log line, span, action log and message caused by one
/// request. Taken from the caller when it sends one, minted otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// Longest accepted from a caller; longer ones are replaced, not trusted.
    pub const MAX_LEN: usize = 128;

    pub fn new() -> Self {
        CorrelationId(Uuid::new_v4().to_string())
    }

    /// Accepts a caller-supplied id when it is short and printable.
    pub fn parse(s: &str) -> Option<Self> {
        let ok =
            !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| CorrelationId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// NATS header carrying the correlation id.
pub const CORRELATION_HEADER: &str = "Flotilla-Correlation-Id";
/// gRPC metadata key carrying the correlation id.
pub const CORRELATION_METADATA: &str = "x-correlation-id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_from_callers_are_bounded_and_printable() {
        assert!(CorrelationId::parse("req-42").is_some());
        assert!(CorrelationId::parse("").is_none());
        assert!(CorrelationId::parse("has space").is_none());
        assert!(CorrelationId::parse("line\nbreak").is_none());
        assert!(CorrelationId::parse(&"x".repeat(CorrelationId::MAX_LEN + 1)).is_none());
    }

    #[test]
    fn instance_ids_are_time_ordered() {
        let a = InstanceId::new();
        let b = InstanceId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<InstanceId>(), Ok(a));
    }
}
