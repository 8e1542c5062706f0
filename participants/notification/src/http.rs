//! `GET /api/v1/notifications?order_id=`: the notifications recorded for one order, newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use saga_runtime::health::problem;
use saga_runtime::openapi::{self, json_response};
use saga_runtime::participant::{Api, ApiContext};
use serde::Deserialize;
use serde_json::{json, Value};

/// Longest order id (the order service's ids are UUIDs; business keys may be longer).
const MAX_ORDER_ID_LEN: usize = 200;
/// Most notifications one answer holds.
const LIMIT: i64 = 100;

pub(crate) fn api(context: ApiContext) -> Api {
    let router = Router::new().route("/api/v1/notifications", get(list)).with_state(context);
    Api { router, paths: paths(), schemas: json!({}) }
}

fn paths() -> Value {
    let notification = json!({"type": "object",
        "required": ["event_id", "saga_id", "order_id", "kind", "channel", "subject", "body", "status", "occurred_at", "sent_at"],
        "properties": {
            "event_id": {"type": "string", "format": "uuid"}, "saga_id": {"type": "string", "format": "uuid"},
            "order_id": {"type": "string"}, "kind": {"type": "string", "enum": ["ORDER_CONFIRMED", "ORDER_FAILED"]},
            "channel": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"},
            "status": {"type": "string", "enum": ["SENT"]},
            "occurred_at": {"type": "string", "format": "date-time"}, "sent_at": {"type": "string", "format": "date-time"}}});
    let page = json!({"type": "object", "required": ["order_id", "items"],
        "properties": {"order_id": {"type": "string"}, "items": {"type": "array", "items": notification}}});
    json!({
        "/api/v1/notifications": {
            "get": {"summary": "The customer notifications recorded for an order, newest first (at most 100)",
                "parameters": [{"name": "order_id", "in": "query", "required": true,
                    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ORDER_ID_LEN, "pattern": r"^[^\x00]*$"}}],
                "responses": {"200": json_response("The order's notifications", page),
                              "400": openapi::problem("Bad input, with what is allowed"),
                              "503": openapi::problem("Overloaded; retry after Retry-After")}},
        },
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    order_id: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    event_id: uuid::Uuid,
    saga_id: uuid::Uuid,
    order_id: String,
    kind: String,
    channel: String,
    subject: String,
    body: String,
    status: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    sent_at: chrono::DateTime<chrono::Utc>,
}

async fn list(State(context): State<ApiContext>, query: Result<Query<Params>, QueryRejection>) -> Response {
    let Ok(Query(params)) = query else {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "order_id is required, and nothing else is allowed".into(),
        );
    };
    let order_id = params.order_id;
    if order_id.is_empty() || order_id.chars().count() > MAX_ORDER_ID_LEN || order_id.contains('\0') {
        return problem(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("order_id must be 1 to {MAX_ORDER_ID_LEN} characters, without NUL"),
        );
    }
    let rows: Result<Vec<Row>, _> = sqlx::query_as(
        "SELECT event_id, saga_id, order_id, kind, channel, subject, body, status, occurred_at, sent_at
         FROM notifications WHERE order_id = $1 ORDER BY sent_at DESC, event_id LIMIT $2",
    )
    .bind(&order_id)
    .bind(LIMIT)
    .fetch_all(&context.pool)
    .await;
    match rows {
        Ok(rows) => {
            let items: Vec<Value> = rows
                .into_iter()
                .map(|r| {
                    json!({"event_id": r.event_id, "saga_id": r.saga_id, "order_id": r.order_id, "kind": r.kind,
                        "channel": r.channel, "subject": r.subject, "body": r.body, "status": r.status,
                        "occurred_at": r.occurred_at, "sent_at": r.sent_at})
                })
                .collect();
            Json(json!({"order_id": order_id, "items": items})).into_response()
        }
        Err(error) => saga_runtime::health::database_error(error),
    }
}
