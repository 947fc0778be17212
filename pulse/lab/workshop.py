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


def check_reserve_script(lab, source: str, *, steps: int = 300, seed: int = 7) -> dict:
    """Your ``reserve_stock.lua`` (KEYS stock, reserved; ARGV qty → -1 miss, 0 not enough, 1 reserved)
    on the lab's Redis, one call at a time: a cache miss, partial quantities, the exact boundary
    (``stock − reserved == qty`` succeeds, ``qty + 1`` does not), a stock that fell below what is reserved,
    then ``steps`` random calls compared with the contract. Redis runs a script atomically, so no race is
    needed to judge it: what matters is that each single call answers and counts right."""
    import random

    r = lab.redis()
    tag = uuid.uuid4().hex[:8]
    stock_key, reserved_key = f"stock:workshop-{tag}", f"reserved:workshop-{tag}"

    def reserve(qty: int):
        try:
            answer = r.evalsha(sha, 2, stock_key, reserved_key, qty)
        except Exception as exc:  # a Lua error: show Redis's own sentence, it names the line
            raise AssertionError(f"Your script failed in Redis for a reservation of {qty}: {exc}") from None
        try:
            return int(answer)
        except (TypeError, ValueError):
            raise AssertionError(f"Your script returned {answer!r}; it must return -1, 0 or 1.") from None

    def held() -> int:
        return int(r.get(reserved_key) or 0)

    def expect(qty: int, want: int, why: str):
        before = held()
        got = reserve(qty)
        assert got == want, f"{why} must return {want}, got {got}."
        after = held()
        grew = qty if want == 1 else 0
        assert after == before + grew, f"{why}: reserved: went from {before} to {after}; it must " + (
            f"grow by exactly {qty}." if grew else "not change."
        )
        assert r.get(stock_key) in (None, str(stock_now[0])), "Your script changed stock:; only reserved: may change."

    stock_now = [None]
    try:
        try:
            sha = r.script_load(source)
        except Exception as exc:
            raise AssertionError(f"Redis could not load your script: {exc}") from None
        expect(1, -1, "A reservation when stock: is missing (a cache miss)")
        assert not r.exists(reserved_key), "A cache miss must not create reserved:."
        stock_now[0] = 10
        r.set(stock_key, 10)
        expect(3, 1, "A reservation of 3 with 10 in stock and nothing reserved")
        expect(4, 1, "A reservation of 4 with 10 in stock and 3 reserved")
        expect(4, 0, "A reservation of 4 with 10 in stock and 7 reserved (one more than is left)")
        expect(3, 1, "A reservation of 3 with 10 in stock and 7 reserved (exactly what is left)")
        expect(1, 0, "A reservation of 1 with 10 in stock and 10 reserved")
        stock_now[0] = 8  # the warehouse wrote two units off: more is held than is in stock
        r.set(stock_key, 8)
        expect(1, 0, "A reservation of 1 with 8 in stock and 10 reserved")
        r.delete(stock_key)
        expect(1, -1, "A reservation when stock: expired but reserved: is still there")
        assert held() == 10, "A cache miss must leave reserved: as it was."
        stock_now[0] = 20  # reloaded from the database
        r.set(stock_key, 20)
        rng, checked = random.Random(seed), 0
        for _ in range(steps):
            if rng.random() < 0.1:  # a reload from the database or a release: stock moves under the holds
                stock_now[0] = rng.randint(0, 30)
                r.set(stock_key, stock_now[0])
                r.set(reserved_key, rng.randint(0, stock_now[0]))
            qty = rng.randint(1, 6)
            want = 1 if stock_now[0] - held() >= qty else 0
            expect(qty, want, f"A reservation of {qty} with {stock_now[0]} in stock and {held()} reserved")
            assert 0 <= held() <= stock_now[0], (
                f"reserved: is {held()} with {stock_now[0]} in stock: never negative, never over."
            )
            checked += 1
        return {"cacheMiss": -1, "boundary": "exact", "randomCalls": checked, "reserved": held()}
    finally:
        r.delete(stock_key, reserved_key)
        r.close()


def check_inbox(lab, claim, *, table: str = "orders.inbox", deliveries: int = 8) -> dict:
    """Your ``claim(conn, table, event_id) -> bool`` on the lab's database: new → True, repeat → False,
    a rolled-back claim does not count, and of ``deliveries`` concurrent deliveries exactly one wins."""
    from pulse.infra import db

    claim = _guarded(claim, "claim")
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


