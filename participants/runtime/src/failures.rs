//! A background loop's failures, told to on-call without flooding the log: a loop that retries
//! every 100 ms while Postgres or the broker is down would otherwise log ten errors a second for
//! the whole outage, and the first one, which says what went wrong, scrolls away.
//!
//! [`Failures`] logs the first failure of a run of them, then at most one line every
//! [`REMIND_EVERY`] while it lasts (how many failed since, and for how long), and one line when
//! the loop succeeds again. Every failure is counted in `saga_background_round_failures_total{task}`,
//! and `saga_background_failing{task}` is 1 while the run lasts: dashboards and alerts see each
//! one, the log sees the story.

use std::fmt::Display;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use tokio::time::Instant;

pub const FAILURES: &str = "saga_background_round_failures_total";
pub const FAILING: &str = "saga_background_failing";

/// How often a run of failures is logged again while it lasts.
pub const REMIND_EVERY: Duration = Duration::from_secs(60);

pub(crate) fn describe_metrics() {
    describe_counter!(
        FAILURES,
        "Failed rounds of a background loop (the timer loop, the watermarks, admission's counts, ...), by task"
    );
    describe_gauge!(FAILING, "1 while a background loop's rounds keep failing (since its last success), by task");
}

/// How bad a loop's failure is, for its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warn,
    Error,
}

/// One background loop's run of failures (see the module's documentation).
#[derive(Debug)]
pub struct Failures {
    task: &'static str,
    severity: Severity,
    /// Failures since the last success, the first one's time, and the last logged line's.
    run: Option<Run>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    failures: u64,
    since: Instant,
    logged_at: Instant,
    /// Failures not logged since the last line.
    unlogged: u64,
}

/// What a failure or a success is to be logged as, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// The first failure after a success (or since the start).
    Started,
    /// Still failing: `failures` since the run started `for_seconds` ago, `unlogged` of them
    /// since the last line.
    Still { failures: u64, unlogged: u64, for_seconds: u64 },
    /// A success after `failures` failures over `for_seconds`.
    Recovered { failures: u64, for_seconds: u64 },
}

impl Failures {
    pub fn new(task: &'static str, severity: Severity) -> Self {
        gauge!(FAILING, "task" => task).set(0.0);
        Self { task, severity, run: None }
    }

    /// Counts a failed round and logs it if it starts a run or the last line is
    /// [`REMIND_EVERY`] old. `what` says what failed ("timer loop", "reading the watermarks").
    pub fn failed(&mut self, what: &str, error: &dyn Display) {
        counter!(FAILURES, "task" => self.task).increment(1);
        gauge!(FAILING, "task" => self.task).set(1.0);
        let (task, severity) = (self.task, self.severity);
        let log = |line: &str| match severity {
            Severity::Warn => tracing::warn!(task, error = %error, "{what}: {line}"),
            Severity::Error => tracing::error!(task, error = %error, "{what}: {line}"),
        };
        match self.record_failure(Instant::now()) {
            Some(Told::Started) => {
                log(&format!("failed; while it keeps failing, it is logged again every {} s", REMIND_EVERY.as_secs()))
            }
            Some(Told::Still { failures, unlogged, for_seconds }) => log(&format!(
                "still failing ({failures} failed rounds in {for_seconds} s, {unlogged} since the last line)"
            )),
            Some(Told::Recovered { .. }) | None => {}
        }
    }

    /// Ends a run of failures, if one lasts, with a line that says how long it lasted.
    pub fn succeeded(&mut self, what: &str) {
        if let Some(Told::Recovered { failures, for_seconds }) = self.record_success(Instant::now()) {
            gauge!(FAILING, "task" => self.task).set(0.0);
            tracing::info!(
                task = self.task,
                failures,
                for_seconds,
                "{what}: recovered after {failures} failed rounds in {for_seconds} s"
            );
        }
    }

    fn record_failure(&mut self, now: Instant) -> Option<Told> {
        match &mut self.run {
            None => {
                self.run = Some(Run { failures: 1, since: now, logged_at: now, unlogged: 0 });
                Some(Told::Started)
            }
            Some(run) => {
                run.failures += 1;
                run.unlogged += 1;
                if now.duration_since(run.logged_at) < REMIND_EVERY {
                    return None;
                }
                let told = Told::Still {
                    failures: run.failures,
                    unlogged: run.unlogged,
                    for_seconds: now.duration_since(run.since).as_secs(),
                };
                run.logged_at = now;
                run.unlogged = 0;
                Some(told)
            }
        }
    }

    fn record_success(&mut self, now: Instant) -> Option<Told> {
        let run = self.run.take()?;
        Some(Told::Recovered { failures: run.failures, for_seconds: now.duration_since(run.since).as_secs() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_is_told_when_it_starts_once_a_minute_while_it_lasts_and_when_it_ends() {
        let mut failures = Failures::new("timers", Severity::Error);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(failures.record_success(at(0)), None, "a success with no failure before it says nothing");
        assert_eq!(failures.record_failure(at(0)), Some(Told::Started));
        assert!(failures.run.is_some(), "a run of failures lasts");
        // Ten a second for a minute: none of them logged.
        let told: Vec<Told> = (1..600).filter_map(|i| failures.record_failure(at(i * 100))).collect();
        assert_eq!(told, []);
        assert_eq!(
            failures.record_failure(at(60_000)),
            Some(Told::Still { failures: 601, unlogged: 600, for_seconds: 60 })
        );
        assert_eq!(failures.record_failure(at(60_100)), None);
        assert_eq!(failures.record_success(at(61_000)), Some(Told::Recovered { failures: 602, for_seconds: 61 }));
        assert!(failures.run.is_none(), "the run ended");
        assert_eq!(failures.record_success(at(61_100)), None);
        // The next failure starts a new run, logged at once.
        assert_eq!(failures.record_failure(at(62_000)), Some(Told::Started));
    }

    #[test]
    fn a_reminder_counts_from_the_last_line_not_from_the_start() {
        let mut failures = Failures::new("watermarks", Severity::Warn);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(failures.record_failure(at(0)), Some(Told::Started));
        assert_eq!(failures.record_failure(at(59)), None);
        assert_eq!(failures.record_failure(at(60)), Some(Told::Still { failures: 3, unlogged: 2, for_seconds: 60 }));
        assert_eq!(failures.record_failure(at(119)), None);
        assert_eq!(failures.record_failure(at(120)), Some(Told::Still { failures: 5, unlogged: 2, for_seconds: 120 }));
    }
}
