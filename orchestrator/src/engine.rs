//! Applies events to sagas durably: loads and locks the saga, runs the pure state machine, and
//! writes the new state, the attempt records, the history entry and the outbox commands on the
//! caller's transaction. Metrics are collected in [`Effects`] and recorded only after commit.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use metrics::{counter, histogram};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use saga_defs::contract::{
    commands_topic, EVENTS_TOPIC, MESSAGE_TYPE_COMMAND, MESSAGE_TYPE_EVENT, REPLIES_TOPIC, SCHEMA_VERSION,
};
use saga_defs::machine::{AttemptOutcome, StepReply, Transition, TransitionError};
use saga_defs::{
    Clock, CommandEnvelope, LifecycleEventType, Registry, ReplyEnvelope, SagaDefinition, SagaEvent, SagaId,
    SagaLifecycleEvent, SagaState, SagaStatus, StartSagaRequest,
};
use saga_runtime::dead_letter::Reason;
use saga_runtime::outbox::OutboxMessage;
use saga_runtime::trace::Context;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::SystemTime;
use uuid::Uuid;

use crate::metrics as m;
use crate::store::{self, HistoryEntry, NewSaga, SagaRow};
use crate::writes::Writes;

/// Metric updates to record once the transaction that caused them has committed.
#[derive(Debug, Default)]
pub(crate) struct Effects(Vec<Effect>);

#[derive(Debug)]
enum Effect {
    Created {
        saga_type: String,
        saga_id: Uuid,
    },
    Ended {
        saga_type: String,
        status: SagaStatus,
        seconds: f64,
    },
    StepFinished {
        saga_type: String,
        step: String,
        kind: &'static str,
        outcome: &'static str,
        code: Option<String>,
        seconds: Option<f64>,
    },
    Ignored {
        reason: &'static str,
    },
    StartRefused {
        reason: &'static str,
    },
    Parked {
        saga_type: String,
        trigger: String,
    },
}

impl Effects {
    pub(crate) fn ignored(&mut self, reason: &'static str) {
        self.0.push(Effect::Ignored { reason });
    }

    pub(crate) fn start_refused(&mut self, reason: &'static str) {
        self.0.push(Effect::StartRefused { reason });
    }

    /// The sagas this transaction created: their types and ids.
    pub(crate) fn created(&self) -> impl Iterator<Item = (&str, Uuid)> {
        self.0.iter().filter_map(|e| match e {
            Effect::Created { saga_type, saga_id } => Some((saga_type.as_str(), *saga_id)),
            _ => None,
        })
    }

    pub(crate) fn extend(&mut self, other: Effects) {
        self.0.extend(other.0);
    }

