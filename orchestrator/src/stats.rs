//! Saga stats over a window that stay fast at millions of sagas (ADR 20).
//!
//! COMPLETED and FAILED sagas never change again. A trigger queues each one as it ends
//! (`saga_stats_pending`); the rollup task counts the queued sagas into `saga_stats` by the hour,
//! the minute and the ten seconds they were created in, and dequeues them in the same
//! transaction, so each is counted once. A window's stats are, in one snapshot: the rolled-up
//! counts of the whole hours inside it, the whole minutes and ten-second spans around them, plus a
//! live count of the sagas the rollup cannot have: those in the part-spans (under ten seconds) at
//! the window's edges, those not ended (in flight, needing attention) and those ended but still
//! queued.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use saga_runtime::failures::{Failures, Severity};
use saga_runtime::CancellationToken;
use sqlx::{PgConnection, PgPool};

/// The bin of a duration in milliseconds: 0 under 1 ms, b >= 1 for [1.1^(b-1), 1.1^b).
const BIN_OF_MS: &str = "CASE WHEN ms < 1 THEN 0 ELSE least(floor(ln(ms) / ln(1.1))::int + 1, 1000) END";

/// The duration bin of the saga whose columns start with `prefix` (`s.` or nothing): that of a
/// COMPLETED saga with a finite start and end, NULL for any other. One expression for the rollup
/// and the live count, so that both bin alike; a row without an end (an import, a hand edit)
/// has no duration rather than stopping the rollup.
fn duration_bin(prefix: &str) -> String {
    format!(
        "CASE WHEN {prefix}status = 'COMPLETED' AND isfinite({prefix}ended_at) AND isfinite({prefix}created_at) THEN
             (SELECT {BIN_OF_MS} FROM (SELECT extract(epoch FROM {prefix}ended_at - {prefix}created_at)::float8
                 * 1000 AS ms) d)
         END"
    )
}
/// The relative width of a bin.
const BIN_BASE: f64 = 1.1;

/// Counts the queued ended sagas into `saga_stats`, at most `limit` of them, in one transaction;
/// how many it took off the queue.
pub(crate) async fn roll_up(pool: &PgPool, limit: i64) -> sqlx::Result<i64> {
    let bin = duration_bin("s.");
    let sql = format!(
        "WITH taken AS (
             DELETE FROM saga_stats_pending WHERE saga_id IN (
                 SELECT saga_id FROM saga_stats_pending ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING saga_id
         ), ended AS (
             SELECT s.saga_type, s.status, coalesce(s.failure_step, '') AS failure_step,
                    coalesce(s.failure_code, '') AS failure_code, s.created_at,
                    coalesce({bin}, -1) AS duration_bin
             FROM taken JOIN saga_instances s ON s.id = taken.saga_id
             WHERE s.status IN ('COMPLETED', 'FAILED')
         ), counted AS (
             INSERT INTO saga_stats (resolution, bucket, saga_type, status, failure_step, failure_code,
                                     duration_bin, sagas)
             SELECT r.resolution, to_timestamp(floor(extract(epoch FROM e.created_at) / r.seconds) * r.seconds),
                    e.saga_type, e.status, e.failure_step, e.failure_code, e.duration_bin, count(*)
             FROM ended e CROSS JOIN (VALUES ('10s', 10), ('minute', 60), ('hour', 3600)) AS r(resolution, seconds)
             GROUP BY 1, 2, 3, 4, 5, 6, 7
             -- One order of row locks for every replica's rollup: no deadlock between them.
             ORDER BY 1, 2, 3, 4, 5, 6, 7
             ON CONFLICT (resolution, bucket, saga_type, status, failure_step, failure_code, duration_bin)
             DO UPDATE SET sagas = saga_stats.sagas + EXCLUDED.sagas
         )
         SELECT count(*) FROM taken"
    );
    // Planned at each call (unprepared), for the queue's size at that moment: see the outbox's
    // DELETE_PUBLISHED.
    sqlx::query_scalar(&sql).persistent(false).bind(limit).fetch_one(pool).await
}

