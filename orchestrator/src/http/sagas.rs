//! `/api/v1/sagas`: start, list and inspect sagas.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use saga_defs::contract::SCHEMA_VERSION;
use saga_defs::{SagaId, SagaStatus, SagaType, StartSagaRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{ApiError, AppState, BODY_LIMIT};
use crate::engine::{Effects, StartError, Started};
use crate::store::{self, ListFilter, SagaRow};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/sagas", get(list).post(start)).route("/api/v1/sagas/{id}", get(show))
}

pub(crate) const DEFAULT_LIMIT: i64 = 20;
pub(crate) const MAX_LIMIT: i64 = 500;
const MAX_KEY_LEN: usize = 255;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    saga_type: String,
    input: Value,
    #[serde(default)]
    business_key: Option<String>,
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let value = headers
        .get("idempotency-key")
        .ok_or_else(|| ApiError::BadRequest("the Idempotency-Key header is required".into()))?;
    let key = value
        .to_str()
        .map_err(|_| ApiError::BadRequest("the Idempotency-Key header must be visible ASCII".into()))?
        .trim()
        .trim_matches('"');
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::BadRequest(format!(
            "the Idempotency-Key header must have 1 to {MAX_KEY_LEN} characters"
        )));
    }
    Ok(key.to_owned())
}

/// `POST /api/v1/sagas`: starts a saga; the same `Idempotency-Key` again returns the same saga.
async fn start(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    if body.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge { limit: BODY_LIMIT });
    }
    let key = idempotency_key(&headers)?;
    let body: StartBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("the body must be {{\"saga_type\", \"input\", \"business_key\"?}}: {e}"))
    })?;
    let saga_type = SagaType::parse(body.saga_type).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let request = StartSagaRequest {
        schema_version: SCHEMA_VERSION,
        saga_id: SagaId::new(),
        saga_type,
        idempotency_key: key,
        business_key: body.business_key,
        input: body.input,
    };
    let mut tx = state.pool.begin().await?;
    let mut effects = Effects::default();
    let started = state.engine.start(&mut tx, &request, &mut effects).await.map_err(|error| match error {
        StartError::Database(e) => ApiError::from(e),
        StartError::KeyReused { .. } => ApiError::IdempotencyKeyReused(error.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    })?;
    tx.commit().await?;
    effects.record();
    let (status, id) = match started {
        Started::Created(id) => (StatusCode::CREATED, id),
        Started::Existing(id) => (StatusCode::OK, id),
    };
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, id).await?.ok_or_else(|| ApiError::NotFound(format!("saga {id}")))?;
    let location = format!("/api/v1/sagas/{id}");
    Ok((status, [(header::LOCATION, location)], Json(summary(&row))).into_response())
}

/// `GET /api/v1/sagas/{id}`: the saga with its steps, attempts and history.
async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a saga id (a UUID)")))?;
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, id).await?.ok_or_else(|| ApiError::NotFound(format!("no saga {id}")))?;
    let attempts = store::attempts(&mut conn, id).await?;
    let history = store::history(&mut conn, id).await?;
    let definition = state.engine.registry().get(&row.saga_type, row.definition_version as u32);

    let steps: Vec<Value> = match definition {
        Some(definition) => definition
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| {
                let mine: Vec<Value> = attempts
                    .iter()
                    .filter(|a| a.step_index as usize == index)
                    .map(|a| {
                        json!({
                            "step": a.step_name, "kind": a.kind, "attempt": a.attempt, "status": a.status,
                            "output": a.output,
                            "error_code": a.error_code, "error_message": a.error_message,
                            "started_at": a.started_at, "deadline_at": a.deadline_at, "finished_at": a.finished_at,
                        })
                    })
                    .collect();
                json!({
                    "index": index,
                    "name": step.name,
                    "participant": step.participant,
                    "action": step.action,
                    "compensation": step.compensation.as_ref().map(|c| c.action.clone()),
                    "status": step_status(&attempts, index),
                    "attempts": mine,
                })
            })
            .collect(),
        None => vec![],
    };
    let history: Vec<Value> = history
        .into_iter()
        .map(|h| {
            json!({
                "version": h.version, "from_status": h.from_status, "to_status": h.to_status,
                "trigger": h.trigger, "summary": h.summary, "detail": h.detail, "recorded_at": h.recorded_at,
            })
        })
        .collect();
    let mut body = summary(&row);
    let object = body.as_object_mut().expect("summary is an object");
    object.insert("input".into(), redact(&row.input, &state.redact));
    object.insert("outputs".into(), row.outputs.clone());
    object.insert("steps".into(), Value::Array(steps));
    object.insert("history".into(), Value::Array(history));
    Ok(Json(body))
}

