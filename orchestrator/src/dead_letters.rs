//! The dead-letter topics of every consumer in the system (the orchestrator's and each
//! participant's), read by offset for on-call, and replayed to their source topic once the cause
//! is fixed. Each replay is recorded in `dead_letter_replays` (who, why, when).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use saga_runtime::config::KafkaConfig;
use saga_runtime::dead_letter::headers as h;
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;

/// How long one read of the dead-letter topics may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where dead letters are and how to re-publish them.
pub(crate) struct DeadLetters {
    kafka: KafkaConfig,
    /// Full names of the dead-letter topics, sorted.
    topics: Vec<String>,
    producer: FutureProducer,
}

/// One dead letter, as on-call sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct DeadLetter {
    /// `dlq-topic/partition@offset`: what `replay` takes.
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) source_topic: Option<String>,
    pub(crate) source_partition: Option<i32>,
    pub(crate) source_offset: Option<i64>,
    /// A short label: invalid_json, message_type, schema_version, empty, unknown_saga,
    /// unexpected_reply, unknown_definition, unknown_saga_type, invalid_input,
    /// idempotency_key_reused, keeps_failing.
    pub(crate) reason: Option<String>,
    pub(crate) error: Option<String>,
    /// The service that dead-lettered it.
    pub(crate) service: Option<String>,
    pub(crate) dead_lettered_at: Option<String>,
    pub(crate) key: Option<String>,
    /// The original payload, when it is UTF-8 text.
    pub(crate) payload: Option<String>,
    /// The original payload in base64, when it is not UTF-8.
    pub(crate) payload_base64: Option<String>,
    /// The original message's headers.
    pub(crate) headers: BTreeMap<String, String>,
    /// The latest replay, if any.
    pub(crate) replayed: Option<Replay>,
}

/// A recorded replay.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub(crate) struct Replay {
    pub(crate) replayed_at: chrono::DateTime<chrono::Utc>,
    pub(crate) actor: String,
    pub(crate) reason: String,
    /// How many times it was replayed in all.
    pub(crate) times: i64,
}

/// A dead letter with its original bytes, for a replay.
#[derive(Clone)]
pub(crate) struct Raw {
    pub(crate) view: DeadLetter,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Parses `topic/partition@offset`.
pub(crate) fn parse_id(id: &str) -> Option<(String, i32, i64)> {
    let (topic, rest) = id.rsplit_once('/')?;
    let (partition, offset) = rest.split_once('@')?;
    Some((topic.to_owned(), partition.parse().ok()?, offset.parse().ok()?))
}

impl DeadLetters {
    pub(crate) fn new(kafka: KafkaConfig, mut topics: Vec<String>, producer: FutureProducer) -> Self {
        topics.sort();
        topics.dedup();
        Self { kafka, topics, producer }
    }

    pub(crate) fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The full name of a dead-letter topic given as `saga-replies.dlq`, `saga-replies`, or with
    /// the topic prefix; `None` if it is none of ours.
    /// Every name [`Self::resolve`] accepts.
    pub(crate) fn accepted_names(&self) -> Vec<String> {
        let prefix = &self.kafka.kafka_topic_prefix;
        let mut names = Vec::new();
        for topic in &self.topics {
            let unprefixed = topic.strip_prefix(prefix.as_str()).unwrap_or(topic);
            for name in [topic.as_str(), unprefixed] {
                names.push(name.to_owned());
                names.push(name.trim_end_matches(".dlq").to_owned());
            }
        }
        names.sort();
        names.dedup();
        names
    }

    pub(crate) fn resolve(&self, name: &str) -> Option<String> {
        let name = if name.ends_with(".dlq") { name.to_owned() } else { format!("{name}.dlq") };
        let prefixed = self.kafka.topic(&name);
        self.topics.iter().find(|t| **t == name || **t == prefixed).cloned()
    }