/// Rolls up ended sagas until `shutdown`: a batch every `interval`, at once again while the queue
/// is longer than a batch. An error (the database not answering) is logged and counted, and the
/// next round tries again; the queue keeps what was not counted.
pub(crate) async fn run(pool: PgPool, interval: Duration, batch: i64, shutdown: CancellationToken) {
    let mut failures = Failures::new("stats-rollup", Severity::Error);
    while !shutdown.is_cancelled() {
        let taken = match roll_up(&pool, batch).await {
            Ok(taken) => {
                metrics::counter!(ROLLED_UP).increment(taken as u64);
                failures.succeeded("saga stats rollup");
                taken
            }
            Err(error) => {
                metrics::counter!(ROLLUP_FAILURES).increment(1);
                failures.failed("saga stats rollup", &format!("{error:#}"));
                0
            }
        };
        if taken >= batch {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

pub(crate) const ROLLED_UP: &str = "saga_stats_rolled_up_total";
pub(crate) const ROLLUP_FAILURES: &str = "saga_stats_rollup_failures_total";

pub(crate) fn describe() {
    metrics::describe_counter!(ROLLED_UP, "Ended sagas counted into the stats rollup (saga_stats)");
    metrics::describe_counter!(ROLLUP_FAILURES, "Rounds of the stats rollup that failed (retried)");
    metrics::counter!(ROLLED_UP).increment(0);
    metrics::counter!(ROLLUP_FAILURES).increment(0);
}

/// One group of sagas: its status, failure and attention, the bin of its duration (COMPLETED),
/// and how many.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Group {
    status: String,
    failure_step: Option<String>,
    failure_code: Option<String>,
    attention_step: Option<String>,
    duration_bin: Option<i32>,
}

/// A group as read: status, failure step, failure code, attention step, duration bin, sagas.
type GroupRow = (String, Option<String>, Option<String>, Option<String>, Option<i32>, i64);

/// Saga counts and durations over sagas created in [from, to).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Stats {
    pub(crate) by_status: Vec<(String, i64)>,
    pub(crate) failures_by_step: Vec<(String, i64)>,
    pub(crate) failures_by_code: Vec<(String, i64)>,
    pub(crate) attention_by_step: Vec<(String, i64)>,
    /// p50, p95, p99 of completed sagas' durations, in seconds, within 5 % (the bins' width).
    pub(crate) completed_seconds: Option<[f64; 3]>,
}

fn ceil(t: DateTime<Utc>, unit: TimeDelta) -> DateTime<Utc> {
    let floor = t.duration_trunc(unit).unwrap_or(t);
    if floor == t {
        t
    } else {
        floor + unit
    }
}

fn floor(t: DateTime<Utc>, unit: TimeDelta) -> DateTime<Utc> {
    t.duration_trunc(unit).unwrap_or(t)
}

/// The stats of the sagas created in [from, to), of one type or all, read in one snapshot.
pub(crate) async fn window(
    conn: &mut PgConnection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    saga_type: Option<&str>,
) -> sqlx::Result<Stats> {
    if from >= to {
        return Ok(Stats::default());
    }
    // [a, b): the whole ten-second spans of the window; [ma, mb): its whole minutes; [ha, hb): its
    // whole hours. Each is empty (at the end of the one around it) when there is none.
    let inward = |from: DateTime<Utc>, to: DateTime<Utc>, unit: TimeDelta| {
        let (a, b) = (ceil(from, unit), floor(to, unit));
        if a < b {
            (a, b)
        } else {
            (to, to)
        }
    };
    let (a, b) = inward(from, to, TimeDelta::seconds(10));
    let (ma, mb) = inward(a, b, TimeDelta::minutes(1));
    let (ha, hb) = inward(ma, mb, TimeDelta::hours(1));

    let mut groups: BTreeMap<Group, i64> = BTreeMap::new();
    let mut add = |rows: Vec<GroupRow>| {
        for (status, failure_step, failure_code, attention_step, duration_bin, n) in rows {
            let group = Group { status, failure_step, failure_code, attention_step, duration_bin };
            *groups.entry(group).or_default() += n;
        }
    };
    let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    // What the rollup counted: whole hours, the whole minutes around them, the whole ten-second
    // spans around those.
    add(sqlx::query_as(
        "SELECT status, nullif(failure_step, ''), nullif(failure_code, ''), NULL::text,
                nullif(duration_bin, -1), sum(sagas)::int8
         FROM saga_stats
         WHERE ($7::text IS NULL OR saga_type = $7)
           AND ((resolution = 'hour' AND bucket >= $5 AND bucket < $6)
             OR (resolution = 'minute' AND ((bucket >= $3 AND bucket < $5) OR (bucket >= $6 AND bucket < $4)))
             OR (resolution = '10s' AND ((bucket >= $1 AND bucket < $3) OR (bucket >= $4 AND bucket < $2))))
         GROUP BY 1, 2, 3, 4, 5",
    )
    .bind(a)
    .bind(b)
    .bind(ma)
    .bind(mb)
    .bind(ha)
    .bind(hb)
    .bind(saga_type)
    .fetch_all(&mut *tx)
    .await?);
    // What it cannot have: every saga of the part-spans at the edges; in the whole spans, the
    // sagas not ended and those ended but not counted yet.
    let columns = format!("status, failure_step, failure_code, attention_step, {}", duration_bin(""));
    let of_type = "($5::text IS NULL OR saga_type = $5)";
    let live_columns = "status, failure_step, failure_code, attention_step, created_at, ended_at";
    let pending_columns = "s.status, s.failure_step, s.failure_code, s.attention_step, s.created_at, s.ended_at";
    let live = format!(
        "SELECT {columns} AS bin, count(*) FROM (
             SELECT {live_columns} FROM saga_instances WHERE {of_type} AND created_at >= $1 AND created_at < $3
             UNION ALL
             SELECT {live_columns} FROM saga_instances WHERE {of_type} AND created_at >= $4 AND created_at < $2
             UNION ALL
             SELECT {live_columns} FROM saga_instances WHERE {of_type} AND created_at >= $3 AND created_at < $4
                 AND status IN ('RUNNING', 'COMPENSATING')
             UNION ALL
             SELECT {live_columns} FROM saga_instances WHERE {of_type} AND created_at >= $3 AND created_at < $4
                 AND status = 'NEEDS_ATTENTION'
             UNION ALL
             SELECT {pending_columns} FROM saga_stats_pending p JOIN saga_instances s ON s.id = p.saga_id
             WHERE {of_type} AND p.created_at >= $3 AND p.created_at < $4 AND s.status IN ('COMPLETED', 'FAILED')
         ) s GROUP BY 1, 2, 3, 4, 5"
    );
    add(sqlx::query_as(&live).bind(from).bind(to).bind(a).bind(b).bind(saga_type).fetch_all(&mut *tx).await?);
    tx.commit().await?;
    Ok(summarise(&groups))
}

