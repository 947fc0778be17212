"""A consumer batch writes its outbox rows in one INSERT at its end (in order, only if the batch commits), and
never commits an inbox claim taken up front that no handler read."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import uuid
from decimal import Decimal

import pytest

from pulse import topology
from pulse.events import Envelope, OrderUpdated, dumps
from pulse.events import EventType as E
from pulse.infra import db as pulse_db
from pulse.infra import outbox
from pulse.infra.consumer import Consumer
from tests.conftest import wait_for
from tests.integration.support import publish

pytestmark = pytest.mark.integration


def rows_of(conn, aggregate_id) -> list[str]:
    return [
        r["event_type"]
        for r in conn.execute(
            "SELECT event_type FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq", (aggregate_id,)
        ).fetchall()
    ]


def consume_as_one_batch(settings, system, channel, spec, envelopes) -> Consumer:
    """Publish ``envelopes`` to ``spec``'s (private, declared) queue, then run one consumer until all are acked and
    delete the queue; all waiting when it starts, the consumer takes them as one batch."""
    publish(settings, envelopes, exchange="", routing_key=spec.name)
    consumer = Consumer(
        settings.amqp_url,
        spec.name,
        topology.Dispatcher(spec, system.deps),
        stop=threading.Event(),
        pool=system.deps.pool,
        batch=10,
        prefetch=10,
    )
    consumer.start()
    n = len(envelopes)
    try:
        wait_for(lambda: consumer.handled == n, message=f"the {n} messages acked")
    finally:
        consumer.stop.set()
        consumer.join(10)
        channel.queue_delete(spec.name)
    return consumer


def test_a_batch_writes_its_outbox_rows_once_at_its_end_in_order(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.batch(system.deps.pool) as current:
        for kind in ("FIRST", "SECOND", "THIRD"):
            outbox.append(current.conn, kind, "ORDER", aggregate, {"orderId": aggregate})
        # Buffered: not even the batch's own transaction sees them before the end.
        assert rows_of(current.conn, aggregate) == []
    assert rows_of(db, aggregate) == ["FIRST", "SECOND", "THIRD"]


@pytest.mark.parametrize("count", [outbox.VALUES_MAX_ROWS, outbox.VALUES_MAX_ROWS + 1, 3 * outbox.VALUES_MAX_ROWS])
def test_a_batch_of_any_size_writes_its_rows_as_given_in_order(system, db, tidy_outbox, count):
    # Past VALUES_MAX_ROWS the rows travel as one JSON array: same ids, columns, payloads and seq order as VALUES.
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    payloads = [
        {"orderId": aggregate, "n": i, "price": Decimal("1.10"), "note": 'a "quote", é and \\ ->>', "none": None}
        for i in range(count)
    ]
    with pulse_db.batch(system.deps.pool) as current:
        ids = [outbox.append(current.conn, f"KIND_{i}", "ORDER", aggregate, p) for i, p in enumerate(payloads)]
    rows = db.execute(
        "SELECT id, aggregate_type, event_type, payload FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq",
        (aggregate,),
    ).fetchall()
    assert [r["id"] for r in rows] == ids
    assert {r["aggregate_type"] for r in rows} == {"ORDER"}
    assert [r["event_type"] for r in rows] == [f"KIND_{i}" for i in range(count)]
    assert [r["payload"] for r in rows] == [json.loads(dumps(p)) for p in payloads]
    logged = db.execute("SELECT count(*) AS n FROM infra.event_log WHERE aggregate_id = %s", (aggregate,)).fetchone()
    assert logged["n"] == count  # the row trigger fired for each


def test_a_batch_that_fails_writes_no_outbox_row(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pytest.raises(RuntimeError), pulse_db.batch(system.deps.pool) as current:
        outbox.append(current.conn, "FIRST", "ORDER", aggregate, {"orderId": aggregate})
        raise RuntimeError("a handler failed")
    assert rows_of(db, aggregate) == []
    with pulse_db.batch(system.deps.pool) as current:  # and the next batch on this thread starts empty
        outbox.append(current.conn, "SECOND", "ORDER", aggregate, {"orderId": aggregate})
    assert rows_of(db, aggregate) == ["SECOND"]


def test_outside_a_batch_the_row_is_written_at_once(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.transaction(system.deps.pool) as conn:
        outbox.append(conn, "ALONE", "ORDER", aggregate, {"orderId": aggregate})
        assert rows_of(conn, aggregate) == ["ALONE"]


def test_a_batch_whose_handler_never_reads_its_up_front_claim_is_not_committed(settings, system, db, channel):
    """A route declared ``claims_always`` whose handler does not claim: committing the batch would mark its events
    handled with no effect (and drop their redeliveries), so the consumer rolls the batch back and takes each
    message alone, where nothing is claimed up front."""
    queue = f"test-claims-{uuid.uuid4().hex[:10]}"
    channel.queue_declare(queue, durable=True)
    inbox = "orders.order_view_inbox"
    calls: list[uuid.UUID] = []
    spec = topology.Queue(
        queue,
        "test",
        inbox,
        routes=(
            topology.Route(
                E.ORDER_UPDATED,
                lambda deps, event_id, event: calls.append(event_id),  # the bug: no inbox.claim
                claims_inbox=False,
                claims_always=True,
            ),
        ),
    )
    envelopes = [
        Envelope.of(
            OrderUpdated(
                order_id=str(uuid.uuid4()),
                user_id=str(uuid.uuid4()),
                strategy="OPTIMISTIC",
                status="PROCESSING",
                payment_status="NOT_STARTED",
                inventory_status="NOT_STARTED",
                failure_reason=None,
                total_amount="1.00",
                updated_at=dt.datetime.now(dt.UTC),
            )
        )
        for _ in range(4)
    ]
    consume_as_one_batch(settings, system, channel, spec, envelopes)
    ids = [e.id for e in envelopes]
    assert set(calls) == set(ids)
    assert db.execute(f"SELECT count(*) AS n FROM {inbox} WHERE event_id = ANY(%s)", (ids,)).fetchone()["n"] == 0


def _updated(order_id: str, payment: str, inventory: str, at: dt.datetime) -> OrderUpdated:
    return OrderUpdated(
        order_id=order_id,
        user_id=str(uuid.uuid4()),
        strategy="OPTIMISTIC",
        status="PROCESSING",
        payment_status=payment,
        inventory_status=inventory,
        failure_reason=None,
        total_amount="10.00",
        updated_at=at,
    )


def test_a_batch_upserts_the_order_view_once_keeping_what_one_by_one_upserts_would(system, db):
    from pulse.views.handlers import on_order_updated

    t0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)
    late, mixed, tie = (str(uuid.uuid4()) for _ in range(3))
    events = [
        _updated(late, "NOT_STARTED", "RESERVED", t0 + dt.timedelta(seconds=2)),  # AWAITING_PAYMENT, the newest
        _updated(late, "SUCCESS", "RESERVED", t0 + dt.timedelta(seconds=1)),  # COMPLETED but stale: must lose
        _updated(mixed, "NOT_STARTED", "NOT_STARTED", t0),
        _updated(mixed, "SUCCESS", "RESERVED", t0 + dt.timedelta(seconds=1)),
        _updated(tie, "NOT_STARTED", "RESERVED", t0),
        _updated(tie, "SUCCESS", "RESERVED", t0),  # same time: the later one wins, as a second upsert would
    ]
    try:
        with pulse_db.batch(system.deps.pool) as current:
            for e in events:
                on_order_updated(system.deps, current.conn, e)
            views = current.conn.execute(
                "SELECT count(*) AS n FROM orders.order_views WHERE order_id = ANY(%s::uuid[])", ([late, mixed, tie],)
            ).fetchone()
            assert views["n"] == 0  # buffered until the batch ends
        shown = {
            str(r["order_id"]): r["display_status"]
            for r in db.execute(
                "SELECT order_id, display_status FROM orders.order_views WHERE order_id = ANY(%s::uuid[])",
                ([late, mixed, tie],),
            ).fetchall()
        }
        assert shown == {late: "AWAITING_PAYMENT", mixed: "COMPLETED", tie: "COMPLETED"}
        with pulse_db.transaction(system.deps.pool) as conn:  # and a stale update after the batch changes nothing
            on_order_updated(system.deps, conn, _updated(late, "SUCCESS", "RESERVED", t0))
        row = db.execute("SELECT display_status FROM orders.order_views WHERE order_id = %s", (late,)).fetchone()
        assert row["display_status"] == "AWAITING_PAYMENT"
    finally:
        db.execute("DELETE FROM orders.order_views WHERE order_id = ANY(%s::uuid[])", ([late, mixed, tie],))


def test_a_batch_reads_and_locks_its_orders_once_and_each_event_starts_from_the_last(system, new_product, db):
    """The orders queue's pre-lock reads every order row of the batch in one statement; the second event of an
    order in the batch must see what the first one wrote (a stale row would leave it PROCESSING)."""
    from pulse.events import PaymentProcessed, StockReserved
    from pulse.orders.handlers import lock_batch

    product, user = new_product(stock=5, price="2.00"), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    created = outbox.envelope_of(
        db.execute(
            "SELECT * FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_CREATED'", (order_id,)
        ).fetchone()
    ).event
    steps = [Envelope.of(created.follow(StockReserved)), Envelope.of(created.follow(PaymentProcessed, payment_id="p"))]
    try:
        with pulse_db.batch(system.deps.pool) as current:
            lock_batch(current.conn, [*steps, Envelope.of(created.follow(StockReserved))])
            assert list(current.locked) == [("orders.orders", order_id)]
            for step in steps:
                system.dispatcher("order.queue")(step)
            assert current.locked[("orders.orders", order_id)]["status"] == "COMPLETED"
        row = db.execute(
            "SELECT status, payment_status, inventory_status FROM orders.orders WHERE id = %s", (order_id,)
        )
        assert row.fetchone() == {"status": "COMPLETED", "payment_status": "SUCCESS", "inventory_status": "RESERVED"}
        updates = [
            r["payload"]["status"]
            for r in db.execute(
                "SELECT payload FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_UPDATED' ORDER BY seq",
                (order_id,),
            ).fetchall()
        ]
        assert updates[-2:] == ["PROCESSING", "COMPLETED"]
    finally:
        db.execute("DELETE FROM shared.outbox WHERE aggregate_id = %s", (order_id,))


class _WatchedProvider:
    """The system's provider, noting each charge and whether a consumer batch (its transaction) was open then."""

    def __init__(self, inner):
        self.inner, self.name, self.charges = inner, inner.name, []

    def charge(self, order_id, amount):
        self.charges.append((str(order_id), getattr(pulse_db._local, "batch", None) is not None))
        return self.inner.charge(order_id, amount)

    def refund(self, order_id, provider_payment_id):
        return self.inner.refund(order_id, provider_payment_id)


