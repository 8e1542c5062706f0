//! The at-least-once batch consumer: takes whatever messages are ready (up to a batch size),
//! hands them to a handler that applies them in one database transaction, and stores their
//! offsets only after that succeeded. A failing batch is retried with backoff, never skipped.
//!
//! A message that fails every time it is applied would stall its partition. While the database
//! answers, failures are counted: after `max_failures` the batch is applied one message at a
//! time, and the one that still fails `max_failures` times is dead-lettered (see
//! [`crate::dead_letter`]) so the consumer can move on. While the database does not answer,
//! nothing is counted and nothing is dead-lettered: the batch waits for it.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures::StreamExt;
use metrics::{counter, describe_counter, describe_histogram, histogram};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// An owned copy of a consumed message.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    fn from_message(message: &BorrowedMessage<'_>) -> Self {
        let headers = message
            .headers()
            .map(|headers| {
                headers.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
            })
            .unwrap_or_default();
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Where the record came from, for logs and errors.
    pub fn position(&self) -> String {
        format!("{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// Applies a batch of records. An error means nothing of the batch was applied.
pub trait BatchHandler: Send + Sync {
    fn handle<'a>(&'a self, records: &'a [Record]) -> impl Future<Output = anyhow::Result<()>> + Send + 'a;

    /// The handler's database, where dead letters are written (through the outbox).
    fn pool(&self) -> &PgPool;

    /// The service's name, recorded on its dead letters.
    fn service(&self) -> &str;
}

/// How the consumer batches and when it gives up on a message.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub batch_size: usize,
    /// Failures of one message, while the database answers, before it is dead-lettered.
    pub max_failures: u32,
}

pub(crate) const CONSUMED: &str = "saga_consumer_messages_total";
pub(crate) const BATCH_SECONDS: &str = "saga_consumer_batch_duration_seconds";
pub(crate) const BATCH_FAILURES: &str = "saga_consumer_batch_failures_total";

pub(crate) fn describe_metrics() {
    describe_counter!(CONSUMED, "Messages consumed and applied, by topic");
    describe_histogram!(BATCH_SECONDS, metrics::Unit::Seconds, "Time to apply one batch of consumed messages");
    describe_counter!(BATCH_FAILURES, "Batches whose transaction failed and was retried");
    // At zero from the start, so that `rate()` and alerts see the first failure.
    metrics::counter!(BATCH_FAILURES).increment(0);
    crate::dead_letter::describe_metrics();
    metrics::describe_gauge!(
        crate::kafka::CONSUMER_LAG,
        "Messages not yet consumed and committed, by consumer group, topic and partition"
    );
}

/// Runs until `shutdown` is cancelled, then commits the stored offsets.
pub async fn run(
    consumer: &crate::kafka::GroupConsumer,
    settings: Settings,
    handler: &impl BatchHandler,
    shutdown: CancellationToken,
) {
    let mut stream = consumer.stream().ready_chunks(settings.batch_size.max(1));
    loop {
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => break,
            chunk = stream.next() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let mut records = Vec::with_capacity(chunk.len());
        for message in chunk {
            match message {
                Ok(message) => records.push(Record::from_message(&message)),
                Err(error) => tracing::warn!(%error, "consumer error"),
            }
        }
        if records.is_empty() {
            continue;
        }
        if !apply_or_dead_letter(&records, handler, settings.max_failures, &shutdown).await {
            break;
        }
        crate::crash_point!("consumer.after_commit");
        if let Err(error) = consumer.store_offsets(&next_offsets(&records)) {
            tracing::warn!(%error, "cannot store offsets; the batch may be redelivered and will be deduplicated");
        }
        for record in &records {
            counter!(CONSUMED, "topic" => record.topic.clone()).increment(1);
        }
    }
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing to commit is reported as an error too.
        tracing::debug!(%error, "final offset commit");
    }
}

