CREATE TABLE IF NOT EXISTS inventory.products (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) > 0),
    base_price  numeric(12,2) NOT NULL CHECK (base_price >= 0)
);

CREATE TABLE IF NOT EXISTS inventory.inventory_items (
    product_id          uuid PRIMARY KEY REFERENCES inventory.products(id),
    available_quantity  integer NOT NULL CHECK (available_quantity >= 0),
    version             bigint NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
-- The reconciliation delta scans by updated_at; without this it is a full scan.
CREATE INDEX IF NOT EXISTS inventory_items_updated_at_idx ON inventory.inventory_items (updated_at);

CREATE TABLE IF NOT EXISTS inventory.carts (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL UNIQUE,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS carts_updated_at_idx ON inventory.carts (updated_at);

CREATE TABLE IF NOT EXISTS inventory.cart_items (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    cart_id     uuid NOT NULL REFERENCES inventory.carts(id) ON DELETE CASCADE,
    product_id  uuid NOT NULL REFERENCES inventory.products(id),
    -- 0 marks an item removed (order placed, cart expired): a tombstone whose updated_at lets the
    -- reconciliation delta see deletions too. The sweeper purges old tombstones.
    quantity    integer NOT NULL CHECK (quantity >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (cart_id, product_id)
);
CREATE INDEX IF NOT EXISTS cart_items_product_idx ON inventory.cart_items (product_id);
CREATE INDEX IF NOT EXISTS cart_items_updated_at_idx ON inventory.cart_items (updated_at);

-- Which order holds which units: a restock must give back exactly what was taken, once.
CREATE TABLE IF NOT EXISTS inventory.reservations (
    order_id    uuid PRIMARY KEY,
    items       jsonb NOT NULL,
    status      text NOT NULL CHECK (status IN ('RESERVED', 'RELEASED')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS inventory.inbox (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
