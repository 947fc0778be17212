-- The order holds of redis-stock (SPEC §3/§4): at ORDER_CREATED a cart's hold on the ordered units moves to the
-- order, and it is released when inventory decides (or the order fails before any reservation). One row per
-- order, so a re-driven ORDER_CREATED (a new event id) cannot take the ordered units out of the cart twice.
-- Reconciliation's truth for reserved:{productId} = live cart quantities + items of moved, unreleased holds.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = 'infra'
                   AND table_name = 'order_holds') THEN
        CREATE TABLE infra.order_holds (
            order_id     uuid PRIMARY KEY,
            user_id      uuid NOT NULL,
            items        jsonb NOT NULL,
            moved_at     timestamptz,
            released_at  timestamptz,
            updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
        );
        CREATE INDEX order_holds_open_idx ON infra.order_holds (order_id) WHERE released_at IS NULL;
        CREATE INDEX order_holds_updated_idx ON infra.order_holds (updated_at);
        -- Orders of a database older than this table released their holds at ORDER_CREATED (the old rule):
        -- recorded as moved and released, so the watchdog does not move them out of today's carts again.
        INSERT INTO infra.order_holds (order_id, user_id, items, moved_at, released_at)
        SELECT o.id, o.user_id, COALESCE(jsonb_agg(jsonb_build_object('productId', oi.product_id,
               'quantity', oi.quantity)) FILTER (WHERE oi.order_id IS NOT NULL), '[]'::jsonb), o.created_at, o.created_at
        FROM orders.orders o LEFT JOIN orders.order_items oi ON oi.order_id = o.id GROUP BY o.id, o.user_id, o.created_at;
    END IF;
END $$;
