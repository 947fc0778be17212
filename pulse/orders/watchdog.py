"""The saga watchdog: an order whose saga stalled (a lost event) is re-driven from what the database knows.

Each module records its decision for an order in its own table: inventory in ``inventory.reservations``
(RESERVED, RELEASED or FAILED), payment in ``payment.payments`` (SUCCESS, DECLINED, REFUNDED). When an
order has been quiet for longer than the deadline and is not settled, :func:`next_event` compares those
decisions with what the order (and its view, and the user's cart) has absorbed and names the one event
that moves the saga on: a decision the order never heard of is announced again, a module that never
decided gets its trigger event again. The event goes through the outbox with a new id, like any other,
so the usual at-least-once path delivers it; every handler is idempotent per order (inventory and
payment decide once per order, the order's state machine ignores what it already knows), so a re-driven
event that turns out unnecessary does nothing. One step per order per deadline: the next run sees the
effect of the last one.
"""

from __future__ import annotations

import collections
import logging
import os

from pulse.events import EventType as E
from pulse.infra import broker, db, outbox
from pulse.orders.handlers import snapshot
from pulse.views.model import display_status

log = logging.getLogger(__name__)

# The user's cart still holds what the order bought: redis-stock never handled ORDER_CREATED (a lost event).
CART_LEFT = """EXISTS (SELECT 1 FROM inventory.carts c JOIN inventory.cart_items ci ON ci.cart_id = c.id
               WHERE c.user_id = o.user_id AND ci.quantity > 0 AND ci.updated_at <= o.created_at)"""
CANDIDATES = """
SELECT o.*, r.status AS inv_decision, r.items AS reserved_items, pay.status AS pay_decision, pay.id AS payment_id,
       v.display_status AS view_status, """ + CART_LEFT + """ AS cart_left
FROM orders.orders o
LEFT JOIN inventory.reservations r ON r.order_id = o.id
LEFT JOIN payment.payments pay ON pay.order_id = o.id
LEFT JOIN orders.order_views v ON v.order_id = o.id
LEFT JOIN infra.saga_redrives w ON w.order_id = o.id
WHERE o.updated_at < now() - make_interval(secs => %(deadline)s)
  AND o.created_at > now() - make_interval(secs => %(lookback)s)
  AND (w.redriven_at IS NULL OR w.redriven_at < now() - make_interval(secs => %(deadline)s * LEAST(w.attempts, 5)))
  AND NOT (o.status = 'COMPLETED' AND v.display_status = 'COMPLETED' AND r.status = 'RESERVED'
           AND pay.status = 'SUCCESS' AND NOT """ + CART_LEFT + """)
  AND (%(after_t)s::timestamptz IS NULL OR (o.updated_at, o.id) > (%(after_t)s::timestamptz, %(after_id)s::uuid))
ORDER BY o.updated_at, o.id
LIMIT %(limit)s
"""


def _optimistic(o: dict) -> str | None:
    inv, pay = o["inv_decision"], o["pay_decision"]
    if inv is None:
        return E.ORDER_CREATED
    if inv == "FAILED":
        return E.STOCK_FAILED if o["inventory_status"] != "OUT_OF_STOCK" else None
    if pay is None or o["inventory_status"] == "NOT_STARTED":
        return E.STOCK_RESERVED
    if pay == "SUCCESS" and o["payment_status"] != "SUCCESS":
        return E.PAYMENT_PROCESSED
    if pay == "DECLINED" and (o["payment_status"] != "DECLINED" or inv == "RESERVED"):
        return E.PAYMENT_FAILED  # also the restock that never happened
    if inv == "RELEASED" and o["inventory_status"] != "RELEASED":
        return E.STOCK_RELEASED
    return None


def _post_payment(o: dict) -> str | None:
    inv, pay = o["inv_decision"], o["pay_decision"]
    if pay is None:
        return E.ORDER_CREATED
    if pay == "DECLINED":
        return E.PAYMENT_FAILED if o["payment_status"] != "DECLINED" else None
    if o["payment_status"] == "NOT_STARTED" or inv is None:
        return E.PAYMENT_PROCESSED
    if inv == "RESERVED" and o["inventory_status"] != "RESERVED":
        return E.STOCK_RESERVED
    if inv == "FAILED" and (o["inventory_status"] != "OUT_OF_STOCK" or pay == "SUCCESS"):
        return E.STOCK_FAILED  # also the refund that never happened
    if pay == "REFUNDED" and o["payment_status"] != "REFUNDED":
        return E.PAYMENT_REFUNDED
    return None


def next_event(o: dict) -> str | None:
    """The event that moves this order's saga on, from the modules' decisions; None when it is settled."""
    step = (_optimistic if o["strategy"] == "OPTIMISTIC" else _post_payment)(o)
    if step is not None:
        return step
    if o["cart_left"]:
        return E.ORDER_CREATED  # redis-stock never cleared the cart; the other modules ignore a repeat
    if o["view_status"] != display_status(o["strategy"], o["payment_status"], o["inventory_status"]):
        return E.ORDER_UPDATED
    return None


