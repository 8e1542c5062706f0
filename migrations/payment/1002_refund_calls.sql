-- The simulated gateway also counts refund calls per saga (tokens can make refunds fail).
ALTER TABLE gateway_calls ADD COLUMN refund_calls INTEGER NOT NULL DEFAULT 0;