    pub(crate) fn record(self) {
        for effect in self.0 {
            match effect {
                Effect::Created { saga_type, .. } => counter!(m::SAGA_CREATED, "saga_type" => saga_type).increment(1),
                Effect::Ended { saga_type, status, seconds } => {
                    let name = match status {
                        SagaStatus::Completed => m::SAGA_COMPLETED,
                        SagaStatus::Failed => m::SAGA_FAILED,
                        _ => m::SAGA_NEEDS_ATTENTION,
                    };
                    counter!(name, "saga_type" => saga_type.clone()).increment(1);
                    histogram!(m::SAGA_DURATION, "saga_type" => saga_type, "outcome" => status.as_str())
                        .record(seconds);
                }
                Effect::StepFinished { saga_type, step, kind, outcome, code, seconds } => {
                    if let Some(code) = code {
                        counter!(m::STEP_FAILURES, "saga_type" => saga_type.clone(), "step" => step.clone(), "kind" => kind, "code" => code)
                            .increment(1);
                    }
                    if let Some(seconds) = seconds {
                        histogram!(m::STEP_DURATION, "saga_type" => saga_type, "step" => step, "kind" => kind, "outcome" => outcome)
                            .record(seconds);
                    }
                }
                Effect::Ignored { reason } => counter!(m::REPLIES_IGNORED, "reason" => reason).increment(1),
                Effect::StartRefused { reason } => counter!(m::START_REQUESTS_REFUSED, "reason" => reason).increment(1),
                Effect::Parked { saga_type, trigger } => {
                    counter!(m::SAGA_UNPROCESSABLE, "saga_type" => saga_type, "trigger" => trigger).increment(1)
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("unknown saga type {given:?}; defined types: {known}")]
    UnknownType { given: String, known: String },
    #[error("the saga input must be a JSON object")]
    InputNotObject,
    #[error("{0}")]
    Unstorable(String),
    #[error("idempotency key {key:?} was already used for a different request (saga {existing})")]
    KeyReused { key: String, existing: Uuid },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Whether `start` created a saga or found the one started earlier with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Started {
    Created(Uuid),
    Existing(Uuid),
}

/// A start request checked, with its first transition, ready for its row to be inserted (alone
/// with [`store::insert`], or with the rest of a consumed batch with [`store::insert_many`]).
pub(crate) struct PreparedStart<'r, 'e> {
    request: &'r StartSagaRequest,
    /// The trace and correlation id it came with (headers of the message or the request).
    trace: Context,
    traceparent: String,
    definition: &'e saga_defs::SagaDefinition,
    hash: String,
    clock: Clock,
    transition: Transition,
}

impl PreparedStart<'_, '_> {
    pub(crate) fn new_saga(&self) -> NewSaga<'_> {
        NewSaga {
            id: self.request.saga_id.as_uuid(),
            saga_type: self.definition.name.as_str(),
            definition_version: self.definition.version as i32,
            idempotency_key: &self.request.idempotency_key,
            request_hash: &self.hash,
            business_key: self.request.business_key.as_deref(),
            input: &self.request.input,
            state: &self.transition.next,
            step_name: self.definition.steps[0].name.as_str(),
            now: self.clock.now,
            trace_parent: Some(self.traceparent.as_str()),
            correlation_id: self.trace.correlation_id.as_deref(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Corrupt(#[from] store::CorruptRow),
    #[error("saga {0} changed under a held lock (version guard failed)")]
    VersionConflict(Uuid),
}

impl ApplyError {
    /// Whether the error belongs to the saga (it would fail the same way on every try: its
    /// stored state cannot be read, or Postgres refuses a value written for it), rather than to
    /// the database (unreachable, overloaded), which trying again later fixes.
    pub(crate) fn is_the_sagas(&self) -> bool {
        match self {
            ApplyError::Corrupt(_) => true,
            ApplyError::VersionConflict(_) => false,
            ApplyError::Database(error) => match error {
                sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::Encode(_) => true,
                // Data exceptions (22), integrity violations (23), program limits (54).
                sqlx::Error::Database(e) => {
                    e.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54"))
                }
                _ => false,
            },
        }
    }
}

/// What an operator asks of a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Operation {
    Retry,
    Abort,
}

impl Operation {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Operation::Retry => "RETRY",
            Operation::Abort => "ABORT",
        }
    }
}

/// Who asked, why, and under which request.
#[derive(Debug, Clone)]
pub(crate) struct Operator<'a> {
    pub(crate) actor: &'a str,
    pub(crate) reason: &'a str,
    pub(crate) idempotency_key: Option<&'a str>,
    pub(crate) bulk_id: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum OperateError {
    #[error("no saga {0}")]
    NotFound(Uuid),
    #[error(transparent)]
    Refused(TransitionError),
    #[error("saga definition {0} v{1} is not loaded")]
    UnknownDefinition(String, i32),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl From<sqlx::Error> for OperateError {
    fn from(error: sqlx::Error) -> Self {
        OperateError::Apply(error.into())
    }
}

/// The result of an operator's action: the state before and after, and the audit entry.
#[derive(Debug, Clone)]
pub(crate) struct Operated {
    pub(crate) saga_id: Uuid,
    pub(crate) status_before: SagaStatus,
    pub(crate) status_after: SagaStatus,
    pub(crate) version_after: i64,
    pub(crate) audit_id: i64,
    pub(crate) summary: String,
}

/// What a lifecycle event announces.
struct Lifecycle<'a> {
    trace: &'a Context,
    event_type: LifecycleEventType,
    saga_id: Uuid,
    definition: &'a SagaDefinition,
    business_key: Option<&'a str>,
    state: &'a SagaState,
    version: i64,
    now: DateTime<Utc>,
}

/// Where an event came from, for the history.
struct Origin<'a> {
    trigger: &'a str,
    message_id: Option<Uuid>,
    operator: Option<&'a Operator<'a>>,
}

pub(crate) struct Engine {
    registry: Arc<Registry>,
    topic_prefix: String,
}

/// Now to the microsecond, as Postgres keeps it: a deadline sent in a command is the one stored
/// in its attempt, and a command made again from the attempt (ADR 28) carries the same.
fn clock() -> Clock {
    use chrono::SubsecRound;
    Clock { now: Utc::now().trunc_subsecs(6), random: rand::random::<f64>() }
}

/// SHA-256 of the request's canonical JSON (object keys sorted), to detect a reused key.
pub(crate) fn request_hash(saga_type: &str, business_key: Option<&str>, input: &Value) -> String {
    let canonical = json!({"saga_type": saga_type, "business_key": business_key, "input": input});
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

impl Engine {
    pub(crate) fn new(registry: Arc<Registry>, topic_prefix: String) -> Self {
        Self { registry, topic_prefix }
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// Starts a saga, or finds the one already started with the same idempotency key.
    pub(crate) async fn start(
        &self,
        w: &mut Writes<'_>,
        request: &StartSagaRequest,
        trace: Context,
        effects: &mut Effects,
    ) -> Result<Started, StartError> {
        let prepared = self.prepare_start(request, trace)?;
        let inserted = store::insert(w.conn, prepared.new_saga()).await?;
        self.finish_start(w, prepared, inserted, effects).await
    }

    /// The checks and the first transition of a start, before anything is written.
    pub(crate) fn prepare_start<'r>(
        &self,
        request: &'r StartSagaRequest,
        trace: Context,
    ) -> Result<PreparedStart<'r, '_>, StartError> {
        let definition = self.registry.latest(request.saga_type.as_str()).ok_or_else(|| StartError::UnknownType {
            given: request.saga_type.to_string(),
            known: self.registry.all().map(|d| d.name.to_string()).collect::<Vec<_>>().join(", "),
        })?;
        if !request.input.is_object() {
            return Err(StartError::InputNotObject);
        }
        let texts = [Some(request.idempotency_key.as_str()), request.business_key.as_deref()];
        if let Some(error) = texts.into_iter().flatten().find_map(|t| saga_defs::storable::check_text(t).err()) {
            return Err(StartError::Unstorable(error));
        }
        saga_defs::storable::check(&request.input).map_err(|e| StartError::Unstorable(format!("input: {e}")))?;
        let hash = request_hash(request.saga_type.as_str(), request.business_key.as_deref(), &request.input);
        let clock = clock();
        let transition = saga_defs::start(definition, clock);
        let traceparent = trace.parent.header();
        Ok(PreparedStart { request, trace, traceparent, definition, hash, clock, transition })
    }

    /// Writes what a prepared start did once its row was inserted (`inserted`), or finds the
    /// saga that already holds its idempotency key.
    pub(crate) async fn finish_start(
        &self,
        w: &mut Writes<'_>,
        prepared: PreparedStart<'_, '_>,
        inserted: bool,
        effects: &mut Effects,
    ) -> Result<Started, StartError> {
        let PreparedStart { request, trace, definition, hash, clock, transition, .. } = prepared;
        let id = request.saga_id.as_uuid();
        if !inserted {
            let (existing, existing_hash) =
                store::find_by_key(w.conn, definition.name.as_str(), &request.idempotency_key)
                    .await?
                    .ok_or(sqlx::Error::RowNotFound)?;
            if existing_hash != hash {
                return Err(StartError::KeyReused { key: request.idempotency_key.clone(), existing });
            }
            return Ok(Started::Existing(existing));
        }
        let summary = describe(definition, None, "started", &transition);
        tracing::debug!(
            saga_id = %id, trace_id = %trace.trace_id(), correlation_id = trace.correlation(), "saga started"
        );
        self.write_effects(w, id, definition, &request.input, &json!({}), &transition, &trace, clock.now).await?;
        let started = Lifecycle {
            event_type: LifecycleEventType::Started,
            saga_id: id,
            definition,
            business_key: request.business_key.as_deref(),
            state: &transition.next,
            version: 1,
            now: clock.now,
            trace: &trace,
        };
        w.outbox(vec![self.lifecycle_event(started)]).await?;
        w.append_history(HistoryEntry {
            saga_id: id,
            version: 1,
            from_status: None,
            to_status: transition.next.status,
            trigger: "STARTED",
            summary: &summary,
            detail: detail(&transition, None),
            now: clock.now,
        })
        .await?;
        effects.0.push(Effect::Created { saga_type: definition.name.to_string(), saga_id: id });
        tracing::info!(saga_id = %id, saga_type = %definition.name, "saga started");
        Ok(Started::Created(id))
    }

    /// Applies a participant's reply. A reply that answers a command the saga sent but no longer
    /// waits for (a duplicate, or a late answer to an attempt that timed out) changes nothing and
    /// is counted; a reply about a saga, step or attempt that was never sent is returned as a
    /// dead letter.
    pub(crate) async fn on_reply(
        &self,
        w: &mut Writes<'_>,
        reply: &ReplyEnvelope,
        effects: &mut Effects,
    ) -> Result<Option<Reason>, ApplyError> {
        let saga_id = reply.saga_id.as_uuid();
        let Some(row) = w.lock(saga_id).await? else {
            return Ok(Some(Reason::new("unknown_saga", format!("no saga {saga_id}"))));
        };
        let Some(definition) = self.registry.get(&row.saga_type, row.definition_version as u32) else {
            let error = format!("saga definition {} v{} is not loaded", row.saga_type, row.definition_version);
            return Ok(Some(Reason::new("unknown_definition", error)));
        };
        let event = SagaEvent::Reply(StepReply {
            step: reply.step.clone(),
            kind: reply.kind,
            attempt: reply.attempt,
            outcome: reply.outcome.clone(),
        });
        let origin = Origin { trigger: "REPLY", message_id: Some(reply.message_id), operator: None };
        let Err(refused) = self.transition(w, definition, row, &event, origin, effects).await? else {
            return Ok(None);
        };
        match w.attempt_status(saga_id, reply.step.as_str(), reply.kind, reply.attempt).await?.as_deref() {
            None => Ok(Some(Reason::new("unexpected_reply", format!("no such command was sent: {refused}")))),
            Some(status) => {
                let label = if matches!(status, "SUCCEEDED" | "FAILED") { "duplicate" } else { "stale" };
                tracing::info!(%saga_id, step = %reply.step, attempt = reply.attempt, attempt_status = status, label, "reply changes nothing");
                effects.ignored(label);
                Ok(None)
            }
        }
    }

    /// Fires the timer of a saga the caller has locked.
    pub(crate) async fn on_timer(&self, w: &mut Writes<'_>, id: Uuid, effects: &mut Effects) -> Result<(), ApplyError> {
        let Some(row) = w.lock(id).await? else { return Ok(()) };
        let origin = Origin { trigger: "TIMER", message_id: None, operator: None };
        self.apply(w, row, &SagaEvent::TimerFired, origin, effects).await
    }

    /// Moves a saga that cannot be processed aside: `NEEDS_ATTENTION` with code
    /// `UNPROCESSABLE_SAGA` and the reason, a history entry, a lifecycle event and a metric,
    /// without reading its JSON. Nothing happens to a saga that has ended.
    pub(crate) async fn park(
        &self,
        w: &mut Writes<'_>,
        id: Uuid,
        trigger: &str,
        reason: &str,
        effects: &mut Effects,
    ) -> sqlx::Result<()> {
        let now = Utc::now();
        let code = saga_defs::contract::codes::UNPROCESSABLE_SAGA;
        let Some(parked) = w.park(id, code, reason, now).await? else { return Ok(()) };
        let summary = format!("could not be processed: {reason}; needs a human");
        let from_status = parked.status_before.parse::<SagaStatus>().ok();
        w.append_history(HistoryEntry {
            saga_id: id,
            version: parked.version,
            from_status,
            to_status: SagaStatus::NeedsAttention,
            trigger,
            summary: &summary,
            detail: json!({"parked": {"code": code, "reason": reason}}),
            now,
        })
        .await?;
        if let (Ok(saga_type), Ok(step)) =
            (saga_defs::SagaType::parse(parked.saga_type.clone()), saga_defs::StepName::parse(parked.step_name.clone()))
        {
            let payload = SagaLifecycleEvent {
                schema_version: SCHEMA_VERSION,
                event_id: Uuid::now_v7(),
                event_type: LifecycleEventType::NeedsAttention,
                saga_id: SagaId::from(id),
                saga_type,
                definition_version: parked.definition_version as u32,
                business_key: parked.business_key.clone(),
                status: SagaStatus::NeedsAttention,
                version: parked.version,
                failure: None,
                attention: Some(saga_defs::messages::FailureInfo {
                    step,
                    code: code.to_owned(),
                    message: reason.to_owned(),
                }),
                occurred_at: now,
            };
            w.outbox(vec![OutboxMessage::new(self.topic(EVENTS_TOPIC), id, MESSAGE_TYPE_EVENT, &payload)]).await?;
        }
        effects.0.push(Effect::Parked { saga_type: parked.saga_type.clone(), trigger: trigger.to_lowercase() });
        effects.0.push(Effect::Ended {
            saga_type: parked.saga_type,
            status: SagaStatus::NeedsAttention,
            seconds: (now - parked.created_at).num_milliseconds() as f64 / 1000.0,
        });
        tracing::error!(saga_id = %id, trigger, reason, "saga cannot be processed; parked as NEEDS_ATTENTION");
        Ok(())
    }

    /// An operator's retry or abort of the saga `id`, which this call locks.
    pub(crate) async fn operate(
        &self,
        w: &mut Writes<'_>,
        id: Uuid,
        operation: &Operation,
        operator: &Operator<'_>,
        effects: &mut Effects,
    ) -> Result<Operated, OperateError> {
        let row = w.lock(id).await?.ok_or(OperateError::NotFound(id))?;
        self.operate_locked(w, row, operation, operator, effects).await
    }

    /// Whether the state machine would allow `operation` on `row`, without writing anything
    /// (a bulk retry's dry run).
    pub(crate) fn check(&self, row: &SagaRow, operation: &Operation) -> Result<(), OperateError> {
        let definition = self
            .registry
            .get(&row.saga_type, row.definition_version as u32)
            .ok_or_else(|| OperateError::UnknownDefinition(row.saga_type.clone(), row.definition_version))?;
        let event = match operation {
            Operation::Retry => SagaEvent::Retry,
            Operation::Abort => SagaEvent::Abort { reason: String::new() },
        };
        let state = row.state().map_err(ApplyError::from)?;
        row.input().map_err(ApplyError::from)?;
        row.outputs().map_err(ApplyError::from)?;
        saga_defs::apply(definition, &state, &event, clock()).map(|_| ()).map_err(OperateError::Refused)
    }

    /// An operator's retry or abort of a saga the caller has locked. Writes the transition, its
    /// history entry and the audit entry on the caller's transaction.
    pub(crate) async fn operate_locked(
        &self,
        w: &mut Writes<'_>,
        row: SagaRow,
        operation: &Operation,
        operator: &Operator<'_>,
        effects: &mut Effects,
    ) -> Result<Operated, OperateError> {
        let Some(definition) = self.registry.get(&row.saga_type, row.definition_version as u32) else {
            return Err(OperateError::UnknownDefinition(row.saga_type.clone(), row.definition_version));
        };
        let event = match operation {
            Operation::Retry => SagaEvent::Retry,
            Operation::Abort => SagaEvent::Abort { reason: operator.reason.to_owned() },
        };
        let status_before = row.status().map_err(ApplyError::from)?;
        let (id, version_before) = (row.id, row.version);
        let origin = Origin { trigger: operation.as_str(), message_id: None, operator: Some(operator) };
        let (transition, summary) =
            self.transition(w, definition, row, &event, origin, effects).await?.map_err(OperateError::Refused)?;
        w.flush().await?; // a direct writer: nothing is handed off
        let audit_id = store::append_audit(
            w.conn,
            store::NewAudit {
                saga_id: id,
                action: operation.as_str(),
                actor: operator.actor,
                reason: operator.reason,
                idempotency_key: operator.idempotency_key,
                bulk_id: operator.bulk_id,
                status_before,
                status_after: transition.next.status,
                version_before,
                detail: json!({"summary": summary, "transition": detail(&transition, None)}),
                now: Utc::now(),
            },
        )
        .await?;
        tracing::info!(saga_id = %id, action = operation.as_str(), actor = operator.actor, reason = operator.reason, %summary, "operator action");
        Ok(Operated {
            saga_id: id,
            status_before,
            status_after: transition.next.status,
            version_after: version_before + 1,
            audit_id,
            summary,
        })
    }

    #[tracing::instrument(skip_all, fields(saga_id = %row.id, trigger = origin.trigger))]
    async fn apply(
        &self,
        w: &mut Writes<'_>,
        row: SagaRow,
        event: &SagaEvent,
        origin: Origin<'_>,
        effects: &mut Effects,
    ) -> Result<(), ApplyError> {
        let Some(definition) = self.registry.get(&row.saga_type, row.definition_version as u32) else {
            tracing::error!(saga_type = row.saga_type, version = row.definition_version, "saga definition not loaded");
            effects.ignored("unknown_definition");
            return Ok(());
        };
        if let Err(error) = self.transition(w, definition, row, event, origin, effects).await? {
            tracing::info!(%error, "event changes nothing");
            effects.ignored(error.label());
        }
        Ok(())
    }

    /// Runs the state machine and writes what it decided. The inner error is an event that
    /// does not apply to the saga's state; nothing was written then.
    async fn transition(
        &self,
        w: &mut Writes<'_>,
        definition: &SagaDefinition,
        row: SagaRow,
        event: &SagaEvent,
        origin: Origin<'_>,
        effects: &mut Effects,
    ) -> Result<Result<(Transition, String), TransitionError>, ApplyError> {
        let state = row.state()?;
        // Read now, so that an unreadable saga fails before anything was written.
        row.input()?;
        row.outputs()?;
        let clock = clock();
        let transition = match saga_defs::apply(definition, &state, event, clock) {
            Ok(transition) => transition,
            Err(error) => return Ok(Err(error)),
        };
        let next = &transition.next;
        let step_name = definition.steps[next.step_index].name.as_str();
        let new_output = match &transition.finished {
            Some(f) if f.kind == saga_defs::StepKind::Action => match &f.outcome {
                AttemptOutcome::Succeeded { output } => Some((f.step.as_str(), output)),
                _ => None,
            },
            _ => None,
        };
        if !w.update(&row, next, step_name, new_output, clock.now).await? {
            return Err(ApplyError::VersionConflict(row.id));
        }
        let input = row.input()?.clone();
        let mut outputs = row.outputs()?.clone();
        if let (Some((step, output)), Some(map)) = (new_output, outputs.as_object_mut()) {
            map.insert(step.to_owned(), output.clone());
        }
        if let Some(finished) = &transition.finished {
            let started = w.finish_attempt(row.id, finished, clock.now).await?;
            let (outcome, code) = match &finished.outcome {
                AttemptOutcome::Succeeded { .. } => ("succeeded", None),
                AttemptOutcome::Failed(e) => ("failed", Some(e.code.clone())),
                AttemptOutcome::TimedOut => ("timed_out", Some(saga_defs::contract::codes::STEP_TIMEOUT.to_owned())),
                AttemptOutcome::Abandoned => ("abandoned", None),
            };
            effects.0.push(Effect::StepFinished {
                saga_type: row.saga_type.clone(),
                step: finished.step.to_string(),
                kind: finished.kind.as_str(),
                outcome,
                code,
                seconds: started.map(|s| (clock.now - s).num_milliseconds() as f64 / 1000.0),
            });
        }
        let trace = row.trace();
        tracing::debug!(
            saga_id = %row.id, trace_id = %trace.trace_id(), correlation_id = trace.correlation(),
            trigger = origin.trigger, "saga moved"
        );
        self.write_effects(w, row.id, definition, &input, &outputs, &transition, &trace, clock.now).await?;
        let mut summary = describe(definition, Some(&state), origin.trigger, &transition);
        let mut history_detail = detail(&transition, origin.message_id);
        if let Some(operator) = origin.operator {
            summary =
                format!("{} by {} ({}); {summary}", origin.trigger.to_lowercase(), operator.actor, operator.reason);
            history_detail["operator"] = json!({"actor": operator.actor, "reason": operator.reason});
        }
        w.append_history(HistoryEntry {
            saga_id: row.id,
            version: row.version + 1,
            from_status: Some(state.status),
            to_status: next.status,
            trigger: origin.trigger,
            summary: &summary,
            detail: history_detail,
            now: clock.now,
        })
        .await?;
        if let Some(event_type) = LifecycleEventType::entering(next.status).filter(|_| next.status != state.status) {
            let event = Lifecycle {
                event_type,
                saga_id: row.id,
                definition,
                business_key: row.business_key.as_deref(),
                state: next,
                version: row.version + 1,
                now: clock.now,
                trace: &trace,
            };
            w.outbox(vec![self.lifecycle_event(event)]).await?;
        }
        if next.status.is_terminal() {
            effects.0.push(Effect::Ended {
                saga_type: row.saga_type.clone(),
                status: next.status,
                seconds: (clock.now - row.created_at).num_milliseconds() as f64 / 1000.0,
            });
            tracing::info!(status = %next.status, "saga ended");
        }
        Ok(Ok((transition, summary)))
    }

    /// The `saga-events` message announcing a lifecycle event.
    fn lifecycle_event(&self, event: Lifecycle<'_>) -> OutboxMessage {
        let payload = SagaLifecycleEvent {
            schema_version: SCHEMA_VERSION,
            event_id: Uuid::now_v7(),
            event_type: event.event_type,
            saga_id: SagaId::from(event.saga_id),
            saga_type: event.definition.name.clone(),
            definition_version: event.definition.version,
            business_key: event.business_key.map(str::to_owned),
            status: event.state.status,
            version: event.version,
            failure: event.state.failure.clone(),
            attention: event.state.attention.clone(),
            occurred_at: event.now,
        };
        let mut message = OutboxMessage::new(self.topic(EVENTS_TOPIC), event.saga_id, MESSAGE_TYPE_EVENT, &payload);
        let fallback = event.trace.parent.child_of_message(payload.event_id);
        let published = saga_runtime::trace::span(
            Some(&event.trace.parent),
            SpanKind::Producer,
            SystemTime::now(),
            fallback,
            || {
                let name = serde_json::to_value(event.event_type).ok().and_then(|v| v.as_str().map(str::to_owned));
                (
                    format!("publish {}", name.unwrap_or_default()).into(),
                    vec![KeyValue::new("saga.id", event.saga_id.to_string())],
                )
            },
        );
        message.headers = event.trace.headers(published);
        message
    }

    /// Records the commands as pending attempts and puts them in the outbox.
    #[allow(clippy::too_many_arguments)]
    async fn write_effects(
        &self,
        w: &mut Writes<'_>,
        id: Uuid,
        definition: &SagaDefinition,
        input: &Value,
        outputs: &Value,
        transition: &Transition,
        trace: &Context,
        now: DateTime<Utc>,
    ) -> sqlx::Result<()> {
        let mut messages = Vec::with_capacity(transition.commands.len());
        for command in &transition.commands {
            w.insert_attempt(id, command, now).await?;
            let failure = transition.next.failure.clone();
            messages.push(self.command_message(id, definition, input, outputs, failure, command, trace));
        }
        w.outbox(messages).await
    }

    /// The message of a command: its envelope (a fresh message id), to the participant's topic,
    /// with a span of its own in the saga's trace.
    #[allow(clippy::too_many_arguments)]
    fn command_message(
        &self,
        id: Uuid,
        definition: &SagaDefinition,
        input: &Value,
        outputs: &Value,
        failure: Option<saga_defs::messages::FailureInfo>,
        command: &saga_defs::machine::StepCommand,
        trace: &Context,
    ) -> OutboxMessage {
        let envelope = CommandEnvelope {
            schema_version: SCHEMA_VERSION,
            message_id: Uuid::now_v7(),
            saga_id: SagaId::from(id),
            saga_type: definition.name.clone(),
            step: command.step.clone(),
            kind: command.kind,
            action: command.action.clone(),
            attempt: command.attempt,
            reply_to: self.topic(REPLIES_TOPIC),
            input: input.clone(),
            outputs: outputs.clone(),
            failure,
            deadline: command.deadline,
        };
        let mut message =
            OutboxMessage::new(self.topic(&commands_topic(&command.participant)), id, MESSAGE_TYPE_COMMAND, &envelope);
        // A span per command (without an export, its id is the command's message id).
        let fallback = trace.parent.child_of_message(envelope.message_id);
        let sent =
            saga_runtime::trace::span(Some(&trace.parent), SpanKind::Producer, SystemTime::now(), fallback, || {
                let name = format!("send {} {}", command.kind.as_str().to_lowercase(), command.action);
                let attributes = vec![
                    KeyValue::new("saga.id", id.to_string()),
                    KeyValue::new("saga.step", command.step.to_string()),
                    KeyValue::new("saga.attempt", i64::from(command.attempt)),
                ];
                (name.into(), attributes)
            });
        message.headers = trace.headers(sent);
        message
    }

    /// The command of a saga's pending attempt, made again as the transition that started the
    /// attempt made it (ADR 28): the saga's input, outputs and failure cannot have changed while
    /// the attempt is pending, since only its reply or deadline moves the saga on. `None`: the
    /// saga's definition or row cannot give it (the saga's deadline handles it then).
    pub(crate) fn pending_command(
        &self,
        row: &SagaRow,
        attempt: &crate::lease::PendingCommand,
    ) -> Result<OutboxMessage, String> {
        let definition = self
            .registry
            .get(&row.saga_type, row.definition_version as u32)
            .ok_or_else(|| format!("no definition {} v{}", row.saga_type, row.definition_version))?;
        let index = usize::try_from(attempt.step_index).map_err(|_| "a negative step index".to_owned())?;
        let step = definition.steps.get(index).ok_or_else(|| format!("no step {index}"))?;
        let kind: saga_defs::StepKind = attempt.kind.parse().map_err(|_| format!("kind {:?}", attempt.kind))?;
        let (action, _) = step.command(kind).ok_or("a compensation the step does not have")?;
        let command = saga_defs::machine::StepCommand {
            step_index: index,
            step: step.name.clone(),
            participant: step.participant.clone(),
            kind,
            action: action.to_owned(),
            attempt: u32::try_from(attempt.attempt).map_err(|_| "a negative attempt".to_owned())?,
            deadline: attempt.deadline_at,
        };
        let state = row.state().map_err(|e| e.to_string())?;
        let input = row.input().map_err(|e| e.to_string())?;
        let outputs = row.outputs().map_err(|e| e.to_string())?;
        Ok(self.command_message(row.id, definition, input, outputs, state.failure, &command, &row.trace()))
    }
}

fn detail(transition: &Transition, message_id: Option<Uuid>) -> Value {
    let finished = transition.finished.as_ref().map(|f| {
        let (outcome, error) = match &f.outcome {
            AttemptOutcome::Succeeded { .. } => ("SUCCEEDED", None),
            AttemptOutcome::Failed(e) => {
                ("FAILED", Some(json!({"code": e.code, "message": e.message, "retryable": e.retryable})))
            }
            AttemptOutcome::TimedOut => ("TIMED_OUT", None),
            AttemptOutcome::Abandoned => ("ABANDONED", None),
        };
        json!({"step": f.step, "kind": f.kind, "attempt": f.attempt, "outcome": outcome, "error": error})
    });
    let commands: Vec<Value> = transition
        .commands
        .iter()
        .map(|c| json!({"step": c.step, "kind": c.kind, "action": c.action, "attempt": c.attempt, "participant": c.participant, "deadline": c.deadline}))
        .collect();
    json!({"finished": finished, "commands": commands, "retry_at": match transition.next.waiting {
        saga_defs::Waiting::Retry { at } => Some(at),
        _ => None,
    }, "message_id": message_id})
}

/// One line, for people, of what a transition did.
fn describe(definition: &SagaDefinition, before: Option<&SagaState>, trigger: &str, t: &Transition) -> String {
    let mut parts = Vec::new();
    if before.is_none() {
        parts.push(format!("started {} v{}", definition.name, definition.version));
    }
    if let Some(f) = &t.finished {
        let what = format!("{} {} attempt {}", f.step, f.kind.as_str().to_lowercase(), f.attempt);
        parts.push(match &f.outcome {
            AttemptOutcome::Succeeded { .. } => format!("{what} succeeded"),
            AttemptOutcome::Failed(e) => format!("{what} failed: {} ({})", e.code, e.message),
            AttemptOutcome::TimedOut => format!("{what} timed out"),
            AttemptOutcome::Abandoned => format!("{what} abandoned"),
        });
    } else if trigger == "TIMER" {
        parts.push("backoff over".to_owned());
    }
    if let saga_defs::Waiting::Retry { at } = t.next.waiting {
        parts.push(format!("retry at {}", at.to_rfc3339()));
    }
    for c in &t.commands {
        parts.push(format!(
            "sent {} {} attempt {} to {}",
            c.action,
            c.kind.as_str().to_lowercase(),
            c.attempt,
            c.participant
        ));
    }
    if t.next.status.is_terminal() {
        parts.push(format!("saga {}", t.next.status));
    }
    if let (Some(b), SagaStatus::Compensating) = (before, t.next.status) {
        if b.status == SagaStatus::Running {
            parts.push("compensating".to_owned());
        }
    }
    parts.join("; ")
}
