//! How far a consumer has applied its partitions, in time: for each assigned partition of the
//! topics it follows, the latest instant `T` such that every record appended before `T` has been
//! applied (its offset stored after its transaction committed, or committed). The orchestrator
//! waits for this before it calls a reply late (ADR 29): a reply that sits in Kafka because
//! nobody consumed its partition (a rebalance after a crash, a consumer behind a burst) has not
//! been lost.
//!
//! Read from librdkafka's statistics report. For each partition the report gives its end (the
//! last stable offset, or the high watermark, as of the last fetch response) and where the
//! consumer is. A report whose applied offset has reached the end proves every record appended
//! before the report (less [`MARGIN`]) applied. Under sustained traffic the applied offset seldom
//! equals the end at the moment of a report, so each partition keeps a mark: an end seen at some
//! instant; once the applied offset passes it, the partition is complete up to that instant, and
//! a new mark is taken.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::statistics::Statistics;

/// How much older than the report its partitions' ends may be: the fetch response that carried
/// an end came before the report, by at most a fetch's round trip while records flow (and an
/// idle partition's long poll returns as soon as a record is appended).
pub const MARGIN: TimeDelta = TimeDelta::milliseconds(500);

/// One partition in one statistics report, as far as progress goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSample {
    pub topic: String,
    pub partition: i32,
    /// Assigned to this member (librdkafka's `desired`).
    pub assigned: bool,
    /// Its end is current: the partition is being fetched (`fetch_state` active) from a broker
    /// whose connection is up. Otherwise the end may be old, and proves nothing.
    pub fetching: bool,
    /// The offset after the last record that can be read (last stable offset, else high
    /// watermark); negative when not known.
    pub end: i64,
    /// The first offset still in the log; negative when not known.
    pub start: i64,
    /// The offset after the last record applied: the larger of the stored and the committed
    /// offset; negative when neither is known.
    pub applied: i64,
}

impl PartitionSample {
    /// Nothing in the partition waits: every record up to its end is applied, or it holds none.
    fn caught_up(&self) -> bool {
        self.end >= 0 && (self.applied >= self.end || self.start == self.end)
    }
}

