"""redis-stock.queue: keep Redis in step with the database after orders and stock movements."""

from __future__ import annotations

from pulse.infra import inbox, keys

APPLIED_TTL_S = 7 * 24 * 3600


def on_order_created(deps, envelope) -> None:
    """Clear the user's cart in the database and in Redis (releasing its reservation).

    The database side commits first, with the inbox row. The Redis side then runs on every delivery,
    even a duplicate one, because a crash may have come between the two; a per-event marker set in
    the same Lua call keeps it to one effect. Doing Redis first instead would open a window where a
    cart read finds Redis empty, falls back to the not-yet-cleared database cart and caches it again.
    """
    user_id = envelope.payload["userId"]
    with deps.transaction() as conn:
        if inbox.claim(conn, "infra.redis_stock_inbox", envelope.id, enabled=not deps.naive("no-inbox")):
            cart = conn.execute("UPDATE inventory.carts SET updated_at = now() WHERE user_id = %s RETURNING id",
                                (user_id,)).fetchone()
            if cart is not None:
                conn.execute("UPDATE inventory.cart_items SET quantity = 0, updated_at = now() "
                             "WHERE cart_id = %s AND quantity > 0", (cart["id"],))
    # after_commit: inside a consumer batch the database side commits only with the whole batch.
    deps.after_commit(lambda: deps.scripts.clear_cart(
        [keys.cart(user_id), keys.CLEANUP_QUEUE, keys.applied(envelope.id)], [user_id, APPLIED_TTL_S]))


def on_stock_changed(deps, envelope) -> None:
    """STOCK_RESERVED / STOCK_RELEASED: refresh ``stock:{productId}`` from the database."""
    product_ids = [i["productId"] for i in envelope.payload.get("items", [])]
    with deps.transaction() as conn:
        if not inbox.claim(conn, "infra.redis_stock_inbox", envelope.id, enabled=not deps.naive("no-inbox")):
            return
        rows = conn.execute("SELECT product_id, available_quantity FROM inventory.inventory_items "
                            "WHERE product_id = ANY(%s::uuid[])", (product_ids,)).fetchall()
    if rows:
        stock = {keys.stock(r["product_id"]): r["available_quantity"] for r in rows}
        deps.after_commit(lambda: deps.redis.mset(stock))
