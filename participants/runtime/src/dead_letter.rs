//! Dead letters: a message that cannot be applied (unreadable, an unknown type or schema version,
//! about a saga or step that does not exist, or failing every time it is applied) is copied to
//! `<topic>.dlq` through the outbox, in the transaction that moves the consumer past it. The copy
//! keeps the original key, payload bytes and headers, and adds `dlq-*` headers saying where it
//! came from and why. Nothing is lost and the consumer never stalls on it; `sagactl dlq replay`
//! re-publishes it to its source topic once the cause is fixed.

use metrics::{counter, describe_counter};

use crate::consumer::Record;
use crate::outbox::{OutboxMessage, Payload};

/// Header names added to a dead letter (and stripped again by a replay).
pub mod headers {
    pub const SOURCE_TOPIC: &str = "dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "dlq-source-offset";
    /// A short, stable label (`invalid_json`, `unknown_saga`, ...).
    pub const REASON: &str = "dlq-reason";
    /// The error, for people.
    pub const ERROR: &str = "dlq-error";
    /// When it was dead-lettered (RFC 3339).
    pub const AT: &str = "dlq-dead-lettered-at";
    /// Which service dead-lettered it.
    pub const SERVICE: &str = "dlq-service";
    /// Set on a replayed message: the dead letter it came from (`topic/partition@offset`).
    pub const REPLAYED_FROM: &str = "dlq-replayed-from";
    /// Every header a dead letter adds.
    pub const ALL: &[&str] = &[SOURCE_TOPIC, SOURCE_PARTITION, SOURCE_OFFSET, REASON, ERROR, AT, SERVICE];
}

/// What a dead-letter topic's name ends with.
pub const SUFFIX: &str = ".dlq";

/// The dead-letter topic of `topic`.
pub fn topic_of(topic: &str) -> String {
    format!("{topic}{SUFFIX}")
}

/// Why a message is dead-lettered: a bounded label (metrics) and the error (headers, logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub label: &'static str,
    pub error: String,
}

impl Reason {
    pub fn new(label: &'static str, error: impl ToString) -> Self {
        Self { label, error: error.to_string() }
    }
}

pub(crate) const DEAD_LETTERED: &str = "saga_dead_letters_total";

pub(crate) fn describe_metrics() {
    describe_counter!(DEAD_LETTERED, "Messages copied to a dead-letter topic, by source topic and reason");
}

/// The outbox message that dead-letters `record` (insert it in the transaction that moves past it).
pub fn message(service: &str, record: &Record, reason: &Reason) -> OutboxMessage {
    tracing::warn!(
        position = record.position(),
        reason = reason.label,
        error = reason.error,
        "dead-lettering a message"
    );
    let mut headers: Vec<(String, String)> =
        record.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect();
    headers.retain(|(k, _)| !headers::ALL.contains(&k.as_str()));
    headers.extend([
        (headers::SOURCE_TOPIC.to_owned(), record.topic.clone()),
        (headers::SOURCE_PARTITION.to_owned(), record.partition.to_string()),
        (headers::SOURCE_OFFSET.to_owned(), record.offset.to_string()),
        (headers::REASON.to_owned(), reason.label.to_owned()),
        (headers::ERROR.to_owned(), truncate(&reason.error, 2000)),
        (headers::AT.to_owned(), chrono::Utc::now().to_rfc3339()),
        (headers::SERVICE.to_owned(), service.to_owned()),
    ]);
    OutboxMessage {
        topic: topic_of(&record.topic),
        key: record.key.clone().unwrap_or_default(),
        message_type: None,
        payload: Payload::Raw(record.payload.clone()),
        headers,
    }
}

/// Counts dead letters once their transaction has committed.
pub fn count(topic: &str, label: &'static str) {
    counter!(DEAD_LETTERED, "topic" => topic.to_owned(), "reason" => label).increment(1);
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_the_original_and_says_where_it_came_from() {
        let record = Record {
            topic: "p.saga-replies".into(),
            partition: 2,
            offset: 41,
            key: Some("k".into()),
            payload: Some(vec![0xff, b'{']),
            headers: vec![("message-type".into(), b"saga.reply".to_vec()), (headers::REASON.into(), b"old".to_vec())],
        };
        let message = message("saga-orchestrator", &record, &Reason::new("invalid_json", "expected value"));
        assert_eq!(message.topic, "p.saga-replies.dlq");
        assert_eq!(message.key, "k");
        assert_eq!(message.message_type, None);
        assert_eq!(message.payload, Payload::Raw(Some(vec![0xff, b'{'])));
        let get =
            |name: &str| message.headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        assert_eq!(get("message-type"), ["saga.reply"]);
        assert_eq!(get(headers::SOURCE_TOPIC), ["p.saga-replies"]);
        assert_eq!(get(headers::SOURCE_PARTITION), ["2"]);
        assert_eq!(get(headers::SOURCE_OFFSET), ["41"]);
        assert_eq!(get(headers::REASON), ["invalid_json"], "an earlier dead letter's headers are replaced");
        assert_eq!(get(headers::ERROR), ["expected value"]);
        assert_eq!(truncate("ab€d", 3), "ab€…");
    }
}
