-- The trace and correlation id a saga started with (the start request's `traceparent` and
-- `x-correlation-id` headers, or the API request's): every command and event it sends carries
-- them, however long after its start (docs/operations.md, issue 14). Written once, never
-- indexed, so a step's update stays HOT (ADR 21).
ALTER TABLE saga_instances ADD COLUMN trace_parent TEXT, ADD COLUMN correlation_id TEXT;
