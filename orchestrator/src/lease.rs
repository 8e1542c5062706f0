//! The registration that keeps commands handed to Kafka from memory from being lost (ADR 28).
//!
//! A consumed batch no longer writes its commands to the outbox: each is already recorded as a
//! pending attempt, which the batch marks as held by this process's registration
//! (`saga_step_attempts.handed_by`) while holding a `FOR KEY SHARE` lock on it. The process renews
//! its registration every third of its lease ([`run`]). A registration not renewed for a lease
//! (its process died, or stalled that long) is adopted by any process ([`adopt`]): the command of
//! each of its still-pending attempts is made again from the saga and its definition and written
//! to the outbox, where the relay publishes it, and the registration is deleted, in transactions
//! that lock it `FOR UPDATE` (so no batch can give it an attempt meanwhile). A process that stops
//! cleanly adopts its own registration on its way out ([`release`]), so that a restart does not
//! wait for the lease. Commands published twice this way are answered twice by the participants,
//! which deduplicate by saga, step, kind and attempt; the second reply is stale and ignored.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, describe_counter};
use saga_runtime::failures::{Failures, Severity};
use saga_runtime::outbox;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::engine::Engine;
use crate::store::{SagaRow, SAGA_COLUMNS};

const COMMANDS_ADOPTED: &str = "saga_lease_commands_adopted_total";
const REGISTRATIONS_ADOPTED: &str = "saga_lease_registrations_adopted_total";
const NOT_REMADE: &str = "saga_lease_commands_not_remade_total";
const RENEWALS_FAILED: &str = "saga_lease_renewals_failed_total";

pub(crate) fn describe() {
    describe_counter!(
        COMMANDS_ADOPTED,
        "Commands of pending attempts written to the outbox because the process that held them in memory stopped or \
         let its lease lapse (ADR 28)"
    );
    describe_counter!(
        REGISTRATIONS_ADOPTED,
        "Registrations of orchestrator processes adopted (stopped, or lease lapsed)"
    );
    describe_counter!(
        NOT_REMADE,
        "Pending attempts whose command could not be made again on adoption (no definition, an unreadable saga): \
         their step's deadline retries or compensates them"
    );
    describe_counter!(RENEWALS_FAILED, "Renewals of this process's registration that failed");
    for name in [COMMANDS_ADOPTED, REGISTRATIONS_ADOPTED, NOT_REMADE, RENEWALS_FAILED] {
        counter!(name).increment(0);
    }
}

/// How many pending attempts one adoption transaction takes.
const CHUNK: i64 = 500;

/// Where this process runs, for people reading `orchestrator_relays`.
pub(crate) fn host() -> String {
    let name = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("{name} pid {}", std::process::id())
}

/// Registers this process; its id marks the attempts whose commands it holds.
pub(crate) async fn register(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("INSERT INTO orchestrator_relays (host) VALUES ($1) RETURNING id")
        .bind(host())
        .fetch_one(pool)
        .await
}

/// Renews the registration `id` every third of `lease`, and adopts every registration whose lease
/// lapsed, until `shutdown`. A failed renewal or adoption is tried again at the next tick (while
/// Postgres is unreachable no one can adopt anything either), and logged when the failures
/// start, once a minute while they last and when they end ([`Failures`]).
pub(crate) async fn run(
    pool: PgPool,
    engine: std::sync::Arc<Engine>,
    id: i64,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let host = host();
    let every = lease / 3;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = Failures::new("lease", Severity::Warn);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The round's first failure, if any.
        let mut failed = renew(&pool, id, &host).await.err();
        let mut renewed = std::time::Instant::now();
        let mut after = None;
        loop {
            // A long adoption (a crashed process held many commands) must not let this
            // process's own lease lapse.
            if renewed.elapsed() >= every {
                if let Err(error) = renew(&pool, id, &host).await {
                    failed.get_or_insert(error);
                }
                renewed = std::time::Instant::now();
            }
            match adopt(&pool, &engine, Which::Lapsed { lease, except: id }, after).await {
                // The next chunk of the same registration, or the next registration.
                Ok(Some(adopted)) => after = adopted.next,
                Ok(None) => break,
                Err(error) => {
                    failed.get_or_insert(format!("adopting a lapsed registration: {error}"));
                    break;
                }
            }
        }
        match failed {
            None => failures.succeeded("renewing and adopting registrations"),
            Some(error) => failures.failed("renewing and adopting registrations", &error),
        }
    }
}

