-- saga_history is read by saga and version only (a saga's history in order; retention deletes by
-- saga), through the unique (saga_id, version) index; nothing reads it by its id. The primary
-- key on id was a second B-tree entry for every transition (6.6 a saga at 120/s, pg_waldump;
-- docs/performance.md, 2026-12-04 fourth session). It goes; id stays, filled as before,
-- unindexed. The unique (saga_id, version) key identifies a row for logical replication, as the
-- primary key did (its columns are NOT NULL). Both statements are catalogue changes: instant on
-- a table of any size.
ALTER TABLE saga_history DROP CONSTRAINT saga_history_pkey;
ALTER TABLE saga_history REPLICA IDENTITY USING INDEX saga_history_saga_id_version_key;
