//! The orchestrator's retention policies (see `saga_runtime::retention`): finished sagas with
//! their attempts, history and audit; operator idempotency records; dead-letter replay records.

use clap::Args;
use saga_runtime::retention::{parse_keep, Keep as Age, Policy};

/// How long the orchestrator keeps what it only keeps for a while.
#[derive(Debug, Clone, Args)]
pub(crate) struct Keep {
    /// How long a COMPLETED or FAILED saga is kept after it ended, with its attempts, history and
    /// audit entries (e.g. `30d`); `off` keeps them forever. Sagas that need attention and sagas
    /// in flight are never deleted. Once deleted, a start request with the same idempotency key
    /// starts a new saga.
    #[arg(long, env = "SAGA_RETENTION", default_value = "30d", value_parser = parse_keep, global = true)]
    pub(crate) saga_retention: Age,
    /// How long an operator request made under an Idempotency-Key is remembered (the same key
    /// again gets the stored answer), e.g. `7d`; `off` keeps them forever.
    #[arg(long, env = "OPERATOR_REQUEST_RETENTION", default_value = "7d", value_parser = parse_keep, global = true)]
    pub(crate) operator_request_retention: Age,
    /// How long the record of a dead letter's replay is kept, e.g. `14d` (match
    /// KAFKA_DEAD_LETTER_RETENTION, the dead letters' own); `off` keeps them forever.
    #[arg(long, env = "DEAD_LETTER_REPLAY_RETENTION", default_value = "14d", value_parser = parse_keep, global = true)]
    pub(crate) dead_letter_replay_retention: Age,
}

pub(crate) fn policies(keep: &Keep) -> Vec<Policy> {
    vec![
        Policy {
            name: "saga_instances",
            what: "finished sagas (COMPLETED, FAILED) with their attempts, history and audit entries",
            keep: keep.saga_retention.0,
            delete: "WITH doomed AS (
                         SELECT id FROM saga_instances
                         WHERE status IN ('COMPLETED', 'FAILED') AND ended_at < $1
                         ORDER BY ended_at LIMIT $2 FOR UPDATE SKIP LOCKED
                     ), attempts AS (
                         DELETE FROM saga_step_attempts WHERE saga_id IN (SELECT id FROM doomed) RETURNING 1
                     ), history AS (
                         DELETE FROM saga_history WHERE saga_id IN (SELECT id FROM doomed) RETURNING 1
                     ), audit AS (
                         DELETE FROM saga_audit WHERE saga_id IN (SELECT id FROM doomed) RETURNING 1
                     ), sagas AS (
                         DELETE FROM saga_instances WHERE id IN (SELECT id FROM doomed) RETURNING 1
                     )
                     SELECT (SELECT count(*) FROM sagas), (SELECT count(*) FROM attempts),
                            (SELECT count(*) FROM history), (SELECT count(*) FROM audit)"
                .to_owned(),
            tables: &["saga_instances", "saga_step_attempts", "saga_history", "saga_audit"],
            eligible: "SELECT count(*) FROM (SELECT 1 FROM saga_instances
                       WHERE status IN ('COMPLETED', 'FAILED') AND ended_at < $1 LIMIT $2) s"
                .to_owned(),
        },
        Policy {
            name: "saga_stats",
            what: "the stats rollup's counts of sagas created more than SAGA_RETENTION ago",
            keep: keep.saga_retention.0,
            delete: "WITH doomed AS (
                         SELECT ctid FROM saga_stats WHERE bucket < $1 ORDER BY bucket LIMIT $2 FOR UPDATE SKIP LOCKED
                     ), gone AS (
                         DELETE FROM saga_stats WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed)) RETURNING 1
                     )
                     SELECT count(*) FROM gone"
                .to_owned(),
            tables: &["saga_stats"],
            eligible: "SELECT count(*) FROM (SELECT 1 FROM saga_stats WHERE bucket < $1 LIMIT $2) s".to_owned(),
        },
        Policy::one_table(
            "operator_requests",
            "operator requests' Idempotency-Keys and stored answers",
            keep.operator_request_retention.0,
            &["operator_requests"],
            "idempotency_key",
            "created_at",
        ),
        Policy::one_table(
            "dead_letter_replays",
            "records of dead letters replayed (who, when, why)",
            keep.dead_letter_replay_retention.0,
            &["dead_letter_replays"],
            "id",
            "replayed_at",
        ),
    ]
}