    /// The newest `limit` dead letters of each topic in `topics` (all of ours when empty),
    /// newest first overall.
    pub(crate) async fn list(&self, topics: Vec<String>, limit: i64) -> anyhow::Result<Vec<Raw>> {
        let topics = if topics.is_empty() { self.topics.clone() } else { topics };
        let kafka = self.kafka.clone();
        tokio::task::spawn_blocking(move || {
            let reader = saga_runtime::kafka::reader(&kafka, "saga-orchestrator-dlq-reader")?;
            let mut all = Vec::new();
            for topic in &topics {
                all.extend(read_topic(&reader, topic, limit)?);
            }
            all.sort_by(|a, b| b.view.dead_lettered_at.cmp(&a.view.dead_lettered_at).then(b.view.id.cmp(&a.view.id)));
            all.truncate(limit.max(0) as usize);
            Ok(all)
        })
        .await?
    }

    /// One dead letter by position; `None` if it is not (or no longer) there.
    /// The dead letters at `wanted` (topic, partition, offset), in that order; `None` where there
    /// is none. One reader for all, each partition read once from its lowest wanted offset to
    /// its highest.
    pub(crate) async fn get_many(&self, wanted: Vec<(String, i32, i64)>) -> anyhow::Result<Vec<Option<Raw>>> {
        let kafka = self.kafka.clone();
        tokio::task::spawn_blocking(move || {
            let reader = saga_runtime::kafka::reader(&kafka, "saga-orchestrator-dlq-reader")?;
            let mut ranges: BTreeMap<&str, BTreeMap<i32, (i64, i64)>> = BTreeMap::new();
            for (topic, partition, offset) in &wanted {
                let range = ranges.entry(topic).or_default().entry(*partition).or_insert((*offset, *offset + 1));
                *range = (range.0.min(*offset), range.1.max(*offset + 1));
            }
            let mut found = Vec::new();
            for (topic, partitions) in ranges {
                let list: Vec<(i32, i64, i64)> = partitions.into_iter().map(|(p, (from, to))| (p, from, to)).collect();
                found.extend(read_range(&reader, topic, &list)?);
            }
            Ok(wanted
                .iter()
                .map(|(topic, partition, offset)| {
                    found
                        .iter()
                        .find(|r| r.view.topic == *topic && r.view.partition == *partition && r.view.offset == *offset)
                        .cloned()
                })
                .collect())
        })
        .await?
    }

