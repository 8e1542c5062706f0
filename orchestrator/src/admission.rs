//! Admission control: overload becomes queueing, not compensation.
//!
//! Every saga type has a bound on its sagas in flight (`RUNNING` or `COMPENSATING`). While a
//! type is at its bound the orchestrator takes no more start requests: its consumer pauses the
//! `saga-start-requests` partitions, so the backlog waits durably in Kafka (and the order API
//! goes on accepting orders), and `POST /api/v1/sagas` answers 429 with `Retry-After`. The
//! sagas in flight thus never queue behind more than the bound in the participants' topics, so
//! a step's deadline is not spent waiting in a queue the orchestrator itself filled.
//!
//! The counts are read from `saga_instances` every [`REFRESH`] by a supervised task (shared by
//! every replica, since they read the same table), and the sagas this replica starts in between
//! are added, so a burst cannot run past the bound. A start is registered before its transaction
//! commits, and each read takes one snapshot for the count and for which registered starts it
//! sees: a saga is counted either by the read or as starting, never twice and never missed (it
//! was counted twice at times, and a third start at a bound of 3 got a 429). The start-requests
//! topic carries every saga type: while one type is at its bound, starts of the others wait too.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::gauge;
use saga_runtime::failures::{Failures, Severity};
use saga_runtime::CancellationToken;
use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics as m;

/// How often the counts of sagas in flight are read again.
pub(crate) const REFRESH: Duration = Duration::from_millis(200);

/// The bound of sagas in flight: a default and per-type overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) default: i64,
    pub(crate) per_type: BTreeMap<String, i64>,
}

impl Limits {
    pub(crate) fn of(&self, saga_type: &str) -> i64 {
        self.per_type.get(saga_type).copied().unwrap_or(self.default)
    }
}

/// Parses `500` or `500,order-fulfilment=2000,refund=50`: a default, then overrides by type.
pub(crate) fn parse_limits(text: &str) -> Result<Limits, String> {
    let mut limits = Limits { default: 500, per_type: BTreeMap::new() };
    let number = |s: &str| -> Result<i64, String> {
        s.trim().parse::<i64>().ok().filter(|n| *n >= 1).ok_or_else(|| format!("{s:?} is not a number of 1 or more"))
    };
    for (i, entry) in text.split(',').map(str::trim).filter(|e| !e.is_empty()).enumerate() {
        match entry.split_once('=') {
            Some((saga_type, n)) => {
                limits.per_type.insert(saga_type.trim().to_owned(), number(n)?);
            }
            None if i == 0 => limits.default = number(entry)?,
            None => return Err(format!("{entry:?}: only the first entry may be a bare default")),
        }
    }
    Ok(limits)
}

/// What admission knows of one saga type.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct TypeAdmission {
    /// Sagas RUNNING or COMPENSATING.
    pub(crate) in_flight: i64,
    /// The bound; at it, starts wait.
    pub(crate) limit: i64,
    /// Whether starts of this type wait now.
    pub(crate) saturated: bool,
}

pub(crate) struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// In flight per type: the last read, plus the starts registered and not seen by it.
    in_flight: BTreeMap<String, i64>,
    /// Sagas registered as starting and not yet seen by a read, with their type and when.
    starting: HashMap<Uuid, (String, Instant)>,
}

/// A registered start not seen by a read after this long is dropped: its transaction never
/// committed and its guard was not dropped either (a task that hangs between the two).
const STARTING_AT_MOST: Duration = Duration::from_secs(60);

impl Counts {
    fn add(&mut self, saga_type: &str, n: i64) {
        *self.in_flight.entry(saga_type.to_owned()).or_default() += n;
    }
}

/// Starts registered with [`Admission::starting`], until their transaction committed
/// ([`Starting::committed`]); dropped otherwise, which takes them back.
#[must_use = "call committed() once the transaction committed"]
pub(crate) struct Starting<'a> {
    admission: &'a Admission,
    ids: Vec<Uuid>,
}

