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
use metrics::{counter, describe_counter, describe_histogram, gauge, histogram};
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
    /// How long to wait for a batch to fill once its first message arrived; zero takes what is
    /// ready.
    pub batch_wait: Duration,
    /// Failures of one message, while the database answers, before it is dead-lettered.
    pub max_failures: u32,
    /// How long a consumer may be out of its group, or starved of messages that wait for it,
    /// before it is replaced ([`GroupWatch`]); zero never replaces it.
    pub stall_timeout: Duration,
    /// How long one starvation probe may wait for the broker ([`GroupWatch`]).
    pub probe_budget: Duration,
}

pub(crate) const CONSUMED: &str = "saga_consumer_messages_total";
pub(crate) const BATCH_SECONDS: &str = "saga_consumer_batch_duration_seconds";
pub(crate) const BATCH_FAILURES: &str = "saga_consumer_batch_failures_total";
pub(crate) const PANICS: &str = "saga_consumer_panics_total";
pub(crate) const REJOINS: &str = "saga_consumer_rejoins_total";
pub(crate) const IN_GROUP: &str = "saga_consumer_in_group";
pub(crate) const DELIVERY_SECONDS: &str = "saga_consumer_delivery_seconds";

/// Milliseconds since the Unix epoch, the clock of Kafka's timestamps.
fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// From a record's Kafka timestamp (its producer's hand-off, or the broker's append with
/// `LogAppendTime`) to its consumer taking it up, in seconds; 0 when the clocks disagree.
fn delivery_seconds(created_millis: i64, taken_up_millis: i64) -> f64 {
    taken_up_millis.saturating_sub(created_millis).max(0) as f64 / 1000.0
}

pub(crate) fn describe_metrics() {
    describe_counter!(CONSUMED, "Messages consumed and applied, by topic");
    describe_histogram!(BATCH_SECONDS, metrics::Unit::Seconds, "Time to apply one batch of consumed messages");
    describe_histogram!(
        DELIVERY_SECONDS,
        metrics::Unit::Seconds,
        "From a record's Kafka timestamp (its hand-off to the producer) to this consumer taking it up for a batch, by topic: \
         the producer's linger, the broker, the fetch, and the wait behind the batch before it"
    );
    describe_counter!(BATCH_FAILURES, "Batches whose transaction failed and was retried");
    // At zero from the start, so that `rate()` and alerts see the first failure.
    metrics::counter!(BATCH_FAILURES).increment(0);
    describe_counter!(
        PANICS,
        "Batches whose handling panicked (the message that panics alone is dead-lettered, reason panic)"
    );
    metrics::counter!(PANICS).increment(0);
    describe_counter!(
        REJOINS,
        "Consumers replaced by a new one that joined the group afresh, by reason (out_of_group: not a member \
         for the stall timeout while a broker was up; starved: messages waiting on its partitions and none received)"
    );
    for reason in ["out_of_group", "starved"] {
        metrics::counter!(REJOINS, "reason" => reason).increment(0);
    }
    metrics::describe_gauge!(
        IN_GROUP,
        "1 while the consumer is a member of its group (librdkafka group state up/steady), else 0; from the statistics report"
    );
    crate::dead_letter::describe_metrics();
    metrics::describe_gauge!(
        crate::kafka::CONSUMER_LAG,
        "Messages not yet consumed and committed, by consumer group, topic and partition"
    );
}