fn summarise(groups: &BTreeMap<Group, i64>) -> Stats {
    let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
    let (mut by_step, mut by_code, mut attention) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut bins: BTreeMap<i32, i64> = BTreeMap::new();
    for (g, &n) in groups {
        *by_status.entry(g.status.clone()).or_default() += n;
        if matches!(g.status.as_str(), "FAILED" | "NEEDS_ATTENTION" | "COMPENSATING") {
            if let Some(step) = &g.failure_step {
                *by_step.entry(step.clone()).or_default() += n;
            }
            if let Some(code) = &g.failure_code {
                *by_code.entry(code.clone()).or_default() += n;
            }
        }
        if g.status == "NEEDS_ATTENTION" {
            if let Some(step) = &g.attention_step {
                *attention.entry(step.clone()).or_default() += n;
            }
        }
        if g.status == "COMPLETED" {
            if let Some(bin) = g.duration_bin {
                *bins.entry(bin).or_default() += n;
            }
        }
    }
    // Most first, then by key, as the API has always listed them.
    let sorted = |map: BTreeMap<String, i64>| {
        let mut pairs: Vec<(String, i64)> = map.into_iter().filter(|(_, n)| *n > 0).collect();
        pairs.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
        pairs
    };
    Stats {
        by_status: sorted(by_status),
        failures_by_step: sorted(by_step),
        failures_by_code: sorted(by_code),
        attention_by_step: sorted(attention),
        completed_seconds: percentiles(&bins),
    }
}

/// The seconds a bin stands for: the geometric middle of its range, so within 5 % of any value
/// in it.
fn bin_seconds(bin: i32) -> f64 {
    if bin <= 0 {
        0.0005
    } else {
        BIN_BASE.powf(bin as f64 - 0.5) / 1000.0
    }
}

