//! The orchestrator's consumer: participants' replies and start requests, applied many to a
//! transaction. Offsets are stored by the runtime only after the transaction commits.

use std::sync::Arc;

use saga_defs::contract::{
    HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, MESSAGE_TYPE_REPLY, MESSAGE_TYPE_START, SCHEMA_VERSION,
};
use saga_defs::{ReplyEnvelope, StartSagaRequest};
use saga_runtime::consumer::{BatchHandler, Record};
use sqlx::PgPool;

use crate::engine::{Effects, Engine, StartError};

pub(crate) struct Inbound {
    pub(crate) pool: PgPool,
    pub(crate) engine: Arc<Engine>,
    pub(crate) replies_topic: String,
    pub(crate) start_topic: String,
}

enum Message {
    Reply(ReplyEnvelope),
    Start(StartSagaRequest),
}

/// Why a record cannot be applied. A later issue dead-letters these; here they are logged and counted.
fn read<'a>(record: &'a Record, expected_type: &str) -> Result<&'a [u8], &'static str> {
    if record.header(HEADER_MESSAGE_TYPE).is_some_and(|t| t != expected_type) {
        return Err("message_type");
    }
    if record.header(HEADER_SCHEMA_VERSION).is_some_and(|v| v != SCHEMA_VERSION.to_string()) {
        return Err("schema_version");
    }
    record.payload.as_deref().ok_or("empty")
}

impl Inbound {
    fn parse(&self, record: &Record) -> Result<Message, &'static str> {
        if record.topic == self.replies_topic {
            let reply: ReplyEnvelope =
                serde_json::from_slice(read(record, MESSAGE_TYPE_REPLY)?).map_err(|_| "invalid_json")?;
            if reply.schema_version != SCHEMA_VERSION {
                return Err("schema_version");
            }
            Ok(Message::Reply(reply))
        } else if record.topic == self.start_topic {
            let start: StartSagaRequest =
                serde_json::from_slice(read(record, MESSAGE_TYPE_START)?).map_err(|_| "invalid_json")?;
            if start.schema_version != SCHEMA_VERSION {
                return Err("schema_version");
            }
            Ok(Message::Start(start))
        } else {
            Err("unknown_topic")
        }
    }
}

impl BatchHandler for Inbound {
    async fn handle(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut effects = Effects::default();
        for record in records {
            match self.parse(record) {
                Ok(Message::Reply(reply)) => self.engine.on_reply(&mut tx, &reply, &mut effects).await?,
                Ok(Message::Start(request)) => match self.engine.start(&mut tx, &request, &mut effects).await {
                    Ok(_) => {}
                    Err(StartError::Database(error)) => return Err(error.into()),
                    Err(error) => {
                        tracing::warn!(position = record.position(), %error, "start request refused");
                        effects.start_refused(match error {
                            StartError::UnknownType { .. } => "unknown_saga_type",
                            StartError::InputNotObject => "invalid_input",
                            _ => "idempotency_key_reused",
                        });
                    }
                },
                Err(reason) => {
                    tracing::warn!(position = record.position(), reason, "skipping an unreadable message");
                    effects.ignored(reason);
                }
            }
        }
        tx.commit().await?;
        effects.record();
        Ok(())
    }
}
