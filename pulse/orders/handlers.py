"""orders.queue: the order follows the saga's events; every change is announced as ORDER_UPDATED."""

from __future__ import annotations

import logging

from pulse.events import EventType as E
from pulse.infra import outbox
from pulse.orders.model import apply_event

log = logging.getLogger(__name__)


def snapshot(order: dict) -> dict:
    """The ORDER_UPDATED payload: enough for the view to compute its status and discard stale updates."""
    return {"orderId": str(order["id"]), "userId": str(order["user_id"]), "status": order["status"],
            "paymentStatus": order["payment_status"], "inventoryStatus": order["inventory_status"],
            "failureReason": order["failure_reason"], "strategy": order["strategy"],
            "totalAmount": order["total_amount"], "updatedAt": order["updated_at"]}


def on_saga_event(deps, conn, envelope) -> None:
    """Apply one saga event to its order (the dispatcher claimed orders.inbox), announcing the new state."""
    order_id = envelope.payload["orderId"]
    order = conn.execute("SELECT * FROM orders.orders WHERE id = %s FOR UPDATE", (order_id,)).fetchone()
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    changes = apply_event(order, envelope.event_type, guarded=not deps.naive("unguarded-state"))
    if not changes:
        return
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)
    updated = conn.execute(
        f"UPDATE orders.orders SET {assignments}, updated_at = clock_timestamp() WHERE id = %(id)s RETURNING *",
        {**changes, "id": order_id}).fetchone()
    outbox.append(conn, E.ORDER_UPDATED, "ORDER", order_id, snapshot(updated))
    log.debug("order %s: %s -> %s", order_id, envelope.event_type, changes)


HANDLED = (E.PAYMENT_PROCESSED, E.PAYMENT_FAILED, E.STOCK_RESERVED, E.STOCK_FAILED, E.STOCK_RELEASED,
           E.PAYMENT_REFUNDED)
