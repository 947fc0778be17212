"""orders.queue: the order follows the saga's events; every change is announced as ORDER_UPDATED."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pulse.events import Envelope, Event, OrderUpdated
from pulse.events import EventType as E
from pulse.infra import db, outbox
from pulse.orders.model import apply_event

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)


def snapshot(order: dict[str, Any], **marks: Any) -> OrderUpdated:
    """The ORDER_UPDATED event of an ``orders.orders`` row (``marks``: a watchdog's re-drive marks)."""
    return OrderUpdated(
        order_id=str(order["id"]),
        user_id=str(order["user_id"]),
        status=order["status"],
        payment_status=order["payment_status"],
        inventory_status=order["inventory_status"],
        failure_reason=order["failure_reason"],
        strategy=order["strategy"],
        total_amount=order["total_amount"],
        updated_at=order["updated_at"],
        **marks,
    )


def on_saga_event(deps: Deps, conn: db.Conn, event: Event) -> None:
    """Apply one saga event to its order (the dispatcher claimed orders.inbox), announcing the new state."""
    order_id = event.order_id
    current, key = db.open_batch(conn), _key(order_id)
    order = current.locked.get(key) if current is not None and key is not None else None
    if order is None:
        order = conn.execute("SELECT * FROM orders.orders WHERE id = %s FOR UPDATE", (order_id,)).fetchone()
    if order is None:
        raise LookupError(f"order {order_id} does not exist")
    changes = apply_event(order, event.TYPE, guarded=not deps.naive("unguarded-state"))
    if not changes:
        return
    assignments = ", ".join(f"{column} = %({column})s" for column in changes)
    updated = db.one(  # the row is locked above: it is there
        conn.execute(
            f"UPDATE orders.orders SET {assignments}, updated_at = clock_timestamp() WHERE id = %(id)s RETURNING *",
            {**changes, "id": order_id},
        )
    )
    if current is not None and key is not None:
        current.locked[key] = updated  # the next event of this order in the batch starts from here
    outbox.append_event(conn, snapshot(updated))
    log.debug("order %s: %s -> %s", order_id, event.TYPE.value, changes)


# The batch keys the rows its pre-lock read by (table, id) (db.Batch.locked).
TABLE = "orders.orders"


def lock_batch(conn: db.Conn, envelopes: Iterable[Envelope], naive: Callable[[str], bool] | None = None) -> None:
    """A consumer batch's pre-lock (see Consumer.prelock): its orders' rows, read and locked in id order in one
    statement and kept in the batch, so each handler neither reads its row again nor locks rows in message
    order (two processes' batches would deadlock on that)."""
    ids = sorted({k[1] for e in envelopes if (k := _key(e.order_id)) is not None})
    current = db.open_batch(conn)
    if not ids or current is None:
        return
    rows = conn.execute(
        "SELECT * FROM orders.orders WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE", (ids,)
    ).fetchall()
    current.locked.update({(TABLE, str(r["id"])): r for r in rows})


def _key(order_id: object) -> tuple[str, str] | None:
    """The batch's key of an order's row (None for an id that is not a UUID: its handler fails on its own)."""
    try:
        return TABLE, str(uuid.UUID(str(order_id)))
    except ValueError:
        return None


HANDLED = (
    E.PAYMENT_PROCESSED,
    E.PAYMENT_FAILED,
    E.STOCK_RESERVED,
    E.STOCK_FAILED,
    E.STOCK_RELEASED,
    E.PAYMENT_REFUNDED,
)