/// Renews the registration `id`, registering it again if it was adopted meanwhile (this process
/// stalled for a lease): its attempts were taken over, and those it marks from now on are held
/// again. A failure is counted and returned; the next tick tries again.
async fn renew(pool: &PgPool, id: i64, host: &str) -> Result<(), String> {
    let renewed: sqlx::Result<bool> = sqlx::query_scalar(
        "INSERT INTO orchestrator_relays (id, host) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now() RETURNING xmax = 0",
    )
    .bind(id)
    .bind(host)
    .fetch_one(pool)
    .await;
    match renewed {
        Ok(true) => {
            tracing::warn!(
                relay = id,
                "this process's registration had been adopted (its lease lapsed); registered again"
            );
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(error) => {
            counter!(RENEWALS_FAILED).increment(1);
            Err(format!("renewing this process's registration (relay {id}): {error}"))
        }
    }
}

/// Adopts this process's own registration, at a clean stop: its held commands go to the outbox
/// for the next process's relay, without waiting for the lease to lapse.
pub(crate) async fn release(pool: &PgPool, engine: &Engine, id: i64) -> sqlx::Result<()> {
    let mut after = None;
    while let Some(adopted) = adopt(pool, engine, Which::Own(id), after).await? {
        after = adopted.next;
    }
    Ok(())
}

/// Which registration to adopt.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which {
    /// Any whose last renewal is older than `lease`, but `except` (this process's own: while it
    /// runs, its renewals are only late).
    Lapsed { lease: Duration, except: i64 },
    /// This one, whatever its renewal.
    Own(i64),
}

