-- Saga stats that stay fast at millions of sagas (ADR 20). COMPLETED and FAILED never change
-- again, so each such saga is counted once into `saga_stats`, by the minute and by the hour of
-- its creation, with its outcome and (for COMPLETED) its duration's bin; `GET /api/v1/sagas/stats`
-- adds those counts to a live count of the sagas not rolled up yet (in flight, needing attention,
-- just ended, or in the part-minutes at the window's edges).

-- Sagas that ended and are not counted in `saga_stats` yet. Filled by the triggers below in the
-- transaction that ends the saga; emptied by the orchestrator's rollup task in the transaction
-- that counts it, so each saga is counted exactly once.
CREATE TABLE saga_stats_pending (
    saga_id UUID PRIMARY KEY
);

CREATE TABLE saga_stats (
    -- 'minute' or 'hour': the same sagas are counted at both resolutions.
    resolution   TEXT        NOT NULL CHECK (resolution IN ('minute', 'hour')),
    -- The start of the minute or hour (UTC) the sagas were created in.
    bucket       TIMESTAMPTZ NOT NULL,
    saga_type    TEXT        NOT NULL,
    status       TEXT        NOT NULL CHECK (status IN ('COMPLETED', 'FAILED')),
    -- '' when the saga has none.
    failure_step TEXT        NOT NULL,
    failure_code TEXT        NOT NULL,
    -- COMPLETED: the bin of the duration (ended_at - created_at) in milliseconds, bin b >= 1
    -- holding [1.1^(b-1), 1.1^b) and bin 0 under 1 ms; FAILED: -1.
    duration_bin INTEGER     NOT NULL,
    sagas        BIGINT      NOT NULL,
    PRIMARY KEY (resolution, bucket, saga_type, status, failure_step, failure_code, duration_bin)
);

CREATE FUNCTION saga_stats_pend() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saga_stats_pending (saga_id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER saga_stats_pend_on_end AFTER UPDATE OF status ON saga_instances
    FOR EACH ROW WHEN (NEW.status IN ('COMPLETED', 'FAILED') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION saga_stats_pend();

-- Sagas are not inserted ended by the orchestrator; imports and the benchmark's preload are.
CREATE TRIGGER saga_stats_pend_on_insert AFTER INSERT ON saga_instances
    FOR EACH ROW WHEN (NEW.status IN ('COMPLETED', 'FAILED'))
    EXECUTE FUNCTION saga_stats_pend();

-- The sagas that ended before this migration are counted by the rollup task like the others.
INSERT INTO saga_stats_pending (saga_id) SELECT id FROM saga_instances WHERE status IN ('COMPLETED', 'FAILED');
