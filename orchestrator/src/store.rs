//! SQL for saga instances, their attempts and history. Functions take a connection, so callers
//! own the transaction; every value is a bound parameter.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use saga_defs::machine::{AttemptOutcome, FinishedAttempt, StepCommand};
use saga_defs::messages::FailureInfo;
use saga_defs::{SagaState, SagaStatus, StepKind, StepName, Waiting};
use serde_json::Value;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

/// One row of `saga_instances`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SagaRow {
    pub(crate) id: Uuid,
    pub(crate) saga_type: String,
    pub(crate) definition_version: i32,
    pub(crate) business_key: Option<String>,
    pub(crate) input: StoredJson,
    pub(crate) outputs: StoredJson,
    pub(crate) status: String,
    pub(crate) step_index: i32,
    pub(crate) step_name: String,
    pub(crate) step_kind: String,
    pub(crate) attempt: i32,
    pub(crate) first_attempt: i32,
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
    /// The `traceparent` and correlation id the saga started with (migration 1007).
    pub(crate) trace_parent: Option<String>,
    pub(crate) correlation_id: Option<String>,
}

/// A JSON column as stored, or why it cannot be read. Reading a row never fails on its JSON:
/// one unreadable value (a number serde_json cannot read back, written before such numbers were
/// refused at the door, or by hand) must not fail a whole page of the list or a whole batch of
/// the timer loop. The engine treats an unreadable value as [`CorruptRow`] and parks that saga.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredJson(pub(crate) Result<Value, String>);

impl sqlx::Type<Postgres> for StoredJson {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Value as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <Value as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for StoredJson {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(Self(<Value as sqlx::Decode<'r, Postgres>>::decode(value).map_err(|e| e.to_string())))
    }
}

impl StoredJson {
    /// The value, or a placeholder saying why it cannot be shown.
    pub(crate) fn or_placeholder(&self) -> Value {
        match &self.0 {
            Ok(value) => value.clone(),
            Err(error) => serde_json::json!({"unreadable": error}),
        }
    }
}

/// A stored value the code cannot read: a bug or a manual edit, never user input.
#[derive(Debug, thiserror::Error)]
#[error("saga {saga_id}: stored {column} is not valid: {value}")]
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
    /// The trace and correlation id it started with; a saga started before they were kept (or
    /// whose stored `traceparent` is unreadable) is its own trace, the saga id as trace id.
    pub(crate) fn trace(&self) -> saga_runtime::trace::Context {
        use saga_runtime::trace::{Context, TraceParent};
        let parent = self.trace_parent.as_deref().and_then(TraceParent::parse);
        Context {
            from_caller: parent.is_some(),
            parent: parent.unwrap_or_else(|| TraceParent::of_saga(self.id)),
            correlation_id: self.correlation_id.as_deref().and_then(saga_runtime::trace::correlation_id),
        }
    }

    pub(crate) fn input(&self) -> Result<&Value, CorruptRow> {
        self.input.0.as_ref().map_err(|e| self.corrupt("input", e))
    }

    pub(crate) fn outputs(&self) -> Result<&Value, CorruptRow> {
        self.outputs.0.as_ref().map_err(|e| self.corrupt("outputs", e))
    }

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
            first_attempt: u32::try_from(self.first_attempt)
                .map_err(|_| self.corrupt("first_attempt", &self.first_attempt.to_string()))?,
            waiting,
            failure: failure(&self.failure_step, &self.failure_code, &self.failure_reason),
            attention: failure(&self.attention_step, &self.attention_code, &self.attention_reason),
        })
    }
}

pub(crate) const SAGA_COLUMNS: &str = "id, saga_type, definition_version, business_key, input, outputs, status, \
    step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, failure_step, failure_code, failure_reason, \
    attention_step, attention_code, attention_reason, version, created_at, updated_at, ended_at, trace_parent, correlation_id";

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

pub(crate) fn waiting_label(waiting: &Waiting) -> &'static str {
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
    pub(crate) trace_parent: Option<&'a str>,
    pub(crate) correlation_id: Option<&'a str>,
}

/// Inserts a saga unless one with the same type and idempotency key exists; true if inserted.
pub(crate) async fn insert(conn: &mut PgConnection, saga: NewSaga<'_>) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key,
             input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at,
             trace_parent, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, $16, $17)
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
    .bind(saga.trace_parent)
    .bind(saga.correlation_id)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Inserts sagas in one statement, each unless one with its type and idempotency key exists
