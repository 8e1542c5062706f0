-- The on-call surface: operator retries and aborts with an append-only audit log, idempotent
-- operator requests, and the indexes behind every filter of GET /api/v1/sagas.

-- The attempt at which the current retry budget began: 1, or the attempt an operator's retry sent.
ALTER TABLE saga_instances ADD COLUMN first_attempt INTEGER NOT NULL DEFAULT 1;

-- An operator's retry or abort gives up on the pending attempt: ABANDONED.
ALTER TABLE saga_step_attempts DROP CONSTRAINT saga_step_attempts_status_check;
ALTER TABLE saga_step_attempts ADD CONSTRAINT saga_step_attempts_status_check
    CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'TIMED_OUT', 'ABANDONED'));

-- Every filter is served by an index whose trailing columns give the list order (newest first),
-- so a page is an index range scan that stops after `limit` rows.
CREATE INDEX saga_instances_type_created ON saga_instances (saga_type, created_at DESC, id DESC);
CREATE INDEX saga_instances_failure_step_created ON saga_instances (failure_step, created_at DESC, id DESC)
    WHERE failure_step IS NOT NULL;
CREATE INDEX saga_instances_failure_code_created ON saga_instances (failure_code, created_at DESC, id DESC)
    WHERE failure_code IS NOT NULL;
CREATE INDEX saga_instances_attention_step_created ON saga_instances (attention_step, created_at DESC, id DESC)
    WHERE attention_step IS NOT NULL;
CREATE INDEX saga_instances_attention_code_created ON saga_instances (attention_code, created_at DESC, id DESC)
    WHERE attention_code IS NOT NULL;
CREATE INDEX saga_instances_updated ON saga_instances (updated_at DESC, id DESC);
-- Sagas not yet terminal, by age: the "stuck" filter and the in-flight gauges.
CREATE INDEX saga_instances_unfinished_created ON saga_instances (created_at DESC, id DESC)
    WHERE status IN ('RUNNING', 'COMPENSATING');
DROP INDEX saga_instances_business_key;
CREATE INDEX saga_instances_business_key_created ON saga_instances (business_key, created_at DESC, id DESC)
    WHERE business_key IS NOT NULL;
-- Stats windows over finished sagas.
CREATE INDEX saga_instances_ended ON saga_instances (ended_at) WHERE ended_at IS NOT NULL;

-- Who did what to which saga, and what it changed. Written in the transaction of the change.
CREATE TABLE saga_audit (
    id              BIGSERIAL   PRIMARY KEY,
    saga_id         UUID        NOT NULL REFERENCES saga_instances (id),
    action          TEXT        NOT NULL CHECK (action IN ('RETRY', 'ABORT')),
    actor           TEXT        NOT NULL,
    reason          TEXT        NOT NULL,
    idempotency_key TEXT,
    -- Set when the action was one of a bulk request.
    bulk_id         UUID,
    status_before   TEXT        NOT NULL,
    status_after    TEXT        NOT NULL,
    version_before  BIGINT      NOT NULL,
    version_after   BIGINT      NOT NULL,
    detail          JSONB       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX saga_audit_saga ON saga_audit (saga_id, id);

CREATE FUNCTION forbid_update_or_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;

CREATE TRIGGER saga_audit_append_only BEFORE UPDATE OR DELETE ON saga_audit
    FOR EACH ROW EXECUTE FUNCTION forbid_update_or_delete();

-- Operator requests made under an Idempotency-Key: the same key again returns the stored
-- response instead of acting twice. Written in the transaction of the action.
CREATE TABLE operator_requests (
    idempotency_key TEXT        PRIMARY KEY,
    -- What was asked: method, path and a hash of the body.
    request_hash    TEXT        NOT NULL,
    status_code     INTEGER     NOT NULL,
    response        JSONB       NOT NULL,
    actor           TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
