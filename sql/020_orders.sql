CREATE TABLE IF NOT EXISTS orders.orders (
    id                uuid PRIMARY KEY,
    user_id           uuid NOT NULL,
    status            text NOT NULL CHECK (status IN ('CREATED', 'PROCESSING', 'COMPLETED', 'FAILED')),
    failure_reason    text CHECK (failure_reason IN ('PAYMENT_FAILED', 'OUT_OF_STOCK')),
    payment_status    text NOT NULL DEFAULT 'NOT_STARTED'
                      CHECK (payment_status IN ('NOT_STARTED', 'SUCCESS', 'DECLINED', 'REFUNDED')),
    inventory_status  text NOT NULL DEFAULT 'NOT_STARTED'
                      CHECK (inventory_status IN ('NOT_STARTED', 'RESERVED', 'RELEASED', 'OUT_OF_STOCK')),
    strategy          text NOT NULL CHECK (strategy IN ('OPTIMISTIC', 'POST_PAYMENT')),
    total_amount      numeric(12,2) NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS orders_status_idx ON orders.orders (status, updated_at);

CREATE TABLE IF NOT EXISTS orders.order_items (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id    uuid NOT NULL REFERENCES orders.orders(id) ON DELETE CASCADE,
    product_id  uuid NOT NULL,
    quantity    integer NOT NULL CHECK (quantity > 0),
    unit_price  numeric(12,2) NOT NULL
);
CREATE INDEX IF NOT EXISTS order_items_order_idx ON orders.order_items (order_id);

CREATE TABLE IF NOT EXISTS orders.idempotency_records (
    key            text PRIMARY KEY,
    status         text NOT NULL,
    response_body  jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    user_id        uuid
);

CREATE TABLE IF NOT EXISTS orders.inbox (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders.order_views (
    order_id        uuid PRIMARY KEY,
    display_status  text NOT NULL,
    last_updated    timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS orders.order_view_inbox (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