/// p50, p95 and p99 (nearest rank) of the binned durations.
fn percentiles(bins: &BTreeMap<i32, i64>) -> Option<[f64; 3]> {
    let total: i64 = bins.values().sum();
    if total == 0 {
        return None;
    }
    let at = |q: f64| {
        let rank = ((q * total as f64).ceil() as i64).max(1);
        let mut seen = 0;
        for (&bin, &n) in bins {
            seen += n;
            if seen >= rank {
                return bin_seconds(bin);
            }
        }
        bin_seconds(*bins.keys().last().expect("not empty"))
    };
    Some([at(0.5), at(0.95), at(0.99)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bin_stands_for_its_values_within_five_per_cent() {
        for ms in [1.0_f64, 1.7, 12.0, 84.0, 999.0, 61_234.0, 3_600_000.0] {
            let bin = (ms.ln() / BIN_BASE.ln()).floor() as i32 + 1;
            let seconds = bin_seconds(bin);
            let error = (seconds * 1000.0 - ms).abs() / ms;
            assert!(error < 0.05, "{ms} ms -> bin {bin} -> {seconds} s ({error})");
        }
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        // 98 sagas in the bin of ~100 ms, one of ~1 s, one of ~10 s.
        let bin = |ms: f64| (ms.ln() / BIN_BASE.ln()).floor() as i32 + 1;
        let bins = BTreeMap::from([(bin(100.0), 98), (bin(1000.0), 1), (bin(10_000.0), 1)]);
        let [p50, p95, p99] = percentiles(&bins).unwrap();
        assert!((p50 - 0.1).abs() < 0.005 && (p95 - 0.1).abs() < 0.005, "{p50} {p95}");
        assert!((p99 - 1.0).abs() < 0.05, "{p99}");
        assert_eq!(percentiles(&BTreeMap::new()), None);
    }

    #[test]
    fn window_edges_round_to_whole_minutes_inward() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let minute = TimeDelta::minutes(1);
        assert_eq!(ceil(t("2026-11-30T10:00:00Z"), minute), t("2026-11-30T10:00:00Z"));
        assert_eq!(ceil(t("2026-11-30T10:00:00.001Z"), minute), t("2026-11-30T10:01:00Z"));
        assert_eq!(floor(t("2026-11-30T10:00:59.999Z"), minute), t("2026-11-30T10:00:00Z"));
    }
}

/// Against the real Postgres: the stats of any window, whatever has been rolled up so far, equal
/// a brute-force count over `saga_instances` (durations within the bins' 5 %).
#[cfg(test)]
mod window_tests {
    use sqlx::{Executor, PgPool};

    use super::*;
    use crate::store::scratch;

    type Exact = (Vec<(String, i64)>, Vec<(String, i64)>, Vec<(String, i64)>, Vec<(String, i64)>, Vec<f64>);

    /// The stats counted the obvious way, with the durations (ms) of the completed sagas sorted.
    async fn brute_force(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>, saga_type: Option<&str>) -> Exact {
        let window = "created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR saga_type = $3)";
        let mut lists = Vec::new();
        for (column, statuses) in [
            ("status", "TRUE"),
            ("failure_step", "status IN ('FAILED', 'NEEDS_ATTENTION', 'COMPENSATING')"),
            ("failure_code", "status IN ('FAILED', 'NEEDS_ATTENTION', 'COMPENSATING')"),
            ("attention_step", "status = 'NEEDS_ATTENTION'"),
        ] {
            let mut rows: Vec<(String, i64)> = sqlx::query_as(&format!(
                "SELECT {column}, count(*) FROM saga_instances WHERE {window} AND {column} IS NOT NULL AND {statuses}
                 GROUP BY 1"
            ))
            .bind(from)
            .bind(to)
            .bind(saga_type)
            .fetch_all(pool)
            .await
            .unwrap();
            rows.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
            lists.push(rows);
        }
        let durations: Vec<f64> = sqlx::query_scalar(&format!(
            "SELECT extract(epoch FROM ended_at - created_at)::float8 * 1000 FROM saga_instances
             WHERE {window} AND status = 'COMPLETED' AND isfinite(ended_at) ORDER BY 1"
        ))
        .bind(from)
        .bind(to)
        .bind(saga_type)
        .fetch_all(pool)
        .await
        .unwrap();
        let [a, b, c, d]: [Vec<(String, i64)>; 4] = lists.try_into().unwrap();
        (a, b, c, d, durations)
    }

    async fn check(pool: &PgPool, from: DateTime<Utc>, to: DateTime<Utc>, saga_type: Option<&str>, when: &str) {
        let mut conn = pool.acquire().await.unwrap();
        let got = window(&mut conn, from, to, saga_type).await.unwrap();
        let (by_status, by_step, by_code, attention, durations) = brute_force(pool, from, to, saga_type).await;
        let what = format!("{when}: [{from}, {to}) {saga_type:?}");
        assert_eq!(got.by_status, by_status, "{what}");
        assert_eq!(got.failures_by_step, by_step, "{what}");
        assert_eq!(got.failures_by_code, by_code, "{what}");
        assert_eq!(got.attention_by_step, attention, "{what}");
        match got.completed_seconds {
            None => assert!(durations.is_empty(), "{what}: no percentiles for {} completed", durations.len()),
            Some(quantiles) => {
                for (q, seconds) in [0.5, 0.95, 0.99].into_iter().zip(quantiles) {
                    let rank = ((q * durations.len() as f64).ceil() as usize).max(1);
                    let exact = durations[rank - 1];
                    let error = (seconds * 1000.0 - exact).abs() / exact;
                    assert!(error < 0.05, "{what}: p{q} {seconds} s against {exact} ms");
                }
            }
        }
    }

    #[tokio::test]
    async fn any_window_counts_what_a_brute_force_count_does() {
        let (conn, name) = scratch::database("stats").await;
        drop(conn);
        let pool = PgPool::connect(&scratch::url(&name)).await.unwrap();
        // Not on ten seconds: every window below has part-spans at its edges.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT date_trunc('hour', now()) + interval '37 min 12.345 s'")
            .fetch_one(&pool)
            .await
            .unwrap();
        // 4,000 sagas over the last four hours, two types, started RUNNING.
        pool.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at)
             SELECT gen_random_uuid(), CASE WHEN i % 7 = 0 THEN 'refund' ELSE 'order-fulfilment' END, 1, 'k' || i,
                 'h', '{}', 'RUNNING', 0, 'verify_order', 'ACTION', 1, 'REPLY', now(), t, t
             FROM generate_series(1, 4000) AS i,
                 LATERAL (SELECT date_trunc('hour', now()) + interval '37 min 12.345 s'
                     - (('x' || substr(md5(i::text), 1, 8))::bit(32)::int8 % 14400000) * interval '1 ms' AS t) AS tt",
        )
        .await
        .unwrap();
        // Most of them end one way or another (the update trigger queues the ended).
        let end = |share: &str| {
            format!(
                "UPDATE saga_instances SET
                     status = CASE WHEN h % 20 = 3 THEN 'FAILED' WHEN h % 50 = 7 THEN 'NEEDS_ATTENTION'
                                   WHEN h % 40 = 9 THEN 'COMPENSATING' ELSE 'COMPLETED' END,
                     failure_step = CASE WHEN h % 20 = 3 OR h % 50 = 7 OR h % 40 = 9
                                         THEN (ARRAY['reserve_inventory', 'charge_payment'])[1 + h % 2] END,
                     failure_code = CASE WHEN h % 20 = 3 OR h % 50 = 7 OR h % 40 = 9
                                         THEN (ARRAY['PAYMENT_DECLINED', 'OUT_OF_STOCK', 'X'])[1 + h % 3] END,
                     attention_step = CASE WHEN h % 50 = 7 THEN 'verify_order' END,
                     wake_at = CASE WHEN h % 40 = 9 AND h % 20 <> 3 AND h % 50 <> 7 THEN now() END,
                     ended_at = CASE WHEN h % 40 = 9 AND h % 20 <> 3 AND h % 50 <> 7 THEN NULL
                                     ELSE created_at + (1 + h % 90000) * interval '1 ms' END
                 FROM (SELECT id AS hid, ('x' || substr(md5(id::text), 1, 7))::bit(28)::int AS h FROM saga_instances) x
                 WHERE id = hid AND status = 'RUNNING' AND {share}"
            )
        };
        pool.execute(end("h % 10 <> 0").as_str()).await.unwrap();

        let (minute, hour) = (TimeDelta::minutes(1), TimeDelta::hours(1));
        let top = floor(now, hour);
        let mut windows = vec![
            (now - hour, now),
            (now - TimeDelta::minutes(15), now),
            (now - TimeDelta::hours(5), now + minute),
            (top - TimeDelta::hours(3), top),
            (top - TimeDelta::hours(2) - TimeDelta::seconds(30), top - TimeDelta::seconds(1)),
            (floor(now, minute) - TimeDelta::minutes(2), floor(now, minute)),
            (floor(now, minute) - TimeDelta::seconds(50), floor(now, minute) - TimeDelta::seconds(10)),
            (now - TimeDelta::seconds(25), now),
            (now - TimeDelta::seconds(90), now - TimeDelta::seconds(70)),
            (now, now - hour),
        ];
        // And some pseudo-random ones.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..12 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let start = now - TimeDelta::milliseconds((x >> 33) as i64 % 15_000_000);
            let length = TimeDelta::milliseconds((x >> 11) as i64 % 9_000_000);
            windows.push((start, start + length));
        }
        let check_all = |when: &'static str| {
            let (pool, windows) = (&pool, &windows);
            async move {
                for (i, &(from, to)) in windows.iter().enumerate() {
                    let saga_type = [None, Some("order-fulfilment"), Some("refund")][i % 3];
                    check(pool, from, to, saga_type, when).await;
                }
            }
        };
        check_all("nothing rolled up").await;
        assert_eq!(roll_up(&pool, 1500).await.unwrap(), 1500);
        check_all("part rolled up").await;
        while roll_up(&pool, 1500).await.unwrap() > 0 {}
        check_all("all rolled up").await;
        // More end, some inserted ended already (the insert trigger queues them).
        pool.execute(end("TRUE").as_str()).await.unwrap();
        pool.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, created_at, updated_at, ended_at)
             SELECT gen_random_uuid(), 'refund', 1, 'imported' || i, 'h', '{}', 'COMPLETED', 0, 'verify_order',
                 'ACTION', 1, 'NOTHING', now() - i * interval '1 min', now(), now() - i * interval '1 min' + interval '2 s'
             FROM generate_series(1, 100) AS i",
        )
        .await
        .unwrap();
        // Rows a hand or an import may leave: COMPLETED without an end, or ended at infinity. They
        // are counted without a duration; they do not stop the rollup.
        pool.execute(
            "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, input,
                 status, step_index, step_name, step_kind, attempt, waiting, created_at, updated_at, ended_at)
             VALUES (gen_random_uuid(), 'refund', 1, 'no-end', 'h', '{}', 'COMPLETED', 0, 'verify_order', 'ACTION', 1,
                     'NOTHING', now() - interval '5 min', now(), NULL),
                    (gen_random_uuid(), 'refund', 1, 'end-at-infinity', 'h', '{}', 'COMPLETED', 0, 'verify_order',
                     'ACTION', 1, 'NOTHING', now() - interval '7 min', now(), 'infinity')",
        )
        .await
        .unwrap();
        check_all("more ended since").await;
        while roll_up(&pool, 1500).await.unwrap() > 0 {}
        check_all("all rolled up again").await;
        // Each ended saga counted once at each resolution.
        let ended: i64 =
            sqlx::query_scalar("SELECT count(*) FROM saga_instances WHERE status IN ('COMPLETED', 'FAILED')")
                .fetch_one(&pool)
                .await
                .unwrap();
        let counted: Vec<(String, i64)> =
            sqlx::query_as("SELECT resolution, sum(sagas)::int8 FROM saga_stats GROUP BY 1 ORDER BY 1")
                .fetch_all(&pool)
                .await
                .unwrap();
        let expected: Vec<(String, i64)> = ["10s", "hour", "minute"].map(|r| (r.to_owned(), ended)).into();
        assert_eq!(counted, expected);
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM saga_stats_pending").fetch_one(&pool).await.unwrap();
        assert_eq!(pending, 0);
        pool.close().await;
        scratch::drop(&name).await;
    }
}
