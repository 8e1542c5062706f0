//! The timer loop (reply deadlines and retry backoffs: `saga_instances.wake_at`, indexed by
//! `saga_wakeups`) and the sampler of in-flight and connection-pool gauges.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use metrics::gauge;
use saga_runtime::failures::{Failures, Severity};
use saga_runtime::CancellationToken;
use sqlx::{Acquire, PgPool};

use crate::engine::{Effects, Engine};
use crate::metrics as m;
use crate::store;

/// How often the timer loop checks that `saga_wakeups` matches `saga_instances.wake_at` (ADR 21).
const REPAIR_EVERY: Duration = Duration::from_secs(60);

/// Handles due sagas until `shutdown`: those whose backoff has ended, and those whose reply
/// deadline has passed and is not later than what `gate` says the replies are applied up to (ADR
/// 29). Claims use `FOR UPDATE SKIP LOCKED`, so replicas share the
/// work without acting on one saga twice, and a restarted orchestrator resumes the stored timers.
pub(crate) async fn run(
    pool: PgPool,
    engine: Arc<Engine>,
    gate: Arc<crate::watermarks::Gate>,
    interval: Duration,
    batch: i64,
    shutdown: CancellationToken,
) {
    let mut repaired_at = tokio::time::Instant::now();
    let mut failures = Failures::new("timers", Severity::Error);
    while !shutdown.is_cancelled() {
        if repaired_at.elapsed() >= REPAIR_EVERY {
            repaired_at = tokio::time::Instant::now();
            match store::repair_wakeups(&pool).await {
                Ok(0) => {}
                Ok(repaired) => {
                    metrics::counter!(m::WAKEUPS_REPAIRED).increment(repaired as u64);
                    tracing::warn!(repaired, "saga_wakeups was out of step with saga_instances.wake_at; repaired");
                }
                Err(error) => tracing::error!(%error, "repairing saga_wakeups"),
            }
        }
        let handled = match tick(&pool, &engine, &gate, batch).await {
            Ok(handled) => {
                failures.succeeded("timer loop");
                handled
            }
            Err(error) => {
                // Each tick while the database is down fails: the first is logged, then one line
                // a minute (saga_runtime::failures).
                failures.failed("timer loop", &format!("{error:#}"));
                0
            }
        };
        if handled as i64 >= batch {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Handles one batch of due sagas in one transaction, each in a savepoint of its own: a saga
/// that cannot be processed is rolled back alone and parked (`NEEDS_ATTENTION`,
/// `UNPROCESSABLE_SAGA`), and the others go on. Only an error of the database itself (it does not
/// answer) fails the batch, to be tried again.
async fn tick(pool: &PgPool, engine: &Engine, gate: &crate::watermarks::Gate, batch: i64) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let now = Utc::now();
    let due = store::claim_due(&mut tx, now, gate.reply_cutoff(now), batch).await?;
    let mut effects = Effects::default();
    for id in &due {
        let mut item = Effects::default();
        let mut savepoint = tx.begin().await?;
        match engine.on_timer(&mut crate::writes::Writes::direct(&mut savepoint), *id, &mut item).await {
            Ok(()) => {
                savepoint.commit().await?;
                effects.extend(item);
            }
            Err(error) if error.is_the_sagas() => {
                savepoint.rollback().await?;
                let mut writes = crate::writes::Writes::direct(&mut tx);
                engine.park(&mut writes, *id, "TIMER", &format!("{error:#}"), &mut effects).await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
    tx.commit().await?;
    effects.record();
    Ok(due.len())
}

/// Samples `saga_in_flight`, `saga_oldest_in_flight_age_seconds`, `database_connections` and
/// `saga_start_requests_waiting`.
pub(crate) async fn sample_gauges(
    pool: PgPool,
    max_connections: u32,
    start_queue: Arc<crate::http::StartQueue>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        if let Some(depth) = start_queue.depth().await {
            gauge!(m::START_REQUESTS_WAITING).set(depth as f64);
        }
        match store::in_flight_by_status(&pool).await {
            Ok(rows) => {
                let mut oldest: f64 = 0.0;
                for status in ["RUNNING", "COMPENSATING"] {
                    let (count, age) =
                        rows.iter().find(|(s, _, _)| s == status).map_or((0, 0.0), |(_, n, age)| (*n, *age));
                    gauge!(m::IN_FLIGHT, "status" => status).set(count as f64);
                    oldest = oldest.max(age);
                }
                gauge!(m::OLDEST_IN_FLIGHT).set(oldest);
            }
            Err(error) => tracing::debug!(%error, "sampling in-flight sagas"),
        }
        gauge!(m::DB_CONNECTIONS, "state" => "open").set(pool.size() as f64);
        gauge!(m::DB_CONNECTIONS, "state" => "idle").set(pool.num_idle() as f64);
        gauge!(m::DB_CONNECTIONS, "state" => "max").set(max_connections as f64);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
