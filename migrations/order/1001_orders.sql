CREATE TABLE orders (
    id               UUID        PRIMARY KEY,
    idempotency_key  TEXT        NOT NULL UNIQUE,
    -- SHA-256 of the order request, to refuse a reused key with a different body.
    request_hash     TEXT        NOT NULL,
    customer_id      TEXT        NOT NULL,
    items            JSONB       NOT NULL,
    total_cents      BIGINT      NOT NULL CHECK (total_cents >= 0),
    currency         TEXT        NOT NULL,
    payment_token    TEXT        NOT NULL,
    shipping_address JSONB       NOT NULL,
    status           TEXT        NOT NULL CHECK (status IN ('PENDING', 'APPROVAL_PENDING', 'APPROVED', 'REJECTED')),
    rejection_code   TEXT,
    rejection_reason TEXT,
    saga_id          UUID        NOT NULL UNIQUE,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
