-- One payment per saga; refunds flip its status. The ledger records every movement.
CREATE TABLE payments (
    saga_id      UUID        PRIMARY KEY,
    order_id     UUID        NOT NULL,
    amount_cents BIGINT      NOT NULL CHECK (amount_cents >= 0),
    currency     TEXT        NOT NULL,
    status       TEXT        NOT NULL CHECK (status IN ('CHARGED', 'REFUNDED')),
    charged_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at  TIMESTAMPTZ
);

CREATE TABLE ledger (
    id           BIGSERIAL   PRIMARY KEY,
    saga_id      UUID        NOT NULL,
    order_id     UUID        NOT NULL,
    entry_type   TEXT        NOT NULL CHECK (entry_type IN ('CHARGE', 'REFUND')),
    amount_cents BIGINT      NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (saga_id, entry_type)
);

-- State of the simulated payment gateway (an external system): calls made per saga.
CREATE TABLE gateway_calls (
    saga_id UUID    PRIMARY KEY,
    calls   INTEGER NOT NULL
);
