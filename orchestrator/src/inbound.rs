//! The orchestrator's consumer: participants' replies and start requests, applied many to a
//! transaction. Offsets are stored by the runtime only after the transaction commits. What cannot
//! be applied is dead-lettered in that same transaction.

use std::sync::Arc;

use saga_defs::contract::{
    HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, MESSAGE_TYPE_REPLY, MESSAGE_TYPE_START, SCHEMA_VERSION,
};
use saga_defs::{ReplyEnvelope, StartSagaRequest};
use saga_runtime::consumer::{BatchHandler, Record};
use saga_runtime::dead_letter::{self, Reason};
use sqlx::PgPool;

use crate::admission::Admission;
use crate::engine::{ApplyError, Effects, Engine, PreparedStart, StartError};
use crate::store::{self, NewSaga};
use crate::writes::Writes;

/// The name on the orchestrator's dead letters.
const SERVICE: &str = "saga-orchestrator";

pub(crate) struct Inbound {
    pub(crate) pool: PgPool,
    pub(crate) engine: Arc<Engine>,
    pub(crate) replies_topic: String,
    pub(crate) start_topic: String,
    pub(crate) admission: Arc<Admission>,
    /// Publish on commit (see `saga_runtime::outbox::Handoff`); `None`: the relay reads back.
    pub(crate) handoff: Option<saga_runtime::outbox::Handoff>,
}

enum Message {
    Reply(ReplyEnvelope),
    Start(StartSagaRequest),
}

/// Reads a record's payload, checking its type and schema headers when present.
fn read<'a>(record: &'a Record, expected_type: &str) -> Result<&'a [u8], Reason> {
    if let Some(found) = record.header(HEADER_MESSAGE_TYPE).filter(|t| *t != expected_type) {
        return Err(Reason::new("message_type", format!("message type {found:?} is not {expected_type:?}")));
    }
    if let Some(found) = record.header(HEADER_SCHEMA_VERSION).filter(|v| *v != SCHEMA_VERSION.to_string()) {
        return Err(unsupported_schema(found));
    }
    record.payload.as_deref().ok_or_else(|| Reason::new("empty", "the message has no payload"))
}

fn unsupported_schema(found: impl std::fmt::Display) -> Reason {
    Reason::new(
        "schema_version",
        format!("schema version {found} is not supported (this build reads {SCHEMA_VERSION})"),
    )
}

fn invalid(error: serde_json::Error) -> Reason {
    Reason::new("invalid_json", format!("not a valid message: {error}"))
}

/// Reads a JSON message, refusing any value Postgres could not store and give back.
fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Reason> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(invalid)?;
    saga_defs::storable::check(&value)
        .map_err(|e| Reason::new("unstorable", format!("the message holds a value that cannot be stored: {e}")))?;
    serde_json::from_value(value).map_err(invalid)
}

impl Inbound {
    fn parse(&self, record: &Record) -> Result<Message, Reason> {
        if record.topic == self.replies_topic {
            let reply: ReplyEnvelope = decode(read(record, MESSAGE_TYPE_REPLY)?)?;
            if reply.schema_version != SCHEMA_VERSION {
                return Err(unsupported_schema(reply.schema_version));
            }
            Ok(Message::Reply(reply))
        } else if record.topic == self.start_topic {
            let start: StartSagaRequest = decode(read(record, MESSAGE_TYPE_START)?)?;
            if start.schema_version != SCHEMA_VERSION {
                return Err(unsupported_schema(start.schema_version));
            }
            Ok(Message::Start(start))
        } else {
            Err(Reason::new("unknown_topic", format!("not subscribed to {}", record.topic)))
        }
    }
}

