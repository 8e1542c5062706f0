-- No planner statistics for the recorded outcome, a document nobody filters on (the lookups go
-- by the primary key, retention by processed_at): computing them was most of what an ANALYZE
-- of this table cost, a burst of CPU that autovacuum spends each time the young table grew by a
-- tenth (docs/performance.md, 2026-12-04). SET STATISTICS -1 brings them back.
ALTER TABLE processed_commands ALTER COLUMN outcome SET STATISTICS 0;