/// (an earlier one of the same call included, as one at a time would); returns the ids inserted.
pub(crate) async fn insert_many(conn: &mut PgConnection, sagas: &[NewSaga<'_>]) -> sqlx::Result<HashSet<Uuid>> {
    if sagas.is_empty() {
        return Ok(HashSet::new());
    }
    let column = |f: &dyn Fn(&NewSaga<'_>) -> String| sagas.iter().map(f).collect::<Vec<String>>();
    let ids: Vec<Uuid> = sagas.iter().map(|s| s.id).collect();
    let versions: Vec<i32> = sagas.iter().map(|s| s.definition_version).collect();
    let business_keys: Vec<Option<&str>> = sagas.iter().map(|s| s.business_key).collect();
    let inputs: Vec<&Value> = sagas.iter().map(|s| s.input).collect();
    let step_indexes: Vec<i32> = sagas.iter().map(|s| s.state.step_index as i32).collect();
    let attempts: Vec<i32> = sagas.iter().map(|s| s.state.attempt as i32).collect();
    let wake_ats: Vec<Option<DateTime<Utc>>> = sagas.iter().map(|s| s.state.wake_at()).collect();
    let nows: Vec<DateTime<Utc>> = sagas.iter().map(|s| s.now).collect();
    // In the order given, so that of two with one key the first is the one inserted.
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key,
             input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at,
             trace_parent, correlation_id)
         SELECT id, saga_type, definition_version, idempotency_key, request_hash, business_key,
             input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, at, at,
             trace_parent, correlation_id
         FROM UNNEST($1::uuid[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::text[], $7::jsonb[],
                     $8::text[], $9::int4[], $10::text[], $11::text[], $12::int4[], $13::text[],
                     $14::timestamptz[], $15::timestamptz[], $16::text[], $17::text[])
             WITH ORDINALITY AS u(id, saga_type, definition_version, idempotency_key, request_hash, business_key,
                 input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, at,
                 trace_parent, correlation_id, n)
         ORDER BY n
         ON CONFLICT (saga_type, idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(column(&|s| s.saga_type.to_owned()))
    .bind(&versions)
    .bind(column(&|s| s.idempotency_key.to_owned()))
    .bind(column(&|s| s.request_hash.to_owned()))
    .bind(&business_keys)
    .bind(&inputs)
    .bind(column(&|s| s.state.status.as_str().to_owned()))
    .bind(&step_indexes)
    .bind(column(&|s| s.step_name.to_owned()))
    .bind(column(&|s| s.state.kind.as_str().to_owned()))
    .bind(&attempts)
    .bind(column(&|s| waiting_label(&s.state.waiting).to_owned()))
    .bind(&wake_ats)
    .bind(&nows)
    .bind(sagas.iter().map(|s| s.trace_parent).collect::<Vec<_>>())
    .bind(sagas.iter().map(|s| s.correlation_id).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    Ok(inserted.into_iter().collect())
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
             status = $3, step_index = $4, step_name = $5, step_kind = $6, attempt = $7, first_attempt = $19,
             waiting = $8, wake_at = $9,
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
    .bind(next.first_attempt as i32)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How an attempt's outcome is stored: status, error code, error message, output.
pub(crate) fn outcome_columns(outcome: &AttemptOutcome) -> (&'static str, Option<&str>, Option<&str>, Option<&Value>) {
    match outcome {
        AttemptOutcome::Succeeded { output } => ("SUCCEEDED", None, None, Some(output)),
        AttemptOutcome::Failed(error) => ("FAILED", Some(error.code.as_str()), Some(error.message.as_str()), None),
        AttemptOutcome::TimedOut => {
            ("TIMED_OUT", Some(saga_defs::contract::codes::STEP_TIMEOUT), Some("no reply before the deadline"), None)
        }
        AttemptOutcome::Abandoned => {
            ("ABANDONED", None, Some("an operator's retry or abort stopped waiting for it"), None)
        }
    }
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

/// The status of a command the saga sent (`PENDING`, `SUCCEEDED`, ...), or `None` if it never
/// sent that step, kind and attempt.
pub(crate) async fn attempt_status(
    conn: &mut PgConnection,
    saga_id: Uuid,
    step: &str,
    kind: StepKind,
    attempt: u32,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT status FROM saga_step_attempts WHERE saga_id = $1 AND step_name = $2 AND kind = $3 AND attempt = $4",
    )
    .bind(saga_id)
    .bind(step)
    .bind(kind.as_str())
    .bind(attempt as i32)
    .fetch_optional(conn)
    .await
}

/// Records how an attempt ended; returns when it started.
pub(crate) async fn finish_attempt(
    conn: &mut PgConnection,
    saga_id: Uuid,
    finished: &FinishedAttempt,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    let (status, code, message, output) = outcome_columns(&finished.outcome);
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

/// What `park` changed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Parked {
    pub(crate) status_before: String,
    pub(crate) saga_type: String,
    pub(crate) definition_version: i32,
    pub(crate) business_key: Option<String>,
    pub(crate) step_name: String,
    pub(crate) version: i64,
    pub(crate) created_at: DateTime<Utc>,
}

/// Moves an unfinished saga that cannot be processed to `NEEDS_ATTENTION` with `code` and
/// `reason`, reading none of its JSON. `None` if it is not unfinished (or does not exist).
pub(crate) async fn park(
    conn: &mut PgConnection,
    id: Uuid,
    code: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<Parked>> {
    sqlx::query_as(
        "WITH before AS (
             SELECT id, status FROM saga_instances WHERE id = $1 AND status IN ('RUNNING', 'COMPENSATING') FOR UPDATE
         )
         UPDATE saga_instances s SET status = 'NEEDS_ATTENTION', waiting = 'NOTHING', wake_at = NULL,
             attention_step = s.step_name, attention_code = $2, attention_reason = $3,
             version = s.version + 1, updated_at = $4, ended_at = $4
         FROM before WHERE s.id = before.id
         RETURNING before.status AS status_before, s.saga_type, s.definition_version, s.business_key, s.step_name,
             s.version, s.created_at",
    )
    .bind(id)
    .bind(code)
    .bind(reason)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// Brings `saga_wakeups` back in step with `saga_instances.wake_at` where something bypassed its
/// triggers (`session_replication_role = replica`, a restore without them): adds the wake-ups of
/// sagas in flight that have none, corrects those that differ, and deletes those of sagas that
/// are not waiting (or no longer exist). Returns how many rows it changed: 0 when in step.
///
/// A saga whose wake-up it writes is locked first (`SKIP LOCKED`: one in a transition is left to
/// its own trigger), so the value written is the saga's current one, not a stale snapshot's.
pub(crate) async fn repair_wakeups(pool: &sqlx::PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "WITH wanted AS (
             SELECT id, wake_at FROM saga_instances s
             WHERE status IN ('RUNNING', 'COMPENSATING') AND wake_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM saga_wakeups w WHERE w.saga_id = s.id AND w.wake_at = s.wake_at)
             ORDER BY id
             FOR UPDATE SKIP LOCKED
         ), upserted AS (
             INSERT INTO saga_wakeups (saga_id, wake_at) SELECT id, wake_at FROM wanted
             ON CONFLICT (saga_id) DO UPDATE SET wake_at = EXCLUDED.wake_at
             RETURNING 1
         ), deleted AS (
             DELETE FROM saga_wakeups w
             WHERE NOT EXISTS (SELECT 1 FROM saga_instances s WHERE s.id = w.saga_id AND s.wake_at IS NOT NULL)
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM deleted)",
    )
    .fetch_one(pool)
    .await
}

/// saga_wakeups indexes saga_instances.wake_at (migration 1006, ADR 21), which stays unindexed so
/// that a step's update of the saga row is a HOT update; the row's own wake_at is checked again
/// once it is locked, so a stale wake-up cannot act early.
pub(crate) const CLAIM_DUE: &str = "SELECT s.id FROM saga_wakeups w JOIN saga_instances s ON s.id = w.saga_id
     WHERE w.wake_at <= $1 AND s.wake_at <= $1 AND (s.waiting <> 'REPLY' OR s.wake_at <= $3)
     ORDER BY w.wake_at LIMIT $2 FOR UPDATE OF s SKIP LOCKED";

/// Locks up to `limit` sagas whose wake-up time has passed, skipping those another replica holds:
/// a backoff that ended by `now`, a reply deadline that passed by `reply_cutoff` (ADR 29).
pub(crate) async fn claim_due(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    reply_cutoff: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(CLAIM_DUE).bind(now).bind(limit).bind(reply_cutoff).fetch_all(conn).await
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
    pub(crate) output: Option<StoredJson>,
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

/// Filters of the saga list; every field narrows the result. Values are bound, never spliced.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListFilter {
    pub(crate) statuses: Vec<String>,
    pub(crate) saga_type: Option<String>,
    /// The step that failed forward, or whose compensation needs a human.
    pub(crate) failed_step: Option<String>,
    /// The failure's or the attention's error code.
    pub(crate) failure_code: Option<String>,
    pub(crate) business_key: Option<String>,
    pub(crate) created_after: Option<DateTime<Utc>>,
    pub(crate) created_before: Option<DateTime<Utc>>,
    pub(crate) updated_after: Option<DateTime<Utc>>,
    pub(crate) updated_before: Option<DateTime<Utc>>,
    /// Not terminal and started before this instant.
    pub(crate) unfinished_since: Option<DateTime<Utc>>,
    /// Not terminal and its deadline or backoff passed before this instant, without the timer
    /// loop having moved it on.
    pub(crate) overdue_since: Option<DateTime<Utc>>,
}

/// A position in the list: the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) id: Uuid,
}

/// Which of a failed-step (or, without one, failure-code) filter's two columns a query reads:
/// both (`failure_… = x OR attention_… = x`), or one side each, so that each side is read in order
/// from its own index instead of sorting every match (ADR 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Both,
    Failure,
    Attention,
}

/// Appends the WHERE clause of `filter` to `query`.
fn push_filter(query: &mut QueryBuilder<'_, Postgres>, filter: &ListFilter) {
    push_filter_side(query, filter, Side::Both)
}

fn push_filter_side(query: &mut QueryBuilder<'_, Postgres>, filter: &ListFilter, side: Side) {
    query.push(" WHERE TRUE");
    if !filter.statuses.is_empty() {
        query.push(" AND status = ANY(").push_bind(filter.statuses.clone()).push(")");
    }
    let mut eq = |column: &str, value: &Option<String>| {
        if let Some(value) = value {
            query.push(format_args!(" AND {column} = ")).push_bind(value.clone());
        }
    };
    eq("saga_type", &filter.saga_type);
    eq("business_key", &filter.business_key);
    // The side split applies to the step when there is one, else to the code.
    let mut split = side;
    for (value, failure, attention) in [
        (&filter.failed_step, "failure_step", "attention_step"),
        (&filter.failure_code, "failure_code", "attention_code"),
    ] {
        let Some(value) = value else { continue };
        match std::mem::replace(&mut split, Side::Both) {
            Side::Both => {
                query.push(format_args!(" AND ({failure} = ")).push_bind(value.clone());
                query.push(format_args!(" OR {attention} = ")).push_bind(value.clone()).push(")");
            }
            Side::Failure => {
                query.push(format_args!(" AND {failure} = ")).push_bind(value.clone());
            }
            Side::Attention => {
                query.push(format_args!(" AND {attention} = ")).push_bind(value.clone());
                query.push(format_args!(" AND {failure} IS DISTINCT FROM ")).push_bind(value.clone());
            }
        }
    }
    if filter.unfinished_since.is_some() || filter.overdue_since.is_some() {
        query.push(" AND status IN ('RUNNING', 'COMPENSATING')");
    }
    for (expr, value) in [
        ("created_at >=", filter.created_after),
        ("created_at <", filter.created_before),
        ("updated_at >=", filter.updated_after),
        ("updated_at <", filter.updated_before),
        ("created_at <", filter.unfinished_since),
        ("wake_at <", filter.overdue_since),
    ] {
        if let Some(value) = value {
            query.push(format_args!(" AND {expr} ")).push_bind(value);
        }
    }
    if let Some(overdue) = filter.overdue_since {
        // The wake-ups are indexed in their own table (migration 1006): the few overdue sagas
        // are found there, not among all those in flight.
        query.push(" AND id IN (SELECT saga_id FROM saga_wakeups WHERE wake_at < ").push_bind(overdue).push(")");
    }
}

/// Sagas in flight by status, with the age in seconds of the oldest. The predicate is the partial
/// index's (`saga_instances_unfinished_created`), so the cost follows the sagas in flight, not the
/// table: written as a join on the statuses, it scanned all 5 million rows every 5 s.
pub(crate) const IN_FLIGHT_BY_STATUS: &str =
    "SELECT status, count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM saga_instances
     WHERE status IN ('RUNNING', 'COMPENSATING') GROUP BY status";

pub(crate) async fn in_flight_by_status(pool: &sqlx::PgPool) -> sqlx::Result<Vec<(String, i64, f64)>> {
    sqlx::query_as(IN_FLIGHT_BY_STATUS).fetch_all(pool).await
}

/// The query of one page of sagas matching the filter, newest first, after `after` if given.
fn list_query<'a>(
    prefix: &str,
    filter: &'a ListFilter,
    after: Option<Position>,
    limit: i64,
) -> QueryBuilder<'a, Postgres> {
    let page = |query: &mut QueryBuilder<'a, Postgres>, side: Side| {
        query.push(format_args!("SELECT {SAGA_COLUMNS} FROM saga_instances"));
        push_filter_side(query, filter, side);
        if let Some(after) = after {
            query
                .push(" AND (created_at, id) < (")
                .push_bind(after.created_at)
                .push(", ")
                .push_bind(after.id)
                .push(")");
        }
        query.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(limit);
    };
    let mut query = QueryBuilder::new(prefix);
    if filter.failed_step.is_some() || filter.failure_code.is_some() {
        // `a = x OR b = x` would read every match to sort them: a page of each side, merged.
        query.push(format_args!("SELECT {SAGA_COLUMNS} FROM (("));
        page(&mut query, Side::Failure);
        query.push(") UNION ALL (");
        page(&mut query, Side::Attention);
        query.push(")) sides ORDER BY created_at DESC, id DESC LIMIT ").push_bind(limit);
    } else {
        page(&mut query, Side::Both);
    }
    query
}

