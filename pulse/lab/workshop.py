"""Auto-checks of the workshop exercises: each runs the student's code against the real services.

Every check returns a dict of what it observed and raises ``AssertionError`` with one plain sentence
that says what went wrong, so the notebook cell fails exactly where the student's code does.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pulse.config import PROJECT_ROOT

SOLUTIONS = PROJECT_ROOT / "notebooks" / "workshops" / "solutions"


def solution(name: str) -> str:
    """The reference solution's source (kept apart from the exercises, for instructors and CI)."""
    return (SOLUTIONS / name).read_text()


def check_reserve_script(lab, source: str, *, stock: int = 10, shoppers: int = 40) -> dict:
    """Your ``reserve_stock.lua`` (KEYS stock, reserved; ARGV qty → -1 miss, 0 not enough, 1 reserved)
    on the lab's Redis: the contract's three answers, then ``shoppers`` concurrent reservations of one unit."""
    r = lab.redis()
    tag = uuid.uuid4().hex[:8]
    stock_key, reserved_key = f"stock:workshop-{tag}", f"reserved:workshop-{tag}"
    try:
        sha = r.script_load(source)
        assert int(r.evalsha(sha, 2, stock_key, reserved_key, 1)) == -1, "A missing stock key must return -1."
        r.set(stock_key, stock)
        assert int(r.evalsha(sha, 2, stock_key, reserved_key, stock + 1)) == 0, "Asking for more than the stock must return 0."
        assert int(r.get(reserved_key) or 0) == 0, "A refused reservation must not change reserved:."
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: int(r.evalsha(sha, 2, stock_key, reserved_key, 1)), range(shoppers)))
        held = int(r.get(reserved_key) or 0)
        assert answers.count(1) == stock == held, (f"{answers.count(1)} of {shoppers} concurrent reservations succeeded "
                                                   f"and reserved: is {held}; exactly {stock} must.")
        return {"accepted": answers.count(1), "refused": answers.count(0), "reserved": held}
    finally:
        r.delete(stock_key, reserved_key)
        r.close()


def check_inbox(lab, claim, *, table: str = "orders.inbox", deliveries: int = 8) -> dict:
    """Your ``claim(conn, table, event_id) -> bool`` on the lab's database: new → True, repeat → False,
    a rolled-back claim does not count, and of ``deliveries`` concurrent deliveries exactly one wins."""
    from pulse.infra import db

    url = lab.settings.database_url
    event = uuid.uuid4()
    with db.connect(url) as conn:
        with conn.transaction():
            assert claim(conn, table, event) is True, "The first delivery of an event must be claimed (True)."
        with conn.transaction():
            assert claim(conn, table, event) is False, "A redelivered event must not be claimed again (False)."
        rolled = uuid.uuid4()
        try:
            with conn.transaction():
                claim(conn, table, rolled)
                raise RuntimeError("the effect failed")
        except RuntimeError:
            pass
        with conn.transaction():
            assert claim(conn, table, rolled) is True, "A claim rolled back with its effect must not block a retry."
    racing, start = uuid.uuid4(), threading.Barrier(deliveries)

    def deliver(_):
        with db.connect(url) as conn, conn.transaction():
            start.wait()
            return claim(conn, table, racing)

    with ThreadPoolExecutor(deliveries) as pool:
        wins = sum(bool(w) for w in pool.map(deliver, range(deliveries)))
    assert wins == 1, f"{wins} of {deliveries} concurrent deliveries claimed the same event; exactly one must."
    return {"concurrentWinners": wins}


def check_compensation(lab, on_restock, *, quantity: int = 3) -> dict:
    """Your ``on_restock(deps, envelope)`` in the real optimistic saga: a kernel-side system whose
    inventory handles PAYMENT_FAILED with your function, every card declined, one checkout, and the
    PAYMENT_FAILED event delivered twice. Stock must come back exactly once."""
    from pulse import bootstrap
    from pulse.events import EventType as E

    if lab.running:
        raise AssertionError("Stop the lab's server first (lab.stop()): its consumers would take the events.")
    settings = lab.settings.replace(strategy="optimistic", payment_decline_rate=1.0)
    system = bootstrap.build(settings, migrate=False, pool_size=6)
    try:
        system.replace_route("inventory.queue", E.PAYMENT_FAILED, on_restock, claims_inbox=False)
        system.start_workers(schedulers=False)
        product = system.products.create("Workshop restock", 10, 10)["id"]
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), quantity)
        order_id = system.orders.create(user, str(uuid.uuid4()))["orderId"]
        order = _wait(lambda: _settled_order(system, order_id), "the declined order to be compensated")
        failed = _payment_failed_envelope(system, order_id)
        on_restock(system.deps, failed)  # the broker delivers it again
        stock = system.products.get(uuid.UUID(product))["stock"]
        assert order["inventoryStatus"] == "RELEASED", f"The order's inventory is {order['inventoryStatus']}, not RELEASED."
        assert stock == 10, f"Stock is {stock} after the restock and a redelivery; it must be back at 10, exactly once."
        return {"order": order["displayStatus"], "inventory": order["inventoryStatus"], "stock": stock}
    finally:
        system.close()


def _settled_order(system, order_id):
    order = system.orders.get(uuid.UUID(order_id))
    return order if order["inventoryStatus"] == "RELEASED" and order["displayStatus"] else None


def _payment_failed_envelope(system, order_id):
    from pulse.events import Envelope

    with system.deps.pool.connection() as conn:
        row = conn.execute("SELECT event_id FROM infra.event_log WHERE aggregate_id = %s AND event_type = 'PAYMENT_FAILED'",
                           (order_id,)).fetchone()
        items = conn.execute("SELECT items FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()
    event_id = row["event_id"] if row else uuid.uuid4()
    return Envelope(id=event_id, event_type="PAYMENT_FAILED", aggregate_id=order_id,
                    payload={"orderId": order_id, "items": items["items"] if items else [], "strategy": "OPTIMISTIC",
                             "reason": "PAYMENT_FAILED"})


def check_delta_query(lab, sql: str) -> dict:
    """Your reconciliation delta query (``%(lower)s``, ``%(upper)s`` → product_id, available_quantity) against
    the lab's database: rows changed in (lower, upper] are in, rows changed before or after are out."""
    import time

    from pulse.infra import db

    ids = {k: str(uuid.uuid4()) for k in ("before", "inside", "after")}
    with db.connect(lab.settings.database_url, autocommit=True) as conn:
        for key, pid in ids.items():
            conn.execute("INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, 1)", (pid, f"Delta {key}"))
            conn.execute("INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, 5)", (pid,))
            time.sleep(0.05)
            if key == "before":
                lower = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
            if key == "inside":
                upper = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
        rows = conn.execute(sql, {"lower": lower, "upper": upper}).fetchall()
    found = {str(r["product_id"]) for r in rows}
    assert ids["inside"] in found, "A product changed inside the window is missing from your delta."
    assert ids["before"] not in found, "A product changed before the window (already reconciled) is in your delta."
    assert ids["after"] not in found, "A product changed after the window's upper bound (in flight) is in your delta."
    assert all("available_quantity" in r for r in rows), "Select available_quantity too: the fix needs it."
    return {"rows": len(rows), "windowed": True}


def _wait(predicate, what: str, timeout_s: float = 30.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"Timed out waiting for {what}.")


def read_solution_path(name: str) -> Path:
    return SOLUTIONS / name
