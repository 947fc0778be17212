CREATE TABLE IF NOT EXISTS shared.outbox (
    id              uuid PRIMARY KEY,
    aggregate_type  text NOT NULL,
    aggregate_id    text NOT NULL,
    event_type      text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The polling relay claims in seq order; uuids alone carry no order.
    seq             bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS outbox_seq_idx ON shared.outbox (seq);

CREATE TABLE IF NOT EXISTS infra.redis_stock_inbox (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
