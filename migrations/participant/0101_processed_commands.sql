-- One row per (saga, step, kind) a participant has finished: the key of its idempotency.
-- A redelivered command replays `outcome` instead of acting again.
CREATE TABLE processed_commands (
    saga_id      UUID        NOT NULL,
    step         TEXT        NOT NULL,
    kind         TEXT        NOT NULL CHECK (kind IN ('ACTION', 'COMPENSATION')),
    outcome      JSONB       NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, step, kind)
);