impl BatchHandler for Inbound {
    async fn handle(&self, records: &[Record]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut effects = Effects::default();
        let mut dead = Vec::new();
        let parsed: Vec<Result<Message, Reason>> = records.iter().map(|r| self.parse(r)).collect();
        // One transaction, and about four statements and the commit, for the whole batch (see `writes`).
        let mut writes = Writes::batched(&mut tx, self.handoff.is_some());
        let sagas: Vec<uuid::Uuid> = parsed
            .iter()
            .filter_map(|m| match m {
                Ok(Message::Reply(reply)) => Some(reply.saga_id.as_uuid()),
                _ => None,
            })
            .collect();
        writes.prefetch(&sagas).await?;
        // The batch's new sagas are inserted in one statement; what each start then writes
        // joins the batch's other writes.
        let mut starts: Vec<Option<Result<PreparedStart<'_, '_>, StartError>>> = parsed
            .iter()
            .zip(records)
            .map(|(m, record)| match m {
                Ok(Message::Start(request)) => {
                    let trace = saga_runtime::trace::Context::from_record(record, Some(request.saga_id.as_uuid()));
                    Some(self.engine.prepare_start(request, trace))
                }
                _ => None,
            })
            .collect();
        let new_sagas: Vec<NewSaga<'_>> = starts.iter().flatten().flatten().map(PreparedStart::new_saga).collect();
        let mut inserted = store::insert_many(writes.conn, &new_sagas).await?;
        drop(new_sagas);
        for ((record, parsed), start) in records.iter().zip(&parsed).zip(starts.iter_mut()) {
            let verdict = match parsed {
                Ok(Message::Reply(reply)) => match self.engine.on_reply(&mut writes, reply, &mut effects).await {
                    Ok(verdict) => verdict,
                    // Found before anything was written for it: the saga is parked in this
                    // transaction, and the reply kept in the dead-letter topic for a replay once
                    // the saga is fixed.
                    Err(ApplyError::Corrupt(error)) => {
                        let reason = format!("{error}");
                        self.engine.park(&mut writes, reply.saga_id.as_uuid(), "REPLY", &reason, &mut effects).await?;
                        Some(Reason::new("unprocessable_saga", reason))
                    }
                    Err(error) => return Err(error.into()),
                },
                Ok(Message::Start(request)) => {
                    let started = match start.take() {
                        Some(Ok(prepared)) => {
                            // Taken by the first start of the id: the same request delivered
                            // twice in one batch then finds its saga, as one insert each would.
                            let was_inserted = inserted.remove(&request.saga_id.as_uuid());
                            self.engine.finish_start(&mut writes, prepared, was_inserted, &mut effects).await
                        }
                        Some(Err(error)) => Err(error),
                        None => unreachable!("every start request of the batch was prepared"),
                    };
                    match started {
                        Ok(_) => None,
                        Err(StartError::Database(error)) => return Err(error.into()),
                        Err(error) => {
                            let label = match error {
                                StartError::UnknownType { .. } => "unknown_saga_type",
                                StartError::InputNotObject | StartError::Unstorable(_) => "invalid_input",
                                _ => "idempotency_key_reused",
                            };
                            effects.start_refused(label);
                            Some(Reason::new(label, error))
                        }
                    }
                }
                Err(reason) => {
                    if record.topic == self.replies_topic {
                        effects.ignored(reason.label);
                    }
                    Some(reason.clone())
                }
            };
            if let Some(reason) = verdict {
                dead.push((dead_letter::message(SERVICE, record, &reason), reason.label));
            }
        }
        let messages: Vec<_> = dead.iter().map(|(m, _)| m.clone()).collect();
        writes.outbox(messages).await?;
        let handed = writes.flush().await?;
        let starting = self.admission.starting(effects.created());
        tx.commit().await?;
        starting.committed();
        if let (Some(handoff), Some(handed)) = (&self.handoff, handed) {
            handoff.send(handed.since(started));
        }
        effects.record();
        for (message, label) in dead {
            let source = message.topic.trim_end_matches(".dlq");
            dead_letter::count(source, label);
        }
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn service(&self) -> &str {
        SERVICE
    }

    /// Start requests wait in Kafka while a saga type is at its bound of sagas in flight.
    async fn paused_topics(&self) -> Vec<String> {
        if self.admission.any_saturated() {
            vec![self.start_topic.clone()]
        } else {
            Vec::new()
        }
    }
}

/// Against the real Postgres (`TEST_POSTGRES_URL`, default the local server).
#[cfg(test)]
mod tests {
    use saga_defs::contract::{
        HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, MESSAGE_TYPE_REPLY, MESSAGE_TYPE_START, SCHEMA_VERSION,
    };
    use saga_defs::Registry;
    use serde_json::json;

    use super::*;
    use crate::store::scratch;

    /// An inbound handler on a scratch database named after `test`.
    async fn inbound(test: &str) -> (Inbound, PgPool, String) {
        let (_, name) = scratch::database_with_outbox(test).await;
        let pool = PgPool::connect(&scratch::url(&name)).await.unwrap();
        let registry = Arc::new(Registry::embedded().unwrap());
        let types: Vec<String> = registry.all().map(|d| d.name.to_string()).collect();
        let inbound = Inbound {
            pool: pool.clone(),
            engine: Arc::new(Engine::new(registry.clone(), String::new())),
            replies_topic: "saga-replies".into(),
            start_topic: "saga-start-requests".into(),
            admission: Arc::new(Admission::new(crate::admission::parse_limits("500").unwrap(), types)),
            handoff: None,
        };
        (inbound, pool, name)
    }

