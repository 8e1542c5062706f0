//! API errors as `application/problem+json` (RFC 9457) with a stable `type` per error. A 5xx
//! body stays generic; the cause is logged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The saga's state does not allow the action.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// A bound was reached: come back after `Retry-After`.
    #[error("{0}")]
    Saturated(String),
    /// No database connection was free in time: overload, not a fault.
    #[error("the service is overloaded; try again shortly")]
    Overloaded,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut => ApiError::Overloaded,
            other => ApiError::Internal(other.into()),
        }
    }
}

/// Seconds a client is asked to wait after a 429 or 503.
const RETRY_AFTER_SECONDS: &str = "1";

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "saga-state-conflict"),
            ApiError::IdempotencyKeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
            ApiError::Saturated(_) => (StatusCode::TOO_MANY_REQUESTS, "saturated"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = self.parts();
        let detail = match &self {
            ApiError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                "the server could not handle the request; see its logs".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = saga_runtime::health::problem(status, kind, detail);
        if matches!(self, ApiError::Saturated(_) | ApiError::Overloaded) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// The RFC 9457 body every error of this API has, for the OpenAPI document.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct Problem {
    /// A stable URI per kind of error, e.g. https://saga-orchestrator.dev/problems/invalid-request.
    r#type: String,
    title: String,
    status: u16,
    /// What is wrong and, for bad input, what is allowed.
    detail: String,
}