/// One page of sagas matching the filter, newest first, after `after` if given.
pub(crate) async fn list(
    conn: &mut PgConnection,
    filter: &ListFilter,
    after: Option<Position>,
    limit: i64,
) -> sqlx::Result<Vec<SagaRow>> {
    list_query("", filter, after, limit).build_query_as().fetch_all(conn).await
}

/// The plan Postgres chooses for a page of `filter` (for the query-plan test and docs).
#[cfg(test)]
pub(crate) async fn explain_list(conn: &mut PgConnection, filter: &ListFilter, limit: i64) -> sqlx::Result<String> {
    let lines: Vec<String> = list_query("EXPLAIN ", filter, None, limit).build_query_scalar().fetch_all(conn).await?;
    Ok(lines.join("\n"))
}

/// Locks the sagas matching the filter, oldest first, for a bulk action.
pub(crate) async fn lock_matching(
    conn: &mut PgConnection,
    filter: &ListFilter,
    limit: i64,
) -> sqlx::Result<Vec<SagaRow>> {
    let mut query = QueryBuilder::new(format!("SELECT {SAGA_COLUMNS} FROM saga_instances"));
    push_filter(&mut query, filter);
    query.push(" ORDER BY created_at, id LIMIT ").push_bind(limit).push(" FOR UPDATE");
    query.build_query_as().fetch_all(conn).await
}

