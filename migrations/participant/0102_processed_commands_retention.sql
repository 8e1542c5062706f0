-- Retention deletes dedupe records older than DEDUPE_RETENTION, oldest first, in batches.
CREATE INDEX processed_commands_processed_at ON processed_commands (processed_at);
