//! W3C trace context in and out of string header maps, so one trace spans
//! api → outbox → NATS → consumer → provider-adapter → provider HTTP call.
//!
//! The helpers speak plain `(name, value)` pairs; the gRPC and NATS layers
//! adapt their own header types to them.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct PairsInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for PairsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

struct PairsExtractor<'a>(&'a [(String, String)]);

impl Extractor for PairsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// `traceparent`/`tracestate` of the current span; empty when tracing is off.
pub fn current_trace_headers() -> Vec<(String, String)> {
    let cx = tracing::Span::current().context();
    let mut out = Vec::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut PairsInjector(&mut out))
    });
    out
}

/// Makes `span` a child of the trace the headers carry (no-op without them).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &[(String, String)]) {
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&PairsExtractor(headers)));
    use opentelemetry::trace::TraceContextExt;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
