//! A step is timed out only once the replies that could have answered it in time have been
//! applied (ADR 29).
//!
//! A reply deadline is a promise about the participant, not about the orchestrator's own
//! consumer: a reply that waits in a partition of the replies topic that nobody consumes (for the
//! session timeout of a member that crashed, while a rebalance gives its partitions to another)
//! or that waits behind a burst has not been lost, and timing its step out would retry it, or
//! compensate a step that succeeded. So each process follows how far its consumer has applied its
//! partitions of the replies topic ([`saga_runtime::progress`]) and writes it to
//! `reply_watermarks` about every second ([`run`]); the timer loop fires a reply deadline only
//! once every partition of the topic is applied past it ([`Gate::reply_cutoff`]), and never later
//! than `REPLY_DEADLINE_MAX_WAIT_MS` after it, so that nothing waits for ever on a partition that
//! nobody reports. Retry backoffs do not wait: they send, they do not call anything late.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{describe_gauge, gauge};
use rdkafka::consumer::{BaseConsumer, Consumer};
use saga_runtime::failures::{Failures, Severity};
use saga_runtime::progress::Progress;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const APPLIED_LAG: &str = "saga_replies_applied_lag_seconds";
const DEADLINES_WAITING: &str = "saga_reply_deadlines_waiting";

pub(crate) fn describe() {
    describe_gauge!(
        APPLIED_LAG,
        metrics::Unit::Seconds,
        "How far behind now the replies topic is known to be applied, over all its partitions (+Inf while a partition \
         has never been reported): reply deadlines later than that wait (ADR 29)"
    );
    describe_gauge!(
        DEADLINES_WAITING,
        "Sagas whose reply deadline has passed and whose step is not timed out yet because replies that could answer it \
         may still wait unconsumed in Kafka (ADR 29)"
    );
    gauge!(DEADLINES_WAITING).set(0.0);
}

/// How often a process writes its partitions' progress and reads everyone's.
const EVERY: Duration = Duration::from_secs(1);

/// How often the number of the topic's partitions is read from the broker.
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);

/// The instant up to which every partition of the replies topic is known to be applied, as last
/// read, shared with the timer loop.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Microseconds since the epoch; `i64::MIN` while not known.
    applied_until: AtomicI64,
    max_wait: Duration,
}

impl Gate {
    /// A gate that lets a deadline wait at most `max_wait` past its time (zero: never waits).
    pub(crate) fn new(max_wait: Duration) -> Self {
        Self { applied_until: AtomicI64::new(i64::MIN), max_wait }
    }

    fn set(&self, at: Option<DateTime<Utc>>) {
        self.applied_until.store(at.map_or(i64::MIN, |at| at.timestamp_micros()), Ordering::Relaxed);
    }

    fn applied_until(&self) -> Option<DateTime<Utc>> {
        match self.applied_until.load(Ordering::Relaxed) {
            i64::MIN => None,
            micros => DateTime::from_timestamp_micros(micros),
        }
    }

    /// The latest reply deadline the timer loop may act on at `now`.
    pub(crate) fn reply_cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        reply_cutoff(now, self.applied_until(), self.max_wait)
    }
}

/// No later than `now`, nor than `applied_until` (every reply appended before it is applied), nor
/// earlier than `max_wait` before `now`.
fn reply_cutoff(now: DateTime<Utc>, applied_until: Option<DateTime<Utc>>, max_wait: Duration) -> DateTime<Utc> {
    let floor = chrono::TimeDelta::from_std(max_wait)
        .ok()
        .and_then(|wait| now.checked_sub_signed(wait))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    match applied_until {
        _ if max_wait.is_zero() => now,
        Some(applied) => applied.min(now).max(floor),
        None => floor,
    }
}

