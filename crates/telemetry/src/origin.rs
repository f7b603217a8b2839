//! Where a unit of work came from: the trace context and correlation id of
//! the command that asked for it, carried across a level-triggered loop.
//!
//! Why it exists: a `CMD.*` message only wakes a reconcile loop, and the
//! loop then claims rows from the database. Without help the loop's spans
//! would start a new trace and its action logs a new correlation id, so the
//! chain api → NATS → consumer → provider-adapter would break at the claim.
//! The consumer therefore [`remember`]s, per item (an instance id), the
//! context it received; the loop runs each item [`within`] that context.
//! The memory is per process and bounded: an item claimed by another
//! replica, or after a restart, simply starts its own trace — convergence
//! never depends on it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use flotilla_core::CorrelationId;
use flotilla_core::ids::CORRELATION_HEADER;
use tracing::Instrument;

use crate::propagation::{current_trace_headers, set_parent_from_headers};

/// Most items remembered at once; the oldest are forgotten first.
const MAX_ITEMS: usize = 50_000;
/// How long an origin is kept: longer than a provisioning or termination
/// with its retries normally takes, short enough to bound memory.
const TTL: Duration = Duration::from_secs(15 * 60);

/// The context a command arrived with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `traceparent`/`tracestate` of the span that received the command.
    pub trace_headers: Vec<(String, String)>,
    pub correlation_id: CorrelationId,
}

impl Origin {
    /// The context of the current span, with the correlation id found in
    /// `headers` (a received message's) or a new one.
    pub fn current(headers: &[(String, String)]) -> Origin {
        let correlation_id = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(CORRELATION_HEADER))
            .and_then(|(_, v)| CorrelationId::parse(v))
            .unwrap_or_default();
        Origin {
            trace_headers: current_trace_headers(),
            correlation_id,
        }
    }
}

struct Entry {
    at: Instant,
    origin: Origin,
}

fn registry() -> &'static Mutex<HashMap<String, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Remembers where the work on `item` came from.
pub fn remember(item: impl Into<String>, origin: Origin) {
    let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_ITEMS {
        let now = Instant::now();
        map.retain(|_, e| now.duration_since(e.at) < TTL);
        if map.len() >= MAX_ITEMS {
            // Still full of fresh entries (a burst): forget the oldest half.
            let mut ages: Vec<Instant> = map.values().map(|e| e.at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            map.retain(|_, e| e.at > cut);
        }
    }
    map.insert(
        item.into(),
        Entry {
            at: Instant::now(),
            origin,
        },
    );
}

/// The origin of `item`, if this process received one recently.
pub fn lookup(item: &str) -> Option<Origin> {
    let map = registry().lock().unwrap_or_else(|p| p.into_inner());
    map.get(item)
        .filter(|e| e.at.elapsed() < TTL)
        .map(|e| e.origin.clone())
}

/// Forgets `item` (its work is done).
pub fn forget(item: &str) {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(item);
}

tokio::task_local! {
    static CORRELATION: CorrelationId;
}

/// The correlation id of the work the current task runs [`within`], if any.
pub fn correlation() -> Option<CorrelationId> {
    CORRELATION.try_with(|c| c.clone()).ok()
}

/// Runs `fut` for `item` under a span named `name` that continues the
/// item's origin trace (a new trace when none is known), with the origin's
/// correlation id recorded on the span and readable through [`correlation`].
pub async fn within<F: Future>(name: &'static str, item: &str, fut: F) -> F::Output {
    let origin = lookup(item);
    let cid = origin
        .as_ref()
        .map(|o| o.correlation_id.clone())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "work",
        otel.name = name,
        item = item,
        correlation_id = cid.as_str(),
    );
    if let Some(o) = &origin {
        set_parent_from_headers(&span, &o.trace_headers);
    }
    CORRELATION.scope(cid, fut.instrument(span)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_with_the_remembered_correlation_id_or_a_fresh_one() {
        let cid = CorrelationId::parse("req-origin-1").expect("valid");
        remember(
            "item-a",
            Origin {
                trace_headers: vec![],
                correlation_id: cid.clone(),
            },
        );
        let seen = within("test", "item-a", async { correlation() }).await;
        assert_eq!(seen, Some(cid));
        let other = within("test", "item-unknown", async { correlation() }).await;
        assert!(other.is_some_and(|c| c.as_str() != "req-origin-1"));
        assert_eq!(correlation(), None, "only inside `within`");
        forget("item-a");
        assert_eq!(lookup("item-a"), None);
    }
}
