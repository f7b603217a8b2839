//! The agent's side of the worker API: one client that authenticates and
//! traces every call, and the meaning of each failure for the agent.
//!
//! Design notes: the channel connects lazily and reconnects by itself, so a
//! control plane that is down at boot or goes away later is one more failed
//! call, never a dead client. Each call gets its own correlation id and span,
//! so one heartbeat can be followed into the api's logs. The connection is
//! pinged (HTTP/2 keepalive) even while idle: a worker whose network moves
//! under it (a new address, a NAT entry dropped, a partition healed on the
//! other side) holds a connection that answers nothing and resets nothing,
//! and a per-call timeout alone would fail every heartbeat on it until the
//! kernel gives up on TCP, minutes later, long after the worker is declared
//! dead. An unanswered ping closes it and the next call connects afresh.

use std::future::Future;
use std::time::Duration;

use flotilla_core::config::Secret;
use flotilla_core::{CorrelationId, InstanceId};
use flotilla_proto::v1;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::tls::ClientTls;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::AgentError;

/// What a failed call means for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The api does not accept this worker's credentials; asking again
    /// cannot change that.
    Rejected,
    /// The api answered but refuses this request as it stands.
    Refused,
    /// The api could not be reached or could not answer now; worth retrying.
    Transient,
}

impl Fault {
    /// No wildcard arm: a new code must be placed deliberately.
    pub fn of(code: Code) -> Fault {
        match code {
            Code::Unauthenticated | Code::PermissionDenied => Fault::Rejected,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::DataLoss
            | Code::Ok => Fault::Refused,
            Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable => Fault::Transient,
        }
    }
}

/// One failed call to the worker API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{rpc} failed: {code:?}: {message}")]
pub struct CallError {
    pub rpc: &'static str,
    pub code: Code,
    pub message: String,
    pub fault: Fault,
}

impl CallError {
    fn new(rpc: &'static str, status: &Status) -> Self {
        CallError {
            rpc,
            code: status.code(),
            message: status.message().to_owned(),
            fault: Fault::of(status.code()),
        }
    }
}

/// The worker API as this instance sees it.
#[derive(Clone)]
pub struct WorkerApi {
    client: WorkerServiceClient<Channel>,
    instance_id: String,
    bearer: AsciiMetadataValue,
}

impl std::fmt::Debug for WorkerApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerApi")
            .field("instance_id", &self.instance_id)
            .finish()
    }
}

