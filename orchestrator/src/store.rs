//! SQL for saga instances, their attempts and history. Functions take a connection, so callers
//! own the transaction; every value is a bound parameter.

use chrono::{DateTime, Utc};
use saga_defs::machine::{AttemptOutcome, FinishedAttempt, StepCommand};
use saga_defs::messages::FailureInfo;
use saga_defs::{SagaState, SagaStatus, StepKind, StepName, Waiting};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// One row of `saga_instances`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SagaRow {
    pub(crate) id: Uuid,
    pub(crate) saga_type: String,
    pub(crate) definition_version: i32,
    pub(crate) business_key: Option<String>,
    pub(crate) input: Value,
    pub(crate) outputs: Value,
    pub(crate) status: String,
    pub(crate) step_index: i32,
    pub(crate) step_name: String,
    pub(crate) step_kind: String,
    pub(crate) attempt: i32,
    pub(crate) waiting: String,
    pub(crate) wake_at: Option<DateTime<Utc>>,
    pub(crate) failure_step: Option<String>,
    pub(crate) failure_code: Option<String>,
    pub(crate) failure_reason: Option<String>,
    pub(crate) attention_step: Option<String>,
    pub(crate) attention_code: Option<String>,
    pub(crate) attention_reason: Option<String>,
    pub(crate) version: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) ended_at: Option<DateTime<Utc>>,
}

/// A stored value the code cannot read: a bug or a manual edit, never user input.
#[derive(Debug, thiserror::Error)]
#[error("saga {saga_id}: stored {column} {value:?} is not valid")]
pub(crate) struct CorruptRow {
    saga_id: Uuid,
    column: &'static str,
    value: String,
}

fn failure(step: &Option<String>, code: &Option<String>, reason: &Option<String>) -> Option<FailureInfo> {
    match (step, code) {
        (Some(step), Some(code)) => Some(FailureInfo {
            step: StepName::parse(step.clone()).ok()?,
            code: code.clone(),
            message: reason.clone().unwrap_or_default(),
        }),
        _ => None,
    }
}

impl SagaRow {
    pub(crate) fn status(&self) -> Result<SagaStatus, CorruptRow> {
        self.status.parse().map_err(|_| self.corrupt("status", &self.status))
    }

    fn corrupt(&self, column: &'static str, value: &str) -> CorruptRow {
        CorruptRow { saga_id: self.id, column, value: value.to_owned() }
    }

    /// The state machine's view of the row.
    pub(crate) fn state(&self) -> Result<SagaState, CorruptRow> {
        let kind: StepKind = self.step_kind.parse().map_err(|_| self.corrupt("step_kind", &self.step_kind))?;
        let waiting = match (self.waiting.as_str(), self.wake_at) {
            ("REPLY", Some(deadline)) => Waiting::Reply { deadline },
            ("RETRY", Some(at)) => Waiting::Retry { at },
            ("NOTHING", _) => Waiting::Nothing,
            (other, _) => return Err(self.corrupt("waiting", other)),
        };
        Ok(SagaState {
            status: self.status()?,
            step_index: usize::try_from(self.step_index)
                .map_err(|_| self.corrupt("step_index", &self.step_index.to_string()))?,
            kind,
            attempt: u32::try_from(self.attempt).map_err(|_| self.corrupt("attempt", &self.attempt.to_string()))?,
            waiting,
            failure: failure(&self.failure_step, &self.failure_code, &self.failure_reason),
            attention: failure(&self.attention_step, &self.attention_code, &self.attention_reason),
        })
    }
}

pub(crate) const SAGA_COLUMNS: &str = "id, saga_type, definition_version, business_key, input, outputs, status, \
    step_index, step_name, step_kind, attempt, waiting, wake_at, failure_step, failure_code, failure_reason, \
    attention_step, attention_code, attention_reason, version, created_at, updated_at, ended_at";

