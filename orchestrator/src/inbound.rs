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
use crate::writes::{Writes, BEGIN_BATCH};

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
    /// This process's registration (`lease`): with `handoff`, commands go from memory, not
    /// through the outbox (ADR 28).
    pub(crate) relay: Option<i64>,
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
        let mut tx = self.pool.begin_with(BEGIN_BATCH).await?;
        let mut effects = Effects::default();
        let mut dead = Vec::new();
        let parsed: Vec<Result<Message, Reason>> = records.iter().map(|r| self.parse(r)).collect();
        // One transaction, and about four statements and the commit, for the whole batch (see `writes`).
        let mut writes = Writes::batched(&mut tx, self.handoff.is_some(), self.relay);
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
            // Waits while the relay is behind if it holds commands (their only copy is in
            // memory): the consumer then stops taking records, and they wait in Kafka.
            if handoff.deliver(handed.since(started)).await.is_err() {
                tracing::warn!("the relay stopped: this batch's commands are left to the lease");
            }
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
            relay: None,
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

    /// A batch's commands go to the relay from memory, with no outbox row, their attempts held by
    /// this process's registration; an adoption of the registration writes the command of every
    /// attempt still pending to the outbox (the same command, made again) and deletes it; a batch
    /// whose registration is gone writes its commands to the outbox as before (ADR 28).
    #[tokio::test]
    async fn commands_go_from_memory_and_an_adopted_registration_writes_them_to_the_outbox() {
        let (mut inbound, pool, name) = inbound("inbound_lease").await;
        let (handoff, mut relay) = saga_runtime::outbox::Handoff::channel();
        let registration = crate::lease::register(&pool).await.unwrap();
        inbound.handoff = Some(handoff);
        inbound.relay = Some(registration);
        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
        };

        let (first, second) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        inbound.handle(&[start_record(first, 1), start_record(second, 2)]).await.unwrap();
        let handed = relay.try_recv().expect("the batch was handed to the relay");
        assert_eq!(handed.rows(), 2, "the two lifecycle events are rows");
        let commands = handed.unlogged().to_vec();
        assert_eq!(commands.len(), 2, "the two first commands have no row");
        assert_eq!(count("SELECT count(*) FROM outbox WHERE message_type = 'saga.command'").await, 0);
        let held: Vec<Option<i64>> = sqlx::query_scalar("SELECT handed_by FROM saga_step_attempts ORDER BY saga_id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(held, vec![Some(registration); 2], "both attempts are held by the registration");

        // The first saga's command was answered: only the second's is still pending.
        inbound.handle(&[success_reply(first, "verify_order", "order", 3)]).await.unwrap();
        let answered = relay.try_recv().expect("the reply's batch was handed over");
        assert_eq!(answered.unlogged().len(), 1, "the first saga's next command");
        let lapsed = crate::lease::Which::Lapsed { lease: std::time::Duration::from_secs(60), except: 0 };
        assert_eq!(crate::lease::adopt(&pool, &inbound.engine, lapsed, None).await.unwrap(), None, "not lapsed yet");
        let own = crate::lease::Which::Lapsed { lease: std::time::Duration::ZERO, except: registration };
        assert_eq!(crate::lease::adopt(&pool, &inbound.engine, own, None).await.unwrap(), None, "a process's own");

        let adopted = crate::lease::adopt(
            &pool,
            &inbound.engine,
            crate::lease::Which::Lapsed { lease: std::time::Duration::ZERO, except: 0 },
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            adopted,
            Some(crate::lease::Adopted { relay: registration, commands: 2, finished: true, next: None })
        );
        let stored: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT topic, raw_payload FROM outbox WHERE message_type = 'saga.command' AND NOT handed_off ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let comparable = |bytes: &[u8]| {
            let mut value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            value.as_object_mut().unwrap().remove("message_id");
            value
        };
        let mut expected: Vec<(String, serde_json::Value)> = [&commands[1], &answered.unlogged()[0]]
            .into_iter()
            .map(|m| (m.topic.clone(), comparable(m.payload.bytes().unwrap())))
            .collect();
        let mut found: Vec<(String, serde_json::Value)> =
            stored.iter().map(|(topic, payload)| (topic.clone(), comparable(payload))).collect();
        expected.sort_by_key(|(topic, v)| (topic.clone(), v["saga_id"].to_string()));
        found.sort_by_key(|(topic, v)| (topic.clone(), v["saga_id"].to_string()));
        assert_eq!(found, expected, "each pending attempt's command, made again as it was sent");
        assert_eq!(
            count("SELECT count(*) FROM saga_step_attempts WHERE handed_by IS NOT NULL AND status = 'PENDING'").await,
            0
        );
        assert_eq!(count("SELECT count(*) FROM orchestrator_relays").await, 0, "the registration is gone");

        // Its process, still alive, goes on: its commands now go through the outbox.
        let third = uuid::Uuid::now_v7();
        inbound.handle(&[start_record(third, 4)]).await.unwrap();
        let handed = relay.try_recv().unwrap();
        assert_eq!((handed.rows(), handed.unlogged().len()), (2, 0), "the command and the event are rows");
        assert_eq!(
            count("SELECT count(*) FROM saga_step_attempts WHERE handed_by IS NOT NULL AND status = 'PENDING'").await,
            0
        );
        pool.close().await;
        scratch::drop(&name).await;
    }

    /// A registration holding more pending attempts than one adoption step takes is adopted in
    /// steps that each go on where the last ended: every command once, then the registration gone.
    #[tokio::test]
    async fn a_registration_with_many_pending_attempts_is_adopted_in_steps() {
        let (mut inbound, pool, name) = inbound("inbound_lease_steps").await;
        let (handoff, _relay) = saga_runtime::outbox::Handoff::channel();
        let registration = crate::lease::register(&pool).await.unwrap();
        inbound.handoff = Some(handoff);
        inbound.relay = Some(registration);
        let records: Vec<Record> = (0..1_100).map(|i| start_record(uuid::Uuid::new_v4(), i)).collect();
        for batch in records.chunks(250) {
            inbound.handle(batch).await.unwrap();
        }
        let lapsed = crate::lease::Which::Lapsed { lease: std::time::Duration::ZERO, except: 0 };
        let (mut after, mut steps) = (None, Vec::new());
        while let Some(adopted) = crate::lease::adopt(&pool, &inbound.engine, lapsed, after).await.unwrap() {
            steps.push((adopted.commands, adopted.finished));
            after = adopted.next;
        }
        assert_eq!(steps, [(500, false), (500, false), (100, true)]);
        let commands: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT count(*), count(DISTINCT message_key) FROM outbox WHERE message_type = 'saga.command'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(commands, [(1_100, 1_100)], "each saga's command once");
        pool.close().await;
        scratch::drop(&name).await;
    }

    /// A measurement, not a check of speed: what the consumer's handler costs per batch of
    /// replies, on the local Postgres without a broker or participants (so that a change of the
    /// batch's statements can be compared in minutes, with a fraction of the system benchmark's
    /// spread). `MEASURE_SAGAS` sagas (default 2,000) are started, then taken through their
    /// steps in batches of `MEASURE_BATCH` replies (default 8); prints the batches' p50, p90, p99
    /// and mean. `MEASURE_SQL` (DDL: a constraint or trigger dropped) is run on the scratch
    /// database first, for an experiment. Run it release-built (docs/performance.md):
    /// `cargo test --release -p saga-orchestrator --bin saga-orchestrator measure_batches -- --ignored --nocapture`
    #[tokio::test]
    #[ignore = "a measurement: run it on its own, release-built"]
    async fn measure_batches() {
        let setting = |name: &str, default: usize| {
            std::env::var(name).ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(default)
        };
        let (sagas, size) = (setting("MEASURE_SAGAS", 2000), setting("MEASURE_BATCH", 8));
        let (inbound, pool, name) = inbound("measure").await;
        // An experiment's change to the scratch database (DDL: a dropped constraint or trigger).
        if let Ok(sql) = std::env::var("MEASURE_SQL") {
            sqlx::raw_sql(&sql).execute(&pool).await.expect("MEASURE_SQL runs");
        }
        let ids: Vec<uuid::Uuid> = (0..sagas).map(|_| uuid::Uuid::now_v7()).collect();
        let mut offset = 0;
        let mut next = || {
            offset += 1;
            offset
        };
        for chunk in ids.chunks(size) {
            let records: Vec<Record> = chunk.iter().map(|id| start_record(*id, next())).collect();
            inbound.handle(&records).await.unwrap();
        }
        // The steps as the saga's definition has them, the one `start_record` starts.
        let registry = Registry::embedded().unwrap();
        let steps = &registry.latest("order-fulfilment").expect("the order saga is defined").steps;
        let mut times = Vec::new();
        let all = std::time::Instant::now();
        for step in steps {
            for chunk in ids.chunks(size) {
                let records: Vec<Record> =
                    chunk.iter().map(|id| success_reply(*id, step.name.as_str(), &step.participant, next())).collect();
                let started = std::time::Instant::now();
                inbound.handle(&records).await.unwrap();
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let seconds = all.elapsed().as_secs_f64();
        let completed: i64 = sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE status = 'COMPLETED'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(completed, sagas as i64, "every saga went through its steps");
        times.sort_by(f64::total_cmp);
        let quantile = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "{sagas} sagas, batches of {size} replies: {} batches, p50 {:.2} ms, p90 {:.2}, p99 {:.2}, mean {:.2}; {:.0} replies/s",
            times.len(),
            quantile(0.5),
            quantile(0.9),
            quantile(0.99),
            times.iter().sum::<f64>() / times.len() as f64,
            (sagas * steps.len()) as f64 / seconds
        );
        pool.close().await;
        scratch::drop(&name).await;
    }
}