/// One entry of the operator audit log: who did what to which saga, why, and what it changed.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
#[schema(as = AuditEntry)]
pub(crate) struct AuditRow {
    pub(crate) id: i64,
    pub(crate) saga_id: Uuid,
    pub(crate) action: String,
    pub(crate) actor: String,
    pub(crate) reason: String,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) bulk_id: Option<Uuid>,
    pub(crate) status_before: String,
    pub(crate) status_after: String,
    pub(crate) version_before: i64,
    pub(crate) version_after: i64,
    #[schema(value_type = Object)]
    pub(crate) detail: Value,
    pub(crate) recorded_at: DateTime<Utc>,
}

/// What an operator did, as written to the audit log.
pub(crate) struct NewAudit<'a> {
    pub(crate) saga_id: Uuid,
    pub(crate) action: &'a str,
    pub(crate) actor: &'a str,
    pub(crate) reason: &'a str,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) bulk_id: Option<Uuid>,
    pub(crate) status_before: SagaStatus,
    pub(crate) status_after: SagaStatus,
    pub(crate) version_before: i64,
    pub(crate) detail: Value,
    pub(crate) now: DateTime<Utc>,
}

pub(crate) async fn append_audit(conn: &mut PgConnection, audit: NewAudit<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO saga_audit (saga_id, action, actor, reason, idempotency_key, bulk_id, status_before,
             status_after, version_before, version_after, detail, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9 + 1, $10, $11)
         RETURNING id",
    )
    .bind(audit.saga_id)
    .bind(audit.action)
    .bind(audit.actor)
    .bind(audit.reason)
    .bind(audit.idempotency_key)
    .bind(audit.bulk_id)
    .bind(audit.status_before.as_str())
    .bind(audit.status_after.as_str())
    .bind(audit.version_before)
    .bind(audit.detail)
    .bind(audit.now)
    .fetch_one(conn)
    .await
}

pub(crate) async fn audit(conn: &mut PgConnection, saga_id: Uuid) -> sqlx::Result<Vec<AuditRow>> {
    sqlx::query_as(
        "SELECT id, saga_id, action, actor, reason, idempotency_key, bulk_id, status_before, status_after,
             version_before, version_after, detail, recorded_at
         FROM saga_audit WHERE saga_id = $1 ORDER BY id",
    )
    .bind(saga_id)
    .fetch_all(conn)
    .await
}

/// A stored response to an operator request made under an Idempotency-Key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct StoredResponse {
    pub(crate) request_hash: String,
    pub(crate) status_code: i32,
    pub(crate) response: Value,
}

