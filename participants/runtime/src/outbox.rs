//! The transactional outbox: messages are inserted in the same transaction as the state change
//! that caused them, and a relay publishes them to Kafka in batches, then deletes them. Publishing
//! is at least once: a crash between the publish and the delete publishes a batch again, and every
//! consumer deduplicates.

use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use saga_defs::contract::{HEADER_MESSAGE_TYPE, HEADER_SCHEMA_VERSION, SCHEMA_VERSION};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::OutboxConfig;
use crate::db::Params;
use crate::failures::{Failures, Severity};

/// A message to publish.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub topic: String,
    /// The Kafka key; the saga id, so that one saga's messages stay in order on one partition.
    pub key: String,
    /// Published as the `message-type` header, with `schema-version`; `None` adds neither (a dead
    /// letter keeps the original's headers instead).
    pub message_type: Option<&'static str>,
    pub payload: Payload,
    /// Extra Kafka headers, in order.
    pub headers: Vec<(String, String)>,
}

/// What an outbox message carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// One of our message contracts, serialised once when the message is made: the outbox row
    /// stores these bytes (`raw_payload`) and the broker gets the same bytes, so Postgres never
    /// parses them into `jsonb` and a row swept after a crash publishes what a hand-off would
    /// have (docs/performance.md, 2026-12-04 fourth session).
    Json(Vec<u8>),
    /// Bytes published exactly as they are (a dead letter's original, which may not be JSON),
    /// or no payload at all.
    Raw(Option<Vec<u8>>),
}

impl Payload {
    /// What is published and stored: the serialised contract, the raw bytes, or nothing.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Payload::Json(bytes) => Some(bytes),
            Payload::Raw(bytes) => bytes.as_deref(),
        }
    }
}

impl OutboxMessage {
    pub fn new(topic: String, key: impl ToString, message_type: &'static str, payload: &impl serde::Serialize) -> Self {
        Self {
            topic,
            key: key.to_string(),
            message_type: Some(message_type),
            payload: Payload::Json(serde_json::to_vec(payload).expect("message contracts serialise to JSON")),
            headers: Vec::new(),
        }
    }
}

/// Inserts messages into the outbox on the caller's connection (normally inside its transaction).
pub async fn insert(conn: &mut PgConnection, messages: &[OutboxMessage]) -> sqlx::Result<()> {
    insert_with(conn, messages, None).await
}

/// [`insert`], running `also` in the same statement.
pub async fn insert_with(conn: &mut PgConnection, messages: &[OutboxMessage], also: Option<Also>) -> sqlx::Result<()> {
    insert_rows(conn, messages, false, also).await.map(|_| ())
}

/// Inserts messages that the caller will hand to the relay once its transaction committed
/// ([`Handoff::send`]): the relay publishes them at once, and sweeps them only if they are still
/// there after its grace period. Returns the batch to hand off.
pub async fn insert_for_handoff(conn: &mut PgConnection, messages: Vec<OutboxMessage>) -> sqlx::Result<HandedOff> {
    insert_for_handoff_with(conn, messages, None).await
}

/// [`insert_for_handoff`], running `also` in the same statement.
pub async fn insert_for_handoff_with(
    conn: &mut PgConnection,
    messages: Vec<OutboxMessage>,
    also: Option<Also>,
) -> sqlx::Result<HandedOff> {
    let ids = insert_rows(conn, &messages, true, also).await?;
    Ok(HandedOff { rows: ids.into_iter().zip(messages).collect(), unlogged: Vec::new(), started: Instant::now() })
}

/// Inserts messages on the caller's connection, for the relay to publish on commit when
/// `handoff` is set (else its sweep does). Hand what it returns over with
/// [`AfterCommit::send`] once the transaction committed.
pub async fn insert_then_hand_off(
    conn: &mut PgConnection,
    handoff: Option<&Handoff>,
    messages: Vec<OutboxMessage>,
) -> sqlx::Result<AfterCommit> {
    insert_then_hand_off_with(conn, handoff, messages, None).await
}

/// [`insert_then_hand_off`], running `also` in the same statement.
pub async fn insert_then_hand_off_with(
    conn: &mut PgConnection,
    handoff: Option<&Handoff>,
    messages: Vec<OutboxMessage>,
    also: Option<Also>,
) -> sqlx::Result<AfterCommit> {
    match handoff {
        Some(handoff) => {
            let batch = insert_for_handoff_with(conn, messages, also).await?;
            Ok(AfterCommit(Some((handoff.clone(), batch))))
        }
        None => insert_with(conn, &messages, also).await.map(|_| AfterCommit(None)),
    }
}

