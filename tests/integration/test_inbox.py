"""Inboxes: a redelivered event has no second effect, in every module, Redis effects included."""

from __future__ import annotations

import uuid

import pytest

from pulse.events import Envelope
from pulse.events import EventType as E
from pulse.infra import broker
from pulse.infra import db as pulse_db
from tests.conftest import wait_for
from tests.integration.support import (
    db_cart,
    db_stock,
    envelope,
    order_row,
    outbox_rows,
    reserved,
    set_db_stock,
    view_status,
)

pytestmark = pytest.mark.integration


def checkout(system, new_product, quantity=2, stock=10):
    product, user = new_product(stock=stock), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), quantity)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    return order_id, product, user


def late_event_payload(db, order_id) -> dict:
    """The payload a saga event of this order carries (a late or duplicate one, injected by hand)."""
    order = order_row(db, order_id)
    items = db.execute(
        "SELECT product_id::text AS product, quantity FROM orders.order_items WHERE order_id = %s", (order_id,)
    ).fetchall()
    return {
        "orderId": order_id,
        "userId": str(order["user_id"]),
        "strategy": order["strategy"],
        "totalPrice": str(order["total_amount"]),
        "items": [{"productId": i["product"], "quantity": i["quantity"]} for i in items],
    }


def inbox_count(db, table, event_id):
    return db.execute(f"SELECT count(*) AS n FROM {table} WHERE event_id = %s", (event_id,)).fetchone()["n"]


def payments(db, order_id) -> int:
    return db.execute("SELECT count(*) AS n FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()["n"]


def take(bus, order_id, event_type):
    """Deliver everything of the order up to (not including) the first ``event_type``; return that envelope."""
    while True:
        bus.collect(order_id)
        for _, env in bus.pending:
            if env.event_type == event_type:
                return env
        if not bus.pending:
            raise AssertionError(f"no {event_type} produced")
        queue, env = bus.pending.pop(0)
        bus.deliver(queue, env)


def test_inventory_reserves_once(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=2)
    created = take(bus, order_id, "ORDER_CREATED")
    handler = bus.handlers["inventory.queue"]["ORDER_CREATED"]
    handler(created)
    handler(created)
    assert db_stock(db, product) == 8
    assert inbox_count(db, "inventory.inbox", created.id) == 1
    assert [r["event_type"] for r in outbox_rows(db, order_id)].count("STOCK_RESERVED") == 1
    bus.pending.clear()
    bus.run(order_id)


def test_inventory_restocks_once(make_system, new_product, db, bus_for):
    system = make_system(payment_decline_rate=1.0)
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=3)
    failed = take(bus, order_id, "PAYMENT_FAILED")
    assert db_stock(db, product) == 7
    restock = bus.handlers["inventory.queue"]["PAYMENT_FAILED"]
    restock(failed)
    restock(failed)
    restock(envelope("PAYMENT_FAILED", failed.payload))  # same order, another event id: still only once
    assert db_stock(db, product) == 10
    assert [r["event_type"] for r in outbox_rows(db, order_id)].count("STOCK_RELEASED") == 1
    bus.pending = [(q, e) for q, e in bus.pending if q != "inventory.queue"]
    bus.run(order_id)


def test_payment_charges_once(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    reserved_event = take(bus, order_id, "STOCK_RESERVED")
    charge = bus.handlers["payment.queue"]["STOCK_RESERVED"]
    charge(reserved_event)
    charge(reserved_event)
    charge(envelope("STOCK_RESERVED", reserved_event.payload))  # a re-driven saga: new id, same order
    assert payments(db, order_id) == 1
    assert [r["event_type"] for r in outbox_rows(db, order_id)].count("PAYMENT_PROCESSED") == 1
    bus.pending = [(q, e) for q, e in bus.pending if q != "payment.queue"]
    bus.run(order_id)
    assert order_row(db, order_id)["status"] == "COMPLETED"


def test_payment_refunds_once(make_system, new_product, db, bus_for):
    system = make_system(strategy="post-payment")
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=1, stock=1)
    set_db_stock(db, product, 0)
    stock_failed = take(bus, order_id, "STOCK_FAILED")
    refund = bus.handlers["payment.queue"]["STOCK_FAILED"]
    refund(stock_failed)
    refund(stock_failed)
    refund(envelope("STOCK_FAILED", stock_failed.payload))
    assert [r["event_type"] for r in outbox_rows(db, order_id)].count("PAYMENT_REFUNDED") == 1
    bus.pending = [(q, e) for q, e in bus.pending if q != "payment.queue"]
    bus.run(order_id)
    assert order_row(db, order_id)["payment_status"] == "REFUNDED"


