//! `/health` (liveness) and `/ready` (Postgres and the broker reachable), and the HTTP server.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// What readiness checks.
#[derive(Clone)]
pub struct Readiness {
    pub service: &'static str,
    pub pool: PgPool,
    pub producer: FutureProducer,
}

/// The health routes, to merge into a service's router.
pub fn router(readiness: Readiness) -> Router {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).with_state(readiness)
}

async fn health(State(r): State<Readiness>) -> impl IntoResponse {
    Json(json!({"status": "ok", "service": r.service, "version": env!("CARGO_PKG_VERSION")}))
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
    let ready = database == "ok" && broker == "ok";
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "service": r.service,
        "checks": {"database": database, "broker": broker},
    });
    (status, Json(body))
}

/// Serves `router` on `addr` until `shutdown`, then drains in-flight requests.
pub async fn serve(addr: SocketAddr, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "serving HTTP");
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
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
