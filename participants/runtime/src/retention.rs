//! Retention: rows that are only kept for a while (finished sagas with their attempts, history and
//! audit; participants' dedupe records; operator idempotency records; dead-letter replay records)
//! are deleted once older than their policy's age, in small batches, each its own short
//! transaction, with a pause between batches, so that the hot path never waits on it.
//!
//! Each policy is one SQL statement that deletes at most `$2` rows older than `$1` (skipping rows
//! locked by someone else) and returns one row of counts, one per table it deleted from. A policy
//! that fails is logged and counted, and the others go on; the next round tries it again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Args;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

pub const DELETED: &str = "saga_retention_deleted_total";
pub const FAILURES: &str = "saga_retention_failures_total";
pub const LAST_RUN: &str = "saga_retention_last_run_timestamp_seconds";
pub const KEEP_SECONDS: &str = "saga_retention_keep_seconds";

/// How often retention runs and how much it deletes at a time.
#[derive(Debug, Clone, Args)]
pub struct RetentionConfig {
    /// How often retention looks for rows past their policy's age (e.g. `1m`, `30s`).
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub retention_interval: Duration,
    /// Most rows of a policy's main table deleted in one transaction.
    #[arg(long, env = "RETENTION_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub retention_batch_size: i64,
    /// Pause between two batches, so that the hot path gets the database between them (e.g. `50ms`).
    #[arg(long, env = "RETENTION_BATCH_PAUSE", default_value = "50ms", value_parser = parse_duration)]
    pub retention_batch_pause: Duration,
}

/// A duration in humantime form: `30d`, `12h`, `90s`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?} is not a duration like 30d, 12h or 90s: {e}"))
}

/// How long something is kept: an age, or `None` for forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

/// An age (`30d`) or `off` (keep forever).
pub fn parse_keep(text: &str) -> Result<Keep, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Keep(None));
    }
    let keep = parse_duration(text)?;
    if keep.is_zero() {
        return Err("a retention of 0 would delete rows as they are written; use `off` to keep them forever".into());
    }
    // Beyond this, "now minus the age" leaves the calendar the database and chrono can hold.
    if keep > Duration::from_secs(100 * 365 * 86_400) {
        return Err("a retention above 100 years is not supported; use `off` to keep rows forever".into());
    }
    Ok(Keep(Some(keep)))
}

/// What is kept, for how long, and the statement that deletes what is older.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The policy's name, and the label of its main table.
    pub name: &'static str,
    /// What it keeps, in words, for people.
    pub what: &'static str,
    /// How long rows are kept; `None`: forever.
    pub keep: Option<Duration>,
    /// Deletes at most `$2` rows older than `$1` (a timestamptz) and returns one row of bigint
    /// counts, one per table of `tables`, the main table first.
    pub delete: String,
    pub tables: &'static [&'static str],
    /// Counts the rows of the main table past their age now, up to `$2` (for people).
    pub eligible: String,
}

impl Policy {
    /// A policy over one table: rows whose `time` column is older than the age go, oldest first,
    /// identified by `key` (a unique column, or `ctid`).
    pub fn one_table(
        name: &'static str,
        what: &'static str,
        keep: Option<Duration>,
        table: &'static [&'static str],
        key: &str,
        time: &str,
    ) -> Self {
        let main = table[0];
        Self {
            name,
            what,
            keep,
            delete: format!(
                "WITH doomed AS (
                     SELECT {key} FROM {main} WHERE {time} < $1 ORDER BY {time} LIMIT $2 FOR UPDATE SKIP LOCKED
                 ), gone AS (
                     DELETE FROM {main} WHERE {key} IN (SELECT {key} FROM doomed) RETURNING 1
                 )
                 SELECT count(*) FROM gone"
            ),
            tables: table,
            eligible: format!("SELECT count(*) FROM (SELECT 1 FROM {main} WHERE {time} < $1 LIMIT $2) s"),
        }
    }
}

/// What retention has done since the process started, for the API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub last_run: Option<DateTime<Utc>>,
    /// Rows deleted since start, by table.
    pub deleted: BTreeMap<String, u64>,
    /// The last error of each policy that failed in the last round.
    pub errors: BTreeMap<String, String>,
}

pub type SharedStatus = Arc<Mutex<Status>>;

pub fn describe_metrics() {
    describe_counter!(DELETED, "Rows deleted by retention, by table");
    describe_counter!(FAILURES, "Retention batches that failed (retried next round), by policy");
    describe_gauge!(LAST_RUN, metrics::Unit::Seconds, "When retention last finished a round (Unix time)");
    describe_gauge!(
        KEEP_SECONDS,
        metrics::Unit::Seconds,
        "How long each retention policy keeps rows (absent: forever)"
    );
}

