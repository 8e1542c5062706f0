//! `/api/v1/sagas`: start, list, inspect and count sagas.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use saga_defs::contract::SCHEMA_VERSION;
use saga_defs::{SagaId, SagaStatus, SagaType, StartSagaRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::Problem;
use super::params::{self, FilterSpec, DEFAULT_LIMIT, FILTER_PARAMS};
use super::{ApiError, AppState, BODY_LIMIT};
use crate::engine::{Effects, StartError, Started};
use crate::store::{self, Position, SagaRow};

pub(crate) const MAX_KEY_LEN: usize = 255;

/// A saga to start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    /// A loaded saga type, e.g. order-fulfilment.
    saga_type: String,
    /// The saga's input: a JSON object handed to every step.
    #[schema(value_type = Object)]
    input: Value,
    /// What the saga is about, for searching: for orders, the order id.
    #[serde(default)]
    business_key: Option<String>,
}

pub(crate) fn idempotency_key(headers: &HeaderMap, required: bool) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return if required {
            Err(ApiError::BadRequest("the Idempotency-Key header is required".into()))
        } else {
            Ok(None)
        };
    };
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
    Ok(Some(key.to_owned()))
}

/// Start a saga. The same `Idempotency-Key` with the same body returns the saga started first
/// (200); with a different body, 422.
#[utoipa::path(
    post, path = "/api/v1/sagas", operation_id = "start_saga", tag = "sagas",
    request_body = StartBody,
    params(("Idempotency-Key" = String, Header, description = "Required: one saga per key and saga type")),
    responses(
        (status = 201, description = "Started", body = SagaSummary),
        (status = 200, description = "Started earlier with this key", body = SagaSummary),
        (status = 400, description = "Bad input", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Key used for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The saga type is at its bound of sagas in flight; retry after Retry-After seconds", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Overloaded (no database connection free in time); retry after Retry-After seconds", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["admin"]))
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if body.len() > BODY_LIMIT {
        return Err(ApiError::TooLarge { limit: BODY_LIMIT });
    }
    let key = idempotency_key(&headers, true)?.expect("required");
    let body: StartBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("the body must be {{\"saga_type\", \"input\", \"business_key\"?}}: {e}"))
    })?;
    let saga_type = SagaType::parse(body.saga_type).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if body.business_key.as_ref().is_some_and(|k| k.chars().count() > MAX_KEY_LEN) {
        return Err(ApiError::BadRequest(format!("business_key must have at most {MAX_KEY_LEN} characters")));
    }
    let request = StartSagaRequest {
        schema_version: SCHEMA_VERSION,
        saga_id: SagaId::new(),
        saga_type,
        idempotency_key: key,
        business_key: body.business_key,
        input: body.input,
    };
    if state.admission.saturated(request.saga_type.as_str()) {
        let mut conn = state.pool.acquire().await?;
        if store::find_by_key(&mut conn, request.saga_type.as_str(), &request.idempotency_key).await?.is_none() {
            return Err(ApiError::Saturated(format!(
                "{} has as many sagas in flight as it may (SAGA_MAX_IN_FLIGHT); try again shortly",
                request.saga_type
            )));
        }
    }
    let mut tx = state.pool.begin().await?;
    let mut effects = Effects::default();
    let mut writes = crate::writes::Writes::direct(&mut tx);
    let trace = saga_runtime::trace::Context::from_http(&headers);
    let started =
        state.engine.start(&mut writes, &request, trace, &mut effects).await.map_err(|error| match error {
            StartError::Database(e) => ApiError::from(e),
            StartError::KeyReused { .. } => ApiError::IdempotencyKeyReused(error.to_string()),
            other => ApiError::BadRequest(other.to_string()),
        })?;
    let starting = state.admission.starting(effects.created());
    tx.commit().await?;
    starting.committed();
    effects.record();
    let (status, id) = match started {
        Started::Created(id) => (StatusCode::CREATED, id),
        Started::Existing(id) => (StatusCode::OK, id),
    };
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, id).await?.ok_or_else(|| ApiError::NotFound(format!("saga {id}")))?;
    let location = format!("/api/v1/sagas/{id}");
    Ok((status, [(header::LOCATION, location)], Json(SagaSummary::from(&row))).into_response())
}

pub(crate) fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::BadRequest(format!("{id:?} is not a saga id (a UUID)")))
}

/// The step a saga is at.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StepRef {
    index: i32,
    name: String,
    /// ACTION or COMPENSATION.
    kind: String,
    attempt: i32,
}

