-- pgbench -M extended or -M prepared (array parameters; -M simple cannot pass them): the shape of the orchestrator's batch update (orchestrator/src/writes.rs, update_sagas: keep the two in step), 20 sagas FROM UNNEST; -r for its own latency.
\set s random(1, 1980)
SELECT array_agg(id)::text AS ids, array_agg(version)::text AS vers, array_agg(clock_timestamp() + interval '10 s')::text AS wakes FROM (SELECT h.id, s.version FROM hot_ids h JOIN saga_instances s USING (id) WHERE h.n >= :s AND h.n < :s + 20) x \gset
UPDATE saga_instances s SET
 status = u.status, step_index = u.step_index, step_name = u.step_name, step_kind = u.step_kind,
 attempt = u.attempt, first_attempt = u.first_attempt, waiting = u.waiting, wake_at = u.wake_at,
 failure_step = u.failure_step, failure_code = u.failure_code, failure_reason = u.failure_reason,
 attention_step = u.attention_step, attention_code = u.attention_code,
 attention_reason = u.attention_reason, outputs = u.outputs, version = u.version,
 updated_at = u.updated_at, ended_at = u.ended_at
FROM (SELECT u.*, u.expected + 1 AS version, 'RUNNING'::text AS status, 2 AS step_index, 'charge_payment'::text AS step_name, 'ACTION'::text AS step_kind, 1 AS attempt, 1 AS first_attempt, 'REPLY'::text AS waiting, NULL::text AS failure_step, NULL::text AS failure_code, NULL::text AS failure_reason, NULL::text AS attention_step, NULL::text AS attention_code, NULL::text AS attention_reason, '{}'::jsonb AS outputs, now() AS updated_at, NULL::timestamptz AS ended_at FROM UNNEST(:ids::uuid[], :vers::bigint[], :wakes::timestamptz[]) AS u(id, expected, wake_at)) u
WHERE s.id = u.id AND s.version = u.expected;
