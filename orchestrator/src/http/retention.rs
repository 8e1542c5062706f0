//! `/api/v1/retention`: what the orchestrator keeps, for how long, how much there is and how much
//! is past its age now, and what retention deleted since the process started.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::Problem;
use super::{ApiError, AppState};

/// Retention's policies and state, shared with the retention task.
pub(crate) struct Retention {
    pub(crate) policies: Vec<saga_runtime::retention::Policy>,
    pub(crate) status: saga_runtime::retention::SharedStatus,
    pub(crate) config: saga_runtime::retention::RetentionConfig,
    /// `retention.ms` given to the dead-letter topics this service creates.
    pub(crate) dead_letter_topics: Option<Duration>,
}

/// Rows past their age are counted up to this many.
const COUNT_CAP: i64 = 100_000;

/// What is kept and for how long.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetentionView {
    /// One entry per policy: `policy`, `what`, `tables`, `keep` (null: forever), `keep_seconds`,
    /// `rows_estimate` (the planner's estimate of the main table's rows), `past_retention` (rows
    /// of the main table past their age now, counted up to 100,000; `past_retention_capped` when
    /// there are more), `deleted_since_start` by table, `last_error`.
    #[schema(value_type = Vec<Object>)]
    policies: Vec<serde_json::Value>,
    /// How often retention runs, e.g. `1m`.
    interval: String,
    /// Most rows of a policy deleted in one transaction.
    batch_size: i64,
    /// When retention last finished a round; null before the first.
    last_run: Option<chrono::DateTime<chrono::Utc>>,
    /// `retention.ms` of the dead-letter topics this service creates (null: the broker's default).
    /// The dead letters themselves live in Kafka and expire there.
    dead_letter_topics_keep: Option<String>,
}

/// What is kept, for how long, and what retention deleted.
#[utoipa::path(
    get, path = "/api/v1/retention", operation_id = "get_retention", tag = "operations",
    responses(
        (status = 200, body = RetentionView),
        (status = 503, description = "The database did not answer", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["read"]))
)]
pub(crate) async fn show(State(state): State<AppState>) -> Result<Json<RetentionView>, ApiError> {
    let retention = &state.retention;
    let status = retention.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut policies = Vec::with_capacity(retention.policies.len());
    for policy in &retention.policies {
        policies.push(saga_runtime::retention::describe(&state.pool, policy, &status, COUNT_CAP).await?);
    }
    Ok(Json(RetentionView {
        policies,
        interval: humantime::format_duration(retention.config.retention_interval).to_string(),
        batch_size: retention.config.retention_batch_size,
        last_run: status.last_run,
        dead_letter_topics_keep: retention.dead_letter_topics.map(|k| humantime::format_duration(k).to_string()),
    }))
}
