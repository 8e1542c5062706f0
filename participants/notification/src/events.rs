//! From lifecycle events to notifications, a consumed batch in one transaction: each readable
//! event of a completed or failed saga with a business key (the order id) becomes one
//! notification, keyed by the event's id; the others are counted and skipped; an unreadable one
//! is dead-lettered to `saga-events.dlq` in the same transaction.

use metrics::{counter, describe_counter};
use saga_defs::contract::{HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, MESSAGE_TYPE_EVENT, SCHEMA_VERSION};
use saga_defs::{LifecycleEventType, SagaLifecycleEvent};
use saga_runtime::consumer::{BatchHandler, Record};
use saga_runtime::dead_letter::{self, Reason};
use saga_runtime::outbox;
use sqlx::PgPool;

const SENT: &str = "notifications_sent_total";
const SKIPPED: &str = "notification_events_skipped_total";

pub(crate) fn describe_metrics() {
    describe_counter!(SENT, "Customer notifications recorded as sent, by kind (ORDER_CONFIRMED, ORDER_FAILED)");
    describe_counter!(
        SKIPPED,
        "Lifecycle events that notify no customer, by reason (not_an_outcome, no_order, duplicate)"
    );
    for kind in ["ORDER_CONFIRMED", "ORDER_FAILED"] {
        counter!(SENT, "kind" => kind).increment(0);
    }
}

pub(crate) struct Notifier {
    pool: PgPool,
    handoff: Option<outbox::Handoff>,
}

impl Notifier {
    pub(crate) fn new(pool: PgPool, handoff: Option<outbox::Handoff>) -> Self {
        Self { pool, handoff }
    }
}

/// What one event asks of us.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    Notify(Notification),
    Skip(&'static str),
}

#[derive(Debug, PartialEq)]
pub(crate) struct Notification {
    pub(crate) event_id: uuid::Uuid,
    pub(crate) saga_id: uuid::Uuid,
    pub(crate) order_id: String,
    pub(crate) kind: &'static str,
    pub(crate) subject: String,
    pub(crate) body: String,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
}

/// Reads one record as a lifecycle event (headers, when present, must say so).
pub(crate) fn parse(record: &Record) -> Result<SagaLifecycleEvent, Reason> {
    if let Some(found) = record.header(HEADER_MESSAGE_TYPE).filter(|t| *t != MESSAGE_TYPE_EVENT) {
        return Err(Reason::new("message_type", format!("message type {found:?} is not {MESSAGE_TYPE_EVENT:?}")));
    }
    if let Some(found) = record.header(HEADER_SCHEMA_VERSION).filter(|v| *v != SCHEMA_VERSION.to_string()) {
        return Err(Reason::new("schema_version", format!("schema version {found} is not supported")));
    }
    let payload = record.payload.as_deref().ok_or_else(|| Reason::new("empty", "the message has no payload"))?;
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| Reason::new("invalid_json", format!("not JSON: {e}")))?;
    saga_defs::storable::check(&value)
        .map_err(|e| Reason::new("unstorable", format!("the event holds a value that cannot be stored: {e}")))?;
    let event: SagaLifecycleEvent = serde_json::from_value(value)
        .map_err(|e| Reason::new("invalid_json", format!("not a lifecycle event: {e}")))?;
    if event.schema_version != SCHEMA_VERSION {
        return Err(Reason::new("schema_version", format!("schema version {} is not supported", event.schema_version)));
    }
    Ok(event)
}

/// The notification an event calls for, if any.
pub(crate) fn decide(event: &SagaLifecycleEvent) -> Decision {
    let kind = match event.event_type {
        LifecycleEventType::Completed => "ORDER_CONFIRMED",
        LifecycleEventType::Failed => "ORDER_FAILED",
        // Started is no news to the customer; a saga needing attention is on-call's, and ends
        // completed or failed later, which notifies then.
        LifecycleEventType::Started | LifecycleEventType::NeedsAttention => return Decision::Skip("not_an_outcome"),
    };
    let Some(order_id) = event.business_key.clone().filter(|k| !k.is_empty()) else {
        return Decision::Skip("no_order");
    };
    let (subject, body) = if kind == "ORDER_CONFIRMED" {
        (format!("Your order {order_id} is confirmed"), format!("Your order {order_id} is paid and on its way."))
    } else {
        let why = event.failure.as_ref().map_or_else(|| "it could not be completed".to_owned(), |f| f.message.clone());
        (
            format!("Your order {order_id} could not be completed"),
            format!("We could not complete your order {order_id}: {why}. Nothing was charged or everything charged was refunded."),
        )
    };
    Decision::Notify(Notification {
        event_id: event.event_id,
        saga_id: event.saga_id.as_uuid(),
        order_id,
        kind,
        subject,
        body,
        occurred_at: event.occurred_at,
    })
}

