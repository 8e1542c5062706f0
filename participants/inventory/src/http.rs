//! `GET /api/v1/stock/{sku}`, `PUT /api/v1/stock/{sku}` (set the quantity available to reserve)
//! and `POST /api/v1/stock/{sku}/adjustments` (add or remove units, relative to what is there).
//!
//! Stock is bounded ([`MAX_AVAILABLE`]) and so is one reservation
//! ([`crate::participant::MAX_QUANTITY`]), so releasing outstanding reservations onto any stock
//! level an operator set can never overflow: a compensation cannot fail because of a stock change.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use saga_runtime::openapi::{self, json_response};
use saga_runtime::participant::{Api, ApiContext};
use serde::Deserialize;
use serde_json::{json, Value};

pub(crate) fn api(context: ApiContext) -> Api {
    let router = Router::new()
        .route("/api/v1/stock/{sku}", get(show).put(set))
        .route("/api/v1/stock/{sku}/adjustments", axum::routing::post(adjust))
        .with_state(context);
    Api { router, paths: paths(), schemas: json!({}) }
}

/// The routes, as the OpenAPI document describes them: every limit the handlers check.
fn paths() -> Value {
    let sku = json!({"name": "sku", "in": "path", "required": true,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_SKU_LEN, "pattern": r"^[^\x00/]*$"}});
    let stock = json!({"type": "object", "required": ["sku", "available"],
        "properties": {"sku": {"type": "string"}, "available": {"type": "integer"}, "reserved": {"type": "integer"}}});
    let body = |properties: Value, required: &str| {
        json!({"required": true, "content": {"application/json": {"schema":
            {"type": "object", "additionalProperties": false, "required": [required], "properties": properties}}}})
    };
    json!({
        "/api/v1/stock/{sku}": {
            "get": {"summary": "Units available to reserve, and reserved", "parameters": [sku.clone()],
                "responses": {"200": json_response("The stock", stock.clone()), "404": openapi::problem("No such SKU"),
                              "503": openapi::problem("Overloaded; retry after Retry-After")}},
            "put": {"summary": "Set the units available to reserve (creates the SKU)", "parameters": [sku.clone()],
                "requestBody": body(json!({"available": {"type": "integer", "minimum": 0, "maximum": MAX_AVAILABLE}}), "available"),
                "responses": {"200": json_response("Set", stock.clone()), "400": openapi::problem("Bad input, with what is allowed"),
                              "503": openapi::problem("Overloaded; retry after Retry-After")}},
        },
        "/api/v1/stock/{sku}/adjustments": {
            "post": {"summary": "Add or remove units relative to what is available now", "parameters": [sku],
                "requestBody": body(json!({"delta": {"type": "integer", "minimum": -MAX_AVAILABLE, "maximum": MAX_AVAILABLE,
                    "not": {"const": 0}}}), "delta"),
                "responses": {"200": json_response("Adjusted", stock), "400": openapi::problem("Bad input, with what is allowed"),
                              "404": openapi::problem("No such SKU"), "409": openapi::problem("The result would be below 0 or above the bound"),
                              "503": openapi::problem("Overloaded; retry after Retry-After")}},
        },
    })
}

/// Longest SKU.
const MAX_SKU_LEN: usize = 64;

use saga_runtime::health::problem;

fn internal(error: sqlx::Error) -> Response {
    saga_runtime::health::database_error(error)
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

/// Most units of one SKU that can be available to reserve.
pub(crate) const MAX_AVAILABLE: i64 = 1_000_000_000_000;

fn bad(detail: String) -> Response {
    problem(StatusCode::BAD_REQUEST, "invalid-request", detail)
}

/// The refusal of a SKU that is not 1 to 64 characters.
fn bad_sku(sku: &str) -> Option<Response> {
    (sku.is_empty() || sku.chars().count() > MAX_SKU_LEN)
        .then(|| bad(format!("the SKU must have 1 to {MAX_SKU_LEN} characters")))
}

async fn set(State(context): State<ApiContext>, Path(sku): Path<String>, body: axum::body::Bytes) -> Response {
    let request: SetStock = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("expected {{\"available\": N}}: {e}")),
    };
    if let Some(response) = bad_sku(&sku) {
        return response;
    }
    if !(0..=MAX_AVAILABLE).contains(&request.available) {
        return bad(format!("available must be from 0 to {MAX_AVAILABLE}"));
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Adjustment {
    /// Units to add (positive) or remove (negative).
    delta: i64,
}

/// Adds or removes units relative to what is available now, atomically with reservations in
/// flight: removing more than is available is refused (409), as is going past the bound.
async fn adjust(State(context): State<ApiContext>, Path(sku): Path<String>, body: axum::body::Bytes) -> Response {
    let request: Adjustment = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("expected {{\"delta\": N}}: {e}")),
    };
    if let Some(response) = bad_sku(&sku) {
        return response;
    }
    if request.delta == 0 || request.delta.unsigned_abs() > MAX_AVAILABLE as u64 {
        return bad(format!("delta must be from -{MAX_AVAILABLE} to {MAX_AVAILABLE}, and not 0"));
    }
    let adjusted: Result<Option<i64>, _> = sqlx::query_scalar(
        "UPDATE stock SET available = available + $2, updated_at = now()
         WHERE sku = $1 AND available + $2 BETWEEN 0 AND $3 RETURNING available",
    )
    .bind(&sku)
    .bind(request.delta)
    .bind(MAX_AVAILABLE)
    .fetch_optional(&context.pool)
    .await;
    match adjusted {
        Ok(Some(available)) => Json(json!({"sku": sku, "available": available})).into_response(),
        Ok(None) => {
            let current: Result<Option<i64>, _> = sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
                .bind(&sku)
                .fetch_optional(&context.pool)
                .await;
            match current {
                Ok(Some(available)) => problem(
                    StatusCode::CONFLICT,
                    "stock-out-of-range",
                    format!(
                        "{sku}: {available} available; adding {} would leave it outside 0 to {MAX_AVAILABLE}",
                        request.delta
                    ),
                ),
                Ok(None) => problem(StatusCode::NOT_FOUND, "not-found", format!("no SKU {sku:?}; PUT it first")),
                Err(error) => internal(error),
            }
        }
        Err(error) => internal(error),
    }
}
