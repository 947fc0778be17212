"""redis-stock.queue: keep Redis in step with the database after orders and stock movements."""

from __future__ import annotations

from pulse.infra import db, inbox, keys

APPLIED_TTL_S = 7 * 24 * 3600


def on_order_created(deps, envelope) -> None:
    """Clear the user's cart in Redis (releasing its reservation) and in the database.

    The Redis side runs first, guarded by a per-event marker inside the same Lua call, so a
    redelivery after a crash between the two steps neither releases the units twice nor skips
    the database side (the inbox row is committed with the database change).
    """
    user_id = envelope.payload["userId"]
    deps.scripts.clear_cart([keys.cart(user_id), keys.CLEANUP_QUEUE, keys.applied(envelope.id)],
                            [user_id, APPLIED_TTL_S])
    with db.transaction(deps.pool) as conn:
        if not inbox.claim(conn, "infra.redis_stock_inbox", envelope.id, enabled=not deps.naive("no-inbox")):
            return
        cart = conn.execute("UPDATE inventory.carts SET updated_at = now() WHERE user_id = %s RETURNING id",
                            (user_id,)).fetchone()
        if cart is not None:
            conn.execute("UPDATE inventory.cart_items SET quantity = 0, updated_at = now() "
                         "WHERE cart_id = %s AND quantity > 0", (cart["id"],))


def on_stock_changed(deps, envelope) -> None:
    """STOCK_RESERVED / STOCK_RELEASED: refresh ``stock:{productId}`` from the database."""
    product_ids = [i["productId"] for i in envelope.payload.get("items", [])]
    with db.transaction(deps.pool) as conn:
        if not inbox.claim(conn, "infra.redis_stock_inbox", envelope.id, enabled=not deps.naive("no-inbox")):
            return
        rows = conn.execute("SELECT product_id, available_quantity FROM inventory.inventory_items "
                            "WHERE product_id = ANY(%s::uuid[])", (product_ids,)).fetchall()
    if rows:
        deps.redis.mset({keys.stock(r["product_id"]): r["available_quantity"] for r in rows})