/// Applies the batch, or failing that each record on its own, dead-lettering a record that keeps
/// failing. False if shutdown came first (nothing more is stored then).
async fn apply_or_dead_letter(
    records: &[Record],
    handler: &impl BatchHandler,
    max_failures: u32,
    shutdown: &CancellationToken,
) -> bool {
    match apply_with_retries(records, handler, max_failures, shutdown).await {
        Applied::Yes => return true,
        Applied::Shutdown => return false,
        Applied::KeepsFailing(_) if records.len() > 1 => {
            tracing::warn!(count = records.len(), "a batch keeps failing; applying its messages one at a time");
        }
        Applied::KeepsFailing(error) => return dead_letter(&records[0], handler, error, shutdown).await,
    }
    for record in records {
        match apply_with_retries(std::slice::from_ref(record), handler, max_failures, shutdown).await {
            Applied::Yes => {}
            Applied::Shutdown => return false,
            Applied::KeepsFailing(error) => {
                if !dead_letter(record, handler, error, shutdown).await {
                    return false;
                }
            }
        }
    }
    true
}

enum Applied {
    Yes,
    Shutdown,
    /// Failed `max_failures` times while the database answered: the last error.
    KeepsFailing(String),
}

fn backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Whether the database answers a trivial query: a failure while it does not is the database's,
/// not the message's.
async fn database_answers(pool: &PgPool) -> bool {
    tokio::time::timeout(Duration::from_secs(5), sqlx::query("SELECT 1").execute(pool)).await.is_ok_and(|r| r.is_ok())
}

/// Retries with backoff until the records apply, shutdown comes, or they failed `max_failures`
/// times while the database answered.
async fn apply_with_retries(
    records: &[Record],
    handler: &impl BatchHandler,
    max_failures: u32,
    shutdown: &CancellationToken,
) -> Applied {
    let mut backoff = backoff();
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let error = match handler.handle(records).await {
            Ok(()) => {
                histogram!(BATCH_SECONDS).record(started.elapsed().as_secs_f64());
                return Applied::Yes;
            }
            Err(error) => format!("{error:#}"),
        };
        counter!(BATCH_FAILURES).increment(1);
        let counts = database_answers(handler.pool()).await;
        if counts {
            failures += 1;
            if failures >= max_failures {
                return Applied::KeepsFailing(error);
            }
        }
        let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
        tracing::error!(
            error,
            first = records[0].position(),
            count = records.len(),
            failures,
            database_answers = counts,
            retry_in_ms = delay.as_millis() as u64,
            "applying a batch failed; retrying it"
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Applied::Shutdown,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Writes the dead letter, retrying until it is written or shutdown comes.
async fn dead_letter(
    record: &Record,
    handler: &impl BatchHandler,
    error: String,
    shutdown: &CancellationToken,
) -> bool {
    let reason = crate::dead_letter::Reason::new("keeps_failing", error);
    let message = crate::dead_letter::message(handler.service(), record, &reason);
    let mut backoff = backoff();
    loop {
        let written = async {
            let mut tx = handler.pool().begin().await?;
            crate::outbox::insert(&mut tx, std::slice::from_ref(&message)).await?;
            tx.commit().await
        };
        match written.await {
            Ok(()) => {
                crate::dead_letter::count(&record.topic, reason.label);
                return true;
            }
            Err(error) => {
                let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                tracing::error!(%error, position = record.position(), "cannot write a dead letter; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The offsets to store: one past the highest offset per partition.
fn next_offsets(records: &[Record]) -> TopicPartitionList {
    let mut highest: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for record in records {
        let entry = highest.entry((record.topic.as_str(), record.partition)).or_insert(record.offset);
        *entry = (*entry).max(record.offset);
    }
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in highest {
        list.add_partition_offset(topic, partition, Offset::Offset(offset + 1))
            .expect("a fresh list accepts any partition");
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record { topic: topic.into(), partition, offset, key: None, payload: None, headers: vec![] }
    }

    #[test]
    fn the_stored_offset_is_one_past_the_highest_per_partition() {
        let list = next_offsets(&[record("a", 0, 5), record("a", 0, 3), record("a", 1, 9), record("b", 0, 0)]);
        let got: Vec<(String, i32, Offset)> =
            list.elements().iter().map(|e| (e.topic().to_owned(), e.partition(), e.offset())).collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 0, Offset::Offset(6)),
                ("a".into(), 1, Offset::Offset(10)),
                ("b".into(), 0, Offset::Offset(1)),
            ]
        );
    }
}
