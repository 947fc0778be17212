CREATE TABLE IF NOT EXISTS payment.payments (
    id                   uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id             uuid NOT NULL,
    amount               numeric(12,2) NOT NULL,
    status               text NOT NULL CHECK (status IN ('SUCCESS', 'DECLINED', 'REFUNDED')),
    provider             text NOT NULL,
    provider_payment_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    paid_at              timestamptz,
    refunded_at          timestamptz
);
-- At most one charge attempt per order, whatever the broker redelivers.
CREATE UNIQUE INDEX IF NOT EXISTS payments_order_idx ON payment.payments (order_id);

CREATE TABLE IF NOT EXISTS payment.inbox (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