/// The samples of one report, for the topics in `topics`.
pub fn samples(statistics: &Statistics, topics: &BTreeSet<String>) -> Vec<PartitionSample> {
    let up: BTreeSet<i32> =
        statistics.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").map(|b| b.nodeid).collect();
    statistics
        .topics
        .iter()
        .filter(|(topic, _)| topics.contains(*topic))
        .flat_map(|(topic, stats)| {
            let up = &up;
            // Partition -1 is librdkafka's internal unassigned queue.
            stats.partitions.values().filter(|p| p.partition >= 0).map(move |p| PartitionSample {
                topic: topic.clone(),
                partition: p.partition,
                assigned: p.desired,
                fetching: p.fetch_state == "active" && up.contains(&p.broker),
                end: if p.ls_offset >= 0 { p.ls_offset } else { p.hi_offset },
                start: p.lo_offset,
                applied: p.stored_offset.max(p.committed_offset),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Default)]
struct Partition {
    /// An end and when it was seen, to be passed.
    mark: Option<(i64, DateTime<Utc>)>,
    complete_until: Option<DateTime<Utc>>,
}

/// The progress of one consumer (and of the consumers that replace it) on the topics it follows.
#[derive(Debug, Default)]
pub struct Progress {
    topics: BTreeSet<String>,
    partitions: Mutex<BTreeMap<(String, i32), Partition>>,
}

impl Progress {
    /// Follows `topics` (the others in a report are ignored).
    pub fn new(topics: impl IntoIterator<Item = String>) -> Self {
        Self { topics: topics.into_iter().collect(), partitions: Mutex::default() }
    }

    /// Takes in a statistics report that arrived at `now`.
    pub fn observe(&self, statistics: &Statistics, now: DateTime<Utc>) {
        self.observe_samples(samples(statistics, &self.topics), now);
    }

    /// Takes in one report's samples. A partition no longer assigned is forgotten (its new owner
    /// reports it); one whose end is not current keeps what it had.
    pub fn observe_samples(&self, samples: Vec<PartitionSample>, now: DateTime<Utc>) {
        let seen_at = now - MARGIN;
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for sample in samples {
            let key = (sample.topic.clone(), sample.partition);
            if !sample.assigned {
                partitions.remove(&key);
                continue;
            }
            let state = partitions.entry(key).or_default();
            if !sample.fetching || sample.end < 0 {
                continue;
            }
            let mut complete = state.complete_until;
            let mut mark_passed = state.mark.is_none();
            if let Some((end, at)) = state.mark {
                if sample.applied >= end {
                    complete = complete.max(Some(at));
                    mark_passed = true;
                }
            }
            if sample.caught_up() {
                complete = complete.max(Some(seen_at));
                state.mark = None;
            } else if mark_passed {
                state.mark = Some((sample.end, seen_at));
            }
            state.complete_until = complete;
        }
    }

    /// Each assigned partition known to be complete up to an instant, with that instant.
    pub fn complete_until(&self) -> Vec<(String, i32, DateTime<Utc>)> {
        let partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions
            .iter()
            .filter_map(|((topic, partition), state)| Some((topic.clone(), *partition, state.complete_until?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(partition: i32, end: i64, applied: i64) -> PartitionSample {
        PartitionSample { topic: "replies".into(), partition, assigned: true, fetching: true, end, start: 0, applied }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn until(progress: &Progress) -> Vec<(i32, DateTime<Utc>)> {
        progress.complete_until().into_iter().map(|(_, p, t)| (p, t)).collect()
    }

    #[test]
    fn a_caught_up_partition_is_complete_until_its_report_less_the_margin() {
        let progress = Progress::new(["replies".to_owned()]);
        progress.observe_samples(vec![sample(0, 10, 10), sample(1, 0, -1001)], at(1));
        // Partition 1 is empty: nothing to apply, although no offset was ever stored.
        assert_eq!(until(&progress), [(0, at(1) - MARGIN), (1, at(1) - MARGIN)]);
    }

    #[test]
    fn under_sustained_traffic_a_partition_is_complete_until_the_end_it_passed() {
        let progress = Progress::new(["replies".to_owned()]);
        // Always behind its end at the moment of a report, never stalled.
        progress.observe_samples(vec![sample(0, 100, 90)], at(1));
        assert_eq!(until(&progress), [], "nothing is proven before an end is passed");
        progress.observe_samples(vec![sample(0, 200, 150)], at(2));
        assert_eq!(until(&progress), [(0, at(1) - MARGIN)], "the end seen at 1 s was passed");
        // The mark taken at 2 s (end 200) is kept until it is passed, not moved on to 300.
        progress.observe_samples(vec![sample(0, 300, 190)], at(3));
        assert_eq!(until(&progress), [(0, at(1) - MARGIN)]);
        progress.observe_samples(vec![sample(0, 400, 250)], at(4));
        assert_eq!(until(&progress), [(0, at(2) - MARGIN)]);
    }

    #[test]
    fn a_partition_that_is_not_consumed_stays_where_it_was() {
        let progress = Progress::new(["replies".to_owned()]);
        progress.observe_samples(vec![sample(0, 10, 10)], at(1));
        // Records arrive and nothing is applied (a stuck handler, a database outage).
        for second in 2..10 {
            progress.observe_samples(vec![sample(0, 10 + second, 10)], at(second));
        }
        assert_eq!(until(&progress), [(0, at(1) - MARGIN)]);
        // A stale end (no fetch going on) proves nothing, however far the offsets look.
        let mut stale = sample(0, 10, 10);
        stale.fetching = false;
        progress.observe_samples(vec![stale], at(11));
        assert_eq!(until(&progress), [(0, at(1) - MARGIN)]);
        // Once applied up to the end seen at 2 s, it is complete until then.
        progress.observe_samples(vec![sample(0, 30, 12)], at(12));
        assert_eq!(until(&progress), [(0, at(2) - MARGIN)]);
    }

    #[test]
    fn a_revoked_partition_is_forgotten_and_an_unknown_offset_proves_nothing() {
        let progress = Progress::new(["replies".to_owned()]);
        progress.observe_samples(vec![sample(0, 10, 10), sample(1, 10, 10)], at(1));
        let mut revoked = sample(1, 10, 10);
        revoked.assigned = false;
        progress.observe_samples(vec![sample(0, 10, 10), revoked], at(2));
        assert_eq!(until(&progress), [(0, at(2) - MARGIN)]);
        // Newly assigned with records and no offset stored or committed yet.
        progress.observe_samples(vec![sample(2, 10, -1001), sample(3, -1, -1)], at(3));
        assert_eq!(until(&progress), [(0, at(2) - MARGIN)]);
    }

    #[test]
    fn the_instant_never_goes_back() {
        let progress = Progress::new(["replies".to_owned()]);
        progress.observe_samples(vec![sample(0, 10, 10)], at(5));
        // A report from a consumer being replaced, or a clock set back: older in what it proves.
        progress.observe_samples(vec![sample(0, 10, 10)], at(4));
        assert_eq!(until(&progress), [(0, at(5) - MARGIN)]);
    }
}
