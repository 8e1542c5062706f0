-- Dead letters go out through the outbox too, in the transaction that moved the consumer past
-- them. A dead letter keeps the original bytes (which may not be JSON) and headers, so:
--   * `raw_payload` carries bytes published as they are (NULL: publish `payload` as JSON);
--   * `headers` carries extra Kafka headers as [name, value] pairs;
--   * `message_type` may be NULL: then no message-type/schema-version headers are added.
ALTER TABLE outbox
    ALTER COLUMN payload DROP NOT NULL,
    ALTER COLUMN message_type DROP NOT NULL,
    ADD COLUMN raw_payload BYTEA,
    ADD COLUMN headers JSONB NOT NULL DEFAULT '[]'::jsonb,
    ADD CONSTRAINT outbox_one_payload CHECK (payload IS NULL OR raw_payload IS NULL);