/// Writes of the caller's that go with the outbox insert in one statement (one round trip fewer
/// per transaction): data-modifying CTEs, numbering their placeholders from `$1` in `params`; the
/// outbox's parameters follow theirs. The CTEs all run, whatever the insert returns, and see the
/// same snapshot: none may depend on another's writes.
#[derive(Default)]
pub struct Also {
    ctes: Vec<String>,
    params: Params,
}

impl Also {
    /// The parameters: each part adds its values here and writes the placeholders it is given.
    pub fn params(&mut self) -> &mut Params {
        &mut self.params
    }

    /// Adds `name AS (sql)`.
    pub fn cte(&mut self, name: &str, sql: &str) {
        self.ctes.push(format!("{name} AS ({sql})"));
    }

    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.ctes.is_empty()
    }

    /// The statement `main` preceded by the CTEs, and the parameters of both (`main`'s added
    /// after the CTEs' ones).
    pub fn statement(self, main: &str) -> (String, Params) {
        if self.ctes.is_empty() {
            return (main.to_owned(), self.params);
        }
        (format!("WITH {} {main}", self.ctes.join(", ")), self.params)
    }
}

/// Rows [`insert_then_hand_off`] wrote, waiting for their transaction to commit.
#[must_use = "send it once the transaction committed"]
#[derive(Debug)]
pub struct AfterCommit(Option<(Handoff, HandedOff)>);

impl AfterCommit {
    /// Rows a caller's own statement inserted ([`insert_part`], `handed_off` when `handoff` is
    /// set), `ids` being what it returned for `messages`, in any order; none when the condition
    /// kept them out.
    pub fn inserted(handoff: Option<&Handoff>, mut ids: Vec<i64>, messages: Vec<OutboxMessage>) -> Self {
        let Some(handoff) = handoff else { return Self(None) };
        if ids.is_empty() {
            return Self(None);
        }
        // Ids are drawn in the order of the arrays, so they sort as the messages were given.
        ids.sort_unstable();
        debug_assert_eq!(ids.len(), messages.len(), "one id per message");
        Self(Some((
            handoff.clone(),
            HandedOff { rows: ids.into_iter().zip(messages).collect(), unlogged: Vec::new(), started: Instant::now() },
        )))
    }

    /// Counts the dwell from `started` instead (the start of the batch that wrote them).
    pub fn since(self, started: Instant) -> Self {
        Self(self.0.map(|(handoff, batch)| (handoff, batch.since(started))))
    }

    /// Hands the rows to the relay. Call only after their transaction committed.
    pub fn send(self) {
        if let Some((handoff, batch)) = self.0 {
            handoff.send(batch);
        }
    }
}

async fn insert_rows(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
    handed_off: bool,
    also: Option<Also>,
) -> sqlx::Result<Vec<i64>> {
    let mut also = also.unwrap_or_default();
    if messages.is_empty() {
        if !also.is_empty() {
            let (sql, params) = also.statement("SELECT 1");
            params.query(&sql).execute(conn).await?;
        }
        return Ok(Vec::new());
    }
    let insert = insert_part(also.params(), messages, handed_off, None)?;
    let (sql, params) = also.statement(&insert);
    // Ids are drawn in the order of the arrays, so they sort as the messages were given.
    let mut ids: Vec<i64> = params.query_scalar(&sql).fetch_all(conn).await?;
    ids.sort_unstable();
    Ok(ids)
}

/// The outbox insert of `messages` as a part of a caller's own statement (a data-modifying CTE),
/// its placeholders numbered in `params`; it inserts nothing unless `only_if` (an SQL condition,
/// e.g. on a sibling CTE's rows) holds, and returns the `id` of each row. A single statement runs
/// in a transaction of its own: a caller that needs nothing else in its transaction saves the
/// round trips of `BEGIN` and `COMMIT`. Rows inserted `handed_off` go to the relay with
/// [`AfterCommit::inserted`] once the statement returned.
pub fn insert_part(
    params: &mut Params,
    messages: &[OutboxMessage],
    handed_off: bool,
    only_if: Option<&str>,
) -> sqlx::Result<String> {
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let keys: Vec<&str> = messages.iter().map(|m| m.key.as_str()).collect();
    let types: Vec<Option<&str>> = messages.iter().map(|m| m.message_type).collect();
    let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.bytes()).collect();
    let headers: Vec<sqlx::types::Json<&[(String, String)]>> =
        messages.iter().map(|m| sqlx::types::Json(m.headers.as_slice())).collect();
    Ok(format!(
        "INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers, handed_off)
         SELECT u.*, {} FROM UNNEST({}::text[], {}::text[], {}::text[], {}::bytea[], {}::jsonb[]) AS u
         {}
         RETURNING id",
        params.add(handed_off)?,
        params.add(topics)?,
        params.add(keys)?,
        params.add(types)?,
        params.add(payloads)?,
        params.add(headers)?,
        only_if.map(|condition| format!("WHERE {condition}")).unwrap_or_default(),
    ))
}

