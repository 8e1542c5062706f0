//! `/health` (liveness) and `/ready` (Postgres and the broker reachable), and the HTTP server.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use sqlx::PgPool;

/// What readiness checks.
#[derive(Clone)]
pub struct Readiness {
    pub service: &'static str,
    pub pool: PgPool,
    pub producer: FutureProducer,
    /// A background task that died makes both `/health` and `/ready` answer 503.
    pub tasks: crate::supervisor::TaskHealth,
}

/// The health routes, to merge into a service's router.
pub fn router(readiness: Readiness) -> Router {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).with_state(readiness)
}

async fn health(State(r): State<Readiness>) -> impl IntoResponse {
    match r.tasks.died() {
        None => {
            (StatusCode::OK, Json(json!({"status": "ok", "service": r.service, "version": env!("CARGO_PKG_VERSION")})))
        }
        Some(died) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "failed", "service": r.service, "version": env!("CARGO_PKG_VERSION"), "reason": died.to_string()}),
            ),
        ),
    }
}

async fn ready(State(r): State<Readiness>) -> impl IntoResponse {
    let timeout = Duration::from_secs(2);
    let database = tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(&r.pool)).await;
    let database = match database {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(error)) => format!("unreachable: {error}"),
        Err(_) => "unreachable: no answer within 2 s".to_owned(),
    };
    let broker = if crate::kafka::broker_reachable(&r.producer, timeout).await {
        "ok".to_owned()
    } else {
        "unreachable: no broker answered a metadata request within 2 s".to_owned()
    };
    let tasks = match r.tasks.died() {
        None => "ok".to_owned(),
        Some(died) => died.to_string(),
    };
    let ready = database == "ok" && broker == "ok" && tasks == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "service": r.service,
        "checks": {"database": database, "broker": broker, "tasks": tasks},
    });
    (status, Json(body))
}

/// An `application/problem+json` (RFC 9457) response with a stable `type` per kind of error.
pub fn problem(status: axum::http::StatusCode, kind: &str, detail: String) -> axum::response::Response {
    let body = json!({
        "type": format!("https://saga-orchestrator.dev/problems/{kind}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (status, [(axum::http::header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
}

/// Middleware (`axum::middleware::map_response(health::problem_responses)`): turns every error
/// response without a JSON body (unknown route, wrong method, body too large, an extractor's
/// rejection) into `application/problem+json`, keeping its status and headers.
pub async fn problem_responses(response: axum::response::Response) -> axum::response::Response {
    let status = response.status();
    // A JSON body was written on purpose (a problem, or /ready's checks saying what is down):
    // keep it. Only plain-text or empty error bodies (axum's rejections) are rewritten.
    let is_json = response.headers().get(axum::http::header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes().starts_with(b"application/problem+json") || v.as_bytes().starts_with(b"application/json")
    });
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let kind = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => "invalid-request",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let detail = match (status, text) {
        (StatusCode::NOT_FOUND, _) => "no such resource; see /api/v1/openapi.json for the routes".to_owned(),
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            let allow = parts.headers.get(axum::http::header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
            format!("method not allowed here; allowed: {allow}")
        }
        (StatusCode::PAYLOAD_TOO_LARGE, _) => "the request body is larger than this server accepts".to_owned(),
        (s, _) if s.is_server_error() => "the server could not handle the request; see its logs".to_owned(),
        (_, Ok(text)) if !text.is_empty() => text,
        (s, _) => s.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut problem = problem(status, kind, detail);
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}

/// Largest request body any service reads; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Middleware (`axum::middleware::from_fn(health::refuse_unstorable)`) for every service: a
/// request carrying a value Postgres cannot store and give back — NUL (`\u0000`, `%00`) in the
/// path, a query parameter or anywhere in a JSON body, or a JSON number that does not survive
/// `jsonb` (see [`saga_defs::storable`]) — gets a 400 problem naming where, before any handler
/// sees it. Bodies that are not JSON pass through, for the handler to refuse as it does.
pub async fn refuse_unstorable(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let bad = |detail: String| problem(StatusCode::BAD_REQUEST, "invalid-request", detail);
    let path = percent_encoding::percent_decode_str(request.uri().path()).decode_utf8_lossy();
    if saga_defs::storable::check_text(&path).is_err() {
        return bad("the path may not contain the NUL character (%00)".to_owned());
    }
    if let Some(query) = request.uri().query() {
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if saga_defs::storable::check_text(&name).is_err() || saga_defs::storable::check_text(&value).is_err() {
                return bad(format!(
                    "query parameter {:?} may not contain the NUL character (%00)",
                    name.replace('\0', "")
                ));
            }
        }
    }
    let has_body =
        request.headers().get(axum::http::header::CONTENT_LENGTH).is_none_or(|length| length.as_bytes() != b"0")
            && !matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    if !has_body {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        );
    };
    let mut bytes = bytes;
    if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Err(error) = saga_defs::storable::check(&value) {
            return bad(format!("the body holds a value that cannot be stored: {error}"));
        }
        // `2.0` is an integer to JSON Schema, so integer fields take it.
        if saga_defs::storable::whole_numbers_as_integers(&mut value) {
            bytes = serde_json::to_vec(&value).expect("a JSON value serializes").into();
            parts.headers.insert(axum::http::header::CONTENT_LENGTH, bytes.len().into());
        }
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Outermost layers of every service's router (API and health): unknown routes are 404
/// problems, unstorable input is refused ([`refuse_unstorable`]), and every error body is
/// problem+json ([`problem_responses`]).
pub fn finish(router: Router) -> Router {
    router
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(axum::middleware::from_fn(refuse_unstorable))
        .layer(axum::middleware::map_response(problem_responses))
        .layer(axum::middleware::from_fn(crate::trace::correlate))
}

/// The response to a database error in a handler: no connection free in time is overload (503
/// with `Retry-After`, nothing was stored); anything else is a 500 whose cause is logged.
pub fn database_error(error: sqlx::Error) -> axum::response::Response {
    if matches!(error, sqlx::Error::PoolTimedOut) {
        let mut response = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "overloaded; nothing was stored; try again shortly".into(),
        );
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return response;
    }
    tracing::error!(%error, "request failed");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server could not handle the request; see its logs".into(),
    )
}
