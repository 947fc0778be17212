"""Reference solution: the restock compensation (exercise 3)."""

from pulse.events import EventType
from pulse.infra import db, inbox, outbox


def on_restock(deps, envelope):
    p = envelope.payload
    with db.transaction(deps.pool) as conn:
        if not inbox.claim(conn, "inventory.inbox", envelope.id):
            return  # redelivered: the stock was already given back
        reservation = conn.execute(
            "SELECT items FROM inventory.reservations WHERE order_id = %s AND status = 'RESERVED' FOR UPDATE",
            (p["orderId"],),
        ).fetchone()
        if reservation is None:
            return  # nothing was taken for this order
        for item in reservation["items"]:
            conn.execute(
                "UPDATE inventory.inventory_items SET available_quantity = available_quantity + %s, "
                "version = version + 1, updated_at = now() WHERE product_id = %s",
                (item["quantity"], item["productId"]),
            )
        conn.execute(
            "UPDATE inventory.reservations SET status = 'RELEASED', updated_at = now() WHERE order_id = %s",
            (p["orderId"],),
        )
        outbox.append(
            conn,
            EventType.STOCK_RELEASED,
            "ORDER",
            p["orderId"],
            {
                "orderId": p["orderId"],
                "userId": p.get("userId"),
                "items": reservation["items"],
                "strategy": p.get("strategy"),
                "reason": "PAYMENT_FAILED",
            },
        )
