-- Publish on commit: a service that still holds the messages it just committed hands them to its
-- producer at once (`handed_off`) and deletes them once Kafka acknowledged them. The relay sweeps
-- such rows only when they are older than its grace period (a crash or a failed publish left
-- them); other rows it publishes as before, woken by the notification, which handed-off rows
-- no longer send.
ALTER TABLE outbox ADD COLUMN handed_off BOOLEAN NOT NULL DEFAULT false;

DROP TRIGGER outbox_notify ON outbox;

CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE NOT handed_off) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
