-- pgbench: 20 handed-off outbox rows in one insert, with or without the outbox_notify trigger (truncate outbox between runs).
WITH i AS (INSERT INTO outbox (topic, message_key, message_type, payload, headers, handed_off)
SELECT 't.inventory-commands', 'k'||g, 'ReserveInventory', '{"saga_id":"3f1c5c1e-8e2a-4c41-9d59-2a4b1f0f9c11","step":"reserve_inventory","payload":{"items":[{"sku":"SKU-1","quantity":2}]}}'::jsonb, '[["traceparent","00-abc-def-01"]]'::jsonb, true FROM generate_series(1,20) g RETURNING id)
SELECT count(*) FROM i;
