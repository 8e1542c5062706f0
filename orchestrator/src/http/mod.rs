//! The HTTP API: `fn router(state)` so tests can call it with `oneshot`.

mod error;
mod sagas;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use metrics::{counter, histogram};
use sqlx::PgPool;

pub(crate) use error::ApiError;

use crate::engine::Engine;
use crate::metrics as m;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) engine: Arc<Engine>,
    pub(crate) redact: Arc<Vec<String>>,
}

/// Largest request body accepted; larger ones get 413.
pub(crate) const BODY_LIMIT: usize = 256 * 1024;

pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .merge(sagas::router())
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(track))
}

/// Counts and times requests by method, route template and status (never the raw path).
async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    counter!(m::HTTP_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status.clone())
        .increment(1);
    histogram!(m::HTTP_DURATION, "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    response
}
