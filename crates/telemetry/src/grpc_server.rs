//! The one way a Flotilla gRPC server is put together, so every server
//! answers the same: TCP_NODELAY connections, gRPC health, server
//! reflection (v1 and v1alpha) that lists exactly the services served, a
//! span per call continuing the caller's trace, request metrics, the
//! server's call timeout, and the correlation id on every request and
//! every response; TLS when it is given a certificate, and health alone
//! on a second, plaintext listener when asked (for probes that cannot
//! speak TLS).
//!
//! Design notes: the correlation id is handled by a tower layer rather
//! than by each service's interceptor, because only a layer sees the
//! response: a caller that sent no id learns the one minted for it from
//! the answer's `x-correlation-id`, success or error, and can find its
//! request in logs and history. The call timeout lives in the same layer
//! (inside the metrics layer) instead of `Server::timeout`, whose answer is
//! produced outside every layer: there a timed-out call carried no
//! correlation id and was never counted. A client's own `grpc-timeout` is
//! still honoured by tonic. Reflection lists only what this server serves
//! (plus health and reflection itself), not every service in the shared
//! descriptor set: a client that discovers the api must not be told it
//! serves `Provider`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use flotilla_core::CorrelationId;
use flotilla_core::ids::CORRELATION_METADATA;
use http::HeaderValue;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::server::{HealthReporter, health_reporter};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;

use crate::grpc::{incoming, server_span};
use crate::grpc_metrics::GrpcMetricsLayer;

/// Why a server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GrpcServerError {
    /// A registered descriptor set is not a valid `FileDescriptorSet`.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Binding, TLS setup or serving failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Changes the transport before any layer is added (e.g. TLS:
/// `|s| s.tls_config(tls)`), so a server can be configured without this
/// crate knowing about certificates.
pub type TransportHook =
    Box<dyn FnOnce(Server) -> Result<Server, tonic::transport::Error> + Send + 'static>;

/// A gRPC server under construction: add services, then [`GrpcServer::serve`].
pub struct GrpcServer {
    label: &'static str,
    descriptors: Vec<&'static [u8]>,
    timeout: Option<Duration>,
    transport: Option<TransportHook>,
    routes: RoutesBuilder,
    served: Vec<&'static str>,
    health: HealthReporter,
    health_listener: Option<tokio::net::TcpListener>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("label", &self.label)
            .field("served", &self.served)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Reflection services, always served and listed.
pub const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];
/// The health service, always served and listed.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

impl GrpcServer {
    /// A server whose metrics are labelled `label` (e.g. `api`) and whose
    /// reflection describes the services added from `descriptors` (an
    /// encoded `FileDescriptorSet`).
    pub fn new(label: &'static str, descriptors: &'static [u8]) -> GrpcServer {
        let (health, health_service) = health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        GrpcServer {
            label,
            descriptors: vec![descriptors],
            timeout: None,
            transport: None,
            routes,
            served: Vec::new(),
            health,
            health_listener: None,
        }
    }

    /// Longest a call may take until its response headers (a unary call's
    /// whole handler; a stream's start, not its length) before the server
    /// answers DEADLINE_EXCEEDED.
    pub fn timeout(mut self, timeout: Duration) -> GrpcServer {
        self.timeout = Some(timeout);
        self
    }

    /// Applies `hook` to the transport (TLS, keep-alives) before serving.
    pub fn transport(
        mut self,
        hook: impl FnOnce(Server) -> Result<Server, tonic::transport::Error> + Send + 'static,
    ) -> GrpcServer {
        self.transport = Some(Box::new(hook));
        self
    }

    /// Serves TLS with `config` when it is given (see
    /// [`crate::tls::server_tls`]); plaintext when `None`.
    pub fn tls(self, config: Option<tonic::transport::ServerTlsConfig>) -> GrpcServer {
        match config {
            Some(config) => self.transport(move |s| s.tls_config(config)),
            None => self,
        }
    }

    /// Also answers gRPC health, and nothing else, in plaintext on
    /// `listener`: the kubelet's gRPC probe and most health checkers
    /// cannot speak TLS, and health tells only SERVING or NOT_SERVING.
    /// It stops with the server.
    pub fn health_listener(mut self, listener: Option<tokio::net::TcpListener>) -> GrpcServer {
        self.health_listener = listener;
        self
    }

