//! Operator actions: retry and abort one saga, retry many, and read the audit log. Every action
//! is written with its audit entry in one transaction, and is idempotent under an
//! `Idempotency-Key`: the same key and request return the stored response.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Principal;
use super::error::Problem;
use super::params::{FilterSpec, MAX_LIMIT};
use super::sagas::{idempotency_key, parse_id, SagaSummary};
use super::{ApiError, AppState};
use crate::engine::{ApplyError, Effects, OperateError, Operated, Operation, Operator};
use crate::store;

pub(crate) const MAX_REASON_LEN: usize = 1000;

/// Why an operator acts.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ActionBody {
    /// Why, for the audit log and the saga's history (1 to 1000 characters).
    reason: String,
}

/// What an action did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ActionResult {
    saga_id: Uuid,
    /// RETRY or ABORT.
    action: String,
    status_before: String,
    status_after: String,
    /// The saga's version after the action.
    version: i64,
    /// The id of the audit entry.
    audit_id: i64,
    /// What the action did, in words.
    summary: String,
}

impl From<(&Operation, &Operated)> for ActionResult {
    fn from((operation, done): (&Operation, &Operated)) -> Self {
        ActionResult {
            saga_id: done.saga_id,
            action: operation.as_str().to_owned(),
            status_before: done.status_before.as_str().to_owned(),
            status_after: done.status_after.as_str().to_owned(),
            version: done.version_after,
            audit_id: done.audit_id,
            summary: done.summary.clone(),
        }
    }
}

pub(super) fn reason(reason: &str) -> Result<String, ApiError> {
    let long = reason.chars().count() > MAX_REASON_LEN;
    let reason = reason.trim();
    if reason.is_empty() || long {
        return Err(ApiError::BadRequest(format!("reason must have 1 to {MAX_REASON_LEN} characters")));
    }
    Ok(reason.to_owned())
}

/// The reason of an action that may be a dry run, which needs none.
pub(super) fn reason_unless_dry_run(given: Option<&str>, dry_run: bool) -> Result<String, ApiError> {
    match (given, dry_run) {
        (Some(given), _) => reason(given),
        (None, true) => Ok(String::new()),
        (None, false) => Err(ApiError::BadRequest("reason is required unless dry_run is true".into())),
    }
}

/// A JSON integer, as JSON Schema counts them: `2` or `2.0`.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_i64()
        .or_else(|| number.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
        .ok_or_else(|| serde::de::Error::custom(format!("{number} is not a whole number")))
}

pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("the body must be {shape}: {e}")))
}

fn operate_error(error: OperateError) -> ApiError {
    match error {
        OperateError::NotFound(id) => ApiError::NotFound(format!("no saga {id}")),
        OperateError::Refused(refusal) => ApiError::Conflict(refusal.to_string()),
        OperateError::Apply(ApplyError::Corrupt(corrupt)) => {
            ApiError::Conflict(format!("the saga cannot be processed until its stored state is repaired: {corrupt}"))
        }
        other => ApiError::Internal(other.into()),
    }
}

/// Hash of what was asked, so that a key reused for another request is refused.
fn request_hash(what: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(what.as_bytes());
    hasher.update([0]);
    hasher.update(body);
    hex::encode(hasher.finalize())
}

/// Runs `act` in a transaction under an optional idempotency key: a key seen before returns the
/// stored response (with `Idempotent-Replayed: true`) without acting again.
async fn idempotent<F>(
    state: &AppState,
    key: Option<String>,
    hash: String,
    actor: &str,
    act: F,
) -> Result<Response, ApiError>
where
    F: for<'c> FnOnce(
        &'c mut PgConnection,
        &'c mut Effects,
    ) -> futures::future::BoxFuture<'c, Result<(StatusCode, Value), ApiError>>,
{
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key {
        if let Some(stored) = store::claim_request_key(&mut tx, key, &hash, actor).await? {
            if stored.request_hash != hash {
                return Err(ApiError::IdempotencyKeyReused(format!(
                    "Idempotency-Key {key:?} was already used for a different request"
                )));
            }
            let status = StatusCode::from_u16(stored.status_code as u16).unwrap_or(StatusCode::OK);
            let mut response = (status, Json(stored.response)).into_response();
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(response);
        }
    }
    let mut effects = Effects::default();
    let (status, body) = act(&mut tx, &mut effects).await?;
    if let Some(key) = &key {
        store::store_response(&mut tx, key, status.as_u16(), &body).await?;
    }
    tx.commit().await?;
    effects.record();
    Ok((status, Json(body)).into_response())
}

