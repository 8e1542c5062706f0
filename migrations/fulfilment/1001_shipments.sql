CREATE TABLE shipments (
    saga_id         UUID        PRIMARY KEY,
    order_id        UUID        NOT NULL,
    address         JSONB       NOT NULL,
    tracking_number TEXT        NOT NULL UNIQUE,
    status          TEXT        NOT NULL CHECK (status IN ('CREATED', 'CANCELLED')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    cancelled_at    TIMESTAMPTZ
);
