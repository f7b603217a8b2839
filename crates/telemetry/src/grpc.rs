//! gRPC plumbing shared by every server and client: the per-request span
//! (continuing the caller's trace), the correlation id, and health. The
//! server itself is put together in [`crate::grpc_server`].

use flotilla_core::CorrelationId;
use flotilla_core::ids::CORRELATION_METADATA;
use tonic::metadata::{MetadataMap, MetadataValue};
pub use tonic_health::server::{HealthReporter, health_reporter};
use tracing::Span;

use crate::propagation::{current_trace_headers, set_parent_from_headers};

/// The connections a gRPC server accepts on `listener`, with `TCP_NODELAY`:
/// `serve_with_incoming` ignores the builder's nodelay default, and
/// without it small answers wait on the client's delayed ACK.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// For `Server::builder().trace_fn(..)`: one span per call, child of the
/// caller's `traceparent`. The correlation id is recorded on it by
/// [`crate::grpc_server::CorrelationLayer`], which may have to mint it.
pub fn server_span(req: &http::Request<()>) -> Span {
    let path = req.uri().path().to_owned();
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        correlation_id = tracing::field::Empty,
    );
    let headers: Vec<(String, String)> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| {
            req.headers()
                .get(*k)
                .and_then(|v| v.to_str().ok())
                .map(|v| ((*k).to_owned(), v.to_owned()))
        })
        .collect();
    set_parent_from_headers(&span, &headers);
    span
}

/// The request's correlation id, or a new one when it has none (or a bad one).
pub fn correlation_of(md: &MetadataMap) -> CorrelationId {
    md.get(CORRELATION_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(CorrelationId::parse)
        .unwrap_or_default()
}

/// An outgoing request carrying the current trace context and `cid`.
pub fn outgoing<T>(message: T, cid: &CorrelationId) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    inject(req.metadata_mut(), cid);
    req
}

/// Writes the current trace context and `cid` into outgoing metadata.
pub fn inject(md: &mut MetadataMap, cid: &CorrelationId) {
    for (k, v) in current_trace_headers() {
        if let (Ok(key), Ok(val)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            md.insert(key, val);
        }
    }
    if let Ok(v) = MetadataValue::try_from(cid.as_str()) {
        md.insert(CORRELATION_METADATA, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_correlation_id_is_replaced_and_a_good_one_kept() {
        let minted = correlation_of(&MetadataMap::new());
        assert_eq!(minted.as_str().len(), 36);

        let mut md = MetadataMap::new();
        md.insert(CORRELATION_METADATA, MetadataValue::from_static("req-7"));
        assert_eq!(correlation_of(&md).as_str(), "req-7");

        let mut md = MetadataMap::new();
        md.insert(
            CORRELATION_METADATA,
            MetadataValue::from_static("has space"),
        );
        assert_ne!(correlation_of(&md).as_str(), "has space");
    }
}