    /// Serves `svc` and lists it in reflection.
    pub fn add_service<S>(mut self, svc: S) -> GrpcServer
    where
        S: Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.served.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// The health of this server's services, to turn SERVING and back.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Every service name reflection lists: the added ones, health and
    /// reflection itself.
    pub fn listed(&self) -> Vec<&'static str> {
        let mut names = self.served.clone();
        names.push(HEALTH_SERVICE);
        names.extend(REFLECTION_SERVICES);
        names
    }

    fn reflection_builder(&self) -> tonic_reflection::server::Builder<'static> {
        let mut b = tonic_reflection::server::Builder::configure()
            // Both reflection versions are described by both services, so
            // either answers for every name it lists.
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for d in &self.descriptors {
            b = b.register_encoded_file_descriptor_set(d);
        }
        for name in self.listed() {
            b = b.with_service_name(name);
        }
        b
    }

    /// Serves on `listener` until `signal` completes, then finishes the
    /// calls in flight.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()>,
    ) -> Result<(), GrpcServerError> {
        let v1 = self.reflection_builder().build_v1()?;
        let v1alpha = self.reflection_builder().build_v1alpha()?;
        self.routes.add_service(v1).add_service(v1alpha);
        let mut server = Server::builder();
        let tls = self.transport.is_some();
        if let Some(hook) = self.transport.take() {
            server = hook(server)?;
        }
        tracing::info!(
            server = self.label,
            addr = ?listener.local_addr().ok(),
            services = ?self.served,
            tls,
            "gRPC serving"
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let health_only = self.health_listener.take().map(|l| {
            tracing::info!(server = self.label, addr = ?l.local_addr().ok(), "gRPC health serving (plaintext, health only)");
            let svc = tonic_health::pb::health_server::HealthServer::new(
                tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
            );
            let stop = stop.clone();
            tokio::spawn(async move {
                Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming(l), stop.cancelled_owned())
                    .await
            })
        });
        let served = server
            .trace_fn(server_span)
            .layer(GrpcMetricsLayer::new(self.label))
            .layer(CorrelationLayer::new(self.timeout))
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming(listener), signal)
            .await;
        stop.cancel();
        if let Some(task) = health_only
            && let Ok(Err(e)) = task.await
        {
            tracing::warn!(server = self.label, error = %e, "health-only listener failed");
        }
        served?;
        Ok(())
    }
}

/// Gives every request a usable correlation id (the caller's, or a new
/// one), records it on the call's span and returns it in the response
/// headers; bounds the call by the server's timeout.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationLayer {
    timeout: Option<Duration>,
}

impl CorrelationLayer {
    pub fn new(timeout: Option<Duration>) -> Self {
        CorrelationLayer { timeout }
    }
}

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;

    fn layer(&self, inner: S) -> Correlation<S> {
        Correlation {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Correlation<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Correlation<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let cid = req
            .headers()
            .get(CORRELATION_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(CorrelationId::parse)
            .unwrap_or_default();
        // `CorrelationId::parse` admits only visible ASCII, so this holds.
        let value = HeaderValue::from_str(cid.as_str()).ok();
        if let Some(v) = &value {
            req.headers_mut().insert(CORRELATION_METADATA, v.clone());
        }
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Polled inside the call's span (tonic enters it on each poll).
            Span::current().record("correlation_id", cid.as_str());
            let result = match timeout {
                None => fut.await,
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                        "the call took longer than the server's {} s limit",
                        t.as_secs_f64()
                    ))
                    .into_http()),
                },
            };
            result.map(|mut resp| {
                if let Some(v) = value {
                    resp.headers_mut().insert(CORRELATION_METADATA, v);
                }
                resp
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers with the correlation id the request reached it with, as a
    /// header of its own, after `delay`.
    #[derive(Clone)]
    struct Echo {
        delay: Duration,
    }

    impl Service<http::Request<()>> for Echo {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let seen = req.headers().get(CORRELATION_METADATA).cloned();
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut resp = http::Response::new(String::new());
                if let Some(seen) = seen {
                    resp.headers_mut().insert("seen", seen);
                }
                Ok(resp)
            })
        }
    }

    fn request(cid: Option<&'static str>) -> http::Request<()> {
        let mut req = http::Request::new(());
        if let Some(cid) = cid {
            req.headers_mut()
                .insert(CORRELATION_METADATA, HeaderValue::from_static(cid));
        }
        req
    }

    #[tokio::test]
    async fn a_missing_or_bad_correlation_id_is_replaced_and_returned_and_a_good_one_kept() {
        let mut svc = CorrelationLayer::new(None).layer(Echo {
            delay: Duration::ZERO,
        });
        let resp = svc.call(request(None)).await.expect("answer");
        let minted = resp.headers()[CORRELATION_METADATA].clone();
        assert_eq!(minted.len(), 36, "{minted:?}");
        // The handler read the same id the caller is told.
        assert_eq!(resp.headers()["seen"], minted);

        let resp = svc.call(request(Some("req-7"))).await.expect("answer");
        assert_eq!(resp.headers()[CORRELATION_METADATA], "req-7");
        assert_eq!(resp.headers()["seen"], "req-7");

        let resp = svc.call(request(Some("has space"))).await.expect("answer");
        assert_ne!(resp.headers()[CORRELATION_METADATA], "has space");
        assert_eq!(resp.headers()["seen"], resp.headers()[CORRELATION_METADATA]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_the_timeout_is_answered_deadline_exceeded_with_its_correlation_id() {
        let mut svc = CorrelationLayer::new(Some(Duration::from_secs(60))).layer(Echo {
            delay: Duration::from_secs(61),
        });
        let resp = svc.call(request(Some("slow-1"))).await.expect("answer");
        assert_eq!(resp.headers()["grpc-status"], "4");
        assert_eq!(resp.headers()[CORRELATION_METADATA], "slow-1");
        assert!(resp.headers().get("seen").is_none());

        let mut svc = CorrelationLayer::new(Some(Duration::from_secs(60))).layer(Echo {
            delay: Duration::from_secs(59),
        });
        let resp = svc.call(request(Some("fast-1"))).await.expect("answer");
        assert!(resp.headers().get("grpc-status").is_none());
        assert_eq!(resp.headers()["seen"], "fast-1");
    }
}
