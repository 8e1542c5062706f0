//! Where the engine reads locked sagas and writes what a transition decided: straight through
//! the connection ([`Writes::direct`], for the timer loop and operators, one saga at a time), or
//! for a whole consumed batch ([`Writes::batched`]): the batch's sagas and their pending attempts
//! are locked and read in two statements (in id order, so replicas never deadlock), transitions
//! run in memory against those rows, and [`Writes::flush`] writes each table once, in two
//! statements: the saga updates with the attempts started and finished, then the history with the
//! outbox rows. A batch of N replies costs about four statements (and the commit) instead of six
//! per reply.
//!
//! The batched rows stay current as transitions apply, so several messages for one saga in one
//! batch see each other's effects, as they would one transaction at a time.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use saga_defs::machine::{FinishedAttempt, StepCommand};
use saga_defs::{SagaState, StepKind};
use saga_runtime::db::Params;
use saga_runtime::outbox::{self, OutboxMessage};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::{self, HistoryEntry, SagaRow, StoredJson, SAGA_COLUMNS};

/// How a consumed batch's transaction begins (one round trip): its statements are prepared once
/// per connection with a generic plan made for keyed access, whatever the tables' size and
/// statistics when the plan is made (a plan cached on a fresh deployment's tables of a page or
/// two would scan them whole until their first ANALYZE).
/// `a_batch_reads_and_writes_by_key_on_tables_that_grew_since_its_first_calls` fails without the
/// `enable_*` settings. Planned at each call instead (until 2026-12-05), parsing and planning were
/// about half of Postgres's CPU for a batch of one reply; the handler alone now runs a batch of
/// one reply in 3.3–3.7 ms (p50) instead of 5.1–6.8, of eight in 5.5–6.2 instead of 7.5–9.6
/// (`measure_batches`; docs/performance.md, ADR 18). The settings last until the transaction
/// ends and reach all it runs, the triggers' statements and the foreign keys' checks included:
/// every one of them goes by key, or by a transition table scanned once (migration 1013).
pub(crate) const BEGIN_BATCH: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

/// An attempt's identity: saga, step, kind, attempt.
type AttemptKey = (Uuid, String, &'static str, i32);

fn key(saga_id: Uuid, step: &str, kind: StepKind, attempt: u32) -> AttemptKey {
    (saga_id, step.to_owned(), kind.as_str(), attempt as i32)
}

pub(crate) struct Writes<'c> {
    pub(crate) conn: &'c mut PgConnection,
    batch: Option<Batch>,
    /// The batch's outbox rows are handed to the relay after commit (publish on commit).
    handoff: bool,
    /// This process's relay registration (ADR 28): with `handoff`, the batch's commands are not
    /// written to the outbox but handed off from memory, their attempts marked as held by it.
    relay: Option<i64>,
}

#[derive(Default)]
struct Batch {
    /// Sagas locked in this batch, as they are now (`None`: no such saga).
    rows: HashMap<Uuid, Option<SagaRow>>,
    /// Attempts of the locked sagas known to be pending or decided in this batch: status and start.
    attempts: HashMap<AttemptKey, (&'static str, DateTime<Utc>)>,
    /// Per saga: the version it had when locked, and the row to write.
    updates: BTreeMap<Uuid, (i64, SagaRow)>,
    new_attempts: Vec<(Uuid, StepCommand, DateTime<Utc>)>,
    finished: Vec<(Uuid, FinishedAttempt, DateTime<Utc>)>,
    history: Vec<OwnedHistory>,
    outbox: Vec<OutboxMessage>,
}

struct OwnedHistory {
    saga_id: Uuid,
    version: i64,
    from_status: Option<&'static str>,
    to_status: &'static str,
    trigger: String,
    summary: String,
    detail: Value,
    now: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct PendingAttempt {
    saga_id: Uuid,
    step_name: String,
    kind: String,
    attempt: i32,
    started_at: DateTime<Utc>,
}

impl<'c> Writes<'c> {
    /// Every read and write goes to the database at once.
    pub(crate) fn direct(conn: &'c mut PgConnection) -> Self {
        Self { conn, batch: None, handoff: false, relay: None }
    }

