-- 200,000 sagas (2,000 in flight) in a database with the orchestrator's schema, and hot_ids: the in-flight ones numbered. docs/performance.md, 2026-12-03.
INSERT INTO saga_instances (id, saga_type, definition_version, idempotency_key, request_hash, business_key, input, status, step_index, step_name, step_kind, attempt, waiting, wake_at, created_at, updated_at, ended_at)
SELECT gen_random_uuid(), 'order-fulfilment', 1, 'k'||g, 'h', 'order-'||g,
  jsonb_build_object('order_id', gen_random_uuid(), 'customer_id', 'c'||g, 'items', jsonb_build_array(jsonb_build_object('sku','SKU-1','quantity',2,'unit_price_cents',1999)), 'payment_token','tok_visa','shipping',jsonb_build_object('postal_code','12345','country','DE','city','Berlin','street','Main 1')),
  CASE WHEN g <= 2000 THEN 'RUNNING' ELSE 'COMPLETED' END, 2, 'charge_payment', 'ACTION', 1,
  CASE WHEN g <= 2000 THEN 'REPLY' ELSE 'NOTHING' END,
  CASE WHEN g <= 2000 THEN now() + interval '10 s' END, now(), now(), CASE WHEN g > 2000 THEN now() END
FROM generate_series(1, 200000) g;
CREATE TABLE hot_ids AS SELECT id, row_number() over () AS n FROM saga_instances WHERE status='RUNNING';
CREATE INDEX ON hot_ids(n);
VACUUM ANALYZE;