class _CrashAfterRestock:
    """Faults for the compensation check: the inventory consumer dies once, after your handler committed a
    PAYMENT_FAILED and before the ack, so the broker delivers that event again (a fault between saga steps)."""

    lab = True

    def __init__(self):
        from pulse.faults import NoFaults

        self._base = NoFaults()
        self.armed = False  # set by the wrapped handler once it returned
        self.struck = 0

    def __getattr__(self, name):  # every other hook: never strikes
        return getattr(self._base, name)

    def point(self, name: str, **context) -> None:
        from pulse.faults import FaultInjected

        if name == "consumer.before_ack" and context.get("queue") == "inventory.queue" and self.armed:
            self.armed = False
            self.struck += 1
            raise FaultInjected("fault consumer.before_ack injected (workshop: crash before the ack)")


def check_compensation(lab, on_restock, *, quantity: int = 3, stock: int = 10) -> dict:
    """Your ``on_restock(deps, envelope)`` in the real optimistic saga: a kernel-side system whose
    inventory handles PAYMENT_FAILED with your function, every card declined, one checkout.

    The inventory consumer crashes once after your handler committed and before the ack (the fault
    ``consumer.before_ack``), so the broker redelivers PAYMENT_FAILED; once the order settled, the event
    is delivered a third time by hand. The reservation row must end RELEASED, the order must hear of it,
    and stock must be conserved: back at its start in PostgreSQL, nothing left reserved in Redis."""
    from pulse import bootstrap
    from pulse.events import Envelope
    from pulse.events import EventType as E
    from pulse.infra import keys

    if lab.running:
        raise AssertionError("Stop the lab's server first (lab.stop()): its consumers would take the events.")
    settings = lab.settings.replace(strategy="optimistic", payment_decline_rate=1.0)
    faults = _CrashAfterRestock()
    calls, errors = [], []
    on_restock = _guarded(on_restock, "on_restock")

    def plugged(deps, event_id, event):
        calls.append(str(event_id))
        try:
            on_restock(deps, Envelope.of(event, event_id))  # the learner's handler reads the wire's payload
        except AssertionError as exc:  # the consumer would retry and dead-letter it; the learner needs the sentence
            errors.append(exc)
            raise
        faults.armed = len(calls) == 1  # crash once, right after the first delivery's commit

    def redelivered():
        if errors:
            raise errors[0]
        return len(calls) >= 2 or None

    system = bootstrap.build(settings, migrate=False, pool_size=6, faults=faults)
    try:
        system.replace_route("inventory.queue", E.PAYMENT_FAILED, plugged, claims_inbox=False)
        system.start_workers(schedulers=False)
        product = system.products.create("Workshop restock", 10, stock)["id"]
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), quantity)
        order_id = system.orders.create(user, str(uuid.uuid4()))["orderId"]
        _wait(redelivered, "the broker to redeliver PAYMENT_FAILED after the crash", 30.0)
        order = _wait(
            lambda: _settled_order(system, order_id),
            "the order to hear that its stock was released (STOCK_RELEASED, through the outbox)",
        )
        on_restock(system.deps, _payment_failed_envelope(system, order_id))  # and once more, much later
        with system.deps.pool.connection() as conn:
            row = conn.execute("SELECT status FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()
        pg_stock = system.products.get(uuid.UUID(product))["stock"]
        held = int(system.deps.redis.get(keys.reserved(product)) or 0)
        status = row["status"] if row else None
        assert status == "RELEASED", f"The order's reservation row is {status}, not RELEASED."
        assert pg_stock == stock, (
            f"Stock is {pg_stock} after the restock, a redelivery after a crash and a late "
            f"redelivery; it must be back at {stock}, exactly once."
        )
        assert held == 0, f"Redis still holds {held} units of the released order (reserved:); it must hold none."
        return {
            "order": order["displayStatus"],
            "inventory": order["inventoryStatus"],
            "reservation": status,
            "stock": pg_stock,
            "deliveries": len(calls) + 1,
            "crashes": faults.struck,
        }
    finally:
        system.close()


def _guarded(fn, name: str):
    """``fn`` whose own failures become one sentence naming the learner's function (the traceback helps nobody)."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotImplementedError:
            raise AssertionError(
                f"Your {name} is not written yet: replace the NotImplementedError in the cell above."
            ) from None
        except AssertionError:
            raise
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise AssertionError(f"Your {name} raised {type(exc).__name__}: {first}") from None

    return call


def _settled_order(system, order_id):
    order = system.orders.get(uuid.UUID(order_id))
    return order if order["inventoryStatus"] == "RELEASED" and order["displayStatus"] else None


def _payment_failed_envelope(system, order_id):
    from pulse.events import Envelope

    with system.deps.pool.connection() as conn:
        row = conn.execute(
            "SELECT event_id FROM infra.event_log WHERE aggregate_id = %s AND event_type = 'PAYMENT_FAILED'",
            (order_id,),
        ).fetchone()
        items = conn.execute("SELECT items FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()
    event_id = row["event_id"] if row else uuid.uuid4()
    return Envelope(
        id=event_id,
        event_type="PAYMENT_FAILED",
        aggregate_id=order_id,
        payload={
            "orderId": order_id,
            "items": items["items"] if items else [],
            "strategy": "OPTIMISTIC",
            "reason": "PAYMENT_FAILED",
        },
    )


def check_delta_query(lab, sql: str) -> dict:
    """Your reconciliation delta query (``%(lower)s``, ``%(upper)s`` → product_id, available_quantity) against
    the lab's database. The contract is the reconciler's window ``(lower, upper]``: a row changed exactly at
    ``lower`` was covered by the previous run and stays out, one a microsecond later is in; a row changed
    exactly at ``upper`` is in, one a microsecond later is still in flight and stays out."""
    import datetime as dt
    import random

    from pulse.infra import db

    # A window in the past, away from every real row, at a random microsecond so no two checks share it.
    lower = dt.datetime(2001, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=random.randrange(10**12))
    upper = lower + dt.timedelta(minutes=5)
    us = dt.timedelta(microseconds=1)
    cases = {  # name: (updated_at, belongs in the delta, what the student is told when it is wrong)
        "long before": (lower - dt.timedelta(hours=1), False, "changed an hour before the window"),
        "at lower": (lower, False, "changed exactly at the lower bound (the previous run covered it)"),
        "just after lower": (lower + us, True, "changed one microsecond after the lower bound"),
        "inside": (lower + dt.timedelta(minutes=2), True, "changed inside the window"),
        "at upper": (upper, True, "changed exactly at the upper bound"),
        "just after upper": (upper + us, False, "changed one microsecond after the upper bound (still in flight)"),
    }
    ids = {name: str(uuid.uuid4()) for name in cases}
    with db.connect(lab.settings.database_url) as conn:
        with conn.transaction():
            for n, (name, (at, _, _)) in enumerate(cases.items()):
                conn.execute(
                    "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, 1)",
                    (ids[name], f"Delta {name}"),
                )
                conn.execute(
                    "INSERT INTO inventory.inventory_items (product_id, available_quantity, updated_at) "
                    "VALUES (%s, %s, %s)",
                    (ids[name], 100 + n, at),
                )
        try:
            with conn.transaction():
                rows = conn.execute(sql, {"lower": lower, "upper": upper}).fetchall()
        except Exception as exc:
            raise AssertionError(f"PostgreSQL refused your query: {str(exc).splitlines()[0]}") from None
        finally:
            with conn.transaction():
                conn.execute(
                    "DELETE FROM inventory.inventory_items WHERE product_id = ANY(%s::uuid[])", (list(ids.values()),)
                )
                conn.execute("DELETE FROM inventory.products WHERE id = ANY(%s::uuid[])", (list(ids.values()),))
    assert rows, "Your delta returned no rows, so the products changed inside the window are missing."
    assert "product_id" in rows[0] and "available_quantity" in rows[0], (
        "Select product_id and available_quantity: the fix needs both."
    )
    found = {str(r["product_id"]): r["available_quantity"] for r in rows}
    for n, (name, (_, inside, told)) in enumerate(cases.items()):
        if inside:
            assert ids[name] in found, f"A product {told} is missing from your delta."
            assert found[ids[name]] == 100 + n, f"Your delta gives the wrong available_quantity for a product {told}."
        else:
            assert ids[name] not in found, f"A product {told} is in your delta; it must not be."
    return {"window": "(lower, upper]", "boundsChecked": len(cases), "rowsInWindow": sum(c[1] for c in cases.values())}


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


def record(lab, results: dict, path=None, *, notebook: str) -> dict:
    """Record a workshop's result like :func:`pulse.lab.record`; in classroom mode also keep it in the
    student's own database, where the instructor's class board reads it (:func:`pulse.lab.classroom.results`)."""
    from pulse.lab import classroom
    from pulse.lab.record import record as write

    doc = write(results, path, notebook=notebook)
    if lab.env.get(classroom.CLASS_ENV):
        classroom.store_record(lab.settings.database_url, doc)
    return doc
