"""Inventory updates use optimistic locking on ``version`` with bounded retries; stock never goes below zero."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import uuid
from decimal import Decimal

import pytest

from pulse import topology
from pulse.events import Envelope, Item, OrderCreated
from pulse.infra import db as pulse_db
from pulse.inventory.handlers import MAX_VERSION_RETRIES, VersionConflict, lock_batch
from pulse.status import Strategy
from tests.integration.support import db_stock

pytestmark = pytest.mark.integration


def order_created(order_id: str, product: str, total: str) -> Envelope:
    """ORDER_CREATED of one unit of ``product`` for an optimistic order, as the relay would deliver it."""
    event = OrderCreated(
        order_id=order_id,
        user_id=str(uuid.uuid4()),
        strategy=Strategy.OPTIMISTIC,
        total_price=Decimal(total),
        items=(Item(product_id=product, quantity=1),),
    )
    return Envelope.of(event)


def test_concurrent_reservations_of_one_product_all_succeed_or_fail_cleanly(system, new_product, db, tidy_outbox):
    product = new_product(stock=8)
    reserve = system.dispatcher("inventory.queue")
    orders = [str(uuid.uuid4()) for _ in range(20)]
    tidy_outbox.extend(orders)
    events = {o: order_created(o, product, "10.00") for o in orders}
    start, conflicts, errors = threading.Barrier(len(orders)), [], []

    def run(order_id):
        start.wait()
        try:
            reserve(events[order_id])
        except VersionConflict:
            conflicts.append(order_id)  # bounded retries exhausted: nothing committed, the consumer retries
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for order_id in conflicts:  # what the consumer's redelivery would do
        reserve(events[order_id])

    outcomes = db.execute(
        "SELECT aggregate_id, event_type FROM shared.outbox WHERE aggregate_id = ANY(%s)", (orders,)
    ).fetchall()
    by_order = {}
    for row in outcomes:
        by_order.setdefault(row["aggregate_id"], []).append(row["event_type"])
    assert sorted(by_order) == sorted(orders) and all(len(v) == 1 for v in by_order.values())
    kinds = [v[0] for v in by_order.values()]
    assert kinds.count("STOCK_RESERVED") == 8 and kinds.count("STOCK_FAILED") == 12
    assert db_stock(db, product) == 0
    reservations = db.execute(
        "SELECT count(*) AS n FROM inventory.reservations WHERE order_id = ANY(%s::uuid[]) AND status = 'RESERVED'",
        (orders,),
    ).fetchone()["n"]
    assert reservations == 8
    version = db.execute("SELECT version FROM inventory.inventory_items WHERE product_id = %s", (product,)).fetchone()[
        "version"
    ]
    assert version == 8  # one bump per successful decrement, none for a failed or lost attempt


def test_a_version_conflict_is_retried_and_then_gives_up(system, new_product, db, tidy_outbox):
    """Another writer bumps the version between our read and our write on every attempt."""
    product, order_id = new_product(stock=5), str(uuid.uuid4())
    tidy_outbox.append(order_id)
    event = order_created(order_id, product, "1.00")
    attempts = []

    class Interfered:
        """The handler's connection, except that a concurrent writer commits a version bump after each read."""

        def __init__(self, conn):
            self._conn = conn

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def execute(self, query, params=None, *args, **kwargs):
            result = self._conn.execute(query, params, *args, **kwargs)
            if query.startswith("SELECT") and "available_quantity, version FROM inventory.inventory_items" in query:
                attempts.append(1)
                db.execute(
                    "UPDATE inventory.inventory_items SET version = version + 1 WHERE product_id = %s", (product,)
                )
            return result

    @contextlib.contextmanager
    def interfering(pool):
        with pulse_db.unit(pool) as conn:
            yield Interfered(conn)

    # Injected into a copy of this system's dependencies: the process's transactions stay the real ones.
    deps = dataclasses.replace(system.deps, transaction_factory=interfering)
    interfered = topology.Dispatcher(system.queues["inventory.queue"], deps)
    with pytest.raises(VersionConflict):
        interfered(event)
    assert len(attempts) == MAX_VERSION_RETRIES
    assert db_stock(db, product) == 5
    assert db.execute("SELECT 1 FROM inventory.inbox WHERE event_id = %s", (event.id,)).fetchone() is None
    system.dispatcher("inventory.queue")(event)  # without interference the redelivery goes through
    assert db_stock(db, product) == 4


def test_two_batches_taking_the_same_products_in_opposite_orders_do_not_deadlock(system, new_product, db, tidy_outbox):
    """Two inventory consumers (two `pulse serve` processes) whose batches hold orders for the same products in
    opposite orders: the batch pre-lock takes the rows in product order, so the second batch waits for the first
    instead of deadlocking (PostgreSQL would only break that after deadlock_timeout, 1 s per deadlock)."""
    p1, p2 = new_product(stock=10), new_product(stock=10)
    reserve = system.dispatcher("inventory.queue")

    def order(product):
        o = str(uuid.uuid4())
        tidy_outbox.append(o)
        return order_created(o, product, "10.00")

    batches = {"a": [order(p1), order(p2)], "b": [order(p2), order(p1)]}
    a_holds_first, errors = threading.Event(), []

    def consume(name):
        try:
            if name == "b":
                a_holds_first.wait(10)
            with pulse_db.batch(system.deps.pool) as current:
                lock_batch(current.conn, batches[name])
                for i, e in enumerate(batches[name]):
                    reserve(e)
                    if name == "a" and i == 0:
                        a_holds_first.set()
                        time.sleep(0.3)  # b starts its batch now, holding p2 first without the pre-lock
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=consume, args=(n,)) for n in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert db_stock(db, p1) == 8 and db_stock(db, p2) == 8
