//! `POST /api/v1/orders` and `GET /api/v1/orders/{id}`.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use saga_defs::contract::{MESSAGE_TYPE_START, ORDER_FULFILMENT, SCHEMA_VERSION, START_REQUESTS_TOPIC};
use saga_defs::{SagaId, SagaType, StartSagaRequest};
use saga_runtime::db::Params;
use saga_runtime::openapi::{json_response, problem, text};
use saga_runtime::outbox::{self, OutboxMessage};
use saga_runtime::participant::{Api, ApiContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const BODY_LIMIT: usize = 64 * 1024;

pub(crate) fn api(context: ApiContext) -> Api {
    let router = Router::new()
        .route("/api/v1/orders", post(place))
        .route("/api/v1/orders/{id}", get(show))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(context);
    Api { router, paths: paths(), schemas: schemas() }
}

const MAX_ITEMS: usize = 100;
const MAX_QUANTITY: i64 = 10_000;
const MAX_UNIT_PRICE_CENTS: i64 = 100_000_000;

/// The routes, as the OpenAPI document describes them: every limit `validate` checks.
fn paths() -> Value {
    let key = json!({"name": "Idempotency-Key", "in": "header", "required": true,
        "description": "One order per key; the same key and body again returns the same order",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r#"^[ -~]*[!#-~][ -~]*$"#}});
    let order = json!({"$ref": "#/components/schemas/Order"});
    json!({
        "/api/v1/orders": {"post": {
            "summary": "Place an order: stored PENDING, and its saga started through the outbox",
            "parameters": [key],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PlaceOrder"}}}},
            "responses": {
                "201": json_response("Placed", order.clone()),
                "200": json_response("Placed earlier with this key", order.clone()),
                "400": problem("Bad input, with what is allowed"),
                "413": problem("Body too large"),
                "422": problem("The key was used for another order"),
                "503": problem("Overloaded: nothing was stored; retry after Retry-After"),
            }}},
        "/api/v1/orders/{id}": {"get": {
            "summary": "An order: PENDING, then APPROVED, or REJECTED with the reason",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
            "responses": {
                "200": json_response("The order", order),
                "400": problem("Not a UUID"),
                "404": problem("No such order"),
                "503": problem("Overloaded; retry after Retry-After"),
            }}},
    })
}

fn schemas() -> Value {
    json!({
        "PlaceOrder": {"type": "object", "additionalProperties": false,
            "required": ["customer_id", "items", "payment_token", "shipping_address"],
            "properties": {
                "customer_id": text(100),
                "items": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": {"$ref": "#/components/schemas/Item"}},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "default": "USD"},
                "payment_token": text(200),
                "shipping_address": {"$ref": "#/components/schemas/Address"},
            }},
        "Item": {"type": "object", "additionalProperties": false, "required": ["sku", "quantity", "unit_price_cents"],
            "properties": {
                "sku": text(64),
                "quantity": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
                "unit_price_cents": {"type": "integer", "minimum": 0, "maximum": MAX_UNIT_PRICE_CENTS},
            }},
        "Address": {"type": "object", "additionalProperties": false, "required": ["line1", "city", "postal_code", "country"],
            "properties": {
                "name": {"type": ["string", "null"], "pattern": r"^[^\x00]*$"},
                "line1": text(200),
                "line2": {"type": ["string", "null"], "pattern": r"^[^\x00]*$"},
                "city": text(100),
                "postal_code": text(20),
                "country": text(2),
            }},
        "Order": {"type": "object",
            "required": ["id", "customer_id", "items", "total_cents", "currency", "status", "saga_id", "created_at", "updated_at"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "customer_id": {"type": "string"},
                "items": {"type": "array", "items": {"type": "object"}},
                "total_cents": {"type": "integer"},
                "currency": {"type": "string"},
                "status": {"type": "string", "enum": ["PENDING", "APPROVAL_PENDING", "APPROVED", "REJECTED"]},
                "rejection": {"type": ["object", "null"]},
                "saga_id": {"type": "string", "format": "uuid"},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
            }},
    })
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    KeyReused(String),
    #[error(transparent)]
    Internal(#[from] sqlx::Error),
}

impl ApiError {
    /// 503 with Retry-After for overload (no database connection free in time), else 500.
    fn internal(self) -> Response {
        match self {
            ApiError::Internal(error) => saga_runtime::health::database_error(error),
            other => other.into_response(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid-request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::KeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-reused"),
            ApiError::Internal(_) => return self.internal(),
        };
        let detail = self.to_string();
        saga_runtime::health::problem(status, kind, detail)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    sku: String,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Address {
    #[serde(default)]
    name: Option<String>,
    line1: String,
    #[serde(default)]
    line2: Option<String>,
    city: String,
    postal_code: String,
    country: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceOrder {
    customer_id: String,
    items: Vec<Item>,
    #[serde(default = "default_currency")]
    currency: String,
    payment_token: String,
    shipping_address: Address,
}

fn default_currency() -> String {
    "USD".to_owned()
}

impl PlaceOrder {
    /// Checks the request and returns the order total in cents.
    fn validate(&self) -> Result<i64, String> {
        let text = |name: &str, value: &str, max: usize| {
            if value.trim().is_empty() || value.chars().count() > max {
                Err(format!("{name} must have 1 to {max} characters"))
            } else {
                Ok(())
            }
        };
        text("customer_id", &self.customer_id, 100)?;
        text("payment_token", &self.payment_token, 200)?;
        if self.items.is_empty() || self.items.len() > MAX_ITEMS {
            return Err(format!("items must list 1 to {MAX_ITEMS} items"));
        }
        if !(self.currency.len() == 3 && self.currency.chars().all(|c| c.is_ascii_uppercase())) {
            return Err(format!("currency must be an ISO 4217 code such as USD, not {:?}", self.currency));
        }
        let mut total: i64 = 0;
        for (i, item) in self.items.iter().enumerate() {
            text(&format!("items[{i}].sku"), &item.sku, 64)?;
            if !(1..=MAX_QUANTITY).contains(&item.quantity) {
                return Err(format!("items[{i}].quantity must be from 1 to {MAX_QUANTITY}"));
            }
            if !(0..=MAX_UNIT_PRICE_CENTS).contains(&item.unit_price_cents) {
                return Err(format!("items[{i}].unit_price_cents must be from 0 to {MAX_UNIT_PRICE_CENTS}"));
            }
            total += item.quantity * item.unit_price_cents;
        }
        let a = &self.shipping_address;
        text("shipping_address.line1", &a.line1, 200)?;
        text("shipping_address.city", &a.city, 100)?;
        text("shipping_address.postal_code", &a.postal_code, 20)?;
        text("shipping_address.country", &a.country, 2)?;
        Ok(total)
    }
}

/// A new order and the ids of the outbox rows written with it.
#[derive(sqlx::FromRow)]
struct PlacedRow {
    #[sqlx(flatten)]
    order: OrderRow,
    outbox_ids: Vec<i64>,
}

#[derive(sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    customer_id: String,
    items: Value,
    total_cents: i64,
    currency: String,
    status: String,
    rejection_code: Option<String>,
    rejection_reason: Option<String>,
    saga_id: Uuid,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl OrderRow {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "customer_id": self.customer_id,
            "items": self.items,
            "total_cents": self.total_cents,
            "currency": self.currency,
            "status": self.status,
            "rejection": self.rejection_code.as_ref().map(|code| json!({"code": code, "reason": self.rejection_reason})),
            "saga_id": self.saga_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }
}

const ORDER_COLUMNS: &str =
    "id, customer_id, items, total_cents, currency, status, rejection_code, rejection_reason, saga_id, created_at, updated_at";

/// Places an order: stores it `PENDING` and, in the same transaction, asks the orchestrator to
/// start its saga. The same `Idempotency-Key` again returns the same order.
async fn place(State(context): State<ApiContext>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let received = std::time::SystemTime::now();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::BadRequest("the Idempotency-Key header is required (1 to 255 visible ASCII characters)".into())
        })?;
    let request: PlaceOrder =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid order: {e}")))?;
    let total = request.validate().map_err(ApiError::BadRequest)?;
    let canonical = serde_json::to_value(&request).expect("orders serialise").to_string();
    let hash = hex::encode(Sha256::digest(canonical.as_bytes()));

    let id = Uuid::now_v7();
    let saga_id = SagaId::new();
    let start = StartSagaRequest {
        schema_version: SCHEMA_VERSION,
        saga_id,
        saga_type: SagaType::parse(ORDER_FULFILMENT).expect("a valid saga type"),
        idempotency_key: format!("order:{id}"),
        business_key: Some(id.to_string()),
        input: json!({
            "order_id": id,
            "customer_id": request.customer_id,
            "items": request.items,
            "total_cents": total,
            "currency": request.currency,
            "payment_token": request.payment_token,
            "shipping_address": request.shipping_address,
        }),
    };
    let topic = context.kafka.topic(START_REQUESTS_TOPIC);
    // The saga's trace begins here (or continues the caller's `traceparent`) and goes with its
    // correlation id through the start request to the orchestrator. The request's span ends
    // where the start request is written, as a command's span ends where its reply is.
    let trace = saga_runtime::trace::Context::from_http(&headers);
    let fallback = if trace.from_caller { trace.parent.child() } else { trace.parent };
    let request_span = saga_runtime::trace::span(
        trace.span_parent(),
        opentelemetry::trace::SpanKind::Server,
        received,
        fallback,
        || {
            let attributes = vec![
                opentelemetry::KeyValue::new("order.id", id.to_string()),
                opentelemetry::KeyValue::new("saga.id", saga_id.to_string()),
            ];
            ("POST /api/v1/orders".into(), attributes)
        },
    );
    let mut message = OutboxMessage::new(topic, saga_id, MESSAGE_TYPE_START, &start);
    message.headers = trace.headers(request_span);
    let messages = vec![message];

    // The order and the request to start its saga in one statement, which is its own transaction:
    // one round trip instead of four (BEGIN, the two inserts, COMMIT). The start request is
    // written only with a new order; the row comes back from the INSERT itself.
    let mut params = Params::default();
    let insert_order = format!(
        "INSERT INTO orders (id, idempotency_key, request_hash, customer_id, items, total_cents, currency, payment_token,
             shipping_address, status, saga_id)
         VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {}, 'PENDING', {})
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING {ORDER_COLUMNS}",
        params.add(id)?,
        params.add(&key)?,
        params.add(&hash)?,
        params.add(&request.customer_id)?,
        params.add(sqlx::types::Json(&request.items))?,
        params.add(total)?,
        params.add(&request.currency)?,
        params.add(&request.payment_token)?,
        params.add(sqlx::types::Json(&request.shipping_address))?,
        params.add(saga_id.as_uuid())?,
    );
    let insert_start =
        outbox::insert_part(&mut params, &messages, context.handoff.is_some(), Some("EXISTS (SELECT FROM placed)"))?;
    let sql = format!(
        "WITH placed AS ({insert_order}), started AS ({insert_start})
         SELECT placed.*, ARRAY(SELECT id FROM started) AS outbox_ids FROM placed"
    );
    let placed: Option<PlacedRow> = params.query_as(&sql).fetch_optional(&context.pool).await?;
    let Some(PlacedRow { order, outbox_ids }) = placed else {
        let (existing, existing_hash): (Uuid, String) =
            sqlx::query_as("SELECT id, request_hash FROM orders WHERE idempotency_key = $1")
                .bind(&key)
                .fetch_one(&context.pool)
                .await?;
        if existing_hash != hash {
            return Err(ApiError::KeyReused(format!(
                "idempotency key {key:?} was already used for a different order ({existing})"
            )));
        }
        let order = load(&context, existing).await?;
        return Ok((StatusCode::OK, Json(order.to_json())).into_response());
    };
    outbox::AfterCommit::inserted(context.handoff.as_ref(), outbox_ids, messages).send();
    tracing::info!(
        order_id = %id, saga_id = %saga_id, trace_id = %request_span.trace_id(), correlation_id = trace.correlation(),
        "order placed"
    );
    Ok((StatusCode::CREATED, [(header::LOCATION, format!("/api/v1/orders/{id}"))], Json(order.to_json()))
        .into_response())
}

async fn load(context: &ApiContext, id: Uuid) -> Result<OrderRow, ApiError> {
    sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
        .bind(id)
        .fetch_optional(&context.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no order {id}")))
}

async fn show(State(context): State<ApiContext>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not an order id (a UUID)")))?;
    Ok(Json(load(&context, id).await?.to_json()))
}