/// Committed outbox rows and their messages, to publish now.
#[derive(Debug)]
pub struct HandedOff {
    rows: Vec<(i64, OutboxMessage)>,
    /// Messages with no row, made durable by the caller in another way (the orchestrator's
    /// commands, by their pending attempts; ADR 28): published after the rows, and written to
    /// the outbox (for the relay's table path) only if the broker does not take them.
    unlogged: Vec<OutboxMessage>,
    /// When the work that wrote them began (for `saga_outbox_dwell_seconds`).
    started: Instant,
}

impl HandedOff {
    /// Adds messages that have no outbox row (see the field). A batch holding any must be handed
    /// over with [`Handoff::deliver`], which waits for room instead of leaving it to the sweep.
    pub fn with_unlogged(mut self, messages: Vec<OutboxMessage>) -> Self {
        self.unlogged.extend(messages);
        self
    }

    /// The messages it holds without a row.
    pub fn unlogged(&self) -> &[OutboxMessage] {
        &self.unlogged
    }

    /// How many rows it holds.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Counts from `started` instead (the start of the batch that wrote them).
    pub fn since(mut self, started: Instant) -> Self {
        self.started = started;
        self
    }
}

/// The way from a committed transaction to this process's relay. [`Handoff::send`] never waits:
/// when the relay is behind (its queue is full) the rows stay in the outbox for its sweep.
/// Messages without a row have no sweep to fall back on: [`Handoff::deliver`] waits for room, so
/// that a relay behind holds its consumer back (queueing) instead of losing them.
#[derive(Debug, Clone)]
pub struct Handoff(tokio::sync::mpsc::Sender<HandedOff>);

/// Batches the relay may hold before a handoff is left to the sweep.
const HANDOFF_QUEUE: usize = 256;

impl Handoff {
    pub fn channel() -> (Self, tokio::sync::mpsc::Receiver<HandedOff>) {
        let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF_QUEUE);
        (Self(tx), rx)
    }

    /// Hands committed rows to the relay. Call only after the transaction that inserted them
    /// committed.
    pub fn send(&self, batch: HandedOff) {
        debug_assert!(batch.unlogged.is_empty(), "a batch with messages that have no row goes through deliver");
        if batch.rows.is_empty() {
            return;
        }
        if self.0.try_send(batch).is_err() {
            counter!(HANDOFFS_LEFT).increment(1);
        }
    }

    /// Hands committed rows and messages without a row to the relay, waiting while its queue is
    /// full when there are any of the latter. Call only after the transaction that wrote them
    /// committed. An error: the relay is gone (the process is stopping); what has no row is then
    /// left to whoever makes it durable (the orchestrator's lease, ADR 28).
    pub async fn deliver(&self, batch: HandedOff) -> Result<(), HandedOff> {
        if batch.unlogged.is_empty() {
            self.send(batch);
            return Ok(());
        }
        self.0.send(batch).await.map_err(|error| error.0)
    }
}

pub(crate) const PUBLISHED: &str = "saga_outbox_published_total";
pub(crate) const PUBLISH_ERRORS: &str = "saga_outbox_publish_errors_total";
pub(crate) const BATCH_SECONDS: &str = "saga_outbox_batch_duration_seconds";
pub(crate) const PENDING: &str = "saga_outbox_pending";
pub(crate) const OLDEST_AGE: &str = "saga_outbox_oldest_age_seconds";
pub(crate) const DWELL_SECONDS: &str = "saga_outbox_dwell_seconds";
pub(crate) const HANDOFFS_LEFT: &str = "saga_outbox_handoffs_left_total";
pub(crate) const UNDELIVERED_STORED: &str = "saga_outbox_undelivered_stored_total";
/// Finer than the default buckets: the dwell of a healthy outbox is a few milliseconds.
pub(crate) const DWELL_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

