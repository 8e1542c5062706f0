//! Who the caller is: what the web page asks after sign-in, to check the token and to show or
//! hide the actions.

use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{AuthMode, Principal};
use super::error::Problem;

/// The caller's token.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Session {
    /// The token's name, recorded as the actor of its actions ("anonymous" with auth off).
    name: String,
    /// `read` (queries) or `admin` (queries and actions).
    scope: &'static str,
    /// `tokens`, or `disabled` when the orchestrator runs with AUTH_DISABLED (local development).
    auth: &'static str,
}

/// The caller: the token's name and scope, and whether authentication is on.
#[utoipa::path(
    get, path = "/api/v1/session", operation_id = "get_session", tag = "definitions",
    responses(
        (status = 200, body = Session),
        (status = 401, description = "No token, or not a valid one", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn show(
    Extension(principal): Extension<Principal>,
    Extension(mode): Extension<AuthMode>,
) -> Json<Session> {
    Json(Session {
        name: principal.name,
        scope: principal.scope.as_str(),
        auth: match mode {
            AuthMode::Tokens => "tokens",
            AuthMode::Disabled => "disabled",
        },
    })
}
