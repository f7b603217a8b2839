//! Where a unit of work came from: the trace context and correlation id of
//! the command that asked for it, carried across a level-triggered loop.
//!
//! Why it exists: a `CMD.*` message only wakes a reconcile loop, and the
//! loop then claims rows from the database. Without help the loop's spans
//! would start a new trace and its action logs a new correlation id, so the
//! chain api → provider-adapter would break at the claim. The request's
//! context is therefore stored on each instance row it writes (`origin`),
//! and the loop runs each row's step [`within`] that context — whichever
//! replica claims it, after a restart too.

use std::future::Future;

use flotilla_core::CorrelationId;
use flotilla_core::ids::CORRELATION_HEADER;
use tracing::Instrument;

use crate::propagation::{current_trace_headers, set_parent_from_headers};

/// The context a request came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `traceparent`/`tracestate` of the request's span.
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

tokio::task_local! {
    static CORRELATION: CorrelationId;
}

/// The correlation id of the work the current task runs [`within`], if any.
pub fn correlation() -> Option<CorrelationId> {
    CORRELATION.try_with(|c| c.clone()).ok()
}

/// Runs `fut` for `item` under a span named `name` that continues the
/// item's `origin` trace (a new trace when none is known), with the
/// origin's correlation id recorded on the span and readable through
/// [`correlation`].
pub async fn within<F: Future>(
    name: &'static str,
    item: &str,
    origin: Option<Origin>,
    fut: F,
) -> F::Output {
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
    async fn work_runs_with_its_origins_correlation_id_or_a_fresh_one() {
        let cid = CorrelationId::parse("req-origin-1").expect("valid");
        let origin = Origin {
            trace_headers: vec![],
            correlation_id: cid.clone(),
        };
        let seen = within("test", "item-a", Some(origin), async { correlation() }).await;
        assert_eq!(seen, Some(cid));
        let other = within("test", "item-unknown", None, async { correlation() }).await;
        assert!(other.is_some_and(|c| c.as_str() != "req-origin-1"));
        assert_eq!(correlation(), None, "only inside `within`");
    }
}