    /// Reads come from the rows locked for the batch; writes wait for [`Writes::flush`]. With
    /// `handoff`, the outbox rows `flush` writes are returned to hand to the relay after commit;
    /// with a `relay` registration too, the commands are returned without rows (ADR 28). The
    /// transaction `conn` is in began with [`BEGIN_BATCH`].
    pub(crate) fn batched(conn: &'c mut PgConnection, handoff: bool, relay: Option<i64>) -> Self {
        Self { conn, batch: Some(Batch::default()), handoff, relay: relay.filter(|_| handoff) }
    }

    /// Locks and reads the sagas `ids` (and their pending attempts) in two statements, in id
    /// order. Only for a batched writer; a direct one locks each saga as it comes.
    pub(crate) async fn prefetch(&mut self, ids: &[Uuid]) -> sqlx::Result<()> {
        let Some(batch) = self.batch.as_mut() else { return Ok(()) };
        let mut wanted: Vec<Uuid> = ids.iter().filter(|id| !batch.rows.contains_key(id)).copied().collect();
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(());
        }
        // Prepared, with the generic plan for keyed access that `BEGIN_BATCH` asks for, as are
        // the batch's writes below.
        let rows: Vec<SagaRow> = sqlx::query_as(&format!(
            "SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = ANY($1) ORDER BY id FOR UPDATE"
        ))
        .bind(&wanted)
        .fetch_all(&mut *self.conn)
        .await?;
        let pending: Vec<PendingAttempt> = sqlx::query_as(
            "SELECT saga_id, step_name, kind, attempt, started_at FROM saga_step_attempts
             WHERE saga_id = ANY($1) AND status = 'PENDING'",
        )
        .bind(&wanted)
        .fetch_all(&mut *self.conn)
        .await?;
        for id in wanted {
            batch.rows.insert(id, None);
        }
        for row in rows {
            batch.rows.insert(row.id, Some(row));
        }
        for a in pending {
            let kind = if a.kind == StepKind::Compensation.as_str() { "COMPENSATION" } else { "ACTION" };
            batch.attempts.insert((a.saga_id, a.step_name, kind, a.attempt), ("PENDING", a.started_at));
        }
        Ok(())
    }

    /// The saga `id`, locked for this transaction; `None` if there is no such saga.
    pub(crate) async fn lock(&mut self, id: Uuid) -> sqlx::Result<Option<SagaRow>> {
        if self.batch.as_ref().is_some_and(|b| !b.rows.contains_key(&id)) {
            self.prefetch(&[id]).await?;
        }
        match &self.batch {
            Some(batch) => Ok(batch.rows.get(&id).cloned().flatten()),
            None => store::lock(self.conn, id).await,
        }
    }

    /// Writes the state after a transition, guarded by the version `row` was read at. False if
    /// the version moved (a direct writer; a batched one holds the lock it read under).
    pub(crate) async fn update(
        &mut self,
        row: &SagaRow,
        next: &SagaState,
        step_name: &str,
        new_output: Option<(&str, &Value)>,
        now: DateTime<Utc>,
    ) -> sqlx::Result<bool> {
        let Some(batch) = self.batch.as_mut() else {
            return store::update(self.conn, row, next, step_name, new_output, now).await;
        };
        let mut outputs = row.outputs.clone();
        if let (Some((step, output)), Ok(Value::Object(map))) = (new_output, outputs.0.as_mut()) {
            map.insert(step.to_owned(), output.clone());
        }
        let f = next.failure.as_ref();
        let a = next.attention.as_ref();
        let advanced = SagaRow {
            status: next.status.as_str().to_owned(),
            step_index: next.step_index as i32,
            step_name: step_name.to_owned(),
            step_kind: next.kind.as_str().to_owned(),
            attempt: next.attempt as i32,
            first_attempt: next.first_attempt as i32,
            waiting: store::waiting_label(&next.waiting).to_owned(),
            wake_at: next.wake_at(),
            failure_step: f.map(|f| f.step.to_string()),
            failure_code: f.map(|f| f.code.clone()),
            failure_reason: f.map(|f| f.message.clone()),
            attention_step: a.map(|a| a.step.to_string()),
            attention_code: a.map(|a| a.code.clone()),
            attention_reason: a.map(|a| a.message.clone()),
            outputs: StoredJson(outputs.0),
            version: row.version + 1,
            updated_at: now,
            ended_at: next.status.is_terminal().then_some(now),
            ..row.clone()
        };
        let expected = batch.updates.get(&row.id).map_or(row.version, |(expected, _)| *expected);
        batch.rows.insert(row.id, Some(advanced.clone()));
        batch.updates.insert(row.id, (expected, advanced));
        Ok(true)
    }