/// Claims `key` for this request; if it was used before, returns what was stored. A concurrent
/// request with the same key waits here until the first one commits or rolls back.
pub(crate) async fn claim_request_key(
    conn: &mut PgConnection,
    key: &str,
    request_hash: &str,
    actor: &str,
) -> sqlx::Result<Option<StoredResponse>> {
    let claimed = sqlx::query(
        "INSERT INTO operator_requests (idempotency_key, request_hash, status_code, response, actor)
         VALUES ($1, $2, 0, 'null'::jsonb, $3) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .bind(request_hash)
    .bind(actor)
    .execute(&mut *conn)
    .await?;
    if claimed.rows_affected() == 1 {
        return Ok(None);
    }
    sqlx::query_as("SELECT request_hash, status_code, response FROM operator_requests WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(conn)
        .await
}

/// Stores the response to the request that claimed `key`, in the same transaction.
pub(crate) async fn store_response(
    conn: &mut PgConnection,
    key: &str,
    status_code: u16,
    response: &Value,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE operator_requests SET status_code = $2, response = $3 WHERE idempotency_key = $1")
        .bind(key)
        .bind(status_code as i32)
        .bind(response)
        .execute(conn)
        .await?;
    Ok(())
}

/// Scratch databases with the orchestrator's schema, on the real Postgres (`TEST_POSTGRES_URL`,
/// default the local server), for tests of its SQL.
#[cfg(test)]
pub(crate) mod scratch {
    use sqlx::{Connection, Executor, PgConnection};
    use uuid::Uuid;

    /// The server's URL and its query (`?sslmode=disable`, `?host=/var/run/postgresql`), if any.
    fn base() -> (String, String) {
        let url = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        match url.split_once('?') {
            Some((base, query)) => (base.trim_end_matches('/').to_owned(), format!("?{query}")),
            None => (url.trim_end_matches('/').to_owned(), String::new()),
        }
    }

    /// A new database with every migration applied: a connection to it, and its name.
    pub(crate) async fn database(purpose: &str) -> (PgConnection, String) {
        let name = format!("sagatest_{purpose}_{}", &Uuid::new_v4().simple().to_string()[..10]);
        let mut admin = PgConnection::connect(&url("postgres")).await.expect("Postgres is running");
        admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.unwrap();
        let mut conn = PgConnection::connect(&url(&name)).await.unwrap();
        sqlx::migrate!("../migrations/orchestrator").run(&mut conn).await.unwrap();
        (conn, name)
    }

    /// [`database`] with the outbox's tables too, as a service's own database has them.
    pub(crate) async fn database_with_outbox(purpose: &str) -> (PgConnection, String) {
        let (mut conn, name) = database(purpose).await;
        let mut outbox = saga_runtime::db::outbox_migrations();
        outbox.set_ignore_missing(true);
        outbox.run(&mut conn).await.unwrap();
        (conn, name)
    }

    pub(crate) fn url(name: &str) -> String {
        let (base, query) = base();
        format!("{base}/{name}{query}")
    }

    pub(crate) async fn drop(name: &str) {
        let mut admin = PgConnection::connect(&url("postgres")).await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }
}

/// Against the real Postgres (`TEST_POSTGRES_URL`, default the local server): every filter of
/// the saga list is served by an index, on a table large enough for the planner to care.
/// `WRITE_QUERY_PLANS=docs/query-plans.md` also writes the plans down.
#[cfg(test)]
mod plan_tests {
    use sqlx::Executor;

    use super::*;

    #[tokio::test]
    async fn every_list_filter_is_served_by_an_index() {
        let (mut conn, name) = scratch::database("plans").await;
        // 50,000 sagas over 50 days: mostly completed, some failed at various steps, a few in flight.
        conn.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash,
                 business_key, input, status, step_index, step_name, step_kind, attempt, waiting, wake_at,
                 failure_step, failure_code, attention_step, attention_code, created_at, updated_at, ended_at)
             SELECT gen_random_uuid(), CASE WHEN i % 10 = 0 THEN 'refund' ELSE 'order-fulfilment' END, 1,
                 'k' || i, 'h', 'order:' || i, '{}'::jsonb,
                 s.status, 0, 'verify_order', 'ACTION', 1,
                 CASE WHEN s.status IN ('RUNNING', 'COMPENSATING') THEN 'REPLY' ELSE 'NOTHING' END,
                 CASE WHEN s.status IN ('RUNNING', 'COMPENSATING') THEN t + interval '10 seconds' END,
                 CASE WHEN s.status IN ('FAILED', 'NEEDS_ATTENTION') THEN (ARRAY['reserve_inventory', 'charge_payment', 'create_shipment'])[1 + i % 3] END,
                 CASE WHEN s.status IN ('FAILED', 'NEEDS_ATTENTION') THEN (ARRAY['INVENTORY_UNAVAILABLE', 'PAYMENT_DECLINED', 'INVALID_ADDRESS'])[1 + i % 3] END,
                 CASE WHEN s.status = 'NEEDS_ATTENTION' THEN 'reserve_inventory' END,
                 CASE WHEN s.status = 'NEEDS_ATTENTION' THEN 'STEP_TIMEOUT' END,
                 t, t, CASE WHEN s.status IN ('RUNNING', 'COMPENSATING') THEN NULL ELSE t END
             FROM generate_series(1, 50000) AS i,
                 LATERAL (SELECT now() - (i * interval '86 seconds') AS t) AS tt,
                 LATERAL (SELECT CASE WHEN i % 500 = 0 THEN 'RUNNING' WHEN i % 997 = 0 THEN 'NEEDS_ATTENTION'
                                      WHEN i % 20 = 0 THEN 'FAILED' ELSE 'COMPLETED' END AS status) AS s",
        )
        .await
        .unwrap();
        conn.execute("ANALYZE saga_instances; ANALYZE saga_wakeups").await.unwrap();
        // The plans below are made without statistics of the documents (migration 1008).
        let analyzed: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_stats WHERE tablename = 'saga_instances' ORDER BY attname",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert!(analyzed.contains(&"status".to_owned()) && analyzed.contains(&"created_at".to_owned()), "{analyzed:?}");
        assert!(!analyzed.contains(&"input".to_owned()) && !analyzed.contains(&"outputs".to_owned()), "{analyzed:?}");

        let now = Utc::now();
        let day = chrono::Duration::days(1);
        let one = |f: fn(&mut ListFilter)| {
            let mut filter = ListFilter::default();
            f(&mut filter);
            filter
        };
        let cases: Vec<(&str, ListFilter)> = vec![
            ("no filter", ListFilter::default()),
            ("status=FAILED", one(|f| f.statuses = vec!["FAILED".into()])),
            ("status=RUNNING,NEEDS_ATTENTION", one(|f| f.statuses = vec!["RUNNING".into(), "NEEDS_ATTENTION".into()])),
            ("saga_type=refund", one(|f| f.saga_type = Some("refund".into()))),
            ("failed_step=charge_payment", one(|f| f.failed_step = Some("charge_payment".into()))),
            ("failure_code=PAYMENT_DECLINED", one(|f| f.failure_code = Some("PAYMENT_DECLINED".into()))),
            (
                "status=FAILED&failed_step=charge_payment",
                ListFilter {
                    statuses: vec!["FAILED".into()],
                    failed_step: Some("charge_payment".into()),
                    ..ListFilter::default()
                },
            ),
            ("business_key=order:4242", one(|f| f.business_key = Some("order:4242".into()))),
            ("created_after (last day)", ListFilter { created_after: Some(now - day), ..ListFilter::default() }),
            (
                "created_before (older than 40 days)",
                ListFilter { created_before: Some(now - day * 40), ..ListFilter::default() },
            ),
            ("updated_after (last day)", ListFilter { updated_after: Some(now - day), ..ListFilter::default() }),
            (
                "updated_before (older than 40 days)",
                ListFilter { updated_before: Some(now - day * 40), ..ListFilter::default() },
            ),
            (
                "stuck_for=1h",
                ListFilter { unfinished_since: Some(now - chrono::Duration::hours(1)), ..ListFilter::default() },
            ),
            (
                "past_deadline=true",
                ListFilter { overdue_since: Some(now - chrono::Duration::seconds(5)), ..ListFilter::default() },
            ),
            (
                "status=FAILED&failure_code=INVALID_ADDRESS&created_after (last 7 days)",
                ListFilter {
                    statuses: vec!["FAILED".into()],
                    failure_code: Some("INVALID_ADDRESS".into()),
                    created_after: Some(now - day * 7),
                    ..ListFilter::default()
                },
            ),
        ];
        let mut doc = String::from(
            "# Query plans of GET /api/v1/sagas\n\nWritten by `WRITE_QUERY_PLANS=$PWD/docs/query-plans.md cargo test -p \
             saga-orchestrator every_list_filter_is_served_by_an_index` on 50,000 sagas (see the test for their mix). \
             The test fails if any filter's plan scans the table instead of an index.\n",
        );
        let mut failures = Vec::new();
        // And the gauges' and admission's counts of sagas in flight.
        for (name, sql) in [
            ("in flight by status (gauges)", IN_FLIGHT_BY_STATUS.to_owned()),
            ("in flight by type (admission)", crate::admission::IN_FLIGHT_BY_TYPE.to_owned()),
        ] {
            let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}")).fetch_all(&mut conn).await.unwrap();
            let plan = lines.join("\n");
            if !plan.contains("saga_instances_unfinished_created") {
                failures.push(format!("{name}:\n{plan}"));
            }
        }
        for (name, filter) in &cases {
            let plan = explain_list(&mut conn, filter, 21).await.unwrap();
            doc.push_str(&format!("\n## {name}\n\n```\n{plan}\n```\n"));
            if plan.contains("Seq Scan on saga_instances") || !plan.contains("Index") {
                failures.push(format!("{name}:\n{plan}"));
            }
        }
        // And the timer loop's claim, with 20,000 more sagas waiting for a reply (as when a
        // participant is down): through the wake-ups' index, not the sagas in flight.
        conn.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at)
             SELECT gen_random_uuid(), 'order-fulfilment', 1, 'waiting' || i, 'h', '{}'::jsonb, 'RUNNING', 2,
                 'charge_payment', 'ACTION', 1, 'REPLY', now() + i * interval '10 ms', now() - interval '1 minute'
             FROM generate_series(1, 20000) AS i;
             ANALYZE saga_instances; ANALYZE saga_wakeups",
        )
        .await
        .unwrap();
        let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {CLAIM_DUE}"))
            .bind(now)
            .bind(200i64)
            .bind(now - chrono::TimeDelta::seconds(2))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let plan = lines.join("\n");
        doc.push_str(&format!("\n## the timer loop's claim of due sagas\n\n```\n{plan}\n```\n"));
        if !plan.contains("saga_wakeups_wake_at") {
            failures.push(format!("timer claim:\n{plan}"));
        }
        if let Ok(path) = std::env::var("WRITE_QUERY_PLANS") {
            std::fs::write(path, doc).unwrap();
        }
        drop(conn);
        scratch::drop(&name).await;
        assert!(failures.is_empty(), "filters not served by an index:\n{}", failures.join("\n\n"));
    }
}

