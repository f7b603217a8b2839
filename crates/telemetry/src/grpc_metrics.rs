//! Request metrics for every tonic server: one tower layer, so each service
//! reports `flotilla_grpc_server_requests_total{service,method,code}` and
//! `flotilla_grpc_server_request_duration_seconds{service,method}` the same
//! way without touching its handlers.
//!
//! The code is read from the response headers: tonic answers an error with
//! a trailers-only response (`grpc-status` in the headers), and a success
//! with headers first and `grpc-status: 0` in the trailers. So a response
//! without `grpc-status` in its headers counts as `OK`. A stream that fails
//! after its first message is counted as `OK` too: the call started fine,
//! and its end is the handler's to report. The duration runs until the
//! response headers, which for a unary call is the whole handler.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower_layer::Layer;
use tower_service::Service;

/// Adds request metrics labelled with `service` (e.g. `api`).
#[derive(Debug, Clone, Copy)]
pub struct GrpcMetricsLayer {
    service: &'static str,
}

impl GrpcMetricsLayer {
    pub fn new(service: &'static str) -> Self {
        GrpcMetricsLayer { service }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            service: self.service,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    service: &'static str,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = method_of(req.uri().path());
        let service = self.service;
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => code_name(
                    resp.headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(0),
                ),
                // The transport failed before any status: the caller sees
                // it as UNAVAILABLE.
                Err(_) => "UNAVAILABLE",
            };
            metrics::counter!(
                "flotilla_grpc_server_requests_total",
                "service" => service, "method" => method.clone(), "code" => code
            )
            .increment(1);
            metrics::histogram!(
                "flotilla_grpc_server_request_duration_seconds",
                "service" => service, "method" => method
            )
            .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// `/flotilla.v1.FleetService/Provision` → `flotilla.v1.FleetService/Provision`.
/// Paths that are not `/<service>/<method>` (probes, scanners) share one
/// label so they cannot blow up the label space.
fn method_of(path: &str) -> String {
    let p = path.trim_start_matches('/');
    match p.split_once('/') {
        Some((svc, m))
            if !svc.is_empty()
                && !m.is_empty()
                && !m.contains('/')
                && p.len() <= 128
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._/".contains(&b)) =>
        {
            p.to_owned()
        }
        _ => "unknown".to_owned(),
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_labelled_by_path_and_odd_paths_share_one_label() {
        assert_eq!(
            method_of("/flotilla.v1.FleetService/Provision"),
            "flotilla.v1.FleetService/Provision"
        );
        assert_eq!(method_of("/"), "unknown");
        assert_eq!(method_of("/a/b/c"), "unknown");
        assert_eq!(method_of("/x/<script>"), "unknown");
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(99), "UNKNOWN");
    }
}