    /// Records that a command was sent (a pending attempt).
    pub(crate) async fn insert_attempt(
        &mut self,
        saga_id: Uuid,
        command: &StepCommand,
        now: DateTime<Utc>,
    ) -> sqlx::Result<()> {
        let Some(batch) = self.batch.as_mut() else {
            return store::insert_attempt(self.conn, saga_id, command, now).await;
        };
        batch
            .attempts
            .entry(key(saga_id, command.step.as_str(), command.kind, command.attempt))
            .or_insert(("PENDING", now));
        batch.new_attempts.push((saga_id, command.clone(), now));
        Ok(())
    }

    /// Records how a pending attempt ended; when it started, or `None` if it was not pending.
    pub(crate) async fn finish_attempt(
        &mut self,
        saga_id: Uuid,
        finished: &FinishedAttempt,
        now: DateTime<Utc>,
    ) -> sqlx::Result<Option<DateTime<Utc>>> {
        let Some(batch) = self.batch.as_mut() else {
            return store::finish_attempt(self.conn, saga_id, finished, now).await;
        };
        let key = key(saga_id, finished.step.as_str(), finished.kind, finished.attempt);
        match batch.attempts.get_mut(&key) {
            Some(known) if known.0 == "PENDING" => {
                known.0 = store::outcome_columns(&finished.outcome).0;
                let started = known.1;
                batch.finished.push((saga_id, finished.clone(), now));
                Ok(Some(started))
            }
            _ => Ok(None),
        }
    }

    /// The status of a command the saga sent, or `None` if it never sent it.
    pub(crate) async fn attempt_status(
        &mut self,
        saga_id: Uuid,
        step: &str,
        kind: StepKind,
        attempt: u32,
    ) -> sqlx::Result<Option<String>> {
        if let Some((status, _)) = self.batch.as_ref().and_then(|b| b.attempts.get(&key(saga_id, step, kind, attempt)))
        {
            return Ok(Some((*status).to_owned()));
        }
        // Not pending when locked and not decided in this batch: as the database has it.
        store::attempt_status(self.conn, saga_id, step, kind, attempt).await
    }

    pub(crate) async fn append_history(&mut self, entry: HistoryEntry<'_>) -> sqlx::Result<()> {
        let Some(batch) = self.batch.as_mut() else {
            return store::append_history(self.conn, entry).await;
        };
        batch.history.push(OwnedHistory {
            saga_id: entry.saga_id,
            version: entry.version,
            from_status: entry.from_status.map(|s| s.as_str()),
            to_status: entry.to_status.as_str(),
            trigger: entry.trigger.to_owned(),
            summary: entry.summary.to_owned(),
            detail: entry.detail,
            now: entry.now,
        });
        Ok(())
    }

    pub(crate) async fn outbox(&mut self, messages: Vec<OutboxMessage>) -> sqlx::Result<()> {
        match self.batch.as_mut() {
            Some(batch) => {
                batch.outbox.extend(messages);
                Ok(())
            }
            None => outbox::insert(self.conn, &messages).await,
        }
    }

