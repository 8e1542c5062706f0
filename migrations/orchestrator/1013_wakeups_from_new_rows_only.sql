-- The wake-ups' update trigger (migration 1006) upserts every updated saga's wake_at, skipping
-- those unchanged in the upsert's own condition, instead of joining the statement's old rows to
-- its new ones to find them. The join was the only one among the statements a consumed batch
-- runs that is not by key, and a batch plans with hash and merge joins off (ADR 18:
-- `writes::BEGIN_BATCH`), under which it was a nested loop over the two transition tables:
-- quadratic in the batch's size. The old rows are no longer captured at all.
--
-- Also: a saga whose wake-up row went missing (written past the triggers) gets it back at its
-- next update, as `repair_wakeups` would.
CREATE OR REPLACE FUNCTION saga_wakeups_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO saga_wakeups (saga_id, wake_at)
        SELECT id, wake_at FROM new_rows WHERE wake_at IS NOT NULL ORDER BY id
        ON CONFLICT (saga_id) DO UPDATE SET wake_at = EXCLUDED.wake_at
            WHERE saga_wakeups.wake_at IS DISTINCT FROM EXCLUDED.wake_at;
    DELETE FROM saga_wakeups w USING new_rows n WHERE w.saga_id = n.id AND n.wake_at IS NULL;
    RETURN NULL;
END
$$;

DROP TRIGGER saga_wakeups_on_update ON saga_instances;
CREATE TRIGGER saga_wakeups_on_update AFTER UPDATE ON saga_instances
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION saga_wakeups_on_update();
