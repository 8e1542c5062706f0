-- pgbench: the same update with the wake-ups upserted by a CTE (run with the trigger disabled).
\set s random(1, 1980)
WITH u AS (SELECT h.id, clock_timestamp() + interval '10 s' AS wake_at FROM hot_ids h WHERE h.n >= :s AND h.n < :s + 20),
w AS (INSERT INTO saga_wakeups (saga_id, wake_at) SELECT id, wake_at FROM u ORDER BY id ON CONFLICT (saga_id) DO UPDATE SET wake_at = EXCLUDED.wake_at)
UPDATE saga_instances s SET wake_at = u.wake_at, version = s.version + 1, updated_at = now(), attempt = s.attempt
FROM u WHERE s.id = u.id;