    /// Parks a saga (see `store::park`), after writing what is buffered; the saga is read again
    /// from the database if the batch meets it again.
    pub(crate) async fn park(
        &mut self,
        id: Uuid,
        code: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> sqlx::Result<Option<store::Parked>> {
        self.flush_unhanded().await?;
        if let Some(batch) = self.batch.as_mut() {
            batch.rows.remove(&id);
            batch.attempts.retain(|(saga, ..), _| *saga != id);
        }
        store::park(self.conn, id, code, reason, now).await
    }

    /// Writes what is buffered in the middle of a batch: its outbox rows are left to the relay
    /// (not handed off), since the batch goes on.
    async fn flush_unhanded(&mut self) -> sqlx::Result<()> {
        let handoff = std::mem::replace(&mut self.handoff, false);
        let flushed = self.flush().await.map(|_| ());
        self.handoff = handoff;
        flushed
    }

    /// Writes everything buffered in two statements: the saga updates with the attempts started
    /// and finished, then the history with the outbox rows (data-modifying CTEs, each table
    /// written once). Nothing to do for a direct writer. The caller commits, then hands what is
    /// returned to the relay.
    pub(crate) async fn flush(&mut self) -> sqlx::Result<Option<outbox::HandedOff>> {
        let Some(batch) = self.batch.as_mut() else { return Ok(None) };
        let conn = &mut *self.conn;
        let updates: Vec<(i64, SagaRow)> = std::mem::take(&mut batch.updates).into_values().collect();
        let new_attempts = std::mem::take(&mut batch.new_attempts);
        // The CTEs of one statement share its snapshot: an attempt started in this batch is not
        // there for a sibling UPDATE to finish, so such finishes (rare) follow in one more.
        let started: std::collections::HashSet<AttemptKey> =
            new_attempts.iter().map(|(id, c, _)| key(*id, c.step.as_str(), c.kind, c.attempt)).collect();
        let (finished_after, finished): (Vec<_>, Vec<_>) = std::mem::take(&mut batch.finished)
            .into_iter()
            .partition(|(id, f, _)| started.contains(&key(*id, f.step.as_str(), f.kind, f.attempt)));

        let mut first = outbox::Also::default();
        // The commands go from memory only if the registration is there, locked against an
        // adoption until this transaction ends (ADR 28); else into the outbox, as they used to.
        let relay = match self.relay.filter(|_| self.handoff && !new_attempts.is_empty()) {
            Some(relay) => {
                let id = first.params().add(relay)?;
                first.cte("relay", &format!("SELECT id FROM orchestrator_relays WHERE id = {id} FOR KEY SHARE"));
                Some("(SELECT id FROM relay)")
            }
            None => None,
        };
        if !new_attempts.is_empty() {
            let sql = insert_attempts(first.params(), &new_attempts, relay)?;
            first.cte("new_attempts", &sql);
        }
        if !finished.is_empty() {
            let sql = finish_attempts(first.params(), &finished)?;
            first.cte("finished_attempts", &sql);
        }
        let mut held = false;
        if !updates.is_empty() || !first.is_empty() {
            if !updates.is_empty() {
                let sql = update_sagas(first.params(), &updates)?;
                first.cte("updated", &format!("{sql} RETURNING 1"));
            }
            let main = format!(
                "SELECT {}::int8, {}",
                if updates.is_empty() { "0" } else { "(SELECT count(*) FROM updated)" },
                if relay.is_some() { "EXISTS (SELECT FROM relay)" } else { "false" }
            );
            let (sql, params) = first.statement(&main);
            let (updated, relay_held): (i64, bool) = params.query_as(&sql).fetch_one(&mut *conn).await?;
            if updated != updates.len() as i64 {
                // Rows locked by this transaction cannot have moved: something else wrote them.
                return Err(sqlx::Error::Protocol(format!(
                    "{} of {} saga updates found their version moved under a held lock",
                    updates.len() as i64 - updated,
                    updates.len()
                )));
            }
            held = relay_held;
        }
        if !finished_after.is_empty() {
            let mut params = Params::default();
            let sql = finish_attempts(&mut params, &finished_after)?;
            params.query(&sql).execute(&mut *conn).await?;
        }

        let history = std::mem::take(&mut batch.history);
        let also = if history.is_empty() {
            None
        } else {
            let mut also = outbox::Also::default();
            let sql = insert_history(also.params(), &history)?;
            also.cte("history", &sql);
            Some(also)
        };
        let messages = std::mem::take(&mut batch.outbox);
        if !self.handoff {
            return outbox::insert_with(conn, &messages, also).await.map(|_| None);
        }
        if !held {
            return outbox::insert_for_handoff_with(conn, messages, also).await.map(Some);
        }
        let (commands, rest): (Vec<_>, Vec<_>) =
            messages.into_iter().partition(|m| m.message_type == Some(saga_defs::contract::MESSAGE_TYPE_COMMAND));
        let handed = outbox::insert_for_handoff_with(conn, rest, also).await?;
        Ok(Some(handed.with_unlogged(commands)))
    }
}

/// The batch's saga updates, each guarded by the version its saga was locked at.
fn update_sagas(params: &mut Params, updates: &[(i64, SagaRow)]) -> sqlx::Result<String> {
    let rows: Vec<&SagaRow> = updates.iter().map(|(_, row)| row).collect();
    let expected: Vec<i64> = updates.iter().map(|(v, _)| *v).collect();
    let outputs: Vec<Value> = rows.iter().map(|r| r.outputs.or_placeholder()).collect();
    Ok(format!(
        "UPDATE saga_instances s SET
             status = u.status, step_index = u.step_index, step_name = u.step_name, step_kind = u.step_kind,
             attempt = u.attempt, first_attempt = u.first_attempt, waiting = u.waiting, wake_at = u.wake_at,
             failure_step = u.failure_step, failure_code = u.failure_code, failure_reason = u.failure_reason,
             attention_step = u.attention_step, attention_code = u.attention_code,
             attention_reason = u.attention_reason, outputs = u.outputs, version = u.version,
             updated_at = u.updated_at, ended_at = u.ended_at
         FROM UNNEST({}::uuid[], {}::bigint[], {}::text[], {}::int[], {}::text[], {}::text[], {}::int[],
                     {}::int[], {}::text[], {}::timestamptz[], {}::text[], {}::text[], {}::text[],
                     {}::text[], {}::text[], {}::text[], {}::jsonb[], {}::bigint[],
                     {}::timestamptz[], {}::timestamptz[])
             AS u(id, expected, status, step_index, step_name, step_kind, attempt, first_attempt, waiting,
                  wake_at, failure_step, failure_code, failure_reason, attention_step, attention_code,
                  attention_reason, outputs, version, updated_at, ended_at)
         WHERE s.id = u.id AND s.version = u.expected",
        params.add(rows.iter().map(|r| r.id).collect::<Vec<_>>())?,
        params.add(expected)?,
        params.add(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.step_index).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.step_name.as_str()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.step_kind.as_str()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.attempt).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.first_attempt).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.waiting.as_str()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.wake_at).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.failure_step.as_deref()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.failure_code.as_deref()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.failure_reason.as_deref()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.attention_step.as_deref()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.attention_code.as_deref()).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.attention_reason.as_deref()).collect::<Vec<_>>())?,
        params.add(outputs)?,
        params.add(rows.iter().map(|r| r.version).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())?,
        params.add(rows.iter().map(|r| r.ended_at).collect::<Vec<_>>())?,
    ))
}