/// A step's status from its attempts: the latest action outcome, then COMPENSATED when undone.
fn step_status(attempts: &[store::AttemptRow], index: usize) -> &'static str {
    let last = |kind: &str| attempts.iter().rfind(|a| a.step_index as usize == index && a.kind == kind);
    match (last("ACTION"), last("COMPENSATION")) {
        (_, Some(c)) if c.status == "SUCCEEDED" => "COMPENSATED",
        (_, Some(c)) if c.status == "PENDING" => "COMPENSATING",
        (_, Some(_)) => "COMPENSATION_FAILED",
        (None, None) => "NOT_STARTED",
        (Some(a), None) => match a.status.as_str() {
            "SUCCEEDED" => "SUCCEEDED",
            "PENDING" => "RUNNING",
            "TIMED_OUT" => "TIMED_OUT",
            _ => "FAILED",
        },
    }
}

const LIST_PARAMS: &str = "status, saga_type, business_key, limit";

/// `GET /api/v1/sagas?status=FAILED&limit=10`: sagas newest first.
async fn list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let mut filter = ListFilter { limit: DEFAULT_LIMIT, ..ListFilter::default() };
    for (name, value) in &params {
        match name.as_str() {
            "status" => {
                for status in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let status: SagaStatus = status
                        .to_ascii_uppercase()
                        .parse()
                        .map_err(|e: saga_defs::status::UnknownStatus| ApiError::BadRequest(e.to_string()))?;
                    filter.statuses.push(status.as_str().to_owned());
                }
            }
            "saga_type" => filter.saga_type = Some(value.clone()),
            "business_key" => filter.business_key = Some(value.clone()),
            "limit" => {
                filter.limit = value.parse::<i64>().ok().filter(|l| (1..=MAX_LIMIT).contains(l)).ok_or_else(|| {
                    ApiError::BadRequest(format!("limit must be a whole number from 1 to {MAX_LIMIT}, not {value:?}"))
                })?;
            }
            other => {
                return Err(ApiError::BadRequest(format!("unknown query parameter {other:?}; allowed: {LIST_PARAMS}")));
            }
        }
    }
    let mut conn = state.pool.acquire().await?;
    let rows = store::list(&mut conn, &filter).await?;
    let items: Vec<Value> = rows.iter().map(summary).collect();
    Ok(Json(json!({"items": items, "count": items.len(), "limit": filter.limit})))
}

/// The fields of a saga shown in lists.
fn summary(row: &SagaRow) -> Value {
    let terminal = row.status().map(|s| s.is_terminal()).unwrap_or(false);
    json!({
        "id": row.id,
        "saga_type": row.saga_type,
        "definition_version": row.definition_version,
        "business_key": row.business_key,
        "status": row.status,
        "current_step": if terminal { Value::Null } else { json!({
            "index": row.step_index, "name": row.step_name, "kind": row.step_kind, "attempt": row.attempt,
            "waiting_for": row.waiting, "until": row.wake_at,
        })},
        "last_step": {"index": row.step_index, "name": row.step_name, "kind": row.step_kind, "attempt": row.attempt},
        "failure": row.failure_code.as_ref().map(|code| json!({
            "step": row.failure_step, "code": code, "reason": row.failure_reason,
        })),
        "attention": row.attention_code.as_ref().map(|code| json!({
            "step": row.attention_step, "code": code, "reason": row.attention_reason,
        })),
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "ended_at": row.ended_at,
    })
}

/// Replaces the values of sensitive fields, at any depth.
pub(crate) fn redact(value: &Value, fields: &[String]) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if fields.iter().any(|f| f == k) {
                        Value::String("[redacted]".into())
                    } else {
                        redact(v, fields)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|v| redact(v, fields)).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_fields_are_redacted_at_any_depth() {
        let fields = vec!["payment_token".to_owned(), "shipping_address".to_owned()];
        let input =
            json!({"payment_token": "tok_visa", "nested": [{"shipping_address": {"line1": "x"}}], "order_id": "o1"});
        assert_eq!(
            redact(&input, &fields),
            json!({"payment_token": "[redacted]", "nested": [{"shipping_address": "[redacted]"}], "order_id": "o1"})
        );
    }
}