/// What a saga not yet finished waits for.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CurrentStep {
    #[serde(flatten)]
    step: StepRef,
    /// REPLY (until the deadline) or RETRY (the backoff ends at `until`).
    waiting_for: String,
    until: Option<DateTime<Utc>>,
}

/// A failure or the reason a saga needs a human.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FailureView {
    step: Option<String>,
    code: String,
    reason: Option<String>,
}

/// A saga as shown in lists.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SagaSummary {
    id: Uuid,
    saga_type: String,
    definition_version: i32,
    business_key: Option<String>,
    /// RUNNING, COMPENSATING, COMPLETED, FAILED or NEEDS_ATTENTION.
    status: String,
    /// Null once the saga has ended.
    current_step: Option<CurrentStep>,
    /// The step the saga was at last.
    last_step: StepRef,
    /// The forward failure that made the saga compensate.
    failure: Option<FailureView>,
    /// Why the saga needs a human.
    attention: Option<FailureView>,
    /// Rises by one per transition.
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
}

impl From<&SagaRow> for SagaSummary {
    fn from(row: &SagaRow) -> Self {
        let terminal = row.status().map(|s| s.is_terminal()).unwrap_or(false);
        let step = || StepRef {
            index: row.step_index,
            name: row.step_name.clone(),
            kind: row.step_kind.clone(),
            attempt: row.attempt,
        };
        let failure = |step: &Option<String>, code: &Option<String>, reason: &Option<String>| {
            code.as_ref().map(|code| FailureView { step: step.clone(), code: code.clone(), reason: reason.clone() })
        };
        SagaSummary {
            id: row.id,
            saga_type: row.saga_type.clone(),
            definition_version: row.definition_version,
            business_key: row.business_key.clone(),
            status: row.status.clone(),
            current_step: (!terminal).then(|| CurrentStep {
                step: step(),
                waiting_for: row.waiting.clone(),
                until: row.wake_at,
            }),
            last_step: step(),
            failure: failure(&row.failure_step, &row.failure_code, &row.failure_reason),
            attention: failure(&row.attention_step, &row.attention_code, &row.attention_reason),
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            ended_at: row.ended_at,
        }
    }
}

/// One attempt at a step's action or compensation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AttemptView {
    step: String,
    kind: String,
    attempt: i32,
    /// PENDING, SUCCEEDED, FAILED, TIMED_OUT or ABANDONED.
    status: String,
    #[schema(value_type = Option<Object>)]
    output: Option<Value>,
    error_code: Option<String>,
    error_message: Option<String>,
    started_at: DateTime<Utc>,
    deadline_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// One step of the saga's definition with what happened to it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StepView {
    index: usize,
    name: String,
    participant: String,
    action: String,
    compensation: Option<String>,
    /// NOT_STARTED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, COMPENSATING, COMPENSATED or
    /// COMPENSATION_FAILED.
    status: &'static str,
    attempts: Vec<AttemptView>,
}

/// A compensation that ran: what was undone.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CompensationView {
    step: String,
    action: String,
    /// SUCCEEDED (undone), PENDING, FAILED or TIMED_OUT (not undone yet).
    status: String,
    attempts: i32,
    finished_at: Option<DateTime<Utc>>,
}

/// One transition in the saga's append-only history.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HistoryView {
    version: i64,
    from_status: Option<String>,
    to_status: String,
    /// STARTED, REPLY, TIMER, RETRY or ABORT.
    trigger: String,
    summary: String,
    #[schema(value_type = Object)]
    detail: Value,
    recorded_at: DateTime<Utc>,
}

/// The whole saga.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SagaDetail {
    #[serde(flatten)]
    summary: SagaSummary,
    /// The input, with sensitive fields shown as "[redacted]".
    #[schema(value_type = Object)]
    input: Value,
    /// Outputs of the completed steps, by step name.
    #[schema(value_type = Object)]
    outputs: Value,
    steps: Vec<StepView>,
    /// The compensations that ran, in the order they ran.
    compensations: Vec<CompensationView>,
    history: Vec<HistoryView>,
    /// The W3C trace id every message of this saga carries (grep the services' logs for it).
    trace_id: String,
    /// The correlation id of the request that started it, if it came with one (ADR 25).
    correlation_id: Option<String>,
}