pub(crate) async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<SagaRow>> {
    sqlx::query_as(&format!("SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(conn)
        .await
}

pub(crate) async fn get(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<SagaRow>> {
    sqlx::query_as(&format!("SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await
}

fn waiting_label(waiting: &Waiting) -> &'static str {
    match waiting {
        Waiting::Reply { .. } => "REPLY",
        Waiting::Retry { .. } => "RETRY",
        Waiting::Nothing => "NOTHING",
    }
}

/// A new saga as `start` made it.
pub(crate) struct NewSaga<'a> {
    pub(crate) id: Uuid,
    pub(crate) saga_type: &'a str,
    pub(crate) definition_version: i32,
    pub(crate) idempotency_key: &'a str,
    pub(crate) request_hash: &'a str,
    pub(crate) business_key: Option<&'a str>,
    pub(crate) input: &'a Value,
    pub(crate) state: &'a SagaState,
    pub(crate) step_name: &'a str,
    pub(crate) now: DateTime<Utc>,
}

/// Inserts a saga unless one with the same type and idempotency key exists; true if inserted.
pub(crate) async fn insert(conn: &mut PgConnection, saga: NewSaga<'_>) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key,
             input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15)
         ON CONFLICT (saga_type, idempotency_key) DO NOTHING",
    )
    .bind(saga.id)
    .bind(saga.saga_type)
    .bind(saga.definition_version)
    .bind(saga.idempotency_key)
    .bind(saga.request_hash)
    .bind(saga.business_key)
    .bind(saga.input)
    .bind(saga.state.status.as_str())
    .bind(saga.state.step_index as i32)
    .bind(saga.step_name)
    .bind(saga.state.kind.as_str())
    .bind(saga.state.attempt as i32)
    .bind(waiting_label(&saga.state.waiting))
    .bind(saga.state.wake_at())
    .bind(saga.now)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The saga already registered under an idempotency key, with the hash of its request.
pub(crate) async fn find_by_key(
    conn: &mut PgConnection,
    saga_type: &str,
    idempotency_key: &str,
) -> sqlx::Result<Option<(Uuid, String)>> {
    sqlx::query_as("SELECT id, request_hash FROM saga_instances WHERE saga_type = $1 AND idempotency_key = $2")
        .bind(saga_type)
        .bind(idempotency_key)
        .fetch_optional(conn)
        .await
}

/// Writes the state after a transition, guarded by the version read. False if the version moved.
pub(crate) async fn update(
    conn: &mut PgConnection,
    row: &SagaRow,
    next: &SagaState,
    step_name: &str,
    new_output: Option<(&str, &Value)>,
    now: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let (output_step, output) = match new_output {
        Some((step, output)) => (Some(step), Some(output)),
        None => (None, None),
    };
    let f = next.failure.as_ref();
    let a = next.attention.as_ref();
    let result = sqlx::query(
        "UPDATE saga_instances SET
             status = $3, step_index = $4, step_name = $5, step_kind = $6, attempt = $7, waiting = $8, wake_at = $9,
             failure_step = $10, failure_code = $11, failure_reason = $12,
             attention_step = $13, attention_code = $14, attention_reason = $15,
             outputs = CASE WHEN $16::text IS NULL THEN outputs ELSE outputs || jsonb_build_object($16::text, $17::jsonb) END,
             version = version + 1, updated_at = $18,
             ended_at = CASE WHEN $3 IN ('COMPLETED', 'FAILED', 'NEEDS_ATTENTION') THEN $18 ELSE NULL END
         WHERE id = $1 AND version = $2",
    )
    .bind(row.id)
    .bind(row.version)
    .bind(next.status.as_str())
    .bind(next.step_index as i32)
    .bind(step_name)
    .bind(next.kind.as_str())
    .bind(next.attempt as i32)
    .bind(waiting_label(&next.waiting))
    .bind(next.wake_at())
    .bind(f.map(|f| f.step.as_str()))
    .bind(f.map(|f| f.code.as_str()))
    .bind(f.map(|f| f.message.as_str()))
    .bind(a.map(|a| a.step.as_str()))
    .bind(a.map(|a| a.code.as_str()))
    .bind(a.map(|a| a.message.as_str()))
    .bind(output_step)
    .bind(output)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Records that a command was sent.
pub(crate) async fn insert_attempt(
    conn: &mut PgConnection,
    saga_id: Uuid,
    command: &StepCommand,
    now: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
         VALUES ($1, $2, $3, $4, $5, 'PENDING', $6, $7)
         ON CONFLICT DO NOTHING",
    )
    .bind(saga_id)
    .bind(command.step_index as i32)
    .bind(command.step.as_str())
    .bind(command.kind.as_str())
    .bind(command.attempt as i32)
    .bind(now)
    .bind(command.deadline)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records how an attempt ended; returns when it started.
pub(crate) async fn finish_attempt(
    conn: &mut PgConnection,
    saga_id: Uuid,
    finished: &FinishedAttempt,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    let (status, code, message, output) = match &finished.outcome {
        AttemptOutcome::Succeeded { output } => ("SUCCEEDED", None, None, Some(output)),
        AttemptOutcome::Failed(error) => ("FAILED", Some(error.code.as_str()), Some(error.message.as_str()), None),
        AttemptOutcome::TimedOut => {
            ("TIMED_OUT", Some(saga_defs::contract::codes::STEP_TIMEOUT), Some("no reply before the deadline"), None)
        }
    };
    sqlx::query_scalar(
        "UPDATE saga_step_attempts SET status = $5, error_code = $6, error_message = $7, output = $8, finished_at = $9
         WHERE saga_id = $1 AND step_name = $2 AND kind = $3 AND attempt = $4 AND status = 'PENDING'
         RETURNING started_at",
    )
    .bind(saga_id)
    .bind(finished.step.as_str())
    .bind(finished.kind.as_str())
    .bind(finished.attempt as i32)
    .bind(status)
    .bind(code)
    .bind(message)
    .bind(output)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// One entry of the append-only history.
pub(crate) struct HistoryEntry<'a> {
    pub(crate) saga_id: Uuid,
    pub(crate) version: i64,
    pub(crate) from_status: Option<SagaStatus>,
    pub(crate) to_status: SagaStatus,
    pub(crate) trigger: &'a str,
    pub(crate) summary: &'a str,
    pub(crate) detail: Value,
    pub(crate) now: DateTime<Utc>,
}

pub(crate) async fn append_history(conn: &mut PgConnection, entry: HistoryEntry<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(entry.saga_id)
    .bind(entry.version)
    .bind(entry.from_status.map(|s| s.as_str()))
    .bind(entry.to_status.as_str())
    .bind(entry.trigger)
    .bind(entry.summary)
    .bind(entry.detail)
    .bind(entry.now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks up to `limit` sagas whose wake-up time has passed, skipping those another replica holds.
pub(crate) async fn claim_due(conn: &mut PgConnection, now: DateTime<Utc>, limit: i64) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT id FROM saga_instances WHERE wake_at <= $1 ORDER BY wake_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AttemptRow {
    pub(crate) step_index: i32,
    pub(crate) step_name: String,
    pub(crate) kind: String,
    pub(crate) attempt: i32,
    pub(crate) status: String,
    pub(crate) error_code: Option<String>,
    pub(crate) error_message: Option<String>,
    pub(crate) output: Option<Value>,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) deadline_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

pub(crate) async fn attempts(conn: &mut PgConnection, saga_id: Uuid) -> sqlx::Result<Vec<AttemptRow>> {
    sqlx::query_as(
        "SELECT step_index, step_name, kind, attempt, status, error_code, error_message, output, started_at, deadline_at, finished_at
         FROM saga_step_attempts WHERE saga_id = $1 ORDER BY started_at, step_index, kind, attempt",
    )
    .bind(saga_id)
    .fetch_all(conn)
    .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct HistoryRow {
    pub(crate) version: i64,
    pub(crate) from_status: Option<String>,
    pub(crate) to_status: String,
    pub(crate) trigger: String,
    pub(crate) summary: String,
    pub(crate) detail: Value,
    pub(crate) recorded_at: DateTime<Utc>,
}

pub(crate) async fn history(conn: &mut PgConnection, saga_id: Uuid) -> sqlx::Result<Vec<HistoryRow>> {
    sqlx::query_as(
        "SELECT version, from_status, to_status, trigger, summary, detail, recorded_at
         FROM saga_history WHERE saga_id = $1 ORDER BY version",
    )
    .bind(saga_id)
    .fetch_all(conn)
    .await
}

/// Filters of the saga list.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListFilter {
    pub(crate) statuses: Vec<String>,
    pub(crate) saga_type: Option<String>,
    pub(crate) business_key: Option<String>,
    pub(crate) limit: i64,
}

/// Sagas matching the filter, newest first.
pub(crate) async fn list(conn: &mut PgConnection, filter: &ListFilter) -> sqlx::Result<Vec<SagaRow>> {
    sqlx::query_as(&format!(
        "SELECT {SAGA_COLUMNS} FROM saga_instances
         WHERE (cardinality($1::text[]) = 0 OR status = ANY($1))
           AND ($2::text IS NULL OR saga_type = $2)
           AND ($3::text IS NULL OR business_key = $3)
         ORDER BY created_at DESC, id DESC
         LIMIT $4"
    ))
    .bind(&filter.statuses)
    .bind(&filter.saga_type)
    .bind(&filter.business_key)
    .bind(filter.limit)
    .fetch_all(conn)
    .await
}
