-- A transition of a saga in flight changes no indexed column of saga_instances, so that Postgres
-- can update the row in place (a heap-only tuple: no new entry in any of the table's indexes, on
-- the same page) instead of adding an entry to each of its eleven indexes. ADR 21.
--
-- Per step, a transition changes wake_at (the reply deadline or the end of a backoff) and
-- updated_at, and both were indexed: the wake-ups move to saga_wakeups, kept in step with
-- saga_instances.wake_at by the triggers below whoever writes it (the engine, an operator's
-- hand-edit, an import), and nothing read the updated_at index (docs/query-plans.md).

DROP INDEX saga_instances_updated;
DROP INDEX saga_instances_wake_at;

-- One row per saga with a wake-up time: exactly the sagas in flight (the CHECK of saga_instances).
CREATE TABLE saga_wakeups (
    saga_id UUID        PRIMARY KEY,
    wake_at TIMESTAMPTZ NOT NULL
) WITH (
    -- Rewritten at every step and deleted at the end: vacuumed as a queue is.
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000
);
CREATE INDEX saga_wakeups_wake_at ON saga_wakeups (wake_at);

INSERT INTO saga_wakeups (saga_id, wake_at) SELECT id, wake_at FROM saga_instances WHERE wake_at IS NOT NULL;

-- Room on each page for the next versions of its rows, so that an update can stay on its page.
-- (New pages only; the pages of sagas already finished are never updated again.)
ALTER TABLE saga_instances SET (fillfactor = 70);

-- Statement triggers: one statement per batch of transitions, whatever its size.
CREATE FUNCTION saga_wakeups_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saga_wakeups (saga_id, wake_at)
        SELECT id, wake_at FROM new_rows WHERE wake_at IS NOT NULL ORDER BY id
        ON CONFLICT (saga_id) DO UPDATE SET wake_at = EXCLUDED.wake_at;
    RETURN NULL;
END
$$;

CREATE FUNCTION saga_wakeups_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saga_wakeups (saga_id, wake_at)
        SELECT n.id, n.wake_at FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.wake_at IS NOT NULL AND n.wake_at IS DISTINCT FROM o.wake_at ORDER BY n.id
        ON CONFLICT (saga_id) DO UPDATE SET wake_at = EXCLUDED.wake_at;
    DELETE FROM saga_wakeups w USING new_rows n WHERE w.saga_id = n.id AND n.wake_at IS NULL;
    RETURN NULL;
END
$$;

CREATE FUNCTION saga_wakeups_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM saga_wakeups w USING old_rows o WHERE w.saga_id = o.id AND o.wake_at IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER saga_wakeups_on_insert AFTER INSERT ON saga_instances
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION saga_wakeups_on_insert();
CREATE TRIGGER saga_wakeups_on_update AFTER UPDATE ON saga_instances
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION saga_wakeups_on_update();
CREATE TRIGGER saga_wakeups_on_delete AFTER DELETE ON saga_instances
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION saga_wakeups_on_delete();
