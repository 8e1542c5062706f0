//! The at-least-once batch consumer: takes whatever messages are ready (up to a batch size),
//! hands them to a handler that applies them in one database transaction, and stores their
//! offsets only after that succeeded. A failing batch is retried with backoff, never skipped.
//!
//! A message that fails every time it is applied would stall its partition. While the database
//! answers, failures are counted: after `max_failures` the batch is applied one message at a
//! time, and the one that still fails `max_failures` times is dead-lettered (see
//! [`crate::dead_letter`]) so the consumer can move on. While the database does not answer,
//! nothing is counted and nothing is dead-lettered: the batch waits for it.
//!
//! A panic while handling a batch is caught (the batch's transaction rolls back): the batch is
//! applied one message at a time, and the message that panics on its own is dead-lettered at
//! once with reason `panic`. The consumer goes on with the next.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures::{FutureExt, StreamExt};
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

    /// Topics whose intake must wait now (backpressure): the consumer pauses their assigned
    /// partitions, so that their messages wait in Kafka, and resumes them once this no longer
    /// names them. Asked before every batch and at least every [`PAUSE_RECHECK`].
    fn paused_topics(&self) -> impl Future<Output = Vec<String>> + Send {
        async { Vec::new() }
    }
}

/// How often a consumer asks again which topics must wait, when no message comes to wake it: an
/// idle consumer must pause before the next message arrives, not after taking it.
pub const PAUSE_RECHECK: Duration = Duration::from_millis(50);

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
pub(crate) const PANICS: &str = "saga_consumer_panics_total";

pub(crate) fn describe_metrics() {
    describe_counter!(CONSUMED, "Messages consumed and applied, by topic");
    describe_histogram!(BATCH_SECONDS, metrics::Unit::Seconds, "Time to apply one batch of consumed messages");
    describe_counter!(BATCH_FAILURES, "Batches whose transaction failed and was retried");
    // At zero from the start, so that `rate()` and alerts see the first failure.
    metrics::counter!(BATCH_FAILURES).increment(0);
    describe_counter!(
        PANICS,
        "Batches whose handling panicked (the message that panics alone is dead-lettered, reason panic)"
    );
    metrics::counter!(PANICS).increment(0);
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
    let mut pauses = Pauses::default();
    loop {
        pauses.apply(consumer, handler.paused_topics().await);
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(PAUSE_RECHECK) => continue,
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
        // A topic that must wait now may have been fetched while this consumer waited for
        // messages, just before its pause: its records are not applied but fetched again after
        // the resume (their partitions are sought back to the first of them).
        let waiting = handler.paused_topics().await;
        if !waiting.is_empty() && records.iter().any(|r| waiting.contains(&r.topic)) {
            pauses.apply(consumer, waiting.clone());
            let (held, kept): (Vec<Record>, Vec<Record>) =
                records.into_iter().partition(|r| waiting.contains(&r.topic));
            records = kept;
            if !hold_back(consumer, &held) {
                records.extend(held);
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

/// Seeks the partitions of `held` back to their first record, so that they are fetched again.
/// False if a seek failed (the caller then applies them now; a record fetched twice is
/// deduplicated like any redelivery).
fn hold_back(consumer: &crate::kafka::GroupConsumer, held: &[Record]) -> bool {
    let mut first: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for record in held {
        let entry = first.entry((record.topic.as_str(), record.partition)).or_insert(record.offset);
        *entry = (*entry).min(record.offset);
    }
    for ((topic, partition), offset) in first {
        if let Err(error) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(1)) {
            tracing::warn!(%error, topic, partition, offset, "cannot seek back a paused partition; applying its records now");
            return false;
        }
        tracing::info!(topic, partition, offset, "records of a paused topic held back until it resumes");
    }
    true
}

/// The partitions this consumer paused, and the assignment they were paused under.
#[derive(Default)]
struct Pauses {
    paused: BTreeSet<(String, i32)>,
    assignment: Vec<(String, i32)>,
}

impl Pauses {
    /// Pauses the assigned partitions of `topics` and resumes the others it paused. After a
    /// rebalance every partition of a paused topic is paused again, new or not.
    fn apply(&mut self, consumer: &crate::kafka::GroupConsumer, topics: Vec<String>) {
        if topics.is_empty() && self.paused.is_empty() {
            return;
        }
        let assignment: Vec<(String, i32)> = match consumer.assignment() {
            Ok(list) => list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer's assignment");
                return;
            }
        };
        let rebalanced = assignment != self.assignment;
        let wanted: BTreeSet<(String, i32)> =
            assignment.iter().filter(|(topic, _)| topics.contains(topic)).cloned().collect();
        let to_pause: Vec<&(String, i32)> =
            wanted.iter().filter(|tp| rebalanced || !self.paused.contains(*tp)).collect();
        let to_resume: Vec<&(String, i32)> =
            self.paused.iter().filter(|tp| !wanted.contains(*tp) && assignment.contains(tp)).collect();
        let list = |partitions: &[&(String, i32)]| {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in partitions {
                list.add_partition(topic, *partition);
            }
            list
        };
        if !to_pause.is_empty() {
            match consumer.pause(&list(&to_pause)) {
                Ok(()) => tracing::info!(partitions = to_pause.len(), ?topics, "intake paused (backpressure)"),
                Err(error) => tracing::warn!(%error, "cannot pause partitions"),
            }
        }
        if !to_resume.is_empty() {
            match consumer.resume(&list(&to_resume)) {
                Ok(()) => tracing::info!(partitions = to_resume.len(), "intake resumed"),
                Err(error) => tracing::warn!(%error, "cannot resume partitions"),
            }
        }
        self.paused = wanted;
        self.assignment = assignment;
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
        Applied::KeepsFailing(error) => {
            return dead_letter(&records[0], handler, "keeps_failing", error, shutdown).await
        }
        Applied::Panicked(_) if records.len() > 1 => {
            tracing::warn!(count = records.len(), "handling a batch panicked; applying its messages one at a time");
        }
        Applied::Panicked(message) => return dead_letter(&records[0], handler, "panic", message, shutdown).await,
    }
    for record in records {
        match apply_with_retries(std::slice::from_ref(record), handler, max_failures, shutdown).await {
            Applied::Yes => {}
            Applied::Shutdown => return false,
            Applied::KeepsFailing(error) => {
                if !dead_letter(record, handler, "keeps_failing", error, shutdown).await {
                    return false;
                }
            }
            Applied::Panicked(message) => {
                if !dead_letter(record, handler, "panic", message, shutdown).await {
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
    /// The handler panicked: a bug that would panic again on every try, so it is not retried.
    Panicked(String),
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
        // A panic unwinds out of the handler's transaction, which is rolled back when dropped.
        let error = match AssertUnwindSafe(handler.handle(records)).catch_unwind().await {
            Ok(Ok(())) => {
                histogram!(BATCH_SECONDS).record(started.elapsed().as_secs_f64());
                return Applied::Yes;
            }
            Ok(Err(error)) => format!("{error:#}"),
            Err(panic) => {
                let message = crate::supervisor::panic_message(panic.as_ref());
                counter!(PANICS).increment(1);
                tracing::error!(
                    panic = message,
                    first = records[0].position(),
                    count = records.len(),
                    "handling a batch panicked"
                );
                return Applied::Panicked(format!("handling the message panicked: {message}"));
            }
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
    label: &'static str,
    error: String,
    shutdown: &CancellationToken,
) -> bool {
    let reason = crate::dead_letter::Reason::new(label, error);
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
