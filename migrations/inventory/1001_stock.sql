CREATE TABLE stock (
    sku        TEXT        PRIMARY KEY,
    -- Units that can still be reserved. Never negative: the reservation's conditional update
    -- (available >= quantity) and this check together make overselling impossible.
    available  BIGINT      NOT NULL CHECK (available >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE reservations (
    saga_id     UUID        NOT NULL,
    sku         TEXT        NOT NULL REFERENCES stock (sku),
    quantity    BIGINT      NOT NULL CHECK (quantity > 0),
    status      TEXT        NOT NULL CHECK (status IN ('RESERVED', 'RELEASED')),
    reserved_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at TIMESTAMPTZ,
    PRIMARY KEY (saga_id, sku)
);