/// Get one saga: input (redacted), status, every step with its attempts, the compensations and
/// the history of transitions.
#[utoipa::path(
    get, path = "/api/v1/sagas/{id}", operation_id = "get_saga", tag = "sagas",
    params(("id" = String, Path, description = "The saga id (a UUID)")),
    responses(
        (status = 200, body = SagaDetail),
        (status = 400, description = "Not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such saga", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<SagaDetail>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.pool.acquire().await?;
    let row = store::get(&mut conn, id).await?.ok_or_else(|| ApiError::NotFound(format!("no saga {id}")))?;
    let attempts = store::attempts(&mut conn, id).await?;
    let history = store::history(&mut conn, id).await?;
    let definition = state.engine.registry().get(&row.saga_type, row.definition_version as u32);

    let view = |a: &store::AttemptRow| AttemptView {
        step: a.step_name.clone(),
        kind: a.kind.clone(),
        attempt: a.attempt,
        status: a.status.clone(),
        output: a.output.as_ref().map(store::StoredJson::or_placeholder),
        error_code: a.error_code.clone(),
        error_message: a.error_message.clone(),
        started_at: a.started_at,
        deadline_at: a.deadline_at,
        finished_at: a.finished_at,
    };
    let steps = definition
        .map(|definition| {
            definition
                .steps
                .iter()
                .enumerate()
                .map(|(index, step)| StepView {
                    index,
                    name: step.name.to_string(),
                    participant: step.participant.clone(),
                    action: step.action.clone(),
                    compensation: step.compensation.as_ref().map(|c| c.action.clone()),
                    status: step_status(&attempts, index),
                    attempts: attempts.iter().filter(|a| a.step_index as usize == index).map(view).collect(),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut compensations: Vec<CompensationView> = Vec::new();
    for attempt in attempts.iter().filter(|a| a.kind == "COMPENSATION") {
        match compensations.iter_mut().find(|c| c.step == attempt.step_name) {
            Some(c) => {
                c.status = attempt.status.clone();
                c.attempts += 1;
                c.finished_at = attempt.finished_at;
            }
            None => compensations.push(CompensationView {
                step: attempt.step_name.clone(),
                action: definition
                    .and_then(|d| d.steps.get(attempt.step_index as usize))
                    .and_then(|s| s.compensation.as_ref())
                    .map(|c| c.action.clone())
                    .unwrap_or_default(),
                status: attempt.status.clone(),
                attempts: 1,
                finished_at: attempt.finished_at,
            }),
        }
    }
    let history = history
        .into_iter()
        .map(|h| HistoryView {
            version: h.version,
            from_status: h.from_status,
            to_status: h.to_status,
            trigger: h.trigger,
            summary: h.summary,
            detail: h.detail,
            recorded_at: h.recorded_at,
        })
        .collect();
    let trace = row.trace();
    Ok(Json(SagaDetail {
        trace_id: trace.trace_id(),
        correlation_id: trace.correlation_id.clone(),
        summary: SagaSummary::from(&row),
        input: redact(&row.input.or_placeholder(), &state.redact),
        outputs: row.outputs.or_placeholder(),
        steps,
        compensations,
        history,
    }))
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

/// Paging of the saga list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct PageParams {
    /// Sagas per page, 1 to 500 (default 20).
    limit: Option<i64>,
    /// The `next` value of the previous page.
    cursor: Option<String>,
}

/// A page of sagas, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SagaPage {
    items: Vec<SagaSummary>,
    count: usize,
    limit: i64,
    /// Pass as `cursor` (with the same filters) for the next page; null on the last page.
    next: Option<String>,
}

/// List sagas, newest first, with filters and keyset pagination.
#[utoipa::path(
    get, path = "/api/v1/sagas", operation_id = "list_sagas", tag = "sagas",
    params(FilterSpec, PageParams),
    responses(
        (status = 200, body = SagaPage),
        (status = 400, description = "Bad filter, limit or cursor", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<SagaPage>, ApiError> {
    let mut spec = FilterSpec::default();
    let (mut limit, mut after) = (DEFAULT_LIMIT, None);
    for (name, value) in &pairs {
        match name.as_str() {
            "limit" => limit = params::parse_limit(value)?,
            "cursor" => after = Some(params::decode_cursor(value)?),
            other => {
                if !spec.set(other, value)? {
                    return Err(ApiError::BadRequest(format!(
                        "unknown query parameter {other:?}; allowed: {FILTER_PARAMS}, limit, cursor"
                    )));
                }
            }
        }
    }
    let filter = spec.to_filter(Utc::now())?;
    let mut conn = state.pool.acquire().await?;
    // One row more than asked tells whether there is a next page.
    let mut rows = store::list(&mut conn, &filter, after, limit + 1).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = match (more, rows.last()) {
        (true, Some(last)) => Some(params::encode_cursor(Position { created_at: last.created_at, id: last.id })),
        _ => None,
    };
    let items: Vec<SagaSummary> = rows.iter().map(SagaSummary::from).collect();
    Ok(Json(SagaPage { count: items.len(), items, limit, next }))
}

/// The window of the stats.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatsParams {
    /// A duration back from `to`, e.g. 15m, 1h (the default), 7d. Ignored when `from` is given.
    window: Option<String>,
    /// Start of the window (RFC 3339). Not with `window`.
    from: Option<String>,
    /// End of the window (RFC 3339); default now.
    to: Option<String>,
    /// Only this saga type.
    saga_type: Option<String>,
}

/// A count by a key.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Count {
    key: String,
    count: i64,
}

/// Percentiles (nearest rank) of completed sagas' durations, in seconds, within 5 % (ADR 20).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
}

/// Counts over the sagas created in the window.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SagaStats {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    saga_type: Option<String>,
    total: i64,
    /// Every status, with 0 where none.
    #[schema(value_type = Object)]
    by_status: serde_json::Map<String, Value>,
    /// COMPLETED / (COMPLETED + FAILED + NEEDS_ATTENTION); null before any saga ended.
    success_rate: Option<f64>,
    /// Forward failures by the step that failed.
    failures_by_step: Vec<Count>,
    /// Forward failures by error code.
    failures_by_code: Vec<Count>,
    /// Sagas needing a human, by the step whose compensation (or pivot) stopped them.
    attention_by_step: Vec<Count>,
    completed_duration_seconds: Option<Percentiles>,
    /// Now, not over the window: the sagas in flight and their bound, per saga type.
    admission: std::collections::BTreeMap<String, crate::admission::TypeAdmission>,
    /// Now: start requests waiting in Kafka for the orchestrator (null if the brokers did not say).
    start_requests_waiting: Option<i64>,
}

/// Saga counts, success rate, failures by step and code, and durations over a window.
#[utoipa::path(
    get, path = "/api/v1/sagas/stats", operation_id = "saga_stats", tag = "sagas",
    params(StatsParams),
    responses(
        (status = 200, body = SagaStats),
        (status = 400, description = "Bad window", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn stats(
    State(state): State<AppState>,
    query: Result<Query<StatsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SagaStats>, ApiError> {
    let Query(p) = query.map_err(|e| {
        ApiError::BadRequest(format!("{}; allowed parameters: window, from, to, saga_type", e.body_text()))
    })?;
    let now = Utc::now();
    let to = p.to.as_deref().map(|t| params::parse_time("to", t)).transpose()?.unwrap_or(now);
    let from = match (&p.window, &p.from) {
        (Some(window), None) => to - params::parse_duration("window", window)?,
        (_, Some(from)) => params::parse_time("from", from)?,
        (None, None) => to - ChronoDuration::hours(1),
    };
    // `from` at or past `to` is an empty window: every count is 0.
    let mut conn = state.pool.acquire().await?;
    let stats = crate::stats::window(&mut conn, from, to, p.saga_type.as_deref()).await?;
    let count =
        |status: SagaStatus| stats.by_status.iter().find(|(s, _)| s == status.as_str()).map(|(_, n)| *n).unwrap_or(0);
    let ended = count(SagaStatus::Completed) + count(SagaStatus::Failed) + count(SagaStatus::NeedsAttention);
    let counts =
        |pairs: &[(String, i64)]| pairs.iter().map(|(key, count)| Count { key: key.clone(), count: *count }).collect();
    Ok(Json(SagaStats {
        from,
        to,
        saga_type: p.saga_type,
        total: stats.by_status.iter().map(|(_, n)| n).sum(),
        by_status: SagaStatus::ALL.iter().map(|s| (s.as_str().to_owned(), Value::from(count(*s)))).collect(),
        success_rate: (ended > 0).then(|| count(SagaStatus::Completed) as f64 / ended as f64),
        failures_by_step: counts(&stats.failures_by_step),
        failures_by_code: counts(&stats.failures_by_code),
        attention_by_step: counts(&stats.attention_by_step),
        completed_duration_seconds: stats.completed_seconds.map(|[p50, p95, p99]| Percentiles { p50, p95, p99 }),
        admission: state.admission.snapshot(),
        start_requests_waiting: state.start_queue.depth().await,
    }))
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
    use serde_json::json;

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
