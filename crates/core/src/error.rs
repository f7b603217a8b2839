//! The closed set of provider outcomes and how every layer treats them.
//!
//! Provider errors are classified once, in the provider layer, into
//! [`ProviderError`]; they cross gRPC as status codes (see `flotilla-proto`)
//! and every consumer decides what to do from [`ErrorClass`] alone. The
//! matches below have no wildcard arm on purpose: a new variant must be
//! classified before the code compiles.

use std::time::Duration;

/// What a caller does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Try again later: transient, rate limited, or waiting on a precondition.
    Retryable,
    /// Trying again cannot help: bad request, bad credentials, refused.
    Permanent,
    /// The effect the caller wanted already holds (deleting a machine that is gone).
    AlreadyDone,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 3] = [
        ErrorClass::Retryable,
        ErrorClass::Permanent,
        ErrorClass::AlreadyDone,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
            ErrorClass::AlreadyDone => "already_done",
        }
    }
}

/// Anything that can be classified.
pub trait Classify {
    fn class(&self) -> ErrorClass;
}

/// A provider call that did not do what was asked. The message is for
/// humans and never carries credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The machine or volume does not exist (HTTP 404, or a listing proved it absent).
    #[error("not found: {0}")]
    NotFound(String),
    /// Refused in the current state (Fly's 412 on deleting a started machine,
    /// a volume still bound); retry after the state changes.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Rate limited (HTTP 429) or quota; back off at least `retry_after`.
    #[error("rate limited: {message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Transient failure (5xx, connection error, circuit open).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call did not answer in time; its effect is unknown.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The request is wrong and will stay wrong.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Authenticated, but not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Credentials missing or rejected.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
}

impl Classify for ProviderError {
    fn class(&self) -> ErrorClass {
        match self {
            ProviderError::NotFound(_) => ErrorClass::AlreadyDone,
            ProviderError::FailedPrecondition(_)
            | ProviderError::ResourceExhausted { .. }
            | ProviderError::Unavailable(_)
            | ProviderError::DeadlineExceeded(_) => ErrorClass::Retryable,
            ProviderError::InvalidArgument(_)
            | ProviderError::PermissionDenied(_)
            | ProviderError::Unauthenticated(_) => ErrorClass::Permanent,
        }
    }
}

impl ProviderError {
    /// A short stable label for metrics and logs.
    pub const fn kind(&self) -> &'static str {
        match self {
            ProviderError::NotFound(_) => "not_found",
            ProviderError::FailedPrecondition(_) => "failed_precondition",
            ProviderError::ResourceExhausted { .. } => "resource_exhausted",
            ProviderError::Unavailable(_) => "unavailable",
            ProviderError::DeadlineExceeded(_) => "deadline_exceeded",
            ProviderError::InvalidArgument(_) => "invalid_argument",
            ProviderError::PermissionDenied(_) => "permission_denied",
            ProviderError::Unauthenticated(_) => "unauthenticated",
        }
    }

    /// The least a caller should wait before retrying, when the provider said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::ResourceExhausted { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_found_means_already_done() {
        let all = [
            ProviderError::NotFound(String::new()),
            ProviderError::FailedPrecondition(String::new()),
            ProviderError::ResourceExhausted {
                message: String::new(),
                retry_after: None,
            },
            ProviderError::Unavailable(String::new()),
            ProviderError::DeadlineExceeded(String::new()),
            ProviderError::InvalidArgument(String::new()),
            ProviderError::PermissionDenied(String::new()),
            ProviderError::Unauthenticated(String::new()),
        ];
        for e in &all {
            let done = e.class() == ErrorClass::AlreadyDone;
            assert_eq!(done, matches!(e, ProviderError::NotFound(_)), "{e}");
        }
        assert_eq!(
            all.iter()
                .filter(|e| e.class() == ErrorClass::Permanent)
                .count(),
            3
        );
    }
}
