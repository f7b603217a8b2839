//! One telemetry setup for every Flotilla binary.
//!
//! It owns: the `tracing` subscriber (JSON or pretty logs, OTLP trace export
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set), W3C trace-context propagation
//! across gRPC metadata and NATS headers, the process-wide Prometheus
//! recorder and its `/metrics` endpoint, the loop metrics every reconcile
//! loop reports, the one gRPC server setup (health, reflection, request
//! metrics, correlation ids), the origin (trace and
//! correlation id) of work a loop picks up, the shutdown signal, TLS of
//! every gRPC server and client (`tls`), and (with the `http-client`
//! feature) the one HTTP client setup.

pub mod grpc;
pub mod grpc_metrics;
pub mod grpc_server;
#[cfg(feature = "http-client")]
pub mod http_client;
pub mod loops;
pub mod metrics;
pub mod origin;
pub mod propagation;
pub mod service;
pub mod shutdown;
mod subscriber;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod tls;

pub use subscriber::{TelemetryError, TelemetryGuard, init};
pub use tokio_util::sync::CancellationToken;