    fn start_record(saga_id: uuid::Uuid, offset: i64) -> Record {
        let request = json!({"schema_version": SCHEMA_VERSION, "saga_id": saga_id, "saga_type": "order-fulfilment",
            "idempotency_key": format!("order-{saga_id}"), "business_key": format!("order-{saga_id}"),
            "input": {"order_id": uuid::Uuid::now_v7(), "items": [{"sku": "A", "quantity": 1}],
                      "total_cents": 100, "currency": "USD", "payment_token": "tok_visa"}});
        Record {
            topic: "saga-start-requests".into(),
            partition: 0,
            offset,
            key: Some(saga_id.to_string()),
            payload: Some(serde_json::to_vec(&request).unwrap()),
            headers: vec![
                (HEADER_MESSAGE_TYPE.into(), MESSAGE_TYPE_START.as_bytes().to_vec()),
                (HEADER_SCHEMA_VERSION.into(), SCHEMA_VERSION.to_string().into_bytes()),
            ],
        }
    }

    fn success_reply(saga_id: uuid::Uuid, step: &str, participant: &str, offset: i64) -> Record {
        let reply = json!({"schema_version": SCHEMA_VERSION, "message_id": uuid::Uuid::now_v7(),
            "command_id": uuid::Uuid::now_v7(), "saga_id": saga_id, "step": step, "kind": "ACTION", "attempt": 1,
            "participant": participant, "outcome": {"status": "SUCCEEDED", "output": {"ok": true}}});
        Record {
            topic: "saga-replies".into(),
            partition: 0,
            offset,
            key: Some(saga_id.to_string()),
            payload: Some(serde_json::to_vec(&reply).unwrap()),
            headers: vec![
                (HEADER_MESSAGE_TYPE.into(), MESSAGE_TYPE_REPLY.as_bytes().to_vec()),
                (HEADER_SCHEMA_VERSION.into(), SCHEMA_VERSION.to_string().into_bytes()),
            ],
        }
    }

    /// An attempt the batch created and a reply in the same batch finished (only an early or
    /// forged reply can) is written finished: the batch's writes must see each other (they did
    /// not, for a day, as the parts of one statement; ADR 18).
    #[tokio::test]
    async fn an_attempt_created_and_answered_in_one_batch_is_written_answered() {
        let (inbound, pool, name) = inbound("inbound_fold").await;
        let saga_id = uuid::Uuid::now_v7();
        inbound.handle(&[start_record(saga_id, 1)]).await.unwrap();
        inbound
            .handle(&[
                success_reply(saga_id, "verify_order", "order", 1),
                success_reply(saga_id, "reserve_inventory", "inventory", 2),
            ])
            .await
            .unwrap();
        let attempts: Vec<(String, String)> = sqlx::query_as(
            "SELECT step_name, status FROM saga_step_attempts WHERE saga_id = $1 ORDER BY started_at, step_index",
        )
        .bind(saga_id)
        .fetch_all(&pool)
        .await
        .unwrap();
        let expected =
            [("verify_order", "SUCCEEDED"), ("reserve_inventory", "SUCCEEDED"), ("charge_payment", "PENDING")];
        assert_eq!(
            attempts.iter().map(|(s, t)| (s.as_str(), t.as_str())).collect::<Vec<_>>(),
            expected,
            "every attempt as the replies left it"
        );
        let (step, version): (String, i64) =
            sqlx::query_as("SELECT step_name, version FROM saga_instances WHERE id = $1")
                .bind(saga_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((step.as_str(), version), ("charge_payment", 3));
        pool.close().await;
        scratch::drop(&name).await;
    }

    /// An outbox publisher redelivers what it published before a crash, so the same start request
    /// can arrive twice in one consumed batch.
    #[tokio::test]
    async fn a_start_request_delivered_twice_in_one_batch_starts_one_saga_in_one_pass() {
        let (inbound, pool, name) = inbound("inbound_twice").await;
        let saga_id = uuid::Uuid::now_v7();
        let record = |offset: i64| start_record(saga_id, offset);
        inbound.handle(&[record(7), record(8)]).await.expect("the batch applies in one pass");
        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).bind(saga_id).fetch_one(&pool).await.unwrap() }
        };
        assert_eq!(count("SELECT count(*) FROM saga_instances WHERE id = $1").await, 1);
        assert_eq!(count("SELECT count(*) FROM saga_history WHERE saga_id = $1").await, 1);
        assert_eq!(count("SELECT count(*) FROM saga_step_attempts WHERE saga_id = $1").await, 1);
        pool.close().await;
        scratch::drop(&name).await;
    }
}
