-- Every replay of a dead letter: which one (its DLQ topic, partition and offset), where it was
-- re-published, who did it and why. Append-only, like the audit log; a dead letter replayed
-- once is not replayed again unless the operator forces it.
CREATE TABLE dead_letter_replays (
    id            BIGSERIAL   PRIMARY KEY,
    dlq_topic     TEXT        NOT NULL,
    dlq_partition INTEGER     NOT NULL,
    dlq_offset    BIGINT      NOT NULL,
    source_topic  TEXT        NOT NULL,
    actor         TEXT        NOT NULL,
    reason        TEXT        NOT NULL,
    replayed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX dead_letter_replays_message ON dead_letter_replays (dlq_topic, dlq_partition, dlq_offset, replayed_at DESC);

CREATE TRIGGER dead_letter_replays_append_only BEFORE UPDATE OR DELETE ON dead_letter_replays
    FOR EACH ROW EXECUTE FUNCTION forbid_update_or_delete();