def test_the_order_applies_an_event_once(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    reserved_event = take(bus, order_id, "STOCK_RESERVED")
    on_saga = bus.handlers["order.queue"]["STOCK_RESERVED"]
    on_saga(reserved_event)
    updated_at = order_row(db, order_id)["updated_at"]
    on_saga(reserved_event)
    assert order_row(db, order_id)["updated_at"] == updated_at
    assert inbox_count(db, "orders.inbox", reserved_event.id) == 1
    updates = [r for r in outbox_rows(db, order_id) if r["event_type"] == "ORDER_UPDATED"]
    assert [u["payload"]["inventoryStatus"] for u in updates].count("RESERVED") == 1
    bus.pending = [(q, e) for q, e in bus.pending if q != "order.queue"]
    bus.run(order_id)


def test_the_view_projects_an_event_once(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    update = take(bus, order_id, "ORDER_UPDATED")
    project = bus.handlers["order-view.queue"]["ORDER_UPDATED"]
    project(update)
    project(update)
    assert inbox_count(db, "orders.order_view_inbox", update.id) == 1
    assert view_status(db, order_id) == "PROCESSING"
    bus.run(order_id)


def test_redis_stock_moves_the_cart_hold_to_the_order_once(system, new_product, db, rds, bus_for):
    bus = bus_for(system)
    product = new_product(stock=10)
    buyer, other = uuid.uuid4(), uuid.uuid4()
    system.carts.add_item(buyer, uuid.UUID(product), 2)
    system.carts.add_item(other, uuid.UUID(product), 3)
    order_id = system.orders.create(buyer, f"k-{buyer}")["orderId"]
    created = take(bus, order_id, "ORDER_CREATED")
    clear = bus.handlers["redis-stock.queue"]["ORDER_CREATED"]
    clear(created)
    # The cart is empty, but its 2 units stay held by the order until inventory decides.
    assert reserved(rds, product) == 5 and db_cart(db, buyer) == {} and not rds.exists(f"cart:{buyer}")
    system.carts.add_item(buyer, uuid.UUID(product), 1)  # the buyer starts a new cart
    clear(created)  # a late redelivery must neither move the hold twice nor clear the new cart
    assert reserved(rds, product) == 6
    assert db_cart(db, buyer) == {product: 1} and rds.hget(f"cart:{buyer}", product) == "1"
    assert db_cart(db, other) == {product: 3}
    assert inbox_count(db, "infra.redis_stock_inbox", created.id) == 1
    bus.pending = [(q, e) for q, e in bus.pending if q != "redis-stock.queue"]
    bus.run(order_id)


def test_a_duplicate_on_the_broker_has_one_effect(make_system, new_product, db, rds):
    """The relay publishes an ORDER_CREATED, the saga completes, then the broker delivers it again.

    A second order, published after the duplicate, is the sentinel: each queue has one consumer
    that handles messages in order, so once the second order completed the duplicate was handled.
    """
    system = make_system(workers=True)
    order_id, product, user = checkout(system, new_product, quantity=2, stock=10)
    original = next(r for r in outbox_rows(db, order_id) if r["event_type"] == "ORDER_CREATED")
    wait_for(lambda: order_row(db, order_id)["status"] == "COMPLETED", message="first order COMPLETED")
    assert db_stock(db, product) == 8
    system.carts.add_item(user, uuid.UUID(product), 1)  # a new cart the duplicate must not clear
    duplicate = Envelope(
        id=original["id"], event_type="ORDER_CREATED", aggregate_id=order_id, payload=original["payload"]
    )
    publisher = broker.ConfirmingPublisher(system.settings.amqp_url)
    try:
        assert publisher.publish_batch([duplicate]) == [broker.Delivery.CONFIRMED]
    finally:
        publisher.close()
    sentinel = uuid.uuid4()
    system.carts.add_item(sentinel, uuid.UUID(product), 3)
    second = system.orders.create(sentinel, f"k-{sentinel}")["orderId"]
    wait_for(
        lambda: order_row(db, second)["status"] == "COMPLETED" and view_status(db, second) == "COMPLETED",
        message="sentinel order COMPLETED",
    )
    wait_for(lambda: db_cart(db, sentinel) == {}, message="sentinel cart cleared")
    assert db_stock(db, product) == 10 - 2 - 3  # the duplicate reserved nothing
    assert payments(db, order_id) == 1
    assert inbox_count(db, "inventory.inbox", original["id"]) == 1
    assert db_cart(db, user) == {product: 1} and rds.hget(f"cart:{user}", product) == "1"
    assert reserved(rds, product) == 1  # only the new cart's unit is held


def test_a_late_stock_reserved_leaves_a_failed_order_failed(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    bus.run(order_id, hold={"inventory.queue", "payment.queue"})
    on_saga = bus.handlers["order.queue"]
    payload = late_event_payload(db, order_id)
    on_saga["PAYMENT_FAILED"](envelope(E.PAYMENT_FAILED, payload))
    on_saga["STOCK_RESERVED"](envelope(E.STOCK_RESERVED, payload))
    order = order_row(db, order_id)
    assert (order["status"], order["failure_reason"]) == ("FAILED", "PAYMENT_FAILED")
    bus.pending.clear()
    bus.run(order_id, hold={"inventory.queue", "payment.queue"})
    assert view_status(db, order_id) == "FAILED_PAYMENT"
    bus.pending.clear()


def test_the_naive_unguarded_mode_shows_why_the_guard_exists(make_system, new_product, db, bus_for):
    system = make_system(naive=frozenset({"unguarded-state"}))
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    bus.run(order_id, hold={"inventory.queue", "payment.queue"})
    payload = late_event_payload(db, order_id)
    bus.handlers["order.queue"]["PAYMENT_FAILED"](envelope(E.PAYMENT_FAILED, payload))
    bus.handlers["order.queue"]["STOCK_RESERVED"](envelope(E.STOCK_RESERVED, payload))
    assert order_row(db, order_id)["status"] == "PROCESSING"  # the bug the guard prevents
    bus.pending.clear()
    bus.run(order_id, hold={"inventory.queue", "payment.queue"})
    bus.pending.clear()


def test_a_consumer_batch_claims_its_events_in_one_statement_and_once_each(system, new_product, db, bus_for):
    """A batch claims its inbox rows up front (one INSERT): a fresh event takes effect, an event already handled
    and the second copy of an event within the batch do not, and both count as the duplicates they are."""
    bus, other_bus = bus_for(system), bus_for(system)
    fresh_order, _, _ = checkout(system, new_product)
    seen_order, _, _ = checkout(system, new_product)
    fresh = take(bus, fresh_order, "ORDER_UPDATED")
    seen = take(other_bus, seen_order, "ORDER_UPDATED")
    project = system.dispatcher("order-view.queue")
    project(seen)  # handled on its own, before the batch
    db.execute("DELETE FROM orders.order_views WHERE order_id = %s", (seen_order,))  # a second effect would show
    inbox = "orders.order_view_inbox"
    with pulse_db.batch(system.deps.pool) as current:
        project.claim_batch(current, [fresh, seen, fresh])
        assert current.claims == {(inbox, fresh.id): True, (inbox, seen.id): False}
        for event in (fresh, seen, fresh):
            project(event)
        assert current.claims == {}  # each up-front claim was used, once
    assert view_status(db, fresh_order) == "PROCESSING"
    assert view_status(db, seen_order) is None
    duplicates = db.execute(
        f"SELECT event_id, duplicates FROM {inbox} WHERE event_id = ANY(%s)", ([fresh.id, seen.id],)
    ).fetchall()
    assert {r["event_id"]: r["duplicates"] for r in duplicates} == {fresh.id: 1, seen.id: 1}
    for b, order_id in ((bus, fresh_order), (other_bus, seen_order)):
        b.pending = [(q, e) for q, e in b.pending if q != "order-view.queue"]
        b.run(order_id)
