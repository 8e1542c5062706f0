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
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::Internal(error.into())
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "saga-state-conflict"),
            ApiError::IdempotencyKeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large"),
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
        saga_runtime::health::problem(status, kind, detail)
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
