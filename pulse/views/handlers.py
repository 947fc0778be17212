"""order-view.queue: the CQRS read model, one row per order, fed only by ORDER_UPDATED."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pulse.events import OrderUpdated
from pulse.infra import db
from pulse.views.model import display_status

if TYPE_CHECKING:
    from pulse.deps import Deps


def on_order_updated(deps: Deps, conn: db.Conn, event: OrderUpdated) -> None:
    """Upsert the order's display status unless a newer update was already projected.

    Two ORDER_UPDATED events of one order can arrive out of order (several consumers, redelivery);
    the order's updated_at travels in the event and the row keeps the newest one.
    """
    status = display_status(event.strategy, event.payment_status, event.inventory_status)
    conn.execute(
        "INSERT INTO orders.order_views (order_id, display_status, last_updated) VALUES (%s, %s, %s) "
        "ON CONFLICT (order_id) DO UPDATE SET display_status = EXCLUDED.display_status, "
        "last_updated = EXCLUDED.last_updated WHERE orders.order_views.last_updated <= EXCLUDED.last_updated",
        (event.order_id, status, event.updated_at),
    )