class Watchdog:
    """Finds stalled sagas and re-drives them; ``run_once()`` is one pass, the server runs it periodically."""

    def __init__(self, deps, *, deadline_s: float | None = None, interval_s: float | None = None,
                 lookback_s: float = 86400.0, limit: int = 500, max_pages: int = 40, depth=None):
        env = os.environ
        self.deps, self.depth = deps, depth
        self.deadline_s = float(deadline_s if deadline_s is not None else env.get("PULSE_WATCHDOG_DEADLINE_S", 30))
        self.interval_s = float(interval_s if interval_s is not None else env.get("PULSE_WATCHDOG_INTERVAL_S", 5))
        self.lookback_s, self.limit, self.max_pages = lookback_s, limit, max_pages
        self.redriven: collections.Counter = collections.Counter()

    def run_once(self) -> dict:
        """One pass; returns how many orders were examined and which events were re-emitted."""
        waiting = self.backlog()
        if waiting:
            # Under a backlog every order looks stalled. Re-driving then re-emits events that are only queued,
            # and those duplicates lengthen the very queues the orders wait on: a 12,800-order chaos campaign
            # re-drove 15,000 times and was still 2,500 orders behind two minutes after its last checkout.
            # A lost event is found once the queues are drained.
            log.info("saga watchdog waits: %s", waiting)
            return {"examined": 0, "redriven": {}, "deferred": waiting}
        emitted: collections.Counter = collections.Counter()
        examined, after = 0, (None, None)
        # Every candidate, a page at a time: settled FAILED orders stay candidates (telling them from a FAILED
        # order whose refund is pending takes next_event), and with one page of the oldest only, a campaign's
        # first 500 failures hid every order that stalled after them.
        for _ in range(self.max_pages):
            with self.deps.pool.connection() as conn:
                rows = conn.execute(CANDIDATES, {"deadline": self.deadline_s, "lookback": self.lookback_s,
                                                 "limit": self.limit, "after_t": after[0],
                                                 "after_id": after[1]}).fetchall()
            examined += len(rows)
            for row in rows:
                event = next_event(row)
                if event is not None and self._redrive(row, event):
                    emitted[str(event.value)] += 1
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
            late = conn.execute("SELECT count(*) AS n FROM shared.outbox WHERE created_at < now() - "
                                "make_interval(secs => %s)", (self.deadline_s,)).fetchone()["n"]
        if late:
            return f"{late} outbox event(s) older than the deadline are not relayed yet"
        if self.depth is not None:
            ready = self.depth.ready(list(broker.BINDINGS[self.deps.settings.strategy]))
            if ready:
                return f"{ready} message(s) queued for the consumers"
        return None

    def close(self) -> None:
        if self.depth is not None:
            self.depth.close()

    def _redrive(self, order: dict, event) -> bool:
        with db.transaction(self.deps.pool) as conn:
            # The upsert's WHERE is the guard: of two watchdogs (two servers) only one re-drives per deadline.
            won = conn.execute(
                "INSERT INTO infra.saga_redrives AS w (order_id, event_type) VALUES (%s, %s) "
                "ON CONFLICT (order_id) DO UPDATE SET event_type = EXCLUDED.event_type, attempts = w.attempts + 1, "
                "redriven_at = clock_timestamp() WHERE w.redriven_at < now() - make_interval(secs => %s) "
                "RETURNING attempts", (order["id"], event.value, self.deadline_s)).fetchone()
            if won is None:
                return False
            outbox.append(conn, event, "ORDER", order["id"], self._payload(conn, order, event))
        log.info("order %s re-driven with %s (attempt %d)", order["id"], event.value, won["attempts"])
        return True

    def _payload(self, conn, order: dict, event) -> dict:
        if event == E.ORDER_UPDATED:
            return {**snapshot(order), "redriven": True}
        items = [{"productId": str(r["product_id"]), "quantity": r["quantity"]} for r in conn.execute(
            "SELECT product_id, quantity FROM orders.order_items WHERE order_id = %s ORDER BY product_id",
            (order["id"],)).fetchall()]
        payload = {"orderId": str(order["id"]), "userId": str(order["user_id"]), "items": items,
                   "totalPrice": order["total_amount"], "strategy": order["strategy"], "redriven": True}
        if event == E.STOCK_FAILED:
            payload["reason"] = "OUT_OF_STOCK"
        elif event == E.PAYMENT_FAILED:
            payload["reason"] = "DECLINED"
        elif event == E.STOCK_RELEASED:
            payload.update(reason="PAYMENT_FAILED", items=order["reserved_items"] or items)
        elif event in (E.PAYMENT_PROCESSED, E.PAYMENT_REFUNDED):
            payload["paymentId"] = str(order["payment_id"])
        return payload