/// Runs until `shutdown` is cancelled, then commits the stored offsets. A consumer that stalls
/// ([`GroupWatch`]) is replaced by one from `remake`, which joins the group afresh.
pub async fn run(
    mut consumer: crate::kafka::GroupConsumer,
    remake: impl Fn() -> rdkafka::error::KafkaResult<crate::kafka::GroupConsumer>,
    settings: Settings,
    handler: &impl BatchHandler,
    shutdown: CancellationToken,
) {
    loop {
        let Some(stall) = consume(&consumer, settings, handler, &shutdown).await else {
            final_commit(&consumer);
            return;
        };
        counter!(REJOINS, "reason" => stall.kind()).increment(1);
        tracing::error!(
            reason = %stall,
            "the consumer stalled; replacing it with a new one that joins its group afresh"
        );
        // Committing and closing (which leaves the group) may wait on a coordinator that does
        // not answer: the old consumer does both on a thread of its own while the new one joins.
        std::thread::spawn(move || {
            final_commit(&consumer);
            drop(consumer);
        });
        consumer = loop {
            match blocking(&remake) {
                Ok(consumer) => break consumer,
                Err(error) => {
                    tracing::error!(%error, "cannot create a new consumer; trying again in 5 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        };
    }
}

/// Commits the offsets stored since the last automatic commit.
fn final_commit(consumer: &crate::kafka::GroupConsumer) {
    if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing to commit is reported as an error too.
        tracing::debug!(%error, "final offset commit");
    }
}

/// Adds to `chunk` what arrives within `wait` of now, up to about `size` messages (a chunk of the
/// stream holds at most `size`, so the batch may end up to one chunk larger).
async fn fill<T, S: futures::Stream<Item = Vec<T>> + Unpin>(
    mut chunk: Vec<T>,
    stream: &mut S,
    size: usize,
    wait: Duration,
) -> Vec<T> {
    if wait.is_zero() {
        return chunk;
    }
    let deadline = tokio::time::Instant::now() + wait;
    while chunk.len() < size {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(more)) => chunk.extend(more),
            Ok(None) | Err(_) => break,
        }
    }
    chunk
}

/// Consumes until `shutdown` (`None`) or until the consumer stalls.
async fn consume(
    consumer: &crate::kafka::GroupConsumer,
    settings: Settings,
    handler: &impl BatchHandler,
    shutdown: &CancellationToken,
) -> Option<Stall> {
    let mut stream = consumer.stream().ready_chunks(settings.batch_size.max(1));
    let mut pauses = Pauses::default();
    let mut watch = GroupWatch::new(settings.stall_timeout);
    let mut idle_since = Some(Instant::now());
    loop {
        pauses.apply(consumer, handler.paused_topics().await);
        let report = consumer.context().group_report();
        if let Some(report) = &report {
            gauge!(IN_GROUP).set(if report.in_group { 1.0 } else { 0.0 });
            if let Some(stall) = watch.observe(report) {
                return Some(stall);
            }
        }
        // Probed only as a member with a broker up: out of the group is the report's to judge,
        // and a broker outage is librdkafka's to ride out.
        let now = Instant::now();
        let member = report.as_ref().is_none_or(|r| r.in_group && r.broker_up);
        if member && watch.probe_due(now, idle_since) {
            let waiting = blocking(|| waiting_partitions(consumer, &pauses.paused, settings.probe_budget));
            if let Some(stall) = watch.observe_probe(now, idle_since, waiting) {
                return Some(stall);
            }
        }
        idle_since.get_or_insert_with(Instant::now);
        let chunk = tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(PAUSE_RECHECK) => continue,
            chunk = stream.next() => match chunk {
                Some(chunk) => chunk,
                None => return None,
            },
        };
        idle_since = None;
        let chunk = fill(chunk, &mut stream, settings.batch_size, settings.batch_wait).await;
        let mut records = Vec::with_capacity(chunk.len());
        let taken_up = now_millis();
        for message in chunk {
            match message {
                Ok(message) => {
                    if let Some(created) = message.timestamp().to_millis() {
                        let seconds = delivery_seconds(created, taken_up);
                        histogram!(DELIVERY_SECONDS, "topic" => message.topic().to_owned()).record(seconds);
                    }
                    records.push(Record::from_message(&message))
                }
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
        if !apply_or_dead_letter(&records, handler, settings.max_failures, shutdown).await {
            return None;
        }
        crate::crash_point!("consumer.after_commit");
        if let Err(error) = consumer.store_offsets(&next_offsets(&records)) {
            tracing::warn!(%error, "cannot store offsets; the batch may be redelivered and will be deduplicated");
        }
        for record in &records {
            counter!(CONSUMED, "topic" => record.topic.clone()).increment(1);
        }
        inject_stall(consumer);
    }
}

/// Fault injection: `consumer.stall=1*return(starve)` pauses every assigned partition behind the
/// consumer's back (a member that stopped fetching), `return(leave)` unsubscribes (a member that
/// fell out of its group and does not come back). Both are what [`GroupWatch`] must notice.
fn inject_stall(consumer: &crate::kafka::GroupConsumer) {
    let Some(fault) = crate::faults::fail::eval("consumer.stall", |arg| arg).flatten() else { return };
    tracing::warn!(fault, "fault injection: the consumer stalls");
    if fault == "leave" {
        consumer.unsubscribe();
    } else if let Err(error) = consumer.assignment().and_then(|assigned| consumer.pause(&assigned)) {
        tracing::warn!(%error, "fault injection: cannot stall the consumer");
    }
}

/// Why a consumer is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stall {
    /// Not a member of its group (librdkafka's group state not `up/steady`) for the stall
    /// timeout while a broker connection is up.
    OutOfGroup { state: String, for_seconds: u64 },
    /// Assigned partitions it has not paused had messages waiting for the stall timeout while it
    /// waited for messages and received none.
    Starved { partitions: Vec<(String, i32)>, for_seconds: u64 },
}

impl Stall {
    fn kind(&self) -> &'static str {
        match self {
            Stall::OutOfGroup { .. } => "out_of_group",
            Stall::Starved { .. } => "starved",
        }
    }
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stall::OutOfGroup { state, for_seconds } => write!(
                f,
                "not a member of its consumer group for {for_seconds} s (group state {state}) while a broker is reachable"
            ),
            Stall::Starved { partitions, for_seconds } => {
                let list: Vec<String> = partitions.iter().map(|(t, p)| format!("{t}/{p}")).collect();
                write!(
                    f,
                    "messages waiting on its partitions {} for {for_seconds} s, and none received",
                    list.join(", ")
                )
            }
        }
    }
}