/// The batch's new pending attempts; `handed_by`, an SQL expression for the registration that
/// holds their commands (none: they are in the outbox).
fn insert_attempts(
    params: &mut Params,
    new: &[(Uuid, StepCommand, DateTime<Utc>)],
    handed_by: Option<&str>,
) -> sqlx::Result<String> {
    Ok(format!(
        "INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at,
                                         handed_by)
         SELECT u.saga_id, u.step_index, u.step_name, u.kind, u.attempt, 'PENDING', u.started_at, u.deadline_at, {}
         FROM UNNEST({}::uuid[], {}::int[], {}::text[], {}::text[], {}::int[], {}::timestamptz[], {}::timestamptz[])
             AS u(saga_id, step_index, step_name, kind, attempt, started_at, deadline_at)
         ON CONFLICT DO NOTHING",
        handed_by.unwrap_or("NULL::int8"),
        params.add(new.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, c, _)| c.step_index as i32).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, c, _)| c.step.as_str()).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, c, _)| c.kind.as_str()).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, c, _)| c.attempt as i32).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, _, now)| *now).collect::<Vec<_>>())?,
        params.add(new.iter().map(|(_, c, _)| c.deadline).collect::<Vec<_>>())?,
    ))
}

/// How the batch's finished attempts ended (those still pending).
fn finish_attempts(params: &mut Params, finished: &[(Uuid, FinishedAttempt, DateTime<Utc>)]) -> sqlx::Result<String> {
    let columns: Vec<_> = finished.iter().map(|(_, f, _)| store::outcome_columns(&f.outcome)).collect();
    Ok(format!(
        "UPDATE saga_step_attempts a SET status = u.status, error_code = u.error_code,
             error_message = u.error_message, output = u.output, finished_at = u.finished_at
         FROM UNNEST({}::uuid[], {}::text[], {}::text[], {}::int[], {}::text[], {}::text[], {}::text[],
                     {}::jsonb[], {}::timestamptz[])
             AS u(saga_id, step_name, kind, attempt, status, error_code, error_message, output, finished_at)
         WHERE a.saga_id = u.saga_id AND a.step_name = u.step_name AND a.kind = u.kind
             AND a.attempt = u.attempt AND a.status = 'PENDING'",
        params.add(finished.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())?,
        params.add(finished.iter().map(|(_, f, _)| f.step.as_str()).collect::<Vec<_>>())?,
        params.add(finished.iter().map(|(_, f, _)| f.kind.as_str()).collect::<Vec<_>>())?,
        params.add(finished.iter().map(|(_, f, _)| f.attempt as i32).collect::<Vec<_>>())?,
        params.add(columns.iter().map(|c| c.0).collect::<Vec<_>>())?,
        params.add(columns.iter().map(|c| c.1).collect::<Vec<_>>())?,
        params.add(columns.iter().map(|c| c.2).collect::<Vec<_>>())?,
        params.add(columns.iter().map(|c| c.3).collect::<Vec<_>>())?,
        params.add(finished.iter().map(|(_, _, now)| *now).collect::<Vec<_>>())?,
    ))
}

