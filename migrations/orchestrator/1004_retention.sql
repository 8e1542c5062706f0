-- Retention (RETENTION_* settings): finished sagas with their attempts, history and audit,
-- operator idempotency records and dead-letter replay records are deleted once past their age,
-- in batches. The append-only tables refuse every update and delete as before, except a delete
-- made by retention, which sets `saga.retention` for its transaction.

CREATE OR REPLACE FUNCTION saga_history_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('saga.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'saga_history is append-only';
END
$$;

CREATE OR REPLACE FUNCTION forbid_update_or_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('saga.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;

-- Finished sagas are found by `saga_instances_ended` (1002); the few needing attention among them
-- are skipped by the status filter. (No index of its own: every index on saga_instances costs
-- each saga's transitions.)
CREATE INDEX operator_requests_created ON operator_requests (created_at);
CREATE INDEX dead_letter_replays_replayed ON dead_letter_replays (replayed_at);