/// One step of an adoption, in one transaction.
#[derive(Debug, PartialEq)]
pub(crate) struct Adopted {
    pub(crate) relay: i64,
    /// Commands written to the outbox.
    pub(crate) commands: usize,
    /// Whether the registration is gone (nothing of it is left pending).
    pub(crate) finished: bool,
    /// Where the next step of the same registration goes on (`None`: from the start).
    pub(crate) next: Option<(i64, Uuid)>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct PendingCommand {
    pub(crate) saga_id: Uuid,
    pub(crate) step_index: i32,
    pub(crate) step_name: String,
    pub(crate) kind: String,
    pub(crate) attempt: i32,
    pub(crate) deadline_at: DateTime<Utc>,
}

/// Adopts up to [`CHUNK`] pending attempts of one registration: their commands into the outbox,
/// their `handed_by` cleared; the registration deleted once none is left. `None`: nothing to adopt.
/// `after`: the registration and saga id the last step of the same adoption ended at, so that a
/// registration with many pending attempts is read once, not once per chunk.
pub(crate) async fn adopt(
    pool: &PgPool,
    engine: &Engine,
    which: Which,
    after: Option<(i64, Uuid)>,
) -> sqlx::Result<Option<Adopted>> {
    let mut tx = pool.begin().await?;
    // A batch marking attempts holds the registration FOR KEY SHARE: a lapsed one being used
    // right now is skipped (its process is alive after all); an own one is waited for.
    let relay: Option<i64> = match which {
        Which::Lapsed { lease, except } => {
            sqlx::query_scalar(
                "SELECT id FROM orchestrator_relays
                 WHERE heartbeat_at < now() - $1 * interval '1 millisecond' AND id <> $2
                 ORDER BY heartbeat_at LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .bind(lease.as_millis() as f64)
            .bind(except)
            .fetch_optional(&mut *tx)
            .await?
        }
        Which::Own(id) => {
            sqlx::query_scalar("SELECT id FROM orchestrator_relays WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
        }
    };
    let Some(relay) = relay else { return Ok(None) };
    let after = after.filter(|(of, _)| *of == relay).map(|(_, saga)| saga);
    // Through the sagas in flight (every saga waiting for a reply has a wake-up): `handed_by` is
    // not indexed. An attempt being finished right now (its row locked) is left for the next step.
    let pending: Vec<PendingCommand> = sqlx::query_as(
        "SELECT a.saga_id, a.step_index, a.step_name, a.kind, a.attempt, a.deadline_at
         FROM saga_wakeups w JOIN saga_step_attempts a ON a.saga_id = w.saga_id
         WHERE a.handed_by = $1 AND a.status = 'PENDING' AND ($3::uuid IS NULL OR w.saga_id > $3)
         ORDER BY w.saga_id LIMIT $2 FOR UPDATE OF a SKIP LOCKED",
    )
    .bind(relay)
    .bind(CHUNK)
    .bind(after)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = pending.iter().map(|p| p.saga_id).collect();
    let sagas: HashMap<Uuid, SagaRow> =
        sqlx::query_as::<_, SagaRow>(&format!("SELECT {SAGA_COLUMNS} FROM saga_instances WHERE id = ANY($1)"))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
    let mut messages = Vec::with_capacity(pending.len());
    let mut not_remade = 0;
    for attempt in &pending {
        let made = match sagas.get(&attempt.saga_id) {
            Some(row) => engine.pending_command(row, attempt),
            None => Err("no such saga".to_owned()),
        };
        match made {
            Ok(message) => messages.push(message),
            Err(reason) => {
                not_remade += 1;
                tracing::error!(
                    saga_id = %attempt.saga_id, step = attempt.step_name, attempt = attempt.attempt, reason,
                    "the command of a pending attempt cannot be made again; the step's deadline handles it"
                );
            }
        }
    }
    outbox::insert(&mut tx, &messages).await?;
    sqlx::query(
        "UPDATE saga_step_attempts a SET handed_by = NULL
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[]) AS u(saga_id, step_name, kind, attempt)
         WHERE a.saga_id = u.saga_id AND a.step_name = u.step_name AND a.kind = u.kind AND a.attempt = u.attempt",
    )
    .bind(&ids)
    .bind(pending.iter().map(|p| p.step_name.as_str()).collect::<Vec<_>>())
    .bind(pending.iter().map(|p| p.kind.as_str()).collect::<Vec<_>>())
    .bind(pending.iter().map(|p| p.attempt).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    // Deleted only when nothing of it is pending any more, rows skipped or passed included.
    let finished = (pending.len() as i64) < CHUNK
        && sqlx::query(
            "DELETE FROM orchestrator_relays r WHERE r.id = $1 AND NOT EXISTS (
                 SELECT FROM saga_wakeups w JOIN saga_step_attempts a ON a.saga_id = w.saga_id
                 WHERE a.handed_by = $1 AND a.status = 'PENDING')",
        )
        .bind(relay)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
    tx.commit().await?;
    counter!(COMMANDS_ADOPTED).increment(messages.len() as u64);
    counter!(NOT_REMADE).increment(not_remade);
    if finished {
        counter!(REGISTRATIONS_ADOPTED).increment(1);
    }
    if !pending.is_empty() || finished {
        tracing::info!(
            relay,
            commands = messages.len(),
            finished,
            own = matches!(which, Which::Own(_)),
            "adopted the commands of a registration"
        );
    }
    if pending.is_empty() && !finished {
        // Only rows being finished right now are left: come back at the next tick.
        return Ok(None);
    }
    // A full chunk: go on after it. A short one that could not finish (rows being finished right
    // now): from the start at the next tick.
    let next = ((pending.len() as i64) == CHUNK).then(|| pending.last().map(|p| (relay, p.saga_id))).flatten();
    Ok(Some(Adopted { relay, commands: messages.len(), finished, next }))
}