pub(crate) fn describe_metrics() {
    describe_counter!(PUBLISHED, "Outbox messages published to Kafka");
    describe_counter!(PUBLISH_ERRORS, "Outbox batches that could not be published and were retried");
    describe_histogram!(BATCH_SECONDS, metrics::Unit::Seconds, "Time to publish one outbox batch");
    describe_gauge!(PENDING, "Messages waiting in the outbox");
    describe_gauge!(OLDEST_AGE, metrics::Unit::Seconds, "Age of the oldest message waiting in the outbox");
    describe_histogram!(
        DWELL_SECONDS,
        metrics::Unit::Seconds,
        "From the start of the transaction that wrote a message to the outbox to its hand-off to the Kafka producer \
         (for the orchestrator: reply consumed to next command produced), on the database's clock"
    );
    describe_counter!(
        HANDOFFS_LEFT,
        "Committed batches not published on commit (relay behind, or a publish failed) and left to the relay's sweep"
    );
    describe_counter!(
        UNDELIVERED_STORED,
        "Messages handed off without an outbox row (the orchestrator's commands) that the broker did not take, \
         written to the outbox for the relay's table path"
    );
    // At zero from the start, so that `rate()` and alerts see the first error.
    metrics::counter!(HANDOFFS_LEFT).increment(0);
    metrics::counter!(UNDELIVERED_STORED).increment(0);
    metrics::counter!(PUBLISHED).increment(0);
    metrics::counter!(PUBLISH_ERRORS).increment(0);
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: String,
    message_type: Option<String>,
    payload: Option<String>,
    raw_payload: Option<Vec<u8>>,
    headers: sqlx::types::Json<Vec<(String, String)>>,
    /// Seconds since the transaction that wrote it began, on the database's clock.
    dwell: f64,
}

impl Row {
    /// The bytes to publish: a contract's as serialised when the message was made, or a row's
    /// `jsonb` payload as text (rows written before contracts were stored as bytes).
    fn payload(&self) -> Option<&[u8]> {
        self.raw_payload.as_deref().or(self.payload.as_deref().map(str::as_bytes))
    }
}

/// The Kafka record of an outbox message: its key, the `message-type` and `schema-version`
/// headers when it has a type, its extra headers in order, and its payload.
fn record<'a>(
    topic: &'a str,
    key: &'a str,
    message_type: Option<&'a str>,
    extra: &'a [(String, String)],
    payload: Option<&'a [u8]>,
    schema_version: &'a str,
) -> FutureRecord<'a, str, [u8]> {
    let mut headers = OwnedHeaders::new_with_capacity(2 + extra.len());
    if let Some(message_type) = message_type {
        headers = headers
            .insert(Header { key: HEADER_MESSAGE_TYPE, value: Some(message_type) })
            .insert(Header { key: HEADER_SCHEMA_VERSION, value: Some(schema_version) });
    }
    for (name, value) in extra {
        headers = headers.insert(Header { key: name, value: Some(value.as_str()) });
    }
    let mut record = FutureRecord::to(topic).key(key).headers(headers);
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    record
}

/// Deletes published rows. Run unprepared (`persistent(false)`), so that Postgres plans it for the
/// table as it is at each call: the outbox is a queue whose size swings between vacuums, and a
/// plan cached while it held a page or two (a sequential scan, the cheapest then) went on reading
/// every page of it once thousands of dead rows had piled up, 574-800 pages for a batch of ten.
const DELETE_PUBLISHED: &str = "DELETE FROM outbox WHERE id = ANY($1)";

/// The rows the relay's sweep publishes.
const SWEEP: &str = "SELECT id, topic, message_key, message_type, payload::text AS payload, raw_payload, headers,
        EXTRACT(EPOCH FROM clock_timestamp() - created_at)::float8 AS dwell
    FROM outbox WHERE NOT handed_off OR created_at < clock_timestamp() - $2 * interval '1 millisecond'
    ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