/// Against the real Postgres: every JSON value that `saga_defs::storable::check` accepts comes
/// back from `jsonb` through sqlx as the same value, and every number it refuses would not.
#[cfg(test)]
mod round_trip_tests {
    use proptest::prelude::*;

    use super::*;

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |x| serde_json::Number::from_f64(x).map(Value::Number)),
            // The top of the double range, where serde_json cannot read Postgres's digits back.
            (0u64..2_000_000, any::<bool>()).prop_map(|(below, negative)| {
                let x = f64::from_bits(f64::MAX.to_bits() - below);
                Value::from(if negative { -x } else { x })
            }),
            (1u32..1075).prop_map(|shift| Value::from(2f64.powi(-(shift as i32)))),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![8 => "[a-z0-9 ]{0,8}", 1 => "\\PC{0,4}", 1 => "[a\u{0}]{1,3}"]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf =
            prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number(), text().prop_map(Value::from)];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(text(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Equal as JSON values: numbers by value (Postgres may print 5e18 as 5000000000000000000).
    fn same(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
            (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y)),
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
            }
            _ => a == b,
        }
    }

    #[test]
    fn what_is_accepted_is_read_back_unchanged_and_what_is_refused_would_not_be() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pool = runtime
            .block_on(sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&scratch::url("postgres")))
            .expect("Postgres is running");
        let config = ProptestConfig { cases: 400, ..ProptestConfig::default() };
        proptest!(config, |(value in json())| {
            let back: Result<Value, sqlx::Error> =
                runtime.block_on(sqlx::query_scalar("SELECT $1::jsonb").bind(&value).fetch_one(&pool));
            match saga_defs::storable::check(&value) {
                Ok(()) => {
                    let back = back.map_err(|e| TestCaseError::fail(format!("accepted {value} but: {e}")))?;
                    prop_assert!(same(&value, &back), "accepted {} but read back {}", value, back);
                }
                Err(refused) if refused.reason.contains("NUL") => {
                    prop_assert!(back.is_err(), "refused {value} ({refused}) but Postgres stored it");
                }
                Err(refused) => {
                    let changed = back.as_ref().map_or(true, |b| !same(&value, b));
                    prop_assert!(changed, "refused {value} ({refused}) but it comes back unchanged");
                }
            }
        });
    }
}

