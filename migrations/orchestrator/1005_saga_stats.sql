-- Saga stats that stay fast at millions of sagas (ADR 20). COMPLETED and FAILED never change
-- again, so each such saga is counted once into `saga_stats`, by the ten seconds, the minute and
-- the hour of its creation, with its outcome and (for COMPLETED) its duration's bin; `GET /api/v1/sagas/stats`
-- adds those counts to a live count of the sagas not rolled up yet (in flight, needing attention,
-- just ended, or in the part-spans under ten seconds at the window's edges).

-- Sagas that ended and are not counted in `saga_stats` yet. Filled by the triggers below in the
-- transaction that ends the saga; emptied by the orchestrator's rollup task in the transaction
-- that counts it, so each saga is counted exactly once.
CREATE TABLE saga_stats_pending (
    saga_id    UUID        PRIMARY KEY,
    -- The saga's, so that a window's stats find the queued sagas of its range by index.
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX saga_stats_pending_created ON saga_stats_pending (created_at);
-- A queue: every row is deleted within seconds. Vacuumed often and without a cost delay, so that
-- dead rows do not pile up in front of the rollup's and the stats' scans.
ALTER TABLE saga_stats_pending SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0);

CREATE TABLE saga_stats (
    -- '10s', 'minute' or 'hour': the same sagas are counted at each resolution.
    resolution   TEXT        NOT NULL CHECK (resolution IN ('10s', 'minute', 'hour')),
    -- The start of the ten seconds, minute or hour (UTC) the sagas were created in.
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
    INSERT INTO saga_stats_pending (saga_id, created_at) VALUES (NEW.id, NEW.created_at) ON CONFLICT DO NOTHING;
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
INSERT INTO saga_stats_pending (saga_id, created_at)
    SELECT id, created_at FROM saga_instances WHERE status IN ('COMPLETED', 'FAILED');