async fn act_on_one(
    state: AppState,
    principal: Principal,
    id: String,
    headers: HeaderMap,
    body: Bytes,
    operation: Operation,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let key = idempotency_key(&headers, false)?;
    let body: ActionBody = parse_body(&body, "{\"reason\": \"why\"}")?;
    let reason = reason(&body.reason)?;
    let hash = request_hash(&format!("{} {id}", operation.as_str()), reason.as_bytes());
    let engine = state.engine.clone();
    let actor = principal.name.clone();
    let key_for_audit = key.clone();
    idempotent(&state, key, hash, &principal.name, move |conn, effects| {
        Box::pin(async move {
            let operator =
                Operator { actor: &actor, reason: &reason, idempotency_key: key_for_audit.as_deref(), bulk_id: None };
            let mut writes = crate::writes::Writes::direct(conn);
            let done = engine.operate(&mut writes, id, &operation, &operator, effects).await.map_err(operate_error)?;
            let result = ActionResult::from((&operation, &done));
            Ok((StatusCode::OK, serde_json::to_value(result).map_err(anyhow::Error::from)?))
        })
    })
    .await
}

/// Retry a saga from where it stopped: the failed compensation of a NEEDS_ATTENTION saga, or
/// the current step of a stuck one (sent again now, with a fresh retry budget).
#[utoipa::path(
    post, path = "/api/v1/sagas/{id}/retry", operation_id = "retry_saga", tag = "operations",
    params(
        ("id" = String, Path, description = "The saga id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key again returns the first response without acting twice"),
    ),
    request_body = ActionBody,
    responses(
        (status = 200, body = ActionResult),
        (status = 400, description = "Bad id or reason", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such saga", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The saga's state does not allow a retry (COMPLETED or FAILED)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key used for another request", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    act_on_one(state, principal, id, headers, body, Operation::Retry).await
}

/// Abort a running saga: stop it and compensate, in reverse order, every step it may have done.
#[utoipa::path(
    post, path = "/api/v1/sagas/{id}/abort", operation_id = "abort_saga", tag = "operations",
    params(
        ("id" = String, Path, description = "The saga id"),
        ("Idempotency-Key" = Option<String>, Header, description = "The same key again returns the first response without acting twice"),
    ),
    request_body = ActionBody,
    responses(
        (status = 200, body = ActionResult),
        (status = 400, description = "Bad id or reason", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such saga", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not RUNNING, or past a step without compensation", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key used for another request", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
pub(crate) async fn abort(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    act_on_one(state, principal, id, headers, body, Operation::Abort).await
}

/// Retry every saga matching a filter.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkRetryBody {
    /// Which sagas; without a status, NEEDS_ATTENTION.
    #[serde(default)]
    filter: FilterSpec,
    /// Most sagas to touch (1 to 500), oldest first. Required.
    #[serde(deserialize_with = "whole_number")]
    limit: i64,
    /// Only show what would be retried.
    #[serde(default)]
    dry_run: bool,
    /// Why; required unless dry_run.
    #[serde(default)]
    reason: Option<String>,
}

/// What a bulk retry did (or would do) to one saga.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkItem {
    saga_id: Uuid,
    business_key: Option<String>,
    status_before: String,
    /// retried, would_retry, or refused (with why).
    result: &'static str,
    status_after: Option<String>,
    detail: String,
}

/// The outcome of a bulk retry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkResult {
    dry_run: bool,
    /// Groups the audit entries of this request; null for a dry run.
    bulk_id: Option<Uuid>,
    matched: usize,
    retried: usize,
    refused: usize,
    items: Vec<BulkItem>,
}

