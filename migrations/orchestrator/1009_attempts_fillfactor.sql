-- Room on each page of saga_step_attempts for the finished version of the attempts inserted on
-- it, so that finishing an attempt (PENDING -> SUCCEEDED, FAILED or TIMED_OUT, with its output)
-- is a heap-only update on the same page: no new entry in the primary key, no move to another
-- page. At fillfactor 100 most finishes found their page full (pg_waldump at 120/s: 3.3 of 5.2
-- updates per saga not HOT, each with a lock record and an index entry; docs/performance.md,
-- 2026-12-04 fourth session). An attempt is finished once, within seconds of its insert, while
-- its page is the newest. New pages only, as for saga_instances (1006).
ALTER TABLE saga_step_attempts SET (fillfactor = 70);