def test_a_payment_batch_calls_the_provider_before_its_transaction_once_per_order(
    settings, system, new_product, db, channel, tidy_outbox
):
    """payment.queue handles a batch in one transaction, but its provider calls are made for the whole batch
    before that transaction opens; an order charged already is not charged again, an order twice in the batch is
    charged once, and each event's effect is what handling it alone would have left."""
    from pulse.events import StockReserved
    from pulse.payment.handlers import on_charge

    product = new_product(stock=10, price="3.00")
    created = []
    for _ in range(3):
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), 1)
        order_id = system.orders.create(user, f"k-{user}")["orderId"]
        tidy_outbox.append(order_id)
        row = db.execute(
            "SELECT * FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_CREATED'", (order_id,)
        ).fetchone()
        created.append(outbox.envelope_of(row).event)
    first, second, before = created
    provider = system.deps.provider = _WatchedProvider(system.deps.provider)
    on_charge(system.deps, uuid.uuid4(), before.follow(StockReserved))  # charged before the batch, alone
    assert provider.charges == [(before.order_id, False)]
    provider.charges.clear()

    envelopes = [Envelope.of(e.follow(StockReserved)) for e in (first, second, before, first)]
    queue = f"test-payment-{uuid.uuid4().hex[:10]}"
    channel.queue_declare(queue, durable=True)
    spec = dataclasses.replace(topology.BY_NAME["payment.queue"], name=queue)
    consumer = consume_as_one_batch(settings, system, channel, spec, envelopes)
    assert consumer.batches == 1, "handled as one batch (not one by one after a failed batch)"
    assert sorted(provider.charges) == sorted([(first.order_id, False), (second.order_id, False)])
    ids = [first.order_id, second.order_id, before.order_id]
    payments = db.execute(
        "SELECT order_id::text AS o, count(*) AS n FROM payment.payments WHERE order_id = ANY(%s::uuid[]) GROUP BY 1",
        (ids,),
    ).fetchall()
    assert {r["o"]: r["n"] for r in payments} == dict.fromkeys(ids, 1)
    processed = db.execute(
        "SELECT aggregate_id, count(*) AS n FROM shared.outbox WHERE aggregate_id = ANY(%s) "
        "AND event_type = 'PAYMENT_PROCESSED' GROUP BY 1",
        (ids,),
    ).fetchall()
    assert {r["aggregate_id"]: r["n"] for r in processed} == {first.order_id: 1, second.order_id: 1, before.order_id: 1}
    claimed = db.execute(
        "SELECT count(*) AS n FROM payment.inbox WHERE event_id = ANY(%s)", ([e.id for e in envelopes],)
    ).fetchone()
    assert claimed["n"] == 4  # every event handled, the duplicate order's second one included