impl Starting<'_> {
    pub(crate) fn committed(mut self) {
        self.ids.clear();
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut counts = self.admission.lock();
        for id in &self.ids {
            if let Some((saga_type, _)) = counts.starting.remove(id) {
                counts.add(&saga_type, -1);
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits, saga_types: impl IntoIterator<Item = String>) -> Self {
        let in_flight = saga_types.into_iter().map(|t| (t, 0)).collect();
        Self { limits, counts: Mutex::new(Counts { in_flight, starting: HashMap::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether starts of `saga_type` must wait.
    pub(crate) fn saturated(&self, saga_type: &str) -> bool {
        self.lock().in_flight.get(saga_type).copied().unwrap_or(0) >= self.limits.of(saga_type)
    }

    /// Whether starts of any type must wait (the start-requests topic carries them all).
    pub(crate) fn any_saturated(&self) -> bool {
        self.lock().in_flight.iter().any(|(t, n)| *n >= self.limits.of(t))
    }

    /// Registers sagas a transaction created, before it commits; call
    /// [`Starting::committed`] once it did (dropping the guard takes them back).
    pub(crate) fn starting<'s>(&self, created: impl IntoIterator<Item = (&'s str, Uuid)>) -> Starting<'_> {
        let mut counts = self.lock();
        let now = Instant::now();
        let mut ids = Vec::new();
        for (saga_type, id) in created {
            if counts.starting.insert(id, (saga_type.to_owned(), now)).is_none() {
                counts.add(saga_type, 1);
                ids.push(id);
            }
        }
        Starting { admission: self, ids }
    }

    /// Every type's admission, for the stats endpoint.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, TypeAdmission> {
        self.lock()
            .in_flight
            .iter()
            .map(|(t, n)| {
                let limit = self.limits.of(t);
                (t.clone(), TypeAdmission { in_flight: *n, limit, saturated: *n >= limit })
            })
            .collect()
    }

    /// Reads the counts again. One snapshot (repeatable read) serves the count and the check of
    /// which registered starts it sees; a start registered after the count began commits after
    /// its snapshot, so the count cannot see it.
    async fn refresh(&self, pool: &PgPool) -> sqlx::Result<()> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(IN_FLIGHT_BY_TYPE).fetch_all(&mut *tx).await?;
        let registered: Vec<Uuid> = self.lock().starting.keys().copied().collect();
        let seen: Vec<Uuid> = if registered.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar("SELECT id FROM saga_instances WHERE id = ANY($1)")
                .bind(&registered)
                .fetch_all(&mut *tx)
                .await?
        };
        tx.commit().await?;
        let mut counts = self.lock();
        let Counts { in_flight, starting } = &mut *counts;
        for id in &seen {
            starting.remove(id);
        }
        starting.retain(|_, (_, since)| since.elapsed() < STARTING_AT_MOST);
        in_flight.values_mut().for_each(|count| *count = 0);
        for (saga_type, n) in rows.into_iter().chain(starting.values().map(|(t, _)| (t.clone(), 1))) {
            *in_flight.entry(saga_type).or_default() += n;
        }
        for (saga_type, n) in in_flight.iter() {
            let limit = self.limits.of(saga_type);
            gauge!(m::IN_FLIGHT_LIMIT, "saga_type" => saga_type.clone()).set(limit as f64);
            gauge!(m::START_INTAKE_PAUSED, "saga_type" => saga_type.clone()).set(if *n >= limit { 1.0 } else { 0.0 });
        }
        Ok(())
    }

    /// Reads the counts every [`REFRESH`] until shutdown. While the database does not answer,
    /// the last counts stand.
    pub(crate) async fn run(self: std::sync::Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        let mut failures = Failures::new("admission", Severity::Warn);
        loop {
            match self.refresh(&pool).await {
                Ok(()) => failures.succeeded("counting the sagas in flight"),
                Err(error) => failures.failed("counting the sagas in flight", &error),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    }
}

/// Sagas in flight by type: the partial index `saga_instances_unfinished_created` serves it.
pub(crate) const IN_FLIGHT_BY_TYPE: &str =
    "SELECT saga_type, count(*) FROM saga_instances WHERE status IN ('RUNNING', 'COMPENSATING') GROUP BY saga_type";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_a_default_and_overrides() {
        let limits = parse_limits("300, order-fulfilment=1000,refund=5").unwrap();
        assert_eq!(limits.of("order-fulfilment"), 1000);
        assert_eq!(limits.of("refund"), 5);
        assert_eq!(limits.of("other"), 300);
        assert_eq!(parse_limits("refund=5").unwrap().of("x"), 500, "the default stays 500");
        for bad in ["0", "-1", "x", "10,20", "refund=0", "refund="] {
            assert!(parse_limits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_type_at_its_bound_is_saturated_and_starts_count_until_the_next_read() {
        let admission = Admission::new(parse_limits("2,b=1").unwrap(), ["a".to_owned(), "b".to_owned()]);
        assert!(!admission.any_saturated());
        admission.starting([("a", Uuid::new_v4())]).committed();
        assert!(!admission.saturated("a"));
        let second = admission.starting([("a", Uuid::new_v4())]);
        assert!(admission.saturated("a") && admission.any_saturated() && !admission.saturated("b"));
        let snapshot = admission.snapshot();
        assert_eq!((snapshot["a"].in_flight, snapshot["a"].limit, snapshot["a"].saturated), (2, 2, true));
        // A start whose transaction did not commit is taken back.
        drop(second);
        assert!(!admission.saturated("a"));
    }

    /// Against the real Postgres: sagas start on four connections while the counts are read in a
    /// loop, none finishing. The count never exceeds the starts registered so far (it did: a
    /// start that committed between a read's reset and its query was counted by both), and it
    /// ends exact.
    #[tokio::test]
    async fn a_start_racing_the_read_is_counted_once() {
        use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
        use std::sync::Arc;

        let (conn, name) = crate::store::scratch::database("admission").await;
        drop(conn);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(6)
            .connect(&crate::store::scratch::url(&name))
            .await
            .unwrap();
        let admission = Arc::new(Admission::new(parse_limits("100000").unwrap(), ["t".to_owned()]));
        let registered = Arc::new(AtomicI64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let over = |admission: &Admission, registered: &AtomicI64| {
            let counted = admission.snapshot()["t"].in_flight;
            let registered = registered.load(Ordering::SeqCst);
            (counted > registered).then(|| format!("{counted} counted of {registered} started"))
        };
        let reader = {
            let (admission, registered, done, pool) =
                (admission.clone(), registered.clone(), done.clone(), pool.clone());
            tokio::spawn(async move {
                let mut reads = 0;
                while !done.load(Ordering::SeqCst) {
                    admission.refresh(&pool).await.unwrap();
                    reads += 1;
                    if let Some(error) = over(&admission, &registered) {
                        return Err(format!("after read {reads}: {error}"));
                    }
                }
                Ok(reads)
            })
        };
        let mut starters = Vec::new();
        for task in 0..4 {
            let (admission, registered, pool) = (admission.clone(), registered.clone(), pool.clone());
            starters.push(tokio::spawn(async move {
                for i in 0..60 {
                    let id = Uuid::new_v4();
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query(
                        "INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash,
                             input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at)
                         VALUES ($1, 't', 1, $2, 'h', '{}', 'RUNNING', 0, 's', 'ACTION', 1, 'REPLY', now(), now(), now())",
                    )
                    .bind(id)
                    .bind(format!("{task}-{i}"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    registered.fetch_add(1, Ordering::SeqCst);
                    let starting = admission.starting([("t", id)]);
                    tx.commit().await.unwrap();
                    starting.committed();
                    if let Some(error) = over(&admission, &registered) {
                        return Err(error);
                    }
                }
                Ok(())
            }));
        }
        for starter in starters {
            starter.await.unwrap().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let reads = reader.await.unwrap().unwrap();
        assert!(reads > 10, "only {reads} reads raced the starts");
        admission.refresh(&pool).await.unwrap();
        assert_eq!(admission.snapshot()["t"].in_flight, 240, "exact once the starts are done");
        // A start that never committed is not counted, even by a read while it was open.
        let open = admission.starting([("t", Uuid::new_v4())]);
        admission.refresh(&pool).await.unwrap();
        assert_eq!(admission.snapshot()["t"].in_flight, 241);
        drop(open);
        assert_eq!(admission.snapshot()["t"].in_flight, 240);
        admission.refresh(&pool).await.unwrap();
        assert_eq!(admission.snapshot()["t"].in_flight, 240);
        pool.close().await;
        crate::store::scratch::drop(&name).await;
    }
}
