//! `GET /api/v1/stock/{sku}` and `PUT /api/v1/stock/{sku}` (set the available quantity).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use saga_runtime::participant::ApiContext;
use serde::Deserialize;
use serde_json::{json, Value};

pub(crate) fn router(context: ApiContext) -> Router {
    Router::new().route("/api/v1/stock/{sku}", get(show).put(set)).with_state(context)
}

use saga_runtime::health::problem;

fn internal(error: sqlx::Error) -> Response {
    tracing::error!(%error, "request failed");
    problem(StatusCode::INTERNAL_SERVER_ERROR, "internal", "see the service logs".into())
}

async fn show(State(context): State<ApiContext>, Path(sku): Path<String>) -> Response {
    let row: Result<Option<(i64, Option<i64>)>, _> = sqlx::query_as(
        "SELECT s.available, (SELECT sum(quantity)::bigint FROM reservations r WHERE r.sku = s.sku AND r.status = 'RESERVED')
         FROM stock s WHERE s.sku = $1",
    )
    .bind(&sku)
    .fetch_optional(&context.pool)
    .await;
    match row {
        Ok(Some((available, reserved))) => {
            Json(json!({"sku": sku, "available": available, "reserved": reserved.unwrap_or(0)})).into_response()
        }
        Ok(None) => problem(StatusCode::NOT_FOUND, "not-found", format!("no SKU {sku:?}")),
        Err(error) => internal(error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetStock {
    available: i64,
}

async fn set(State(context): State<ApiContext>, Path(sku): Path<String>, body: axum::body::Bytes) -> Response {
    let request: SetStock = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return problem(StatusCode::BAD_REQUEST, "invalid-request", format!("expected {{\"available\": N}}: {e}"))
        }
    };
    if request.available < 0 || sku.is_empty() || sku.len() > 64 {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "available must be 0 or more and the SKU 1 to 64 characters".into(),
        );
    }
    let result = sqlx::query(
        "INSERT INTO stock (sku, available) VALUES ($1, $2)
         ON CONFLICT (sku) DO UPDATE SET available = EXCLUDED.available, updated_at = now()",
    )
    .bind(&sku)
    .bind(request.available)
    .execute(&context.pool)
    .await;
    match result {
        Ok(_) => Json::<Value>(json!({"sku": sku, "available": request.available})).into_response(),
        Err(error) => internal(error),
    }
}