/// Publishes one batch. Returns how many messages were published.
pub async fn publish_batch(
    pool: &PgPool,
    producer: &FutureProducer,
    batch_size: i64,
    grace: Duration,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    // Handed-off rows are being published by whoever committed them; only those a crash or a
    // failed publish left behind (older than the grace period) are swept.
    let rows: Vec<Row> =
        sqlx::query_as(SWEEP).bind(batch_size).bind(grace.as_millis() as f64).fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let started = Instant::now();
    let schema_version = SCHEMA_VERSION.to_string();
    crate::faults::crash_point!("outbox.before_publish");
    let dwell = histogram!(DWELL_SECONDS);
    for row in &rows {
        dwell.record(row.dwell);
    }
    let sends = rows.iter().map(|row| {
        let record = record(
            &row.topic,
            &row.message_key,
            row.message_type.as_deref(),
            &row.headers,
            row.payload(),
            &schema_version,
        );
        producer.send(record, Duration::from_secs(30))
    });
    for result in futures::future::join_all(sends).await {
        if let Err((error, _)) = result {
            // Nothing is deleted: the whole batch is published again (consumers deduplicate).
            anyhow::bail!("publishing the outbox batch failed: {error}");
        }
    }
    crate::faults::crash_point!("outbox.after_publish");
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query(DELETE_PUBLISHED).persistent(false).bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    histogram!(BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    counter!(PUBLISHED).increment(rows.len() as u64);
    Ok(rows.len())
}

/// Runs the relay until `shutdown`: publishes whenever a transaction wrote to the outbox
/// (LISTEN/NOTIFY), and at least every poll interval.
pub async fn run_relay(
    pool: PgPool,
    producer: FutureProducer,
    config: OutboxConfig,
    mut handoffs: Option<tokio::sync::mpsc::Receiver<HandedOff>>,
    shutdown: CancellationToken,
) {
    let mut listener = match PgListener::connect_with(&pool).await {
        Ok(mut listener) => match listener.listen("outbox").await {
            Ok(()) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for outbox notifications; polling only");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot LISTEN for outbox notifications; polling only");
            None
        }
    };
    let mut backoff = ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(10),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    };
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(HANDOFFS_IN_FLIGHT));
    let (acknowledged, deletions) = tokio::sync::mpsc::unbounded_channel();
    let deleter = settle(pool.clone(), deletions, config.outbox_delete_linger, shutdown.clone());
    let relay = async move {
        let mut failures = Failures::new("outbox-relay", Severity::Error);
        while !shutdown.is_cancelled() {
            // A batch waiting on a broker that is gone must not hold up shutdown: dropping it rolls
            // its transaction back, and its rows are published after the restart.
            let published = tokio::select! {
                _ = shutdown.cancelled() => break,
                published = publish_batch(&pool, &producer, config.outbox_batch_size, config.outbox_handoff_grace) => published,
            };
            match published {
                Ok(n) => {
                    backoff.reset();
                    failures.succeeded("outbox relay");
                    if n as i64 >= config.outbox_batch_size {
                        continue; // more is waiting
                    }
                }
                Err(error) => {
                    counter!(PUBLISH_ERRORS).increment(1);
                    let delay = backoff.next_backoff().unwrap_or(Duration::from_secs(10));
                    failures.failed("outbox relay", &format!("{error:#} (retrying in {} ms)", delay.as_millis()));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        if let Err(error) = l.recv().await {
                            tracing::warn!(%error, "outbox notification listener");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(notified);
            let poll = tokio::time::sleep(config.outbox_poll_interval);
            tokio::pin!(poll);
            // Until the table needs a look, publish what committed transactions hand over.
            loop {
                let handed = async {
                    match handoffs.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut notified => break,
                    _ = &mut poll => break,
                    batch = handed => match batch {
                        Some(batch) => {
                            let mut batches = vec![batch];
                            while let Some(more) = handoffs.as_mut().and_then(|rx| rx.try_recv().ok()) {
                                batches.push(more);
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = publish_handed_off(&producer, batches, &in_flight, &acknowledged) => {}
                            }
                        }
                        None => handoffs = None,
                    },
                }
            }
        }
    };
    tokio::join!(relay, deleter);
}

/// Hand-offs whose acknowledgements may be awaited at once; beyond, the relay waits.
const HANDOFFS_IN_FLIGHT: usize = 64;

/// What became of handed-off messages once the broker answered.
#[derive(Debug)]
enum Settled {
    /// Rows the broker acknowledged, to delete.
    Acknowledged(Vec<i64>),
    /// Messages without a row that the broker did not take, to write to the outbox.
    Undelivered(Vec<OutboxMessage>),
}

/// Produces rows handed over on commit, in order, then (off the relay's path, so that the next
/// batch is produced meanwhile) awaits the broker's acknowledgements and deletes them. Rows that
/// could not be produced stay for the sweep once older than the grace period; messages without a
/// row that could not be produced are written to the outbox instead ([`settle`]).
async fn publish_handed_off(
    producer: &FutureProducer,
    mut batches: Vec<HandedOff>,
    in_flight: &std::sync::Arc<tokio::sync::Semaphore>,
    settled: &tokio::sync::mpsc::UnboundedSender<Settled>,
) {
    let started = Instant::now();
    let dwell = histogram!(DWELL_SECONDS);
    let schema_version = SCHEMA_VERSION.to_string();
    let mut encoded = Vec::new();
    for batch in &batches {
        let seconds = batch.started.elapsed().as_secs_f64();
        let messages = batch.rows.iter().map(|(id, m)| (Some(*id), m)).chain(batch.unlogged.iter().map(|m| (None, m)));
        for (id, message) in messages {
            dwell.record(seconds);
            encoded.push((id, message, message.payload.bytes()));
        }
    }
    let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
    crate::faults::crash_point!("outbox.before_publish");
    let mut deliveries = Vec::with_capacity(encoded.len());
    let mut refused = None;
    for (_, message, payload) in &encoded {
        let record =
            record(&message.topic, &message.key, message.message_type, &message.headers, *payload, &schema_version);
        match producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((error, _)) => {
                refused = Some(error);
                break;
            }
        }
    }
    let ids: Vec<i64> = encoded.iter().filter_map(|(id, _, _)| *id).collect();
    drop(encoded);
    // The producer copied what it took; what has no row is kept until the broker answered.
    let unlogged: Vec<OutboxMessage> = batches.iter_mut().flat_map(|b| std::mem::take(&mut b.unlogged)).collect();
    let handed = batches.len() as u64;
    if let Some(error) = refused {
        counter!(PUBLISH_ERRORS).increment(1);
        counter!(HANDOFFS_LEFT).increment(handed);
        tracing::warn!(%error, "producing on commit failed; the relay's sweep publishes these rows later");
        if !unlogged.is_empty() {
            let _ = settled.send(Settled::Undelivered(unlogged));
        }
        return;
    }
    let settled = settled.clone();
    tokio::spawn(async move {
        let _permit = permit;
        for delivery in futures::future::join_all(deliveries).await {
            let error = match delivery {
                Ok(Ok(_)) => continue,
                Ok(Err((error, _))) => error.to_string(),
                Err(_) => "the producer dropped the message".to_owned(),
            };
            counter!(PUBLISH_ERRORS).increment(1);
            counter!(HANDOFFS_LEFT).increment(handed);
            tracing::error!(error, "publishing on commit failed; the relay's sweep publishes these rows later");
            if !unlogged.is_empty() {
                let _ = settled.send(Settled::Undelivered(unlogged));
            }
            return;
        }
        crate::faults::crash_point!("outbox.after_publish");
        histogram!(BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        counter!(PUBLISHED).increment((ids.len() + unlogged.len()) as u64);
        // Gone only if the relay stopped: the sweep publishes them once more after the restart.
        if !ids.is_empty() {
            let _ = settled.send(Settled::Acknowledged(ids));
        }
    });
}

/// Deletes the rows the broker acknowledged: every hand-off acknowledged within
/// `linger` of the first in one statement and one commit, instead of one each (a
/// service that hands off an order or a small batch at a time wrote a commit per hand-off).
/// A row published but not deleted (the database failing, a stop) is published once more by the
/// sweep, which consumers deduplicate. Messages without a row that the broker did not take are
/// inserted into the outbox (not handed off: the relay's table path publishes them), retried
/// until they are in; any still out at a stop are logged, and left to whoever made them durable
/// (ADR 28). Ends when every sender is gone or at `shutdown`, after settling what it holds.
async fn settle(
    pool: PgPool,
    mut settled: tokio::sync::mpsc::UnboundedReceiver<Settled>,
    linger: Duration,
    shutdown: CancellationToken,
) {
    let mut received = Vec::new();
    let mut undelivered: Vec<OutboxMessage> = Vec::new();
    let mut backoff = ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(5),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    };
    loop {
        // While messages wait to be stored, come back for them even if nothing else arrives.
        let retry = if undelivered.is_empty() { Duration::MAX } else { backoff.next_backoff().unwrap_or(linger) };
        let stopping = tokio::select! {
            n = settled.recv_many(&mut received, 1024) => {
                if n == 0 && undelivered.is_empty() {
                    return;
                }
                n == 0 || tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tokio::time::sleep(linger) => false,
                }
            }
            _ = tokio::time::sleep(retry) => false,
            _ = shutdown.cancelled() => true,
        };
        while let Ok(more) = settled.try_recv() {
            received.push(more);
        }
        let mut ids = Vec::new();
        for item in received.drain(..) {
            match item {
                Settled::Acknowledged(acknowledged) => ids.extend(acknowledged),
                Settled::Undelivered(messages) => undelivered.extend(messages),
            }
        }
        if !ids.is_empty() {
            if let Err(error) = sqlx::query(DELETE_PUBLISHED).persistent(false).bind(&ids).execute(&pool).await {
                tracing::warn!(%error, rows = ids.len(), "deleting published outbox rows failed; the sweep publishes them again");
            }
        }
        if !undelivered.is_empty() {
            let stored = async { insert(&mut *pool.acquire().await?, &undelivered).await }.await;
            match stored {
                Ok(()) => {
                    counter!(UNDELIVERED_STORED).increment(undelivered.len() as u64);
                    tracing::warn!(
                        messages = undelivered.len(),
                        "messages the broker did not take are in the outbox now"
                    );
                    undelivered.clear();
                    backoff.reset();
                }
                Err(error) => {
                    tracing::warn!(%error, messages = undelivered.len(), "storing undelivered messages in the outbox; retrying")
                }
            }
        }
        if stopping {
            break;
        }
    }
    if !undelivered.is_empty() {
        tracing::error!(
            messages = undelivered.len(),
            "stopping with messages the broker did not take and the outbox could not store; their owner's lease \
             recovers them"
        );
    }
}