/// Against the real Postgres: `saga_wakeups` follows `saga_instances.wake_at` through every kind
/// of write (migration 1006), the timer's claim goes by the saga's own `wake_at`, and the repair
/// puts back what a write that bypassed the triggers left out of step.
#[cfg(test)]
mod wakeup_tests {
    use sqlx::Executor;

    use super::*;

    async fn wakeups(conn: &mut PgConnection) -> Vec<(Uuid, DateTime<Utc>)> {
        sqlx::query_as("SELECT saga_id, wake_at FROM saga_wakeups ORDER BY saga_id").fetch_all(conn).await.unwrap()
    }

    async fn wanted(conn: &mut PgConnection) -> Vec<(Uuid, DateTime<Utc>)> {
        sqlx::query_as("SELECT id, wake_at FROM saga_instances WHERE wake_at IS NOT NULL ORDER BY id")
            .fetch_all(conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn wakeups_follow_every_write_and_the_repair_restores_them() {
        let (mut conn, name) = scratch::database("wakeups").await;
        // 30 sagas: 20 waiting (10 due), 10 ended; one statement, as a batch is.
        conn.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, wake_at, ended_at)
             SELECT md5(i::text)::uuid, 'order', 1, 'k' || i, 'h', '{}'::jsonb,
                 CASE WHEN i <= 20 THEN 'RUNNING' ELSE 'COMPLETED' END, 0, 'verify_order', 'ACTION', 1,
                 CASE WHEN i <= 20 THEN 'REPLY' ELSE 'NOTHING' END,
                 CASE WHEN i <= 10 THEN now() - interval '1 minute' WHEN i <= 20 THEN now() + interval '1 hour' END,
                 CASE WHEN i > 20 THEN now() END
             FROM generate_series(1, 30) AS i",
        )
        .await
        .unwrap();
        assert_eq!(wakeups(&mut conn).await.len(), 20);
        assert_eq!(wakeups(&mut conn).await, wanted(&mut conn).await);
        // The update trigger reads the new rows only (migration 1013): a consumed batch plans
        // with hash and merge joins off (`writes::BEGIN_BATCH`), under which a join of the old
        // rows to the new was a nested loop, quadratic in the batch's size (a batch of 1,000
        // replies took 452 ms instead of 241, `measure_batches`).
        let old_rows: Option<String> =
            sqlx::query_scalar("SELECT tgoldtable::text FROM pg_trigger WHERE tgname = 'saga_wakeups_on_update'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(old_rows, None, "the wake-ups' update trigger captures no old rows");

        // A step (a new deadline), an end, an operator's retry of an ended saga, a hand-edit of
        // one row, a delete: each keeps them in step.
        conn.execute(
            "UPDATE saga_instances SET wake_at = wake_at + interval '5 seconds', version = version + 1
             WHERE id IN (md5('11')::uuid, md5('12')::uuid)",
        )
        .await
        .unwrap();
        conn.execute(
            "UPDATE saga_instances SET status = 'COMPLETED', waiting = 'NOTHING', wake_at = NULL, ended_at = now()
             WHERE id = md5('13')::uuid",
        )
        .await
        .unwrap();
        conn.execute(
            "UPDATE saga_instances SET status = 'RUNNING', waiting = 'REPLY', wake_at = now(), ended_at = NULL
             WHERE id = md5('21')::uuid",
        )
        .await
        .unwrap();
        conn.execute("UPDATE saga_instances SET business_key = 'x' WHERE id = md5('14')::uuid").await.unwrap();
        conn.execute("DELETE FROM saga_instances WHERE id IN (md5('15')::uuid, md5('22')::uuid)").await.unwrap();
        assert_eq!(wakeups(&mut conn).await.len(), 19);
        assert_eq!(wakeups(&mut conn).await, wanted(&mut conn).await);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&scratch::url(&name)).await.unwrap();
        assert_eq!(repair_wakeups(&pool).await.unwrap(), 0, "in step: nothing to repair");

        // The claim goes by the saga's own wake_at: a wake-up row saying "due" for a saga that is
        // not (written past the triggers) does not wake it.
        conn.execute("SET session_replication_role = replica").await.unwrap();
        conn.execute("UPDATE saga_wakeups SET wake_at = now() - interval '1 hour' WHERE saga_id = md5('16')::uuid")
            .await
            .unwrap();
        let now = Utc::now();
        let mut due = claim_due(&mut conn, now, now, 100).await.unwrap();
        due.sort();
        let mut expected: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM saga_instances WHERE wake_at <= now() ORDER BY id")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        expected.sort();
        assert_eq!(due.len(), 11, "10 due and the retried one");
        assert_eq!(due, expected);

        // More writes past the triggers: a wake-up lost, one orphaned, one for an ended saga.
        conn.execute("DELETE FROM saga_wakeups WHERE saga_id IN (md5('1')::uuid, md5('17')::uuid)").await.unwrap();
        conn.execute("INSERT INTO saga_wakeups VALUES (gen_random_uuid(), now()), (md5('23')::uuid, now())")
            .await
            .unwrap();
        conn.execute("UPDATE saga_instances SET wake_at = now() + interval '2 hours' WHERE id = md5('18')::uuid")
            .await
            .unwrap();
        conn.execute("SET session_replication_role = origin").await.unwrap();
        assert_ne!(wakeups(&mut conn).await, wanted(&mut conn).await);
        // 2 added, 2 corrected (16, 18), 2 deleted.
        assert_eq!(repair_wakeups(&pool).await.unwrap(), 6);
        assert_eq!(wakeups(&mut conn).await, wanted(&mut conn).await);
        assert_eq!(repair_wakeups(&pool).await.unwrap(), 0);

        pool.close().await;
        drop(conn);
        scratch::drop(&name).await;
    }

