-- The customer notifications the notification service recorded (sending is simulated): one per
-- lifecycle event of an order saga that completed or failed. The event's id is the key, so an
-- event delivered twice records one notification.
CREATE TABLE notifications (
    event_id    UUID        PRIMARY KEY,
    saga_id     UUID        NOT NULL,
    -- The saga's business key: the order id.
    order_id    TEXT        NOT NULL,
    kind        TEXT        NOT NULL CHECK (kind IN ('ORDER_CONFIRMED', 'ORDER_FAILED')),
    channel     TEXT        NOT NULL,
    subject     TEXT        NOT NULL,
    body        TEXT        NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('SENT')),
    occurred_at TIMESTAMPTZ NOT NULL,
    sent_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX notifications_order ON notifications (order_id, sent_at DESC);
