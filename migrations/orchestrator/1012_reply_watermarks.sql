-- How far the replies topic has been applied, per partition (ADR 29): every reply appended to the
-- partition before complete_until has been applied to saga_instances. Each orchestrator process
-- writes the rows of the partitions its consumer is assigned, about every second; the timer loop
-- calls a reply late only once its deadline is older than every partition's complete_until, so
-- that a reply waiting in an unconsumed partition (a rebalance after a crash, a consumer behind a
-- burst) is applied before its step is timed out. One row per partition: no retention needed.
CREATE TABLE reply_watermarks (
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    complete_until TIMESTAMPTZ NOT NULL,
    -- Which process wrote it last (orchestrator_relays.host), for people.
    written_by     TEXT        NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