    /// Re-publishes a dead letter to its source topic, without the `dlq-*` headers and with
    /// `dlq-replayed-from`, and waits for the broker to acknowledge it.
    pub(crate) async fn publish(&self, raw: &Raw) -> anyhow::Result<String> {
        let source = raw.view.source_topic.clone().context("the dead letter has no dlq-source-topic header")?;
        let mut headers = OwnedHeaders::new();
        for (name, value) in raw.headers.iter().filter(|(n, _)| !h::ALL.contains(&n.as_str()) && n != h::REPLAYED_FROM)
        {
            headers = headers.insert(Header { key: name, value: Some(value.as_slice()) });
        }
        headers = headers.insert(Header { key: h::REPLAYED_FROM, value: Some(raw.view.id.as_str()) });
        let mut record = FutureRecord::<[u8], [u8]>::to(&source).headers(headers);
        if let Some(key) = &raw.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = &raw.payload {
            record = record.payload(payload.as_slice());
        }
        self.producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        Ok(source)
    }
}

/// Fills in the latest replay of each dead letter.
pub(crate) async fn attach_replays(conn: &mut PgConnection, letters: &mut [Raw]) -> sqlx::Result<()> {
    for letter in letters.iter_mut() {
        letter.view.replayed = last_replay(conn, &letter.view).await?;
    }
    Ok(())
}

async fn last_replay(conn: &mut PgConnection, letter: &DeadLetter) -> sqlx::Result<Option<Replay>> {
    sqlx::query_as(
        "SELECT replayed_at, actor, reason, count(*) OVER () AS times FROM dead_letter_replays
         WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3
         ORDER BY replayed_at DESC LIMIT 1",
    )
    .bind(&letter.topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .fetch_optional(conn)
    .await
}

/// Records a replay (in the caller's transaction, committed once the broker acknowledged it).
pub(crate) async fn record_replay(
    conn: &mut PgConnection,
    letter: &DeadLetter,
    source_topic: &str,
    actor: &str,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO dead_letter_replays (dlq_topic, dlq_partition, dlq_offset, source_topic, actor, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&letter.topic)
    .bind(letter.partition)
    .bind(letter.offset)
    .bind(source_topic)
    .bind(actor)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// The newest `limit` messages of each partition of `topic` (none if the topic does not exist).
fn read_topic(reader: &BaseConsumer, topic: &str, limit: i64) -> anyhow::Result<Vec<Raw>> {
    let metadata = reader.fetch_metadata(Some(topic), READ_TIMEOUT)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else { return Ok(Vec::new()) };
    if found.error().is_some() {
        return Ok(Vec::new());
    }
    let mut ranges = Vec::new();
    for partition in found.partitions() {
        let (low, high) = reader.fetch_watermarks(topic, partition.id(), READ_TIMEOUT)?;
        if high > low {
            ranges.push((partition.id(), low.max(high - limit.max(1)), high));
        }
    }
    read_range(reader, topic, &ranges)
}

/// Reads `[from, to)` of each `(partition, from, to)`.
fn read_range(reader: &BaseConsumer, topic: &str, ranges: &[(i32, i64, i64)]) -> anyhow::Result<Vec<Raw>> {
    // A partition the topic does not have holds nothing (asking for it would fail the read).
    let metadata = reader.fetch_metadata(Some(topic), READ_TIMEOUT)?;
    let existing: BTreeSet<i32> =
        metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut assignment = TopicPartitionList::new();
    let mut pending: BTreeMap<i32, i64> = BTreeMap::new();
    for &(partition, from, to) in ranges.iter().filter(|(p, from, to)| to > from && *from >= 0 && existing.contains(p))
    {
        assignment.add_partition_offset(topic, partition, Offset::Offset(from))?;
        pending.insert(partition, to);
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    reader.assign(&assignment)?;
    let started = Instant::now();
    let mut done: BTreeSet<i32> = BTreeSet::new();
    let mut out = Vec::new();
    while done.len() < pending.len() && started.elapsed() < READ_TIMEOUT {
        match reader.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                done.insert(partition);
            }
            Some(Err(error)) => return Err(error.into()),
            Some(Ok(message)) => {
                let to = pending.get(&message.partition()).copied().unwrap_or(i64::MIN);
                if message.offset() < to {
                    out.push(raw(&message));
                }
                if message.offset() + 1 >= to {
                    done.insert(message.partition());
                }
            }
        }
    }
    reader.unassign()?;
    Ok(out)
}

fn raw(message: &impl Message) -> Raw {
    let headers: Vec<(String, Vec<u8>)> = message
        .headers()
        .map(|hs| hs.iter().map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec).unwrap_or_default())).collect())
        .unwrap_or_default();
    let text =
        |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    let payload = message.payload().map(<[u8]>::to_vec);
    let (text_payload, base64_payload) = match payload.as_deref().map(std::str::from_utf8) {
        Some(Ok(text)) => (Some(text.to_owned()), None),
        Some(Err(_)) => (None, payload.as_deref().map(|p| base64::engine::general_purpose::STANDARD.encode(p))),
        None => (None, None),
    };
    let view = DeadLetter {
        id: format!("{}/{}@{}", message.topic(), message.partition(), message.offset()),
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        source_topic: text(h::SOURCE_TOPIC),
        source_partition: text(h::SOURCE_PARTITION).and_then(|v| v.parse().ok()),
        source_offset: text(h::SOURCE_OFFSET).and_then(|v| v.parse().ok()),
        reason: text(h::REASON),
        error: text(h::ERROR),
        service: text(h::SERVICE),
        dead_lettered_at: text(h::AT),
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: text_payload,
        payload_base64: base64_payload,
        headers: headers
            .iter()
            .filter(|(k, _)| !h::ALL.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect(),
        replayed: None,
    };
    Raw { view, key: message.key().map(<[u8]>::to_vec), payload, headers }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_a_topic_partition_and_offset() {
        assert_eq!(parse_id("t1.saga-replies.dlq/2@17"), Some(("t1.saga-replies.dlq".into(), 2, 17)));
        assert_eq!(parse_id("a/b.dlq/0@0"), Some(("a/b.dlq".into(), 0, 0)));
        for bad in ["saga-replies.dlq", "x/1", "x/a@1", "x/1@b", "x/1@"] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }
}
