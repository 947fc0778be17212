"""The invariants of each order: charged at most once, refunded when it failed, money balanced, settled with
its compensation done, each module's effect applied once, and one holder at a time of its idempotency lock.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import TYPE_CHECKING

from pulse.infra.db import one
from pulse.orders.watchdog import next_event
from pulse.status import TERMINAL
from pulse.tools.check.base import MAX_IDS, ORDERS_IN_SCOPE, Result, Scope, result

if TYPE_CHECKING:
    from pulse.infra import db


# -- money ------------------------------------------------------------------------------------------
def one_charge_per_order(conn: db.Conn, scope: Scope) -> Result:
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT p.order_id FROM payment.payments p JOIN o "
        "ON o.id = p.order_id WHERE p.status IN ('SUCCESS', 'REFUNDED') GROUP BY p.order_id "
        "HAVING count(*) > 1",
        scope.sql(),
    ).fetchall()
    return result(
        "one-charge-per-order",
        [r["order_id"] for r in rows],
        "no order was charged twice",
        "{n} order(s) charged more than once",
    )


def failed_orders_refunded(conn: db.Conn, scope: Scope) -> Result:
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.id FROM o JOIN payment.payments p ON p.order_id = o.id "
        "WHERE o.status = 'FAILED' AND p.status = 'SUCCESS'",
        scope.sql(),
    ).fetchall()
    return result(
        "failed-orders-refunded",
        [r["id"] for r in rows],
        "every charged FAILED order was refunded",
        "{n} FAILED order(s) charged and not refunded",
    )


def money_balance(conn: db.Conn, scope: Scope) -> Result:
    """Σ charged − Σ refunded = Σ totals of COMPLETED orders."""
    args = scope.sql()
    totals = one(
        conn.execute(
            f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT "
            "COALESCE((SELECT SUM(p.amount) FROM payment.payments p JOIN o ON o.id = p.order_id "
            "          WHERE p.status IN ('SUCCESS', 'REFUNDED')), 0) AS charged, "
            "COALESCE((SELECT SUM(p.amount) FROM payment.payments p JOIN o ON o.id = p.order_id "
            "          WHERE p.status = 'REFUNDED'), 0) AS refunded, "
            "COALESCE((SELECT SUM(total_amount) FROM o WHERE status = 'COMPLETED'), 0) AS completed",
            args,
        )
    )
    offending = [
        r["id"]
        for r in conn.execute(
            f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.id FROM o LEFT JOIN payment.payments p ON p.order_id = o.id "
            "WHERE (o.status = 'COMPLETED') <> (p.status IS NOT DISTINCT FROM 'SUCCESS')",
            args,
        )
    ]
    net = Decimal(totals["charged"]) - Decimal(totals["refunded"])
    balanced = net == Decimal(totals["completed"]) and not offending
    data = {
        "charged": str(totals["charged"]),
        "refunded": str(totals["refunded"]),
        "completedTotal": str(totals["completed"]),
    }
    text = (
        f"charged {totals['charged']} - refunded {totals['refunded']} = completed {totals['completed']}"
        if balanced
        else f"charged {totals['charged']} - refunded {totals['refunded']} = {net}, but COMPLETED "
        f"orders total {totals['completed']}; {len(offending)} order(s) whose payment and status disagree"
    )
    return Result("money-balance", balanced, text, offending, data)


# -- sagas ------------------------------------------------------------------------------------------
def orders_terminal(conn: db.Conn, scope: Scope, older_than_s: float = 0.0) -> Result:
    """Every order COMPLETED or FAILED with compensation done, its view and its user's cart caught up."""
    # The cutoff is clock_timestamp(), not now(): a handler stamps updated_at with its statement's clock, which
    # can be later than this statement's start, and an order moving right now must be judged, not skipped.
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.*, r.status AS inv_decision, pay.status AS pay_decision, "
        "v.display_status AS view_status, h.moved_at AS hold_moved, h.released_at AS hold_released "
        "FROM o LEFT JOIN inventory.reservations r ON r.order_id = o.id LEFT JOIN infra.order_holds h "
        "ON h.order_id = o.id "
        "LEFT JOIN payment.payments pay ON pay.order_id = o.id LEFT JOIN orders.order_views v ON v.order_id = o.id "
        "WHERE o.updated_at < clock_timestamp() - make_interval(secs => %(older)s)",
        {**scope.sql(), "older": older_than_s},
    ).fetchall()
    stuck = {}
    for row in rows:
        step = next_event(row)
        if row["status"] not in TERMINAL or step is not None:
            stuck[row["id"]] = (
                f"{row['status']}/{row['payment_status']}/{row['inventory_status']} next={step and step.value}"
            )
    return result(
        "orders-terminal",
        list(stuck),
        f"all {len(rows)} order(s) settled",
        "{n} order(s) not settled (non-terminal, compensation pending, stale view, or a cart hold "
        "not moved or not released)",
        examples={str(k): v for k, v in list(stuck.items())[:MAX_IDS]},
    )