/// The batch's history entries.
fn insert_history(params: &mut Params, history: &[OwnedHistory]) -> sqlx::Result<String> {
    Ok(format!(
        "INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
         SELECT * FROM UNNEST({}::uuid[], {}::bigint[], {}::text[], {}::text[], {}::text[], {}::text[],
                              {}::jsonb[], {}::timestamptz[])",
        params.add(history.iter().map(|h| h.saga_id).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.version).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.from_status).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.to_status).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.trigger.as_str()).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.summary.as_str()).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| &h.detail).collect::<Vec<_>>())?,
        params.add(history.iter().map(|h| h.now).collect::<Vec<_>>())?,
    ))
}

/// Against the real Postgres (`TEST_POSTGRES_URL`, default the local server).
#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor};

    use super::*;
    use crate::store::scratch;

    /// Sagas waiting at their second step, with its attempt PENDING and the first SUCCEEDED.
    async fn insert(conn: &mut PgConnection, ids: &[Uuid]) {
        sqlx::query(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, wake_at)
             SELECT id, 'order', 1, id::text, 'h', '{\"order_id\": \"o-1\"}'::jsonb, 'RUNNING', 1,
                 'reserve_inventory', 'ACTION', 1, 'REPLY', now() + interval '30 seconds'
             FROM unnest($1::uuid[]) AS id",
        )
        .bind(ids)
        .execute(&mut *conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
             SELECT id, s.n, s.name, 'ACTION', 1, CASE WHEN s.n = 1 THEN 'PENDING' ELSE 'SUCCEEDED' END,
                 now(), now() + interval '30 seconds'
             FROM unnest($1::uuid[]) AS id, (VALUES (0, 'verify_order'), (1, 'reserve_inventory')) AS s(n, name)",
        )
        .bind(ids)
        .execute(&mut *conn)
        .await
        .unwrap();
    }

    /// A batch as the consumer runs one: the sagas `ids` (waiting at their second step, as
    /// `insert` leaves them) answered and sent on to their third, the first also answered there.
    /// Returns what the batch read: its sagas, their pending attempts, and the rows of
    /// `saga_instances` it read to do it.
    async fn second_step(conn: &mut PgConnection, ids: &[Uuid]) -> Read {
        let now = Utc::now();
        let step = |name: &str| saga_defs::StepName::parse(name).unwrap();
        let succeeded = |step_index: usize, name: &str| FinishedAttempt {
            step_index,
            step: step(name),
            kind: StepKind::Action,
            attempt: 1,
            outcome: saga_defs::machine::AttemptOutcome::Succeeded { output: serde_json::json!({"ok": true}) },
        };
        let command = StepCommand {
            step_index: 2,
            step: step("charge_payment"),
            participant: "payment".into(),
            kind: StepKind::Action,
            action: "charge".into(),
            attempt: 1,
            deadline: now + chrono::Duration::seconds(30),
        };
        let next = SagaState {
            status: saga_defs::SagaStatus::Running,
            step_index: 2,
            kind: StepKind::Action,
            attempt: 1,
            first_attempt: 1,
            waiting: saga_defs::machine::Waiting::Reply { deadline: command.deadline },
            failure: None,
            attention: None,
        };
        let mut tx = conn.begin_with(BEGIN_BATCH).await.unwrap();
        let before = rows_read(&mut tx, "saga_instances").await;
        let mut writer = Writes::batched(&mut tx, false, None);
        writer.prefetch(ids).await.unwrap();
        let batch = writer.batch.as_ref().unwrap();
        let (sagas, pending) = (batch.rows.values().flatten().count(), batch.attempts.len());
        for (i, id) in ids.iter().enumerate() {
            let row = writer.lock(*id).await.unwrap().unwrap();
            let started = writer.finish_attempt(*id, &succeeded(1, "reserve_inventory"), now).await.unwrap();
            assert!(started.is_some(), "the pending attempt was known to the batch");
            assert!(writer.update(&row, &next, "charge_payment", None, now).await.unwrap());
            writer.insert_attempt(*id, &command, now).await.unwrap();
            if i == 0 {
                let started = writer.finish_attempt(*id, &succeeded(2, "charge_payment"), now).await.unwrap();
                assert!(started.is_some(), "the attempt started in this batch was known to it");
            }
            let entry = HistoryEntry {
                saga_id: *id,
                version: row.version + 1,
                from_status: Some(saga_defs::SagaStatus::Running),
                to_status: saga_defs::SagaStatus::Running,
                trigger: "reply",
                summary: "reserve_inventory succeeded",
                detail: serde_json::json!({}),
                now,
            };
            writer.append_history(entry).await.unwrap();
            let message = OutboxMessage::new("commands".into(), id, "command", &serde_json::json!({"n": i}));
            writer.outbox(vec![message]).await.unwrap();
        }
        assert!(writer.flush().await.unwrap().is_none());
        let rows = rows_read(&mut tx, "saga_instances").await - before;
        tx.commit().await.unwrap();
        Read { sagas, pending, rows }
    }

    /// What [`second_step`]'s batch read.
    struct Read {
        sagas: usize,
        pending: usize,
        rows: i64,
    }

    /// Rows of `table` this backend read since its statistics were last reported (at most once
    /// a second; `pg_stat_xact_user_tables`), by sequential scans and through indexes: a batch
    /// reading by key reads about the rows it touches; a plan that walks the whole table, or a
    /// whole index, reads all of them.
    async fn rows_read(conn: &mut PgConnection, table: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)), 0)::bigint FROM pg_stat_xact_user_tables
             WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(conn)
        .await
        .unwrap()
    }

    /// A fresh deployment's first batches meet nearly empty tables. A plan Postgres caches for a
    /// prepared statement then (a scan of the whole table, or of a whole index, the cheapest on a
    /// page or two) would stay until the tables' first ANALYZE, about a minute of full load later,
    /// while every batch scans tables growing by thousands of rows a second (the first minute of
    /// `scripts/bench`: the batch's statements took 4–10 ms a call instead of 0.5–1.5). The
    /// batch's statements, prepared under [`BEGIN_BATCH`], are planned once for keyed access and
    /// read the sagas they touch. (Prepared under the plan cache's default mode, the last batch
    /// reads 60,000 rows of `saga_instances` to touch 25: checked on 2026-12-04; without the
    /// `enable_*` settings of `BEGIN_BATCH`, 60,091: checked on 2026-12-05.)
    #[tokio::test]
    async fn a_batch_reads_and_writes_by_key_on_tables_that_grew_since_its_first_calls() {
        let (mut conn, name) = scratch::database_with_outbox("replan").await;
        // No ANALYZE behind the test's back.
        conn.execute(
            "ALTER TABLE saga_instances SET (autovacuum_enabled = false);
             ALTER TABLE saga_step_attempts SET (autovacuum_enabled = false)",
        )
        .await
        .unwrap();
        // The first batches of a fresh system: a few sagas in the tables.
        for _ in 0..10 {
            let ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
            insert(&mut conn, &ids).await;
            second_step(&mut conn, &ids).await;
        }
        // A minute later.
        let later: Vec<Uuid> = (0..30_000).map(|_| Uuid::new_v4()).collect();
        insert(&mut conn, &later).await;
        let ids = &later[29_000..29_025];
        let Read { sagas, pending, rows } = second_step(&mut conn, ids).await;
        assert_eq!(sagas, 25, "the batch's sagas were read");
        assert_eq!(pending, 25, "their pending attempts were read");
        // 25 sagas locked and updated, and the attempts' and history's foreign keys checked. (The
        // attempts are read by `saga_id`, the first of four key columns: with no statistics yet,
        // the planner's choice between that index and a scan is a coin toss, costs within 0.3 %
        // of each other, which only the first ANALYZE settles.)
        assert!(rows <= 200, "{rows} rows of saga_instances read for a batch of 25 sagas among 30,020");
        let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE step_name = 'charge_payment'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(moved, 45, "the first batches' 20 sagas and the last batch's 25 moved on");
        drop(conn);
        scratch::drop(&name).await;
    }

    /// A batch that waited for a saga's lock (a replica's batch or the timer loop held it) reads
    /// the saga and its pending attempts as the holder committed them: the attempts are read in
    /// a statement after the lock's. One statement that locked and read the attempts (checked
    /// on 2026-12-04, in a function: `FOR UPDATE OF s` with the attempts joined) returns the
    /// saga's new version with the attempts of its own, older snapshot: here the answered
    /// `reserve_inventory` still pending and `charge_payment` missing, and the batch would apply
    /// a reply against an attempt that is no longer pending.
    #[tokio::test]
    async fn a_batch_that_waited_for_a_lock_reads_the_attempts_its_holder_committed() {
        let (mut conn, name) = scratch::database("lockwait").await;
        let id = Uuid::new_v4();
        insert(&mut conn, &[id]).await;
        let before: i64 = sqlx::query_scalar("SELECT version FROM saga_instances WHERE id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        // The holder answers reserve_inventory and starts charge_payment.
        let mut holder = PgConnection::connect(&scratch::url(&name)).await.unwrap();
        let mut held = holder.begin().await.unwrap();
        for statement in [
            "SELECT 1 FROM saga_instances WHERE id = $1 FOR UPDATE",
            "UPDATE saga_step_attempts SET status = 'SUCCEEDED', finished_at = now()
             WHERE saga_id = $1 AND step_name = 'reserve_inventory'",
            "INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
             VALUES ($1, 2, 'charge_payment', 'ACTION', 1, 'PENDING', now(), now() + interval '30 seconds')",
            "UPDATE saga_instances SET step_index = 2, step_name = 'charge_payment', version = version + 1 WHERE id = $1",
        ] {
            sqlx::query(statement).bind(id).execute(&mut *held).await.unwrap();
        }
        let url = scratch::url(&name);
        let batch = tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let mut tx = conn.begin_with(BEGIN_BATCH).await.unwrap();
            let mut writer = Writes::batched(&mut tx, false, None);
            writer.prefetch(&[id]).await.unwrap();
            let read = writer.batch.take().unwrap();
            drop(writer);
            tx.rollback().await.unwrap();
            let row = read.rows[&id].clone().unwrap();
            let mut pending: Vec<(String, &str, i32)> =
                read.attempts.keys().map(|(_, step, kind, attempt)| (step.clone(), *kind, *attempt)).collect();
            pending.sort();
            (row.version, row.step_name, pending)
        });
        // The batch waits for the lock, then the holder commits.
        let mut waited = 0;
        while sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
            == 0
        {
            waited += 1;
            assert!(waited < 500, "the batch never waited for the lock");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        held.commit().await.unwrap();
        let (version, step, pending) = batch.await.unwrap();
        assert_eq!((version, step.as_str()), (before + 1, "charge_payment"), "the saga as the holder committed it");
        assert_eq!(
            pending,
            [("charge_payment".to_owned(), "ACTION", 1)],
            "its pending attempts as the holder committed them"
        );
        drop(holder);
        drop(conn);
        scratch::drop(&name).await;
    }

    /// A batch writes every table in its two statements, and an attempt started and finished in
    /// the same batch ends finished (the finish cannot ride with the insert: CTEs share a
    /// snapshot, so a sibling UPDATE does not see the row being inserted).
    #[tokio::test]
    async fn a_batch_flushes_every_table_and_finishes_an_attempt_it_started() {
        let (mut conn, name) = scratch::database_with_outbox("flush").await;
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        insert(&mut conn, &ids).await;
        second_step(&mut conn, &ids).await;

        let attempts: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT saga_id, step_name, status FROM saga_step_attempts WHERE step_index > 0")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let mut expected = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            expected.push((*id, "reserve_inventory".to_owned(), "SUCCEEDED".to_owned()));
            let payment = if i == 0 { "SUCCEEDED" } else { "PENDING" };
            expected.push((*id, "charge_payment".to_owned(), payment.to_owned()));
        }
        let mut attempts = attempts;
        attempts.sort();
        expected.sort();
        assert_eq!(attempts, expected);
        let sagas: Vec<(String, i64)> = sqlx::query_as("SELECT DISTINCT step_name, version FROM saga_instances")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(sagas, vec![("charge_payment".to_owned(), 2)]);
        let history: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_history").fetch_one(&mut conn).await.unwrap();
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&mut conn).await.unwrap();
        assert_eq!((history, outbox), (3, 3));
        drop(conn);
        scratch::drop(&name).await;
    }
}