def test_an_inventory_batch_works_from_the_rows_it_locked_and_keeps_them_current(system, new_product, db, tidy_outbox):
    """Inventory's pre-lock reads and locks the batch's stock rows and its orders' decisions once; each reservation
    or restock in the batch must then see what the ones before it wrote: a stale copy would fail a version check
    (two orders of one product, a restock before a reservation) or reserve an order twice."""
    from pulse.events import PaymentFailed
    from pulse.inventory.handlers import lock_batch

    product = new_product(stock=5, price="2.00")

    def order(quantity: int):
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), quantity)
        order_id = system.orders.create(user, f"k-{user}")["orderId"]
        tidy_outbox.append(order_id)
        row = db.execute(
            "SELECT * FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_CREATED'", (order_id,)
        ).fetchone()
        return outbox.envelope_of(row).event

    declined, first, second = order(2), order(1), order(1)
    inventory = system.dispatcher("inventory.queue")
    inventory(Envelope.of(declined))  # reserved before the batch: 5 - 2
    assert (
        db.execute(
            "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = %s", (product,)
        ).fetchone()["n"]
        == 3
    )
    steps = [
        Envelope.of(declined.follow(PaymentFailed, reason="DECLINED")),  # restock: 3 + 2
        Envelope.of(first),  # 5 - 1
        Envelope.of(second),  # 4 - 1
        Envelope.of(first),  # the same order again, under another event id: decided already
    ]
    with pulse_db.batch(system.deps.pool) as current:
        lock_batch(current.conn, steps)
        assert current.locked[("inventory.inventory_items", product)]["available_quantity"] == 3
        assert current.locked[("inventory.reservations", first.order_id)] is False
        for step in steps:
            inventory(step)
    stock = db.execute(
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = %s", (product,)
    ).fetchone()["n"]
    assert stock == 3
    reservations = db.execute(
        "SELECT order_id::text AS o, status FROM inventory.reservations WHERE order_id = ANY(%s::uuid[])",
        ([declined.order_id, first.order_id, second.order_id],),
    ).fetchall()
    assert {r["o"]: r["status"] for r in reservations} == {
        declined.order_id: "RELEASED",
        first.order_id: "RESERVED",
        second.order_id: "RESERVED",
    }
    reserved = db.execute(
        "SELECT count(*) AS n FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'STOCK_RESERVED'",
        (first.order_id,),
    ).fetchone()["n"]
    assert reserved == 1
