-- The orchestrator's own SQL for one whole order saga, as src/engine.rs and src/store.rs issue it:
-- the start (saga row, first attempt, command and lifecycle event in the outbox, history), then one
-- transaction per reply (lock, versioned update, finish the attempt, next attempt, outbox,
-- history), and the relay's delete of what it published. Run by scripts/bench through pgbench
-- against the orchestrator's schema: pgbench's "tps" is then sagas per second that Postgres could
-- carry for the orchestrator alone, with no broker and no participants. Unlike the service, it
-- applies one reply per transaction (the consumer applies a batch in one), so it is the
-- pessimistic side of the ceiling.
\set n random(1, 9000000000000000000)
BEGIN;
INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key,
    input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at)
VALUES (md5(:n::text)::uuid, 'order-fulfilment', 1, 'pgbench-' || :n, md5('request' || :n), 'order-' || :n,
    '{"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}', 'RUNNING', 0, 'verify_order', 'ACTION', 1, 'REPLY', now() + interval '10 s', now(), now())
ON CONFLICT (saga_type, idempotency_key) DO NOTHING;
INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
VALUES (md5(:n::text)::uuid, 0, 'verify_order', 'ACTION', 1, 'PENDING', now(), now() + interval '10 s') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('order.commands', md5(:n::text)::uuid::text, 'command', convert_to(('{"schema_version": 1, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b12", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "step": "verify_order", "kind": "ACTION", "action": "verify_order", "attempt": 1, "reply_to": "saga-replies", "input": {"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}, "outputs": {}, "failure": null, "deadline": "2026-11-30T16:00:10Z"}'), 'UTF8'), '[]'),
       ('saga-events', md5(:n::text)::uuid::text, 'event', convert_to(('{"schema_version": 1, "event_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b13", "event_type": "STARTED", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "definition_version": 1, "business_key": "order-' || :n || '", "status": "RUNNING", "version": 1, "failure": null, "attention": null, "occurred_at": "2026-11-30T16:00:00Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 1, NULL, 'RUNNING', 'STARTED', 'started order-fulfilment v1; sent verify_order action attempt 1 to order',
    '{"finished": null, "commands": [{"step": "verify_order", "kind": "ACTION", "action": "verify_order", "attempt": 1, "participant": "order"}], "retry_at": null, "message_id": null}', now());
COMMIT;
BEGIN;
SELECT id, saga_type, definition_version, business_key, input, outputs, status, step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, version, created_at FROM saga_instances WHERE id = md5(:n::text)::uuid FOR UPDATE;
UPDATE saga_instances SET status = 'RUNNING', step_index = 1, step_name = 'reserve_inventory', step_kind = 'ACTION', attempt = 1, first_attempt = 1,
    waiting = 'REPLY', wake_at = now() + interval '10 s', failure_step = NULL, failure_code = NULL, failure_reason = NULL,
    attention_step = NULL, attention_code = NULL, attention_reason = NULL,
    outputs = outputs || jsonb_build_object('verify_order', '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}'::jsonb),
    version = version + 1, updated_at = now(), ended_at = NULL
WHERE id = md5(:n::text)::uuid AND version = 1;
UPDATE saga_step_attempts SET status = 'SUCCEEDED', error_code = NULL, error_message = NULL,
    output = '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}', finished_at = now()
WHERE saga_id = md5(:n::text)::uuid AND step_name = 'verify_order' AND kind = 'ACTION' AND attempt = 1 AND status = 'PENDING' RETURNING started_at;
INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
VALUES (md5(:n::text)::uuid, 1, 'reserve_inventory', 'ACTION', 1, 'PENDING', now(), now() + interval '10 s') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('inventory.commands', md5(:n::text)::uuid::text, 'command', convert_to(('{"schema_version": 1, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b12", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "step": "reserve_inventory", "kind": "ACTION", "action": "reserve_inventory", "attempt": 1, "reply_to": "saga-replies", "input": {"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}, "outputs": {}, "failure": null, "deadline": "2026-11-30T16:00:10Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 2, 'RUNNING', 'RUNNING', 'REPLY', 'verify_order action attempt 1 succeeded; sent reserve_inventory action attempt 1 to inventory',
    '{"finished": {"step": "verify_order", "kind": "ACTION", "attempt": 1, "outcome": "SUCCEEDED", "error": null}, "commands": [], "retry_at": null, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b15"}', now());
COMMIT;
BEGIN;
SELECT id, saga_type, definition_version, business_key, input, outputs, status, step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, version, created_at FROM saga_instances WHERE id = md5(:n::text)::uuid FOR UPDATE;
UPDATE saga_instances SET status = 'RUNNING', step_index = 2, step_name = 'charge_payment', step_kind = 'ACTION', attempt = 1, first_attempt = 1,
    waiting = 'REPLY', wake_at = now() + interval '10 s', failure_step = NULL, failure_code = NULL, failure_reason = NULL,
    attention_step = NULL, attention_code = NULL, attention_reason = NULL,
    outputs = outputs || jsonb_build_object('reserve_inventory', '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}'::jsonb),
    version = version + 1, updated_at = now(), ended_at = NULL
WHERE id = md5(:n::text)::uuid AND version = 2;
UPDATE saga_step_attempts SET status = 'SUCCEEDED', error_code = NULL, error_message = NULL,
    output = '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}', finished_at = now()
WHERE saga_id = md5(:n::text)::uuid AND step_name = 'reserve_inventory' AND kind = 'ACTION' AND attempt = 1 AND status = 'PENDING' RETURNING started_at;
INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
VALUES (md5(:n::text)::uuid, 2, 'charge_payment', 'ACTION', 1, 'PENDING', now(), now() + interval '10 s') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('payment.commands', md5(:n::text)::uuid::text, 'command', convert_to(('{"schema_version": 1, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b12", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "step": "charge_payment", "kind": "ACTION", "action": "charge_payment", "attempt": 1, "reply_to": "saga-replies", "input": {"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}, "outputs": {}, "failure": null, "deadline": "2026-11-30T16:00:10Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 3, 'RUNNING', 'RUNNING', 'REPLY', 'reserve_inventory action attempt 1 succeeded; sent charge_payment action attempt 1 to payment',
    '{"finished": {"step": "reserve_inventory", "kind": "ACTION", "attempt": 1, "outcome": "SUCCEEDED", "error": null}, "commands": [], "retry_at": null, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b15"}', now());
COMMIT;
BEGIN;
SELECT id, saga_type, definition_version, business_key, input, outputs, status, step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, version, created_at FROM saga_instances WHERE id = md5(:n::text)::uuid FOR UPDATE;
UPDATE saga_instances SET status = 'RUNNING', step_index = 3, step_name = 'create_shipment', step_kind = 'ACTION', attempt = 1, first_attempt = 1,
    waiting = 'REPLY', wake_at = now() + interval '10 s', failure_step = NULL, failure_code = NULL, failure_reason = NULL,
    attention_step = NULL, attention_code = NULL, attention_reason = NULL,
    outputs = outputs || jsonb_build_object('charge_payment', '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}'::jsonb),
    version = version + 1, updated_at = now(), ended_at = NULL
WHERE id = md5(:n::text)::uuid AND version = 3;
UPDATE saga_step_attempts SET status = 'SUCCEEDED', error_code = NULL, error_message = NULL,
    output = '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}', finished_at = now()
WHERE saga_id = md5(:n::text)::uuid AND step_name = 'charge_payment' AND kind = 'ACTION' AND attempt = 1 AND status = 'PENDING' RETURNING started_at;
INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
VALUES (md5(:n::text)::uuid, 3, 'create_shipment', 'ACTION', 1, 'PENDING', now(), now() + interval '10 s') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('fulfilment.commands', md5(:n::text)::uuid::text, 'command', convert_to(('{"schema_version": 1, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b12", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "step": "create_shipment", "kind": "ACTION", "action": "create_shipment", "attempt": 1, "reply_to": "saga-replies", "input": {"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}, "outputs": {}, "failure": null, "deadline": "2026-11-30T16:00:10Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 4, 'RUNNING', 'RUNNING', 'REPLY', 'charge_payment action attempt 1 succeeded; sent create_shipment action attempt 1 to fulfilment',
    '{"finished": {"step": "charge_payment", "kind": "ACTION", "attempt": 1, "outcome": "SUCCEEDED", "error": null}, "commands": [], "retry_at": null, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b15"}', now());
COMMIT;
BEGIN;
SELECT id, saga_type, definition_version, business_key, input, outputs, status, step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, version, created_at FROM saga_instances WHERE id = md5(:n::text)::uuid FOR UPDATE;
UPDATE saga_instances SET status = 'RUNNING', step_index = 4, step_name = 'approve_order', step_kind = 'ACTION', attempt = 1, first_attempt = 1,
    waiting = 'REPLY', wake_at = now() + interval '10 s', failure_step = NULL, failure_code = NULL, failure_reason = NULL,
    attention_step = NULL, attention_code = NULL, attention_reason = NULL,
    outputs = outputs || jsonb_build_object('create_shipment', '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}'::jsonb),
    version = version + 1, updated_at = now(), ended_at = NULL
WHERE id = md5(:n::text)::uuid AND version = 4;
UPDATE saga_step_attempts SET status = 'SUCCEEDED', error_code = NULL, error_message = NULL,
    output = '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}', finished_at = now()
WHERE saga_id = md5(:n::text)::uuid AND step_name = 'create_shipment' AND kind = 'ACTION' AND attempt = 1 AND status = 'PENDING' RETURNING started_at;
INSERT INTO saga_step_attempts (saga_id, step_index, step_name, kind, attempt, status, started_at, deadline_at)
VALUES (md5(:n::text)::uuid, 4, 'approve_order', 'ACTION', 1, 'PENDING', now(), now() + interval '10 s') ON CONFLICT DO NOTHING;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('order.commands', md5(:n::text)::uuid::text, 'command', convert_to(('{"schema_version": 1, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b12", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "step": "approve_order", "kind": "ACTION", "action": "approve_order", "attempt": 1, "reply_to": "saga-replies", "input": {"order_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b11", "customer_id": "customer-1", "items": [{"sku": "BENCH-1", "quantity": 2, "unit_price_cents": 1250}], "total_cents": 2500, "currency": "USD", "payment_token": "tok_visa", "shipping_address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "62701", "country": "US"}}, "outputs": {}, "failure": null, "deadline": "2026-11-30T16:00:10Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 5, 'RUNNING', 'RUNNING', 'REPLY', 'create_shipment action attempt 1 succeeded; sent approve_order action attempt 1 to order',
    '{"finished": {"step": "create_shipment", "kind": "ACTION", "attempt": 1, "outcome": "SUCCEEDED", "error": null}, "commands": [], "retry_at": null, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b15"}', now());
COMMIT;
BEGIN;
SELECT id, saga_type, definition_version, business_key, input, outputs, status, step_index, step_name, step_kind, attempt, first_attempt, waiting, wake_at, version, created_at FROM saga_instances WHERE id = md5(:n::text)::uuid FOR UPDATE;
UPDATE saga_instances SET status = 'COMPLETED', step_index = 4, step_name = 'approve_order', step_kind = 'ACTION', attempt = 1, first_attempt = 1,
    waiting = 'NOTHING', wake_at = NULL, failure_step = NULL, failure_code = NULL, failure_reason = NULL,
    attention_step = NULL, attention_code = NULL, attention_reason = NULL,
    outputs = outputs || jsonb_build_object('approve_order', '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}'::jsonb),
    version = version + 1, updated_at = now(), ended_at = now()
WHERE id = md5(:n::text)::uuid AND version = 5;
UPDATE saga_step_attempts SET status = 'SUCCEEDED', error_code = NULL, error_message = NULL,
    output = '{"ok": true, "id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b14"}', finished_at = now()
WHERE saga_id = md5(:n::text)::uuid AND step_name = 'approve_order' AND kind = 'ACTION' AND attempt = 1 AND status = 'PENDING' RETURNING started_at;
INSERT INTO outbox (topic, message_key, message_type, raw_payload, headers)
VALUES ('saga-events', md5(:n::text)::uuid::text, 'event', convert_to(('{"schema_version": 1, "event_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b13", "event_type": "COMPLETED", "saga_id": "' || md5(:n::text)::uuid || '", "saga_type": "order-fulfilment", "definition_version": 1, "business_key": "order-' || :n || '", "status": "COMPLETED", "version": 1, "failure": null, "attention": null, "occurred_at": "2026-11-30T16:00:00Z"}'), 'UTF8'), '[]');
INSERT INTO saga_history (saga_id, version, from_status, to_status, trigger, summary, detail, recorded_at)
VALUES (md5(:n::text)::uuid, 6, 'RUNNING', 'COMPLETED', 'REPLY', 'approve_order action attempt 1 succeeded; saga COMPLETED',
    '{"finished": {"step": "approve_order", "kind": "ACTION", "attempt": 1, "outcome": "SUCCEEDED", "error": null}, "commands": [], "retry_at": null, "message_id": "0190c6a2-5f0e-7d3a-9a51-6f1c2f0e8b15"}', now());
COMMIT;
-- The relay: what this saga put in the outbox, published, is deleted.
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 7 FOR UPDATE SKIP LOCKED);