/// Samples the outbox backlog into the `saga_outbox_pending` and `saga_outbox_oldest_age_seconds`
/// gauges every `every`, until `shutdown`.
pub async fn run_backlog_gauges(pool: PgPool, every: Duration, shutdown: CancellationToken) {
    loop {
        let sample: sqlx::Result<(i64, Option<f64>)> =
            sqlx::query_as("SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox")
                .fetch_one(&pool)
                .await;
        match sample {
            Ok((pending, oldest)) => {
                gauge!(PENDING).set(pending as f64);
                gauge!(OLDEST_AGE).set(oldest.unwrap_or(0.0));
            }
            Err(error) => tracing::debug!(%error, "sampling the outbox backlog"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Against the real Postgres (`TEST_POSTGRES_URL`, default the local server).
#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor};

    use super::*;

    use crate::db::test_url as url;

    async fn next(listener: &mut PgListener) -> sqlx::postgres::PgNotification {
        tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("a notification").unwrap()
    }

    /// A fresh database with the outbox's tables: the admin connection, its name (drop it at the
    /// end) and a connection to it.
    async fn scratch() -> (PgConnection, String, PgConnection) {
        let name = format!("sagatest_outbox_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut admin = PgConnection::connect(&url("postgres")).await.expect("Postgres is running");
        admin.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await.unwrap();
        let mut conn = PgConnection::connect(&url(&name)).await.unwrap();
        crate::db::outbox_migrations().run(&mut conn).await.unwrap();
        (admin, name, conn)
    }

    fn message(n: usize) -> OutboxMessage {
        OutboxMessage::new("t".into(), n, "m", &serde_json::json!({ "n": n }))
    }

    /// The relay is woken when a committed transaction wrote rows it must publish itself, and not
    /// for rows handed off on commit. Notifications arrive in commit order, so a marker sent after
    /// the handed-off rows' commit is the first thing heard if they sent nothing.
    #[tokio::test]
    async fn only_rows_not_handed_off_wake_the_relay() {
        let (mut admin, name, mut conn) = scratch().await;
        let mut listener = PgListener::connect(&url(&name)).await.unwrap();
        listener.listen("outbox").await.unwrap();

        let mut tx = conn.begin().await.unwrap();
        let handed = insert_for_handoff(&mut tx, (0..5).map(message).collect()).await.unwrap();
        assert_eq!(handed.rows.len(), 5);
        tx.commit().await.unwrap();
        conn.execute("SELECT pg_notify('outbox', 'marker')").await.unwrap();
        assert_eq!(next(&mut listener).await.payload(), "marker", "handed-off rows woke the relay");

        let mut tx = conn.begin().await.unwrap();
        insert(&mut tx, &(0..3).map(message).collect::<Vec<_>>()).await.unwrap();
        insert_for_handoff(&mut tx, vec![message(9)]).await.unwrap();
        tx.commit().await.unwrap();
        conn.execute("SELECT pg_notify('outbox', 'marker')").await.unwrap();
        assert_eq!(next(&mut listener).await.payload(), "", "rows for the relay did not wake it");
        // Three such rows in one transaction: one notification.
        assert_eq!(next(&mut listener).await.payload(), "marker");

        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&mut conn).await.unwrap();
        assert_eq!(rows, 9);
        drop(listener);
        conn.close().await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }

    /// A contract is stored as the bytes it was serialised to when the message was made, which
    /// are what a hand-off publishes, so that a row swept after a crash publishes the same bytes
    /// and Postgres parses no `jsonb`; a row of an older version (a `jsonb` payload) still
    /// publishes its payload, and a raw message its bytes or nothing.
    #[tokio::test]
    async fn the_sweep_publishes_the_bytes_a_hand_off_would() {
        let (mut admin, name, mut conn) = scratch().await;

        let contract = OutboxMessage::new("t".into(), 1, "m", &serde_json::json!({"b": [1, 2.5], "a": "é\u{0}"}));
        let raw = OutboxMessage { payload: Payload::Raw(Some(vec![0xff, b'{'])), ..message(2) };
        let empty = OutboxMessage { payload: Payload::Raw(None), ..message(3) };
        let messages = vec![contract, raw, empty];
        insert(&mut conn, &messages).await.unwrap();
        conn.execute(
            "INSERT INTO outbox (topic, message_key, message_type, payload) VALUES ('t', '4', 'm', '{\"old\": true}')",
        )
        .await
        .unwrap();
        let parsed: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE payload IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(parsed, 1, "only the older row holds jsonb");

        let mut tx = conn.begin().await.unwrap();
        let rows: Vec<Row> = sqlx::query_as(SWEEP).bind(10_i64).bind(0.0).fetch_all(&mut *tx).await.unwrap();
        let swept: Vec<Option<&[u8]>> = rows.iter().map(Row::payload).collect();
        let handed: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.bytes()).collect();
        assert_eq!(swept[..3], handed[..], "a swept row publishes what a hand-off does");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(handed[0].unwrap()).unwrap(),
            serde_json::json!({"a": "é\u{0}", "b": [1, 2.5]}),
            "the contract's bytes are its JSON"
        );
        assert_eq!(swept[3], Some(br#"{"old": true}"#.as_slice()), "an older row's jsonb as text");
        tx.rollback().await.unwrap();
        conn.close().await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }

    /// A message handed off without a row (ADR 28) that the broker does not take is not lost: it
    /// is written to the outbox, not handed off, for the relay's table path.
    #[tokio::test]
    async fn a_message_without_a_row_that_the_broker_refuses_lands_in_the_outbox() {
        let (mut admin, name, mut conn) = scratch().await;
        let pool = PgPool::connect(&url(&name)).await.unwrap();
        // No broker listens there: every delivery fails once its timeout passes.
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "300")
            .create()
            .unwrap();
        let config = OutboxConfig {
            outbox_batch_size: 100,
            outbox_poll_interval: Duration::from_secs(60),
            outbox_publish_on_commit: true,
            outbox_handoff_grace: Duration::from_secs(60),
            outbox_delete_linger: Duration::from_millis(10),
        };
        let (handoff, handoffs) = Handoff::channel();
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(run_relay(pool.clone(), producer, config, Some(handoffs), shutdown.clone()));
        let unlogged = vec![message(7), message(8)];
        let batch = HandedOff { rows: Vec::new(), unlogged: Vec::new(), started: Instant::now() };
        handoff.deliver(batch.with_unlogged(unlogged.clone())).await.unwrap();

        let started = Instant::now();
        let stored = loop {
            let stored: Vec<(String, Vec<u8>, bool)> =
                sqlx::query_as("SELECT message_key, raw_payload, handed_off FROM outbox ORDER BY id")
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            if !stored.is_empty() || started.elapsed() > Duration::from_secs(20) {
                break stored;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let expected: Vec<(String, Vec<u8>, bool)> =
            unlogged.iter().map(|m| (m.key.clone(), m.payload.bytes().unwrap().to_vec(), false)).collect();
        assert_eq!(stored, expected, "both messages, as they were, for the relay's table path");
        shutdown.cancel();
        relay.await.unwrap();
        pool.close().await;
        conn.close().await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }

    /// A caller's own statement writes its row and the outbox rows in one round trip, the latter
    /// only when its condition holds (here: the row was new), and hands them to the relay in the
    /// order of the messages.
    #[tokio::test]
    async fn a_part_of_a_callers_statement_inserts_only_when_its_condition_holds() {
        let (mut admin, name, mut conn) = scratch().await;
        conn.execute("CREATE TABLE things (key text PRIMARY KEY)").await.unwrap();
        let (handoff, mut relay) = Handoff::channel();

        let place = |messages: &[OutboxMessage]| {
            let mut params = Params::default();
            let thing = format!(
                "INSERT INTO things VALUES ({}) ON CONFLICT DO NOTHING RETURNING key",
                params.add("k").unwrap()
            );
            let outbox = insert_part(&mut params, messages, true, Some("EXISTS (SELECT FROM placed)")).unwrap();
            let sql = format!("WITH placed AS ({thing}), sent AS ({outbox}) SELECT ARRAY(SELECT id FROM sent)");
            (sql, params)
        };
        let messages: Vec<OutboxMessage> = (0..3).map(message).collect();
        let (sql, params) = place(&messages);
        let ids: Vec<i64> = params.query_scalar(&sql).fetch_one(&mut conn).await.unwrap();
        assert_eq!(ids.len(), 3);
        AfterCommit::inserted(Some(&handoff), ids.into_iter().rev().collect(), messages).send();
        let handed = relay.try_recv().expect("the rows were handed to the relay");
        let stored: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, message_key FROM outbox ORDER BY id").fetch_all(&mut conn).await.unwrap();
        let handed: Vec<(i64, String)> = handed.rows.into_iter().map(|(id, m)| (id, m.key)).collect();
        assert_eq!(handed, stored, "each id with its message, in order");

        // The same row again: nothing for the outbox, nothing to hand off.
        let messages: Vec<OutboxMessage> = (3..5).map(message).collect();
        let (sql, params) = place(&messages);
        let ids: Vec<i64> = params.query_scalar(&sql).fetch_one(&mut conn).await.unwrap();
        assert!(ids.is_empty(), "{ids:?}");
        AfterCommit::inserted(Some(&handoff), ids, messages).send();
        assert!(relay.try_recv().is_err(), "nothing handed off");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&mut conn).await.unwrap();
        assert_eq!(rows, 3);
        conn.close().await.unwrap();
        admin.execute(format!("DROP DATABASE \"{name}\" WITH (FORCE)").as_str()).await.unwrap();
    }
}