/// Watches that a consumer takes part in its group and takes what waits for it. librdkafka
/// recovers from a broker outage, a rebalance or a fenced member on its own; when it does not
/// (ADR 12: a member that never heartbeats again after its broker stalled), the process is up,
/// `/ready` says so, and nothing is consumed. After `limit` of that the consumer is replaced.
/// - Out of its group: librdkafka's statistics report a group state other than `up/steady` for
///   `limit` while a broker connection is up (a broker outage is librdkafka's to ride out).
/// - Starved: the consumer has received nothing for `limit`, and the brokers' high watermarks
///   of assigned partitions it has not paused itself stay above its position for one more probe
///   ([`GroupWatch::probe_every`]) on the same partitions.
///
/// An idle member with no partitions (more replicas than partitions) is left alone.
pub(crate) struct GroupWatch {
    /// Zero turns the watch off.
    limit: Duration,
    last_report: Option<Instant>,
    out_of_group_since: Option<Instant>,
    last_probe: Option<Instant>,
    /// Partitions a probe found with messages waiting, and when.
    suspect: Option<(Instant, BTreeSet<(String, i32)>)>,
}

impl GroupWatch {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, last_report: None, out_of_group_since: None, last_probe: None, suspect: None }
    }

    /// How often an idle consumer's partitions are probed, once it has been idle for the limit.
    fn probe_every(&self) -> Duration {
        self.limit.min(Duration::from_secs(5))
    }

    /// Looks at a statistics report once (the same report again changes nothing).
    pub(crate) fn observe(&mut self, report: &crate::kafka::GroupReport) -> Option<Stall> {
        if self.limit.is_zero() || self.last_report == Some(report.at) {
            return None;
        }
        self.last_report = Some(report.at);
        if report.in_group || !report.broker_up {
            self.out_of_group_since = None;
            return None;
        }
        let since = *self.out_of_group_since.get_or_insert(report.at);
        let out = report.at.saturating_duration_since(since);
        (out >= self.limit).then(|| Stall::OutOfGroup { state: report.state.clone(), for_seconds: out.as_secs() })
    }

    /// Whether to probe the partitions now: the consumer has waited for messages (`idle_since`,
    /// `None` while it applies a batch) for the limit, and the last probe is old enough.
    pub(crate) fn probe_due(&self, now: Instant, idle_since: Option<Instant>) -> bool {
        !self.limit.is_zero()
            && idle_since.is_some_and(|idle| now.saturating_duration_since(idle) >= self.limit)
            && self.last_probe.is_none_or(|probe| now.saturating_duration_since(probe) >= self.probe_every())
    }

    /// A probe's finding: the assigned, unpaused partitions whose high watermark is above the
    /// consumer's position.
    pub(crate) fn observe_probe(
        &mut self,
        now: Instant,
        idle_since: Option<Instant>,
        waiting: BTreeSet<(String, i32)>,
    ) -> Option<Stall> {
        self.last_probe = Some(now);
        let Some(idle) = idle_since else {
            self.suspect = None;
            return None;
        };
        if let Some((at, before)) = &self.suspect {
            // Still idle since before the first finding, and still waiting: a stall once a whole
            // probe interval has passed since that finding.
            let still: Vec<(String, i32)> = waiting.intersection(before).cloned().collect();
            if idle <= *at && !still.is_empty() {
                let stalled = now.saturating_duration_since(*at) >= self.probe_every();
                return stalled.then(|| Stall::Starved {
                    partitions: still,
                    for_seconds: now.saturating_duration_since(idle).as_secs(),
                });
            }
        }
        self.suspect = (!waiting.is_empty()).then_some((now, waiting));
        None
    }
}

