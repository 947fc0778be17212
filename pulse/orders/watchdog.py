"""The saga watchdog: an order whose saga stalled (a lost event) is re-driven from what the database knows.

Each module records its decision for an order in its own table: inventory in ``inventory.reservations``
(RESERVED, RELEASED or FAILED), payment in ``payment.payments`` (SUCCESS, DECLINED, REFUNDED), redis-stock
in ``infra.order_holds`` (hold moved, released). When an order has been quiet for longer than the deadline
and is not settled, :func:`next_step` compares those decisions with what the order (and its view) has
absorbed and names the one event that moves the saga on, and the one queue that missed it: a decision the
order never heard of is announced again, a module that never decided gets its trigger event again. The
event goes through the outbox with a new id, like any other, and carries ``redriveFor``: every other
module drops it unhandled (topology.Dispatcher), so a re-drive touches only the order and the module it
re-drives. One step per order per deadline: the next run sees the effect of the last one.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pulse.events import EVENTS, Event
from pulse.events import EventType as E
from pulse.infra import db, outbox
from pulse.orders.handlers import snapshot
from pulse.status import InventoryStatus as Inv
from pulse.status import PaymentStatus as Pay
from pulse.status import ReservationStatus as Res
from pulse.status import Strategy
from pulse.views.model import display_status

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)

CANDIDATES = """
SELECT o.*, r.status AS inv_decision, r.items AS reserved_items, pay.status AS pay_decision, pay.id AS payment_id,
       v.display_status AS view_status, h.moved_at AS hold_moved, h.released_at AS hold_released
FROM orders.orders o
LEFT JOIN inventory.reservations r ON r.order_id = o.id
LEFT JOIN payment.payments pay ON pay.order_id = o.id
LEFT JOIN orders.order_views v ON v.order_id = o.id
LEFT JOIN infra.order_holds h ON h.order_id = o.id
LEFT JOIN infra.saga_redrives w ON w.order_id = o.id
WHERE o.updated_at < now() - make_interval(secs => %(deadline)s)
  AND o.created_at > now() - make_interval(secs => %(lookback)s)
  AND (w.redriven_at IS NULL OR w.redriven_at < now() - make_interval(secs => %(deadline)s * LEAST(w.attempts, 5)))
  AND NOT (o.status = 'COMPLETED' AND v.display_status = 'COMPLETED' AND r.status = 'RESERVED'
           AND pay.status = 'SUCCESS' AND h.moved_at IS NOT NULL AND h.released_at IS NOT NULL)
  AND (%(after_t)s::timestamptz IS NULL OR (o.updated_at, o.id) > (%(after_t)s::timestamptz, %(after_id)s::uuid))
ORDER BY o.updated_at, o.id
LIMIT %(limit)s
"""
ORDER, INVENTORY, PAYMENT, REDIS_STOCK, VIEW = (
    "order.queue",
    "inventory.queue",
    "payment.queue",
    "redis-stock.queue",
    "order-view.queue",
)
Step = tuple[E, str]  # (event type, the one queue whose module missed it)
Row = dict[str, Any]  # a CANDIDATES row


def _optimistic(o: Row) -> Step | None:
    inv, pay = o["inv_decision"], o["pay_decision"]
    if inv is None:
        return E.ORDER_CREATED, INVENTORY
    if inv == Res.FAILED:
        return (E.STOCK_FAILED, ORDER) if o["inventory_status"] != Inv.OUT_OF_STOCK else None
    if o["inventory_status"] == Inv.NOT_STARTED:
        return E.STOCK_RESERVED, ORDER
    if pay is None:
        return E.STOCK_RESERVED, PAYMENT
    if pay == Pay.SUCCESS and o["payment_status"] != Pay.SUCCESS:
        return E.PAYMENT_PROCESSED, ORDER
    if pay == Pay.DECLINED and o["payment_status"] != Pay.DECLINED:
        return E.PAYMENT_FAILED, ORDER
    if pay == Pay.DECLINED and inv == Res.RESERVED:
        return E.PAYMENT_FAILED, INVENTORY  # the restock that never happened
    if inv == Res.RELEASED and o["inventory_status"] != Inv.RELEASED:
        return E.STOCK_RELEASED, ORDER
    return None


def _post_payment(o: Row) -> Step | None:
    inv, pay = o["inv_decision"], o["pay_decision"]
    if pay is None:
        return E.ORDER_CREATED, PAYMENT
    if pay == Pay.DECLINED:
        return (E.PAYMENT_FAILED, ORDER) if o["payment_status"] != Pay.DECLINED else None
    if o["payment_status"] == Pay.NOT_STARTED:
        return E.PAYMENT_PROCESSED, ORDER
    if inv is None:
        return E.PAYMENT_PROCESSED, INVENTORY
    if inv == Res.RESERVED and o["inventory_status"] != Inv.RESERVED:
        return E.STOCK_RESERVED, ORDER
    if inv == Res.FAILED and o["inventory_status"] != Inv.OUT_OF_STOCK:
        return E.STOCK_FAILED, ORDER
    if inv == Res.FAILED and pay == Pay.SUCCESS:
        return E.STOCK_FAILED, PAYMENT  # the refund that never happened
    if pay == Pay.REFUNDED and o["payment_status"] != Pay.REFUNDED:
        return E.PAYMENT_REFUNDED, ORDER
    return None


def _hold(o: Row) -> Step | None:
    """redis-stock's part: the cart's hold moved to the order, and released once the order's stock was decided."""
    if o["hold_moved"] is None:
        return E.ORDER_CREATED, REDIS_STOCK
    if o["hold_released"] is not None:
        return None
    if o["inv_decision"] in (Res.RESERVED, Res.RELEASED):
        return E.STOCK_RESERVED, REDIS_STOCK
    if o["inv_decision"] == Res.FAILED:
        return E.STOCK_FAILED, REDIS_STOCK
    if o["strategy"] == Strategy.POST_PAYMENT and o["pay_decision"] == Pay.DECLINED:
        return E.PAYMENT_FAILED, REDIS_STOCK
    return None


