//! The HTTP API: `fn router(state)` so tests can call it with `oneshot`. Routes are registered
//! through utoipa's router, so the OpenAPI document at `/api/v1/openapi.json` lists exactly the
//! routes that exist.

pub(crate) mod auth;
mod constraints;
mod dead_letters;
mod definitions;
mod error;
mod operations;
mod params;
mod retention;
mod sagas;
mod session;
mod ui;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use metrics::{counter, histogram};
use sqlx::PgPool;
use tower_http::compression::CompressionLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi as OpenApiDoc;
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) use error::ApiError;
pub(crate) use retention::Retention;

use crate::engine::Engine;
use crate::metrics as m;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) engine: Arc<Engine>,
    pub(crate) redact: Arc<Vec<String>>,
    pub(crate) dead_letters: Arc<crate::dead_letters::DeadLetters>,
    pub(crate) admission: Arc<crate::admission::Admission>,
    pub(crate) start_queue: Arc<StartQueue>,
    pub(crate) retention: Arc<Retention>,
}

/// Where start requests wait while admission holds them back.
pub(crate) struct StartQueue {
    /// Reads the orchestrator group's committed offsets; made once, kept for every look.
    pub(crate) reader: Arc<rdkafka::consumer::BaseConsumer>,
    pub(crate) topic: String,
}

impl StartQueue {
    /// Start requests not yet taken by the orchestrator; `None` if the brokers did not say.
    pub(crate) async fn depth(&self) -> Option<i64> {
        let timeout = std::time::Duration::from_secs(2);
        match saga_runtime::kafka::group_backlog(self.reader.clone(), &self.topic, timeout).await {
            Ok(depth) => Some(depth),
            Err(error) => {
                tracing::debug!(error = format!("{error:#}"), "reading the start-requests backlog");
                None
            }
        }
    }
}

/// Largest request body accepted; larger ones get 413.
pub(crate) const BODY_LIMIT: usize = 256 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "saga-orchestrator",
        description = "Start, query and operate sagas. Every route needs `Authorization: Bearer <token>`: \
            `read` for GET, `admin` for everything else. Errors are application/problem+json (RFC 9457)."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "sagas", description = "Start, list, inspect and count sagas"),
        (name = "operations", description = "Retry and abort sagas, with an audit log"),
        (name = "definitions", description = "The loaded saga definitions"),
        (name = "dead-letters", description = "Messages no consumer could apply, and their replay"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API routes and their OpenAPI document.
fn api() -> (Router<AppState>, OpenApiDoc) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(sagas::list, sagas::start))
        .routes(routes!(sagas::stats))
        .routes(routes!(sagas::show))
        .routes(routes!(operations::retry))
        .routes(routes!(operations::abort))
        .routes(routes!(operations::bulk_retry))
        .routes(routes!(operations::audit))
        .routes(routes!(definitions::list))
        .routes(routes!(definitions::show))
        .routes(routes!(dead_letters::list))
        .routes(routes!(dead_letters::replay))
        .routes(routes!(retention::show))
        .routes(routes!(session::show))
        .split_for_parts()
}

/// The OpenAPI document of the API.
pub(crate) fn openapi() -> OpenApiDoc {
    let (_, mut doc) = api();
    doc.paths.paths.insert(
        "/api/v1/openapi.json".to_owned(),
        utoipa::openapi::path::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .summary(Some("This document"))
                .tag("definitions")
                .response("200", utoipa::openapi::Response::new("The OpenAPI 3.1 document")),
        ),
    );
    doc
}

pub(crate) fn router(state: AppState, auth: auth::Auth) -> Router {
    let (routes, _) = api();
    let known = constraints::Known {
        saga_types: state.engine.registry().all().map(|d| d.name.to_string()).collect(),
        dead_letter_topics: state.dead_letters.accepted_names(),
    };
    let mut doc = serde_json::to_value(openapi()).expect("the OpenAPI document serializes");
    constraints::apply(&mut doc, &known);
    let doc = Arc::new(doc);
    let routes = routes.route("/api/v1/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }));
    routes
        .with_state(state)
        .layer(middleware::from_fn_with_state(auth, auth::require))
        // The page's assets need no token: what it shows comes from the API with the person's.
        .merge(ui::router().layer(CompressionLayer::new()))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(track))
        .layer(middleware::from_fn(saga_runtime::trace::correlate))
}

/// Counts and times requests by method, route template and status (never the raw path).
async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Any token is a method to HTTP; only the standard ones get a label of their own, so that
    // requests, authenticated or not, cannot create series without bound.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" | "TRACE" | "CONNECT") => m.to_owned(),
        _ => "OTHER".to_owned(),
    };
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

#[cfg(test)]
mod tests {
    /// Every operation has its own operationId: tools key links and clients by it (schemathesis
    /// followed a link to the wrong route while three handlers were all called `show`).
    #[test]
    fn operation_ids_are_unique() {
        let doc = serde_json::to_value(super::openapi()).unwrap();
        let mut ids: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                if path == "/api/v1/openapi.json" {
                    continue;
                }
                let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no id"));
                assert!(!ids.iter().any(|i| i == id), "{method} {path}: operationId {id} is used twice");
                ids.push(id.to_owned());
            }
        }
        assert_eq!(ids.len(), 14, "{ids:?}");
    }
}