/// Runs a blocking librdkafka call off the async workers when the runtime has several.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(call),
        _ => call(),
    }
}

/// The assigned partitions, other than `paused`, whose high watermark on the broker is above the
/// consumer's position (or, before it fetched any, the group's committed offset, or else the
/// partition's first offset). Bounded to `budget` in all ([`Settings::probe_budget`]), so that a
/// broker that stops answering cannot hold up the consume loop (its shutdown, its pauses); what
/// could not be read in time is left out.
///
/// The ends of all partitions are asked for in one request per broker: on the consumer's
/// connection the broker answers only after the fetch in flight, which an idle consumer holds
/// for up to `fetch.wait.max.ms`, so asking partition by partition took that long for each.
fn waiting_partitions(
    consumer: &crate::kafka::GroupConsumer,
    paused: &BTreeSet<(String, i32)>,
    budget: Duration,
) -> BTreeSet<(String, i32)> {
    let deadline = Instant::now() + budget;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut waiting = BTreeSet::new();
    let Ok(positions) = consumer.position() else { return waiting };
    let probed: Vec<(String, i32, Option<i64>)> = positions
        .elements()
        .iter()
        .filter(|e| !paused.contains(&(e.topic().to_owned(), e.partition())))
        .map(|e| {
            let position = match e.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            (e.topic().to_owned(), e.partition(), position)
        })
        .collect();
    if probed.is_empty() {
        return waiting;
    }
    let committed = if probed.iter().any(|(_, _, p)| p.is_none()) { consumer.committed(left()).ok() } else { None };
    let offset_in = |list: &TopicPartitionList, topic: &str, partition: i32| match list
        .find_partition(topic, partition)
        .filter(|e| e.error().is_ok())?
        .offset()
    {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    };
    // Where each partition's consumer stands: its position, its group's committed offset, or
    // (neither known) the partition's start, looked up only for those.
    let mut from: Vec<(String, i32, Option<i64>)> = probed
        .into_iter()
        .map(|(topic, partition, position)| {
            let position = position.or_else(|| committed.as_ref().and_then(|c| offset_in(c, &topic, partition)));
            (topic, partition, position)
        })
        .collect();
    let ends = |list: Vec<(&str, i32)>, at: Offset| -> Option<TopicPartitionList> {
        let mut query = TopicPartitionList::new();
        for (topic, partition) in list {
            query.add_partition_offset(topic, partition, at).ok()?;
        }
        consumer.offsets_for_times(query, left()).ok()
    };
    let unknown: Vec<(&str, i32)> =
        from.iter().filter(|(_, _, p)| p.is_none()).map(|(t, p, _)| (t.as_str(), *p)).collect();
    if !unknown.is_empty() {
        let Some(starts) = ends(unknown, Offset::Beginning) else { return waiting };
        for (topic, partition, position) in &mut from {
            if position.is_none() {
                *position = offset_in(&starts, topic, *partition);
            }
        }
    }
    let Some(highs) = ends(from.iter().map(|(t, p, _)| (t.as_str(), *p)).collect(), Offset::End) else {
        return waiting;
    };
    for (topic, partition, position) in from {
        if let (Some(position), Some(high)) = (position, offset_in(&highs, &topic, partition)) {
            if high > position {
                waiting.insert((topic, partition));
            }
        }
    }
    waiting
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
    fn a_delivery_lasts_from_the_records_timestamp_to_its_take_up_and_never_less_than_zero() {
        assert_eq!(delivery_seconds(1_000, 1_250), 0.25);
        // A producer whose clock runs ahead.
        assert_eq!(delivery_seconds(2_000, 1_000), 0.0);
        assert_eq!(delivery_seconds(i64::MIN, i64::MAX), i64::MAX as f64 / 1000.0);
    }

    /// A batch waits at most `wait` after its first message, and no longer once full.
    #[tokio::test(start_paused = true)]
    async fn a_batch_fills_for_its_timeout_or_until_full() {
        use futures::StreamExt;
        let wait = Duration::from_millis(100);
        // Chunks arriving every 30 ms: 100 ms take three more.
        let slow = || {
            futures::stream::iter(1..100).then(|i| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                vec![i]
            })
        };
        let mut stream = Box::pin(slow());
        assert_eq!(fill(vec![0], &mut stream, 200, wait).await, vec![0, 1, 2, 3]);
        let mut stream = Box::pin(slow());
        assert_eq!(fill(vec![0], &mut stream, 3, wait).await, vec![0, 1, 2], "stops once full");
        let mut stream = Box::pin(slow());
        assert_eq!(fill(vec![0], &mut stream, 200, Duration::ZERO).await, vec![0], "no wait: as it came");
        let mut ended = Box::pin(futures::stream::iter(vec![vec![1], vec![2]]));
        assert_eq!(fill(vec![0], &mut ended, 200, wait).await, vec![0, 1, 2], "the stream's end ends it");
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

    mod group_watch {
        use super::super::*;
        use crate::kafka::GroupReport;

        const LIMIT: Duration = Duration::from_secs(60);

        fn report(at: Instant, state: &str, broker_up: bool) -> GroupReport {
            GroupReport { state: state.to_owned(), in_group: state == "up/steady", assigned: 3, broker_up, at }
        }

        /// A report every 5 s from `t0` for `seconds`; the first stall and when.
        fn reports(
            watch: &mut GroupWatch,
            t0: Instant,
            seconds: u64,
            make: impl Fn(Instant) -> GroupReport,
        ) -> Option<(u64, Stall)> {
            (0..=seconds).step_by(5).find_map(|s| watch.observe(&make(t0 + Duration::from_secs(s))).map(|x| (s, x)))
        }

        /// The consume loop's probing, every second from `t0` for `seconds`; the first stall and when.
        fn probes(
            watch: &mut GroupWatch,
            t0: Instant,
            seconds: u64,
            idle_since: impl Fn(Instant) -> Option<Instant>,
            waiting: impl Fn(Instant) -> Vec<(&'static str, i32)>,
        ) -> Option<(u64, Stall)> {
            (0..=seconds).find_map(|s| {
                let now = t0 + Duration::from_secs(s);
                if !watch.probe_due(now, idle_since(now)) {
                    return None;
                }
                let found = waiting(now).into_iter().map(|(t, p)| (t.to_owned(), p)).collect();
                watch.observe_probe(now, idle_since(now), found).map(|x| (s, x))
            })
        }

        #[test]
        fn a_member_out_of_its_group_while_a_broker_is_up_is_replaced_after_the_limit() {
            let (t0, mut watch) = (Instant::now(), GroupWatch::new(LIMIT));
            let stall = reports(&mut watch, t0, 120, |at| report(at, "up/init", true));
            assert_eq!(stall, Some((60, Stall::OutOfGroup { state: "up/init".into(), for_seconds: 60 })));
        }

        #[test]
        fn a_broker_outage_or_rebalances_shorter_than_the_limit_are_left_to_librdkafka() {
            let (t0, mut watch) = (Instant::now(), GroupWatch::new(LIMIT));
            // Ten minutes with the broker away: nothing a new consumer would do better.
            assert_eq!(reports(&mut watch, t0, 600, |at| report(at, "wait-coord/steady", false)), None);
            // Rebalances of 55 s, back in the group between them.
            let rebalancing = |at: Instant| {
                let s = at.duration_since(t0).as_secs();
                report(at, if s % 60 < 55 { "up/wait-join" } else { "up/steady" }, true)
            };
            assert_eq!(reports(&mut watch, t0 + Duration::from_secs(600), 600, rebalancing), None);
        }

        #[test]
        fn the_same_report_seen_again_counts_once() {
            let (t0, mut watch) = (Instant::now(), GroupWatch::new(LIMIT));
            let late = report(t0 + LIMIT, "up/init", true);
            assert_eq!(watch.observe(&report(t0, "up/init", true)), None);
            assert!(watch.observe(&late).is_some());
            assert_eq!(watch.observe(&late), None, "looked at once");
        }

        #[test]
        fn messages_waiting_while_the_consumer_receives_none_replace_it_one_probe_after_the_limit() {
            let (t0, mut watch) = (Instant::now(), GroupWatch::new(LIMIT));
            let stall = probes(&mut watch, t0, 120, |_| Some(t0), |_| vec![("commands", 1)]);
            assert_eq!(stall, Some((65, Stall::Starved { partitions: vec![("commands".into(), 1)], for_seconds: 65 })));
        }

        #[test]
        fn an_idle_consumer_is_not_probed_before_the_limit_nor_more_than_every_five_seconds() {
            let (t0, mut watch) = (Instant::now(), GroupWatch::new(LIMIT));
            let mut probed = Vec::new();
            for s in 0..=80 {
                let now = t0 + Duration::from_secs(s);
                if watch.probe_due(now, Some(t0)) {
                    probed.push(s);
                    assert_eq!(watch.observe_probe(now, Some(t0), BTreeSet::new()), None);
                }
            }
            assert_eq!(probed, vec![60, 65, 70, 75, 80]);
        }

        #[test]
        fn messages_that_arrive_or_are_taken_between_probes_are_not_a_stall() {
            let t0 = Instant::now();
            // A quiet topic: a message now and then, each taken at once (the wait restarts).
            let mut watch = GroupWatch::new(LIMIT);
            let taken = |now: Instant| Some(t0 + Duration::from_secs(now.duration_since(t0).as_secs() / 61 * 61));
            assert_eq!(probes(&mut watch, t0, 600, taken, |_| vec![("commands", 0)]), None);
            // Waiting at one probe, gone at the next: it was just produced, and fetched.
            let mut watch = GroupWatch::new(LIMIT);
            let flickering = |now: Instant| {
                if now.duration_since(t0).as_secs() % 10 == 0 {
                    vec![("commands", 0)]
                } else {
                    vec![]
                }
            };
            assert_eq!(probes(&mut watch, t0, 600, |_| Some(t0), flickering), None);
            // Another partition each probe.
            let mut watch = GroupWatch::new(LIMIT);
            let moving = |now: Instant| vec![("commands", (now.duration_since(t0).as_secs() / 5 % 2) as i32)];
            assert_eq!(probes(&mut watch, t0, 600, |_| Some(t0), moving), None);
        }

        #[test]
        fn a_consumer_applying_a_batch_or_with_the_watch_off_is_never_replaced() {
            let t0 = Instant::now();
            let mut watch = GroupWatch::new(LIMIT);
            assert_eq!(probes(&mut watch, t0, 600, |_| None, |_| vec![("commands", 0)]), None);
            let mut off = GroupWatch::new(Duration::ZERO);
            assert_eq!(probes(&mut off, t0, 600, |_| Some(t0), |_| vec![("commands", 0)]), None);
            assert_eq!(reports(&mut off, t0, 600, |at| report(at, "up/init", true)), None);
        }
    }
}
