-- Saga instances, their step attempts and their append-only history.
-- Column names and the text values of status, step_kind and waiting are part of the durable contract.

CREATE TABLE saga_instances (
    id                 UUID        PRIMARY KEY,
    saga_type          TEXT        NOT NULL,
    definition_version INTEGER     NOT NULL,
    idempotency_key    TEXT        NOT NULL,
    -- SHA-256 of the start request, to refuse a reused key with a different request.
    request_hash       TEXT        NOT NULL,
    business_key       TEXT,
    input              JSONB       NOT NULL,
    -- Outputs of completed steps, by step name.
    outputs            JSONB       NOT NULL DEFAULT '{}'::jsonb,
    status             TEXT        NOT NULL
        CHECK (status IN ('RUNNING', 'COMPENSATING', 'COMPLETED', 'FAILED', 'NEEDS_ATTENTION')),
    step_index         INTEGER     NOT NULL,
    step_name          TEXT        NOT NULL,
    step_kind          TEXT        NOT NULL CHECK (step_kind IN ('ACTION', 'COMPENSATION')),
    attempt            INTEGER     NOT NULL,
    waiting            TEXT        NOT NULL CHECK (waiting IN ('REPLY', 'RETRY', 'NOTHING')),
    -- When the timer loop must look at the saga: the reply deadline or the end of a backoff.
    wake_at            TIMESTAMPTZ,
    failure_step       TEXT,
    failure_code       TEXT,
    failure_reason     TEXT,
    attention_step     TEXT,
    attention_code     TEXT,
    attention_reason   TEXT,
    -- Rises by one per transition; every update is guarded by it.
    version            BIGINT      NOT NULL DEFAULT 1,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at           TIMESTAMPTZ,
    UNIQUE (saga_type, idempotency_key),
    CHECK ((status IN ('RUNNING', 'COMPENSATING')) = (wake_at IS NOT NULL))
);

CREATE INDEX saga_instances_created ON saga_instances (created_at DESC, id DESC);
CREATE INDEX saga_instances_status_created ON saga_instances (status, created_at DESC, id DESC);
CREATE INDEX saga_instances_wake_at ON saga_instances (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX saga_instances_business_key ON saga_instances (business_key) WHERE business_key IS NOT NULL;

CREATE TABLE saga_step_attempts (
    saga_id       UUID        NOT NULL REFERENCES saga_instances (id),
    step_index    INTEGER     NOT NULL,
    step_name     TEXT        NOT NULL,
    kind          TEXT        NOT NULL CHECK (kind IN ('ACTION', 'COMPENSATION')),
    attempt       INTEGER     NOT NULL,
    status        TEXT        NOT NULL CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT')),
    error_code    TEXT,
    error_message TEXT,
    output        JSONB,
    started_at    TIMESTAMPTZ NOT NULL,
    deadline_at   TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    PRIMARY KEY (saga_id, step_name, kind, attempt)
);

CREATE TABLE saga_history (
    id          BIGSERIAL   PRIMARY KEY,
    saga_id     UUID        NOT NULL REFERENCES saga_instances (id),
    -- The saga's version after this transition.
    version     BIGINT      NOT NULL,
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    -- What happened: STARTED, REPLY, TIMER.
    trigger     TEXT        NOT NULL,
    -- What the transition did, in words, for people.
    summary     TEXT        NOT NULL,
    detail      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (saga_id, version)
);

CREATE FUNCTION saga_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'saga_history is append-only';
END
$$;

CREATE TRIGGER saga_history_append_only BEFORE UPDATE OR DELETE ON saga_history
    FOR EACH ROW EXECUTE FUNCTION saga_history_append_only();