impl BatchHandler for Notifier {
    async fn handle(&self, records: &[Record]) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let mut notifications = Vec::new();
        let mut dead = Vec::new();
        let mut skipped = Vec::new();
        for record in records {
            match parse(record).map(|event| decide(&event)) {
                Ok(Decision::Notify(n)) => {
                    let trace = saga_runtime::trace::Context::from_record(record, Some(n.saga_id));
                    let now = std::time::SystemTime::now();
                    saga_runtime::trace::span(
                        Some(&trace.parent),
                        opentelemetry::trace::SpanKind::Consumer,
                        now,
                        trace.parent.child(),
                        || {
                            let name = format!("notify {}", n.kind);
                            (name.into(), vec![opentelemetry::KeyValue::new("saga.id", n.saga_id.to_string())])
                        },
                    );
                    tracing::debug!(
                        saga_id = %n.saga_id, trace_id = %trace.trace_id(), correlation_id = trace.correlation(),
                        order_id = %n.order_id, kind = n.kind, "notification recorded"
                    );
                    notifications.push(n)
                }
                Ok(Decision::Skip(reason)) => skipped.push(reason),
                Err(reason) => dead.push((dead_letter::message("notification-service", record, &reason), reason.label)),
            }
        }
        if notifications.is_empty() && dead.is_empty() {
            // Most events notify nobody (every saga's start): nothing to write, no transaction.
            for reason in skipped {
                counter!(SKIPPED, "reason" => reason).increment(1);
            }
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // One statement for the batch; an event already recorded (redelivered) is left as it was.
        let sent: Vec<String> = sqlx::query_scalar(
            "INSERT INTO notifications (event_id, saga_id, order_id, kind, channel, subject, body, status, occurred_at)
             SELECT u.event_id, u.saga_id, u.order_id, u.kind, 'email', u.subject, u.body, 'SENT', u.occurred_at
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[])
                 AS u(event_id, saga_id, order_id, kind, subject, body, occurred_at)
             ON CONFLICT (event_id) DO NOTHING
             RETURNING kind",
        )
        .bind(notifications.iter().map(|n| n.event_id).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.saga_id).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.order_id.as_str()).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.kind).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.subject.as_str()).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.body.as_str()).collect::<Vec<_>>())
        .bind(notifications.iter().map(|n| n.occurred_at).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        let messages = dead.iter().map(|(m, _)| m.clone()).collect();
        let handed = outbox::insert_then_hand_off(&mut tx, self.handoff.as_ref(), messages).await?.since(started);
        tx.commit().await?;
        handed.send();
        for kind in &sent {
            counter!(SENT, "kind" => kind.clone()).increment(1);
        }
        let duplicates = notifications.len() - sent.len();
        counter!(SKIPPED, "reason" => "duplicate").increment(duplicates as u64);
        for reason in skipped {
            counter!(SKIPPED, "reason" => reason).increment(1);
        }
        for (message, label) in dead {
            dead_letter::count(message.topic.trim_end_matches(".dlq"), label);
        }
        Ok(())
    }

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn service(&self) -> &str {
        "notification-service"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(payload: serde_json::Value) -> Record {
        Record {
            topic: "saga-events".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: Some(serde_json::to_vec(&payload).unwrap()),
            headers: vec![(HEADER_MESSAGE_TYPE.into(), MESSAGE_TYPE_EVENT.as_bytes().to_vec())],
        }
    }

    fn event(event_type: &str, business_key: Option<&str>) -> serde_json::Value {
        json!({"schema_version": SCHEMA_VERSION, "event_id": uuid::Uuid::now_v7(), "event_type": event_type,
            "saga_id": uuid::Uuid::now_v7(), "saga_type": "order-fulfilment", "definition_version": 1,
            "business_key": business_key, "status": "FAILED", "version": 9,
            "failure": {"step": "charge_payment", "code": "PAYMENT_DECLINED", "message": "card declined"},
            "occurred_at": "2026-12-01T10:00:00Z"})
    }

    #[test]
    fn completed_and_failed_orders_notify_and_the_rest_is_skipped() {
        let decide_on = |v| decide(&parse(&record(v)).unwrap());
        match decide_on(event("saga.failed", Some("order-7"))) {
            Decision::Notify(n) => {
                assert_eq!(n.kind, "ORDER_FAILED");
                assert_eq!(n.order_id, "order-7");
                assert!(n.body.contains("card declined"), "{}", n.body);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide_on(event("saga.completed", Some("o"))),
            Decision::Notify(Notification { kind: "ORDER_CONFIRMED", .. })
        ));
        assert_eq!(decide_on(event("saga.started", Some("o"))), Decision::Skip("not_an_outcome"));
        assert_eq!(decide_on(event("saga.needs_attention", Some("o"))), Decision::Skip("not_an_outcome"));
        assert_eq!(decide_on(event("saga.completed", None)), Decision::Skip("no_order"));
    }

    #[test]
    fn what_is_not_a_lifecycle_event_is_refused_with_a_reason() {
        let label = |r: Record| parse(&r).unwrap_err().label;
        assert_eq!(label(record(json!({"schema_version": 1}))), "invalid_json");
        assert_eq!(label(Record { payload: Some(b"{not json".to_vec()), ..record(json!({})) }), "invalid_json");
        assert_eq!(label(Record { payload: None, ..record(json!({})) }), "empty");
        let mut wrong_type = record(event("saga.completed", Some("o")));
        wrong_type.headers = vec![(HEADER_MESSAGE_TYPE.into(), b"saga.command".to_vec())];
        assert_eq!(label(wrong_type), "message_type");
        let mut future = event("saga.completed", Some("o"));
        future["schema_version"] = json!(99);
        assert_eq!(label(record(future)), "schema_version");
        assert_eq!(label(record(event("saga.completed", Some("a\u{0}b")))), "unstorable");
    }
}