/// Writes this process's progress on `topic` and reads everyone's into `gate`, every second,
/// until `shutdown`. A failure (the database, the broker) is counted, logged when it starts, once
/// a minute while it lasts and when it ends ([`Failures`]), and tried again; meanwhile the gate
/// keeps its last value, which only makes deadlines wait longer (at most their bound).
pub(crate) async fn run(
    pool: PgPool,
    progress: Arc<Progress>,
    reader: Arc<BaseConsumer>,
    topic: String,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
) {
    let host = crate::lease::host();
    let mut partitions: Option<i32> = None;
    let mut counted_at: Option<tokio::time::Instant> = None;
    // The broker (the topic's partitions) and the database fail apart; each is logged when it
    // starts failing, once a minute while it does, and when it is back (saga_runtime::failures).
    let mut broker = Failures::new("reply-watermarks-broker", Severity::Warn);
    let mut database = Failures::new("reply-watermarks", Severity::Warn);
    let counting = format!("reading how many partitions {topic} has");
    while !shutdown.is_cancelled() {
        if counted_at.is_none_or(|at| at.elapsed() >= PARTITIONS_EVERY) {
            match count_partitions(reader.clone(), topic.clone()).await {
                Ok(count) => {
                    partitions = Some(count);
                    counted_at = Some(tokio::time::Instant::now());
                    broker.succeeded(&counting);
                }
                Err(error) => broker.failed(&counting, &error),
            }
        }
        let mine: Vec<(i32, DateTime<Utc>)> =
            progress.complete_until().into_iter().filter(|(t, _, _)| *t == topic).map(|(_, p, at)| (p, at)).collect();
        let written =
            publish(&pool, &topic, &host, &mine).await.map_err(|e| format!("writing how far they are applied: {e}"));
        let read_back = match partitions {
            None => Ok(()),
            Some(partitions) => match read(&pool, &topic, partitions).await {
                Ok(applied) => {
                    gate.set(applied);
                    let now = Utc::now();
                    let lag = applied.map_or(f64::INFINITY, |at| (now - at).as_seconds_f64().max(0.0));
                    gauge!(APPLIED_LAG).set(lag);
                    match waiting(&pool, gate.reply_cutoff(now), now).await {
                        Ok(count) => gauge!(DEADLINES_WAITING).set(count as f64),
                        Err(error) => tracing::debug!(%error, "counting the reply deadlines that wait"),
                    }
                    Ok(())
                }
                Err(error) => Err(format!("reading how far they are applied: {error}")),
            },
        };
        match written.and(read_back) {
            Ok(()) => database.succeeded("the replies' watermarks"),
            Err(error) => database.failed("the replies' watermarks", &error),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

async fn count_partitions(reader: Arc<BaseConsumer>, topic: String) -> anyhow::Result<i32> {
    tokio::task::spawn_blocking(move || {
        let metadata = reader.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
        let count = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
        anyhow::ensure!(count > 0, "the broker lists no partition of {topic}");
        Ok(i32::try_from(count)?)
    })
    .await?
}

/// Records that each of `partitions` is applied up to its instant; an instant never goes back.
pub(crate) async fn publish(
    pool: &PgPool,
    topic: &str,
    host: &str,
    partitions: &[(i32, DateTime<Utc>)],
) -> sqlx::Result<()> {
    if partitions.is_empty() {
        return Ok(());
    }
    let (numbers, instants): (Vec<i32>, Vec<DateTime<Utc>>) = partitions.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO reply_watermarks (topic, partition, complete_until, written_by)
         SELECT $1, p, c, $4 FROM unnest($2::int[], $3::timestamptz[]) AS u(p, c) ORDER BY p
         ON CONFLICT (topic, partition) DO UPDATE
             SET complete_until = GREATEST(reply_watermarks.complete_until, EXCLUDED.complete_until),
                 written_by = EXCLUDED.written_by, updated_at = now()",
    )
    .bind(topic)
    .bind(&numbers)
    .bind(&instants)
    .bind(host)
    .execute(pool)
    .await?;
    Ok(())
}

/// The instant up to which every one of the topic's `partitions` is applied; none while some
/// partition has never been reported.
pub(crate) async fn read(pool: &PgPool, topic: &str, partitions: i32) -> sqlx::Result<Option<DateTime<Utc>>> {
    let (reported, earliest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT count(*), min(complete_until) FROM reply_watermarks
         WHERE topic = $1 AND partition >= 0 AND partition < $2",
    )
    .bind(topic)
    .bind(partitions)
    .fetch_one(pool)
    .await?;
    Ok(earliest.filter(|_| reported == i64::from(partitions)))
}

/// Sagas waiting for a reply whose deadline is past `cutoff` but not past `now`.
async fn waiting(pool: &PgPool, cutoff: DateTime<Utc>, now: DateTime<Utc>) -> sqlx::Result<i64> {
    if cutoff >= now {
        return Ok(0);
    }
    sqlx::query_scalar(
        "SELECT count(*) FROM saga_wakeups w JOIN saga_instances s ON s.id = w.saga_id
         WHERE w.wake_at > $1 AND w.wake_at <= $2 AND s.waiting = 'REPLY' AND s.wake_at > $1",
    )
    .bind(cutoff)
    .bind(now)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::scratch;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn a_deadline_waits_for_the_replies_applied_and_no_longer_than_its_bound() {
        let two_minutes = Duration::from_secs(120);
        // Applied up to 10 s ago: deadlines of the last 10 s wait.
        assert_eq!(reply_cutoff(at(100), Some(at(90)), two_minutes), at(90));
        // Applied "in the future" (another host's clock): no later than now.
        assert_eq!(reply_cutoff(at(100), Some(at(105)), two_minutes), at(100));
        // Applied up to long ago, or never reported: the bound.
        assert_eq!(reply_cutoff(at(1000), Some(at(10)), two_minutes), at(880));
        assert_eq!(reply_cutoff(at(1000), None, two_minutes), at(880));
        // A bound of zero: deadlines never wait.
        assert_eq!(reply_cutoff(at(1000), Some(at(10)), Duration::ZERO), at(1000));
        assert_eq!(reply_cutoff(at(1000), None, Duration::ZERO), at(1000));
        let gate = Gate::new(two_minutes);
        assert_eq!(gate.reply_cutoff(at(1000)), at(880));
        gate.set(Some(at(999)));
        assert_eq!(gate.reply_cutoff(at(1000)), at(999));
    }

    #[tokio::test]
    async fn every_partition_must_be_reported_and_the_slowest_one_counts() {
        let (_, name) = scratch::database("reply_watermarks").await;
        let pool = PgPool::connect(&scratch::url(&name)).await.unwrap();
        assert_eq!(read(&pool, "saga-replies", 3).await.unwrap(), None, "nothing reported");
        publish(&pool, "saga-replies", "a", &[(0, at(10)), (1, at(20))]).await.unwrap();
        assert_eq!(read(&pool, "saga-replies", 3).await.unwrap(), None, "partition 2 never reported");
        publish(&pool, "saga-replies", "b", &[(2, at(30))]).await.unwrap();
        publish(&pool, "other-replies", "b", &[(0, at(1))]).await.unwrap();
        assert_eq!(read(&pool, "saga-replies", 3).await.unwrap(), Some(at(10)), "the slowest partition");
        // A process whose report is older (a revoked partition's last owner) moves nothing back.
        publish(&pool, "saga-replies", "a", &[(0, at(40)), (1, at(5))]).await.unwrap();
        assert_eq!(read(&pool, "saga-replies", 3).await.unwrap(), Some(at(20)));
        // Rows of partitions beyond the topic's count (a topic made again smaller) are ignored.
        assert_eq!(read(&pool, "saga-replies", 2).await.unwrap(), Some(at(20)));
        pool.close().await;
        scratch::drop(&name).await;
    }
}