/// Retry every saga matching a filter, at most `limit`, oldest first; `dry_run` shows what would
/// be touched. All retries are one transaction, each with its audit entry.
#[utoipa::path(
    post, path = "/api/v1/sagas/bulk-retry", operation_id = "bulk_retry_sagas", tag = "operations",
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key again returns the first response without acting twice")),
    request_body = BulkRetryBody,
    responses(
        (status = 200, body = BulkResult),
        (status = 400, description = "Bad filter, limit or reason", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key used for another request", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
pub(crate) async fn bulk_retry(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers, false)?;
    let request: BulkRetryBody =
        parse_body(&body, "{\"filter\": {...}, \"limit\": 1..500, \"dry_run\"?: bool, \"reason\"?: \"why\"}")?;
    if !(1..=MAX_LIMIT).contains(&request.limit) {
        return Err(ApiError::BadRequest(format!("limit must be a whole number from 1 to {MAX_LIMIT}")));
    }
    let mut filter = request.filter.to_filter(Utc::now())?;
    if filter.statuses.is_empty() {
        filter.statuses.push("NEEDS_ATTENTION".to_owned());
    }
    let reason = reason_unless_dry_run(request.reason.as_deref(), request.dry_run)?;
    let hash = request_hash("BULK_RETRY", &body);
    let engine = state.engine.clone();
    let actor = principal.name.clone();
    let key_for_audit = key.clone();
    let (limit, dry_run) = (request.limit, request.dry_run);
    let key = if dry_run { None } else { key };
    idempotent(&state, key, hash, &principal.name, move |conn, effects| {
        Box::pin(async move {
            let rows = store::lock_matching(conn, &filter, limit).await?;
            let bulk_id = (!dry_run).then(Uuid::now_v7);
            let operator =
                Operator { actor: &actor, reason: &reason, idempotency_key: key_for_audit.as_deref(), bulk_id };
            let mut items = Vec::with_capacity(rows.len());
            for row in rows {
                let (saga_id, business_key, status_before) = (row.id, row.business_key.clone(), row.status.clone());
                let item = |result, status_after, detail| BulkItem {
                    saga_id,
                    business_key: business_key.clone(),
                    status_before: status_before.clone(),
                    result,
                    status_after,
                    detail,
                };
                if dry_run {
                    items.push(match engine.check(&row, &Operation::Retry) {
                        Ok(()) => item(
                            "would_retry",
                            None,
                            format!("at {} {} attempt {}", row.step_name, row.step_kind, row.attempt),
                        ),
                        Err(OperateError::Refused(refusal)) => item("refused", None, refusal.to_string()),
                        Err(OperateError::Apply(ApplyError::Corrupt(corrupt))) => {
                            item("refused", None, corrupt.to_string())
                        }
                        Err(other) => return Err(operate_error(other)),
                    });
                    continue;
                }
                match engine
                    .operate_locked(
                        &mut crate::writes::Writes::direct(conn),
                        row,
                        &Operation::Retry,
                        &operator,
                        effects,
                    )
                    .await
                {
                    Ok(done) => items.push(item("retried", Some(done.status_after.as_str().to_owned()), done.summary)),
                    Err(OperateError::Refused(refusal)) => items.push(item("refused", None, refusal.to_string())),
                    // Found before anything was written for this saga; the others go on.
                    Err(OperateError::Apply(ApplyError::Corrupt(corrupt))) => {
                        items.push(item("refused", None, corrupt.to_string()))
                    }
                    Err(other) => return Err(operate_error(other)),
                }
            }
            let retried = items.iter().filter(|i| i.result != "refused").count();
            let result = BulkResult {
                dry_run,
                bulk_id,
                matched: items.len(),
                refused: items.len() - retried,
                retried: if dry_run { 0 } else { retried },
                items,
            };
            Ok((StatusCode::OK, serde_json::to_value(result).map_err(anyhow::Error::from)?))
        })
    })
    .await
}

/// The audit log of a saga.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditLog {
    saga: SagaSummary,
    entries: Vec<store::AuditRow>,
}

/// The operator actions taken on a saga: who, when, what, why, and the state before and after.
#[utoipa::path(
    get, path = "/api/v1/sagas/{id}/audit", operation_id = "get_saga_audit_log", tag = "operations",
    params(("id" = String, Path, description = "The saga id")),
    responses(
        (status = 200, body = AuditLog),
        (status = 400, description = "Not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such saga", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn audit(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AuditLog>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, id).await?.ok_or_else(|| ApiError::NotFound(format!("no saga {id}")))?;
    let entries = store::audit(&mut conn, id).await?;
    Ok(Json(AuditLog { saga: SagaSummary::from(&row), entries }))
}
