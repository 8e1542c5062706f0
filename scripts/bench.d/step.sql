-- One step-like transaction, the unit of Postgres's ceiling: lock one saga row, update it with a
-- version guard, finish one attempt row, append a history row and an outbox row. Runs on the sagas
-- scripts/bench left in the orchestrator's database (pgbench picks one at random by its position
-- in a fixed sample); pgbench's "tps" is such transactions per second.
\set k random(1, 1000)
BEGIN;
SELECT id FROM bench_sample WHERE k = :k \gset
SELECT status FROM saga_instances WHERE id = :id::uuid FOR UPDATE;
UPDATE saga_instances SET updated_at = now(), version = version + 1 WHERE id = :id::uuid;
UPDATE saga_step_attempts SET finished_at = now() WHERE saga_id = :id::uuid AND step_name = 'verify_order' AND kind = 'ACTION' AND attempt = 1;
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (:id::uuid, (SELECT version FROM saga_instances WHERE id = :id::uuid), 'RUNNING', 'RUNNING', 'REPLY', 'pgbench step', '{}', now());
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('pgbench', :id, 'command', convert_to('{"pgbench": true}', 'UTF8'), '[]');
COMMIT;
