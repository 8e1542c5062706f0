-- pgbench: one batch's update of 20 sagas in flight, their wake-ups kept by the saga_wakeups_on_update trigger (or by nothing, with it disabled).
\set s random(1, 1980)
UPDATE saga_instances s SET wake_at = u.wake_at, version = s.version + 1, updated_at = now(), attempt = s.attempt
FROM (SELECT h.id, clock_timestamp() + interval '10 s' AS wake_at FROM hot_ids h WHERE h.n >= :s AND h.n < :s + 20) u
WHERE s.id = u.id;