def next_step(o: Row) -> Step | None:
    """The event that moves this order's saga on and the one queue that missed it; None when it is settled."""
    step = (_optimistic if o["strategy"] == Strategy.OPTIMISTIC else _post_payment)(o) or _hold(o)
    if step is not None:
        return step
    if o["view_status"] != display_status(o["strategy"], o["payment_status"], o["inventory_status"]):
        return E.ORDER_UPDATED, VIEW
    return None


def next_event(o: Row) -> E | None:
    """The event of :func:`next_step` alone (the checker asks only whether an order is settled)."""
    step = next_step(o)
    return None if step is None else step[0]


def topology_queues() -> tuple[str, ...]:
    from pulse.topology import QUEUES  # the topology imports the handlers, which import this package

    return QUEUES


class QueueDepth(Protocol):
    """Messages ready in queues (:class:`pulse.infra.broker.QueueDepth`); None when the broker cannot tell."""

    def ready(self, queues: list[str]) -> int | None: ...

    def close(self) -> None: ...


class Watchdog:
    """Finds stalled sagas and re-drives them; ``run_once()`` is one pass, the server runs it periodically."""

    def __init__(
        self,
        deps: Deps,
        *,
        deadline_s: float | None = None,
        interval_s: float | None = None,
        lookback_s: float = 86400.0,
        limit: int = 500,
        max_pages: int = 40,
        depth: QueueDepth | None = None,
        unsettled: Callable[[], int] | None = None,
    ) -> None:
        env = os.environ
        self.deps, self.depth, self.unsettled = deps, depth, unsettled
        self.deadline_s = float(deadline_s if deadline_s is not None else env.get("PULSE_WATCHDOG_DEADLINE_S", 30))
        self.interval_s = float(interval_s if interval_s is not None else env.get("PULSE_WATCHDOG_INTERVAL_S", 5))
        self.lookback_s, self.limit, self.max_pages = lookback_s, limit, max_pages
        self.redriven: collections.Counter[str] = collections.Counter()

    def run_once(self) -> dict[str, Any]:
        """One pass; returns how many orders were examined and which events were re-emitted."""
        if self.deps.naive("no-watchdog"):
            return {"examined": 0, "redriven": {}, "disabled": "no-watchdog"}  # the lab's naive switch
        waiting = self.backlog()
        if waiting:
            # Under a backlog every order looks stalled. Re-driving then re-emits events that are only queued,
            # and those duplicates lengthen the very queues the orders wait on: a 12,800-order chaos campaign
            # re-drove 15,000 times and was still 2,500 orders behind two minutes after its last checkout.
            # A lost event is found once the queues are drained.
            log.info("saga watchdog waits: %s", waiting)
            return {"examined": 0, "redriven": {}, "deferred": waiting}
        emitted: collections.Counter[str] = collections.Counter()
        examined = 0
        after: tuple[dt.datetime | None, uuid.UUID | None] = (None, None)
        # Every candidate, a page at a time: settled FAILED orders stay candidates (telling them from a FAILED
        # order whose refund is pending takes next_event), and with one page of the oldest only, a campaign's
        # first 500 failures hid every order that stalled after them.
        for _ in range(self.max_pages):
            with self.deps.pool.connection() as conn:
                rows = conn.execute(
                    CANDIDATES,
                    {
                        "deadline": self.deadline_s,
                        "lookback": self.lookback_s,
                        "limit": self.limit,
                        "after_t": after[0],
                        "after_id": after[1],
                    },
                ).fetchall()
            examined += len(rows)
            for row in rows:
                step = next_step(row)
                if step is not None and self._redrive(row, *step):
                    emitted[str(step[0].value)] += 1
            if len(rows) < self.limit:
                break
            after = (rows[-1]["updated_at"], rows[-1]["id"])
        else:
            log.warning("saga watchdog stopped after %d orders; the newest were not examined this run", examined)
        self.redriven.update(emitted)
        if emitted:
            log.warning("saga watchdog re-drove %d stalled order(s): %s", sum(emitted.values()), dict(emitted))
        return {"examined": examined, "redriven": dict(emitted)}

    def backlog(self) -> str | None:
        """Why re-driving now would be premature (events still on their way), or None."""
        with self.deps.pool.connection() as conn:
            # Unroutable rows wait for a binding, not for the relay (events-routed reports them); counted, they
            # would hold every re-drive back until someone binds a queue.
            late = outbox.late_count(conn, self.deadline_s)
        if late:
            return f"{late} outbox event(s) older than the deadline are not relayed yet"
        if self.depth is not None:
            ready = self.depth.ready(list(topology_queues()))
            if ready:
                return f"{ready} message(s) queued for the consumers"
        # Delivered but not acked (prefetched, in a handler, or between retries): the broker's count misses them.
        held = self.unsettled() if self.unsettled is not None else 0
        if held:
            return f"{held} message(s) in the consumers' hands, not acked yet"
        return None

    def close(self) -> None:
        if self.depth is not None:
            self.depth.close()

    def _redrive(self, order: Row, event: E, queue: str) -> bool:
        with db.transaction(self.deps.pool) as conn:
            # The upsert's WHERE is the guard: of two watchdogs (two servers) only one re-drives per deadline.
            won = conn.execute(
                "INSERT INTO infra.saga_redrives AS w (order_id, event_type) VALUES (%s, %s) "
                "ON CONFLICT (order_id) DO UPDATE SET event_type = EXCLUDED.event_type, attempts = w.attempts + 1, "
                "redriven_at = clock_timestamp() WHERE w.redriven_at < now() - make_interval(secs => %s) "
                "RETURNING attempts",
                (order["id"], event.value, self.deadline_s),
            ).fetchone()
            if won is None:
                return False
            # Only the module that missed the event acts on it (topology.Dispatcher): re-sent to all, an
            # ORDER_CREATED made redis-stock empty the shopper's next cart.
            outbox.append_event(conn, self._event(conn, order, event, queue))
        log.info("order %s re-driven with %s for %s (attempt %d)", order["id"], event.value, queue, won["attempts"])
        return True

    def _event(self, conn: db.Conn, order: Row, event: E, queue: str) -> Event:
        """The event re-built from what the database knows, marked as a re-drive for ``queue`` alone; each
        type's ``reason`` is its default (the one its module writes)."""
        marks: dict[str, Any] = {"redriven": True, "redrive_for": queue}
        if event == E.ORDER_UPDATED:
            return snapshot(order, **marks)
        items = [
            {"productId": str(r["product_id"]), "quantity": r["quantity"]}
            for r in conn.execute(
                "SELECT product_id, quantity FROM orders.order_items WHERE order_id = %s ORDER BY product_id",
                (order["id"],),
            ).fetchall()
        ]
        fields: dict[str, Any] = {
            "order_id": str(order["id"]),
            "user_id": str(order["user_id"]),
            "items": items,
            "total_price": order["total_amount"],
            "strategy": order["strategy"],
            **marks,
        }
        if event == E.STOCK_RELEASED:
            fields["items"] = order["reserved_items"] or items
        elif event in (E.PAYMENT_PROCESSED, E.PAYMENT_REFUNDED):
            fields["payment_id"] = str(order["payment_id"])
        return EVENTS[event.value](**fields)