    /// ADR 29: a reply deadline is claimed only once it is not later than the reply cutoff; a
    /// backoff is claimed at its time whatever the cutoff.
    #[tokio::test]
    async fn reply_deadlines_wait_for_the_cutoff_and_backoffs_do_not() {
        let (mut conn, name) = scratch::database("claim_cutoff").await;
        conn.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, wake_at)
             VALUES (md5('reply-10')::uuid, 'order-fulfilment', 1, 'a', 'h', '{}', 'RUNNING', 1, 's', 'ACTION', 1,
                     'REPLY', now() - interval '10 seconds'),
                    (md5('reply-60')::uuid, 'order-fulfilment', 1, 'b', 'h', '{}', 'RUNNING', 1, 's', 'ACTION', 1,
                     'REPLY', now() - interval '60 seconds'),
                    (md5('retry-10')::uuid, 'order-fulfilment', 1, 'c', 'h', '{}', 'COMPENSATING', 1, 's', 'COMPENSATION',
                     2, 'RETRY', now() - interval '10 seconds'),
                    (md5('reply-later')::uuid, 'order-fulfilment', 1, 'd', 'h', '{}', 'RUNNING', 1, 's', 'ACTION', 1,
                     'REPLY', now() + interval '60 seconds')",
        )
        .await
        .unwrap();
        // The sagas by idempotency key: a and b wait for a reply (deadlines 10 s and 60 s ago), c
        // for the end of a backoff (10 s ago), d for a reply due in a minute.
        let by_key = |keys: &'static [&'static str]| {
            sqlx::query_scalar::<_, Uuid>("SELECT id FROM saga_instances WHERE idempotency_key = ANY($1) ORDER BY id")
                .bind(keys)
        };
        let now = Utc::now();
        for (cutoff, keys) in [
            (now - chrono::TimeDelta::seconds(30), &["b", "c"][..]),
            (now - chrono::TimeDelta::hours(1), &["c"][..]),
            (now, &["a", "b", "c"][..]),
        ] {
            // Each claim is a statement of its own: its locks end with it.
            let mut due = claim_due(&mut conn, now, cutoff, 100).await.unwrap();
            due.sort();
            assert_eq!(due, by_key(keys).fetch_all(&mut conn).await.unwrap(), "cutoff {cutoff}");
        }
        drop(conn);
        scratch::drop(&name).await;
    }
}

/// Against the real Postgres: a batch's new sagas in one statement behave as one insert each.
#[cfg(test)]
mod insert_many_tests {
    use chrono::SubsecRound;
    use saga_defs::{SagaStatus, StepKind};

    use super::*;

    fn state() -> SagaState {
        SagaState {
            status: SagaStatus::Running,
            step_index: 0,
            kind: StepKind::Action,
            attempt: 1,
            first_attempt: 1,
            // Microseconds, as Postgres keeps them.
            waiting: Waiting::Reply { deadline: (Utc::now() + chrono::Duration::seconds(10)).trunc_subsecs(6) },
            failure: None,
            attention: None,
        }
    }

    #[tokio::test]
    async fn of_two_with_one_key_the_first_is_inserted_and_an_existing_key_inserts_nothing() {
        let (mut conn, name) = scratch::database("insert_many").await;
        let (state, input, now) = (state(), serde_json::json!({"n": 1}), Utc::now());
        let saga = |id: Uuid, key: &'static str, hash: &'static str| NewSaga {
            trace_parent: None,
            correlation_id: None,
            id,
            saga_type: "order-fulfilment",
            definition_version: 1,
            idempotency_key: key,
            request_hash: hash,
            business_key: Some("order:1"),
            input: &input,
            state: &state,
            step_name: "verify_order",
            now,
        };
        let (a, b, c, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert!(insert(&mut conn, saga(a, "key-a", "h1")).await.unwrap());
        let inserted =
            insert_many(&mut conn, &[saga(b, "key-b", "h2"), saga(c, "key-b", "h3"), saga(d, "key-a", "h4")])
                .await
                .unwrap();
        assert_eq!(inserted, HashSet::from([b]), "b first with key-b; key-a was taken before");
        assert_eq!(find_by_key(&mut conn, "order-fulfilment", "key-b").await.unwrap(), Some((b, "h2".to_owned())));
        let row: (String, i32, String, Option<DateTime<Utc>>) =
            sqlx::query_as("SELECT status, attempt, waiting, wake_at FROM saga_instances WHERE id = $1")
                .bind(b)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(row, ("RUNNING".to_owned(), 1, "REPLY".to_owned(), state.wake_at()));
        let wakeups: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_wakeups").fetch_one(&mut conn).await.unwrap();
        assert_eq!(wakeups, 2, "the wake-ups' trigger saw both");
        assert!(insert_many(&mut conn, &[]).await.unwrap().is_empty());
        scratch::drop(&name).await;
    }
}
