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
//! every replica, since they read the same table) and raised locally for each saga started in
//! between, so a burst cannot run far past the bound. The start-requests topic carries every
//! saga type: while one type is at its bound, starts of the others wait too.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::gauge;
use saga_runtime::CancellationToken;
use sqlx::PgPool;

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
    /// In flight per type: the last count read, plus the sagas started since.
    in_flight: Mutex<BTreeMap<String, i64>>,
    /// Sagas started since the running count began: a count whose query began before a start
    /// committed does not see it, so it is added on top (counted twice at worst, never missed).
    started_since: Mutex<BTreeMap<String, i64>>,
}

impl Admission {
    pub(crate) fn new(limits: Limits, saga_types: impl IntoIterator<Item = String>) -> Self {
        let in_flight = saga_types.into_iter().map(|t| (t, 0)).collect();
        Self { limits, in_flight: Mutex::new(in_flight), started_since: Mutex::new(BTreeMap::new()) }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, i64>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether starts of `saga_type` must wait.
    pub(crate) fn saturated(&self, saga_type: &str) -> bool {
        self.counts().get(saga_type).copied().unwrap_or(0) >= self.limits.of(saga_type)
    }

    /// Whether starts of any type must wait (the start-requests topic carries them all).
    pub(crate) fn any_saturated(&self) -> bool {
        self.counts().iter().any(|(t, n)| *n >= self.limits.of(t))
    }

    /// Counts a saga started since the last read.
    pub(crate) fn started(&self, saga_type: &str) {
        *self.counts().entry(saga_type.to_owned()).or_default() += 1;
        *self.started_since.lock().unwrap_or_else(|e| e.into_inner()).entry(saga_type.to_owned()).or_default() += 1;
    }

    /// Every type's admission, for the stats endpoint.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, TypeAdmission> {
        self.counts()
            .iter()
            .map(|(t, n)| {
                let limit = self.limits.of(t);
                (t.clone(), TypeAdmission { in_flight: *n, limit, saturated: *n >= limit })
            })
            .collect()
    }

    /// Reads the counts again.
    async fn refresh(&self, pool: &PgPool) -> sqlx::Result<()> {
        // Starts counted before this point committed before the query below: it sees them.
        self.started_since.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let rows: Vec<(String, i64)> = sqlx::query_as(IN_FLIGHT_BY_TYPE).fetch_all(pool).await?;
        let mut counts = self.counts();
        for count in counts.values_mut() {
            *count = 0;
        }
        for (saga_type, n) in rows {
            counts.insert(saga_type, n);
        }
        for (saga_type, n) in self.started_since.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            *counts.entry(saga_type.clone()).or_default() += n;
        }
        for (saga_type, n) in counts.iter() {
            let limit = self.limits.of(saga_type);
            gauge!(m::IN_FLIGHT_LIMIT, "saga_type" => saga_type.clone()).set(limit as f64);
            gauge!(m::START_INTAKE_PAUSED, "saga_type" => saga_type.clone()).set(if *n >= limit { 1.0 } else { 0.0 });
        }
        Ok(())
    }

    /// Reads the counts every [`REFRESH`] until shutdown. While the database does not answer,
    /// the last counts stand.
    pub(crate) async fn run(self: std::sync::Arc<Self>, pool: PgPool, shutdown: CancellationToken) {
        loop {
            if let Err(error) = self.refresh(&pool).await {
                tracing::debug!(%error, "counting the sagas in flight");
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
        admission.started("a");
        assert!(!admission.saturated("a"));
        admission.started("a");
        assert!(admission.saturated("a") && admission.any_saturated() && !admission.saturated("b"));
        let snapshot = admission.snapshot();
        assert_eq!((snapshot["a"].in_flight, snapshot["a"].limit, snapshot["a"].saturated), (2, 2, true));
    }
}
