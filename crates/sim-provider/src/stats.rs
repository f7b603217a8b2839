//! Request counters by operation and answered status code, so tests and
//! benchmarks can see how many calls a client made and how many failed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::faults::Operation;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `{"create": {"200": 10, "500": 1}, ...}`
    pub requests: BTreeMap<Operation, BTreeMap<u16, u64>>,
}

impl Stats {
    pub(crate) fn record(&mut self, op: Operation, status: u16) {
        *self
            .requests
            .entry(op)
            .or_default()
            .entry(status)
            .or_default() += 1;
    }

    /// Calls of `op` answered with `status`.
    pub fn count(&self, op: Operation, status: u16) -> u64 {
        self.requests
            .get(&op)
            .and_then(|by_status| by_status.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Calls of `op`, whatever the answer.
    pub fn total(&self, op: Operation) -> u64 {
        self.requests
            .get(&op)
            .map(|by_status| by_status.values().sum())
            .unwrap_or(0)
    }
}
