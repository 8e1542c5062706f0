//! Metric names (part of the dashboards' contract) and their descriptions. Labels are bounded:
//! saga type, step, kind, outcome, status, reason; never an id.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub(crate) const SAGA_CREATED: &str = "saga_created_total";
pub(crate) const SAGA_COMPLETED: &str = "saga_completed_total";
pub(crate) const SAGA_FAILED: &str = "saga_failed_total";
pub(crate) const SAGA_NEEDS_ATTENTION: &str = "saga_needs_attention_total";
pub(crate) const SAGA_DURATION: &str = "saga_duration_seconds";
pub(crate) const STEP_DURATION: &str = "saga_step_duration_seconds";
pub(crate) const STEP_FAILURES: &str = "saga_step_failures_total";
pub(crate) const REPLIES_IGNORED: &str = "saga_replies_ignored_total";
pub(crate) const START_REQUESTS_REFUSED: &str = "saga_start_requests_refused_total";
pub(crate) const SAGA_UNPROCESSABLE: &str = "saga_unprocessable_total";
pub(crate) const IN_FLIGHT_LIMIT: &str = "saga_in_flight_limit";
pub(crate) const START_INTAKE_PAUSED: &str = "saga_start_intake_paused";
pub(crate) const START_REQUESTS_WAITING: &str = "saga_start_requests_waiting";
pub(crate) const IN_FLIGHT: &str = "saga_in_flight";
pub(crate) const OLDEST_IN_FLIGHT: &str = "saga_oldest_in_flight_age_seconds";
pub(crate) const DB_CONNECTIONS: &str = "database_connections";
pub(crate) const HTTP_REQUESTS: &str = "http_requests_total";
pub(crate) const HTTP_DURATION: &str = "http_request_duration_seconds";
pub(crate) const WAKEUPS_REPAIRED: &str = "saga_wakeups_repaired_total";

pub(crate) fn describe() {
    describe_counter!(SAGA_CREATED, "Sagas started, by saga_type");
    describe_counter!(SAGA_COMPLETED, "Sagas that completed every step, by saga_type");
    describe_counter!(SAGA_FAILED, "Sagas that failed and were fully compensated, by saga_type");
    describe_counter!(SAGA_NEEDS_ATTENTION, "Sagas parked for a human, by saga_type");
    describe_histogram!(SAGA_DURATION, Unit::Seconds, "Time from start to a terminal status, by saga_type and outcome");
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Time from sending a command to its reply or timeout, by saga_type, step, kind and outcome"
    );
    describe_counter!(STEP_FAILURES, "Failed step attempts, by saga_type, step, kind and code");
    describe_counter!(
        REPLIES_IGNORED,
        "Replies that changed nothing (duplicate, stale, unknown saga, unreadable), by reason"
    );
    describe_counter!(START_REQUESTS_REFUSED, "Start requests refused, by reason");
    describe_counter!(
        SAGA_UNPROCESSABLE,
        "Sagas that could not be processed and were parked as NEEDS_ATTENTION (code UNPROCESSABLE_SAGA), by saga_type and trigger"
    );
    describe_gauge!(IN_FLIGHT, "Sagas not yet terminal, by status");
    describe_gauge!(IN_FLIGHT_LIMIT, "The bound of sagas in flight, by saga_type (SAGA_MAX_IN_FLIGHT)");
    describe_gauge!(
        START_INTAKE_PAUSED,
        "1 while a saga type is at its bound of sagas in flight, so start requests wait in Kafka; by saga_type"
    );
    describe_gauge!(
        START_REQUESTS_WAITING,
        "Start requests waiting in Kafka for the orchestrator (the consumer group's backlog on saga-start-requests)"
    );
    describe_gauge!(OLDEST_IN_FLIGHT, Unit::Seconds, "Age of the oldest saga not yet terminal");
    describe_gauge!(DB_CONNECTIONS, "Database pool connections, by state (open, idle, max)");
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by method, route and status");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request duration, by method, route and status");
    describe_counter!(
        WAKEUPS_REPAIRED,
        "Rows of saga_wakeups added, corrected or deleted to match saga_instances.wake_at (0 unless its triggers were bypassed)"
    );
    metrics::counter!(WAKEUPS_REPAIRED).increment(0);
}

/// Registers the saga counters at zero for every loaded saga type, so that dashboards and the
/// runbook's `grep saga_failed_total` see them before the first saga ends.
pub(crate) fn register_saga_types(types: impl IntoIterator<Item = String>) {
    for saga_type in types {
        for name in [SAGA_CREATED, SAGA_COMPLETED, SAGA_FAILED, SAGA_NEEDS_ATTENTION] {
            metrics::counter!(name, "saga_type" => saga_type.clone()).increment(0);
        }
        for trigger in ["timer", "reply"] {
            metrics::counter!(SAGA_UNPROCESSABLE, "saga_type" => saga_type.clone(), "trigger" => trigger).increment(0);
        }
    }
}
