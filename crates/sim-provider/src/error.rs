//! The sim's errors and the one place they become HTTP answers.
//!
//! Status codes and `{"error": "..."}` bodies match what Fly answers, so a
//! client's error classification is exercised as it would be in production.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::model::MachineState;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    /// `what` is "app", "machine" or "volume".
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// Fly's 412: refused in the current state.
    #[error("failed_precondition: {0}")]
    FailedPrecondition(String),
    /// `wait` did not see the state in time (Fly answers 408).
    #[error("deadline_exceeded: timeout waiting for machine to be {0}")]
    WaitTimedOut(MachineState),
    #[error("rate limited")]
    RateLimited { retry_after_secs: u64 },
    #[error("internal error")]
    Internal,
    #[error("service unavailable")]
    Unavailable,
    #[error("gateway timeout")]
    GatewayTimeout,
}

impl ApiError {
    pub(crate) const fn app_not_found() -> Self {
        ApiError::NotFound { what: "app" }
    }

    pub(crate) const fn machine_not_found() -> Self {
        ApiError::NotFound { what: "machine" }
    }

    pub(crate) const fn volume_not_found() -> Self {
        ApiError::NotFound { what: "volume" }
    }

    pub(crate) fn bad_json(err: &serde_json::Error) -> Self {
        ApiError::BadRequest(format!("invalid request body: {err}"))
    }

    pub const fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::FailedPrecondition(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::WaitTimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status(), Json(json!({ "error": self.to_string() }))).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}