/// Deletes one batch of a policy older than `cutoff`; the counts by table.
pub async fn delete_batch(
    pool: &PgPool,
    policy: &Policy,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<(&'static str, u64)>> {
    let mut tx = pool.begin().await?;
    // The append-only triggers let retention, and only retention, delete.
    sqlx::query("SET LOCAL saga.retention = 'on'").execute(&mut *tx).await?;
    let row = sqlx::query(&policy.delete).bind(cutoff).bind(limit).fetch_one(&mut *tx).await?;
    tx.commit().await?;
    let mut counts = Vec::with_capacity(policy.tables.len());
    for (i, table) in policy.tables.iter().enumerate() {
        counts.push((*table, row.try_get::<i64, _>(i)?.max(0) as u64));
    }
    Ok(counts)
}

/// One round: every policy, batch after batch, until nothing older is left (or shutdown).
pub async fn run_round(
    pool: &PgPool,
    policies: &[Policy],
    config: &RetentionConfig,
    status: &SharedStatus,
    shutdown: &CancellationToken,
) {
    let mut errors = BTreeMap::new();
    for policy in policies {
        let Some(keep) = policy.keep else { continue };
        let cutoff = Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            match delete_batch(pool, policy, cutoff, config.retention_batch_size).await {
                Ok(counts) => {
                    let main = counts.first().map_or(0, |(_, n)| *n);
                    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
                    for (table, n) in counts {
                        counter!(DELETED, "table" => table).increment(n);
                        *status.deleted.entry(table.to_owned()).or_default() += n;
                    }
                    if main > 0 {
                        tracing::debug!(policy = policy.name, deleted = main, "retention batch");
                    }
                    if (main as i64) < config.retention_batch_size {
                        break;
                    }
                }
                Err(error) => {
                    counter!(FAILURES, "policy" => policy.name).increment(1);
                    tracing::warn!(policy = policy.name, %error, "retention batch failed; trying again next round");
                    errors.insert(policy.name.to_owned(), error.to_string());
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(config.retention_batch_pause) => {}
            }
        }
    }
    let now = Utc::now();
    gauge!(LAST_RUN).set(now.timestamp() as f64);
    let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
    status.last_run = Some(now);
    status.errors = errors;
}

/// Runs retention every `retention_interval` until shutdown. Never ends early: a failing
/// policy is retried next round.
pub async fn run(
    pool: PgPool,
    policies: Vec<Policy>,
    config: RetentionConfig,
    status: SharedStatus,
    shutdown: CancellationToken,
) {
    for policy in &policies {
        for table in policy.tables {
            counter!(DELETED, "table" => *table).increment(0);
        }
        counter!(FAILURES, "policy" => policy.name).increment(0);
        if let Some(keep) = policy.keep {
            gauge!(KEEP_SECONDS, "policy" => policy.name).set(keep.as_secs_f64());
        }
        tracing::info!(
            policy = policy.name,
            keep = policy.keep.map_or("forever".to_owned(), |k| humantime::format_duration(k).to_string()),
            "retention policy"
        );
    }
    loop {
        run_round(&pool, &policies, &config, &status, &shutdown).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.retention_interval) => {}
        }
    }
}

/// One policy as people see it: what it keeps, for how long, how much there is, and how much of
/// it is past its age now (counted up to `cap`).
pub async fn describe(pool: &PgPool, policy: &Policy, status: &Status, cap: i64) -> sqlx::Result<serde_json::Value> {
    // The planner's estimate: exact counts of tens of millions of rows take seconds.
    let rows: Option<f32> = sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
        .bind(policy.tables[0])
        .fetch_optional(pool)
        .await?;
    let eligible: Option<i64> = match policy.keep {
        Some(keep) => {
            let cutoff = Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
            Some(sqlx::query_scalar(&policy.eligible).bind(cutoff).bind(cap + 1).fetch_one(pool).await?)
        }
        None => None,
    };
    Ok(serde_json::json!({
        "policy": policy.name,
        "what": policy.what,
        "tables": policy.tables,
        "keep": policy.keep.map(|k| humantime::format_duration(k).to_string()),
        "keep_seconds": policy.keep.map(|k| k.as_secs()),
        "rows_estimate": rows.map(|r| r.max(0.0) as i64),
        "past_retention": eligible.map(|n| n.min(cap)),
        "past_retention_capped": eligible.is_some_and(|n| n > cap),
        "deleted_since_start": policy.tables.iter().map(|t| (t.to_string(), status.deleted.get(*t).copied().unwrap_or(0))).collect::<BTreeMap<_, _>>(),
        "last_error": status.errors.get(policy.name),
    }))
}

/// The participants' dedupe records: one row per finished `(saga, step, kind)`.
pub fn dedupe_policy(keep: Option<Duration>) -> Policy {
    Policy::one_table(
        "processed_commands",
        "dedupe records of handled commands (a redelivered command older than this would act again)",
        keep,
        &["processed_commands"],
        "ctid",
        "processed_at",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_parse_as_ages_or_off() {
        assert_eq!(parse_keep("30d").unwrap(), Keep(Some(Duration::from_secs(30 * 86_400))));
        assert_eq!(parse_keep(" OFF ").unwrap(), Keep(None));
        assert!(parse_keep("0s").is_err());
        assert!(parse_keep("1000000years").is_err());
        assert!(parse_keep("soon").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