impl WorkerApi {
    /// Must be called inside a Tokio runtime (the channel's worker is
    /// spawned). `tls` decides how `url` may be reached: TLS for
    /// `https://`, plaintext only to loopback unless allowed, since the
    /// worker token is in every call's headers.
    pub fn new(
        url: &str,
        tls: &ClientTls,
        timeout: Duration,
        keepalive: Duration,
        instance_id: InstanceId,
        token: &Secret,
    ) -> Result<WorkerApi, AgentError> {
        if token.is_empty() {
            return Err(AgentError::Config(
                "FLOTILLA_WORKER_TOKEN is empty".to_owned(),
            ));
        }
        // The message names the variable, never the value.
        let mut bearer: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                AgentError::Config(
                    "FLOTILLA_WORKER_TOKEN holds characters not allowed in a header".to_owned(),
                )
            })?;
        bearer.set_sensitive(true);
        let endpoint = tls
            .endpoint(url)
            .map_err(|e| AgentError::Config(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive)
            .keep_alive_while_idle(true);
        Ok(WorkerApi {
            client: WorkerServiceClient::new(endpoint.connect_lazy()),
            instance_id: instance_id.to_string(),
            bearer,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub async fn register(&self, hostname: String) -> Result<v1::RegisterResponse, CallError> {
        let message = v1::RegisterRequest {
            instance_id: self.instance_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname,
        };
        self.call("Register", message, |mut c, r| async move {
            c.register(r).await
        })
        .await
    }

    pub async fn report_phase(
        &self,
        phase: v1::WorkerPhase,
    ) -> Result<v1::ReportPhaseResponse, CallError> {
        let message = v1::ReportPhaseRequest {
            instance_id: self.instance_id.clone(),
            phase: phase.into(),
            message: String::new(),
        };
        self.call("ReportPhase", message, |mut c, r| async move {
            c.report_phase(r).await
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        message: v1::HeartbeatRequest,
    ) -> Result<v1::HeartbeatResponse, CallError> {
        self.call("Heartbeat", message, |mut c, r| async move {
            c.heartbeat(r).await
        })
        .await
    }

    async fn call<M, R, F, Fut>(
        &self,
        rpc: &'static str,
        message: M,
        send: F,
    ) -> Result<R, CallError>
    where
        F: FnOnce(WorkerServiceClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let cid = CorrelationId::new();
        let span = tracing::debug_span!("worker_call", rpc, correlation_id = %cid);
        async move {
            // Built inside the span so the trace context it carries is this call's.
            let mut request = outgoing(message, &cid);
            request
                .metadata_mut()
                .insert("authorization", self.bearer.clone());
            send(self.client.clone(), request)
                .await
                .map(Response::into_inner)
                .map_err(|status| CallError::new(rpc, &status))
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_credential_refusals_are_permanent_rejections() {
        assert_eq!(Fault::of(Code::Unauthenticated), Fault::Rejected);
        assert_eq!(Fault::of(Code::PermissionDenied), Fault::Rejected);
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::ResourceExhausted,
        ] {
            assert_eq!(Fault::of(code), Fault::Transient, "{code:?}");
        }
        assert_eq!(Fault::of(Code::FailedPrecondition), Fault::Refused);
    }

    #[tokio::test]
    async fn a_token_that_cannot_be_a_header_is_a_config_error_that_does_not_echo_it() {
        let token: Secret = "bad\ntoken".parse().expect("infallible");
        let err = WorkerApi::new(
            "http://127.0.0.1:1",
            &tls(),
            Duration::from_secs(1),
            Duration::from_secs(1),
            InstanceId::new(),
            &token,
        )
        .expect_err("refused");
        assert!(matches!(err, AgentError::Config(_)));
        assert!(!err.to_string().contains("bad\ntoken"));
    }

    #[tokio::test]
    async fn an_empty_token_or_a_bad_url_is_a_config_error() {
        let empty = Secret::default();
        let ok: Secret = "t".parse().expect("infallible");
        let id = InstanceId::new();
        let timeout = Duration::from_secs(1);
        let tls = tls();
        assert!(WorkerApi::new("http://127.0.0.1:1", &tls, timeout, timeout, id, &empty).is_err());
        assert!(WorkerApi::new("not a url", &tls, timeout, timeout, id, &ok).is_err());
        assert!(WorkerApi::new("http://127.0.0.1:1", &tls, timeout, timeout, id, &ok).is_ok());
    }

    fn tls() -> ClientTls {
        ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "AGENT_ALLOW_PLAINTEXT",
        )
    }

    #[tokio::test]
    async fn the_worker_token_is_not_sent_in_plaintext_beyond_loopback_unless_allowed() {
        let ok: Secret = "t".parse().expect("infallible");
        let (id, timeout) = (InstanceId::new(), Duration::from_secs(1));
        let err = WorkerApi::new(
            "http://api.example.com:50051",
            &tls(),
            timeout,
            timeout,
            id,
            &ok,
        )
        .expect_err("refused");
        assert!(err.to_string().contains("AGENT_ALLOW_PLAINTEXT"), "{err}");
        let allowed = tls().allow_plaintext(true);
        assert!(
            WorkerApi::new(
                "http://api.example.com:50051",
                &allowed,
                timeout,
                timeout,
                id,
                &ok
            )
            .is_ok()
        );
        assert!(
            WorkerApi::new(
                "https://api.example.com:50051",
                &tls(),
                timeout,
                timeout,
                id,
                &ok
            )
            .is_ok()
        );
    }
}