EFFECT_TYPES = (
    "ORDER_CREATED",
    "STOCK_RESERVED",
    "STOCK_FAILED",
    "STOCK_RELEASED",
    "PAYMENT_PROCESSED",
    "PAYMENT_FAILED",
    "PAYMENT_REFUNDED",
)


def effects_once(conn: db.Conn, scope: Scope) -> Result:
    """Each module's effect on an order happened at most once (a second effect = a duplicate processed twice)."""
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT e.aggregate_id, e.event_type, count(*) AS n FROM infra.event_log e "
        "JOIN o ON o.id::text = e.aggregate_id WHERE NOT e.redriven AND e.event_type = ANY(%(types)s) "
        "GROUP BY 1, 2 HAVING count(*) > 1",
        {**scope.sql(), "types": list(EFFECT_TYPES)},
    ).fetchall()
    return result(
        "effects-once",
        sorted({r["aggregate_id"] for r in rows}),
        "every module acted at most once per order",
        "{n} order(s) with an effect applied more than once",
        examples=[f"{r['aggregate_id']} {r['event_type']} x{r['n']}" for r in rows[:MAX_IDS]],
    )


# -- idempotency lock -------------------------------------------------------------------------------
LOCK_MARGIN = 0.25  # share of the lock's hold left for the moments between taking the lock and the log entry


def idempotency_lock_exclusive(conn: db.Conn, scope: Scope) -> Result:
    """An idempotency key's lock has one holder at a time (a late owner never frees a newer owner's lock).

    The trace is the lab fault ``orders.create``: each strike is a request inside order creation, logged with
    its key, the lock's TTL and how long the request stays (``ms``). After such a request took the lock, the
    next one on its key may enter only when the lock expired or that request let go, so no sooner than the
    smaller of the two. A later entry means the lock was freed under its holder's feet.
    """
    rows = conn.execute(
        "SELECT context->>'key' AS key, (context->>'ttl')::float AS ttl, (context->>'ms')::float / 1000 AS held, "
        "fired_at FROM infra.fault_log WHERE name = 'orders.create' AND fired_at >= %(since)s "
        "AND context ? 'key' AND context ? 'ttl' ORDER BY 1, fired_at",
        scope.sql(),
    ).fetchall()
    offending, examples = [], []
    for before, after in itertools.pairwise(rows):
        if before["key"] != after["key"] or not before["held"]:
            continue
        hold = min(before["ttl"], before["held"])
        gap = (after["fired_at"] - before["fired_at"]).total_seconds()
        if gap < hold * (1 - LOCK_MARGIN):
            if before["key"] not in offending:
                offending.append(before["key"])
            examples.append(f"{before['key']}: entered {gap:.2f}s after a holder that kept the lock {hold:.1f}s")
    return result(
        "idempotency-lock-exclusive",
        offending,
        f"every idempotency lock had one holder at a time ({len(rows)} slow creation(s) traced)",
        "{n} idempotency key(s) whose lock let a second request in while its holder still worked",
        examples=examples[:MAX_IDS],
    )
