-- No planner statistics for the documents nobody filters on: the saga's input and outputs, a
-- step attempt's output, a transition's detail and summary. Computing them was most of what an
-- ANALYZE of these tables cost (saga_history 340 -> 150 ms, saga_instances 295 -> 196 ms,
-- saga_step_attempts 124 -> 82 ms on 60,000 / 10,000 / 50,000 rows), a burst of CPU that
-- autovacuum spends each time a young table grew by a tenth, and that showed as a bump in the
-- sagas' latency on two cores (docs/performance.md, 2026-12-04). Every query filters on the
-- other columns, whose statistics stay; a column here that becomes a filter gets its
-- statistics back with SET STATISTICS -1.
ALTER TABLE saga_instances
    ALTER COLUMN input SET STATISTICS 0,
    ALTER COLUMN outputs SET STATISTICS 0;
ALTER TABLE saga_step_attempts
    ALTER COLUMN output SET STATISTICS 0;
ALTER TABLE saga_history
    ALTER COLUMN detail SET STATISTICS 0,
    ALTER COLUMN summary SET STATISTICS 0;
