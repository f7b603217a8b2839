//! Provider errors to gRPC statuses and back: the one place where the closed
//! error set meets the wire, so every service classifies a status the same way.

use std::time::Duration;

use flotilla_core::ProviderError;
use tonic::{Code, Status};

/// Metadata key carrying a rate-limit delay in milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The status a provider error is sent as.
pub fn provider_error_to_status(e: &ProviderError) -> Status {
    let msg = e.to_string();
    match e {
        ProviderError::NotFound(_) => Status::not_found(msg),
        ProviderError::FailedPrecondition(_) => Status::failed_precondition(msg),
        ProviderError::ResourceExhausted { retry_after, .. } => {
            let mut status = Status::resource_exhausted(msg);
            if let Some(after) = retry_after
                && let Ok(v) = after.as_millis().to_string().parse()
            {
                status.metadata_mut().insert(RETRY_AFTER_MS, v);
            }
            status
        }
        ProviderError::Unavailable(_) => Status::unavailable(msg),
        ProviderError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
        ProviderError::InvalidArgument(_) => Status::invalid_argument(msg),
        ProviderError::PermissionDenied(_) => Status::permission_denied(msg),
        ProviderError::Unauthenticated(_) => Status::unauthenticated(msg),
    }
}

/// The provider error a status means. Codes outside the closed set (a bug,
/// a proxy's answer) are treated as transient: retrying is the safe choice
/// for a call whose effect is unknown, and `NotFound` is never guessed.
pub fn status_to_provider_error(s: &Status) -> ProviderError {
    let msg = s.message().to_owned();
    match s.code() {
        Code::NotFound => ProviderError::NotFound(msg),
        Code::FailedPrecondition | Code::Aborted => ProviderError::FailedPrecondition(msg),
        Code::ResourceExhausted => ProviderError::ResourceExhausted {
            message: msg,
            retry_after: s
                .metadata()
                .get(RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        },
        Code::DeadlineExceeded | Code::Cancelled => ProviderError::DeadlineExceeded(msg),
        Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => {
            ProviderError::InvalidArgument(msg)
        }
        Code::PermissionDenied => ProviderError::PermissionDenied(msg),
        Code::Unauthenticated => ProviderError::Unauthenticated(msg),
        Code::Unavailable
        | Code::Internal
        | Code::Unknown
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Ok => ProviderError::Unavailable(msg),
    }
}

/// Longest message (in chars) a refusal carries. It travels percent-encoded
/// in the `grpc-message` HTTP/2 header; echoing a huge input there exceeds
/// the peer's header limit and the caller gets a PROTOCOL_ERROR instead of
/// the refusal (found by the api fuzz test).
pub const MAX_MESSAGE_CHARS: usize = 512;

/// INVALID_ARGUMENT naming the offending field, the form every API uses.
pub fn invalid_field(field: &str, why: impl std::fmt::Display) -> Status {
    let mut message = format!("{field}: {why}");
    if message.chars().count() > MAX_MESSAGE_CHARS {
        message = message.chars().take(MAX_MESSAGE_CHARS).collect();
        message.push('…');
    }
    Status::invalid_argument(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_error_survives_the_wire() {
        let all = [
            ProviderError::NotFound("m1".into()),
            ProviderError::FailedPrecondition("started".into()),
            ProviderError::ResourceExhausted {
                message: "slow down".into(),
                retry_after: Some(Duration::from_millis(1500)),
            },
            ProviderError::ResourceExhausted {
                message: "slow down".into(),
                retry_after: None,
            },
            ProviderError::Unavailable("503".into()),
            ProviderError::DeadlineExceeded("slow".into()),
            ProviderError::InvalidArgument("size".into()),
            ProviderError::PermissionDenied("no".into()),
            ProviderError::Unauthenticated("token".into()),
        ];
        for e in all {
            let back = status_to_provider_error(&provider_error_to_status(&e));
            assert_eq!(back.kind(), e.kind());
            assert_eq!(back.retry_after(), e.retry_after());
        }
    }

    #[test]
    fn unknown_codes_are_transient_never_not_found() {
        for code in [Code::Internal, Code::Unknown, Code::Unimplemented] {
            let e = status_to_provider_error(&Status::new(code, "x"));
            assert_eq!(e.kind(), "unavailable");
        }
    }

    #[test]
    fn a_refusal_echoing_a_huge_input_is_cut_to_fit_a_header() {
        let s = invalid_field("labels", format!("key {:?}: bad", "x".repeat(70_000)));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().starts_with("labels: key \"xxx"));
        assert_eq!(s.message().chars().count(), MAX_MESSAGE_CHARS + 1);
    }
}
