"""Every saga path driven handler by handler (no broker), with the order view's status at each step."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.support import db_cart, db_stock, order_row, redis_cart, reserved, set_db_stock, view_status

pytestmark = pytest.mark.integration


def checkout(system, new_product, quantity=2, stock=10, price="5.00"):
    """A user with ``quantity`` units of a new product in the cart, and the order created from it."""
    product, user = new_product(stock=stock, price=price), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), quantity)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    return order_id, product, user


def state(db, order_id):
    o = order_row(db, order_id)
    return o["status"], o["payment_status"], o["inventory_status"], o["failure_reason"], view_status(db, order_id)


def test_a_new_order_shows_processing(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    bus.run(order_id, hold={"inventory.queue", "payment.queue", "redis-stock.queue"})
    assert state(db, order_id) == ("CREATED", "NOT_STARTED", "NOT_STARTED", None, "PROCESSING")
    bus.run(order_id)


def test_optimistic_happy_path(system, new_product, db, rds, bus_for):
    bus = bus_for(system)
    order_id, product, user = checkout(system, new_product, quantity=2, stock=10)
    bus.run(order_id, hold={"payment.queue"})
    assert state(db, order_id) == ("PROCESSING", "NOT_STARTED", "RESERVED", None, "AWAITING_PAYMENT")
    assert db_stock(db, product) == 8
    # redis-stock: the cart is cleared in Redis and the DB, its reservation released, stock: refreshed
    assert reserved(rds, product) == 0 and redis_cart(rds, user) == {} and db_cart(db, user) == {}
    assert rds.zscore("cart:cleanup:queue", str(user)) is None
    assert rds.get(f"stock:{product}") == "8"
    bus.run(order_id)
    assert state(db, order_id) == ("COMPLETED", "SUCCESS", "RESERVED", None, "COMPLETED")
    payment = db.execute("SELECT * FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()
    assert payment["status"] == "SUCCESS" and payment["amount"] == 10 and payment["paid_at"] is not None
    assert (
        db.execute("SELECT status FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()["status"]
        == "RESERVED"
    )


def test_optimistic_decline_restocks(make_system, new_product, db, rds, bus_for):
    system = make_system(payment_decline_rate=1.0)
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=3, stock=10)
    bus.run(order_id, hold={("inventory.queue", "PAYMENT_FAILED")})
    assert db_stock(db, product) == 7
    assert state(db, order_id) == ("FAILED", "DECLINED", "RESERVED", "PAYMENT_FAILED", "FAILED_PAYMENT")
    bus.run(order_id)
    assert state(db, order_id) == ("FAILED", "DECLINED", "RELEASED", "PAYMENT_FAILED", "FAILED_PAYMENT")
    assert db_stock(db, product) == 10 and rds.get(f"stock:{product}") == "10"
    assert (
        db.execute("SELECT status FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()["status"]
        == "DECLINED"
    )
    assert (
        db.execute("SELECT status FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()["status"]
        == "RELEASED"
    )


def test_optimistic_out_of_stock(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=2, stock=2)
    set_db_stock(db, product, 1)  # the warehouse lost one unit after the cart reserved it
    bus.run(order_id)
    assert state(db, order_id) == ("FAILED", "NOT_STARTED", "OUT_OF_STOCK", "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK")
    assert db_stock(db, product) == 1  # nothing taken
    assert db.execute("SELECT 1 FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone() is None
    assert ("payment.queue", "STOCK_FAILED") not in bus.delivered


def test_an_order_of_several_products_reserves_all_or_nothing(system, new_product, db, bus_for):
    bus = bus_for(system)
    a, b, user = new_product(stock=5), new_product(stock=5), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(a), 2)
    system.carts.add_item(user, uuid.UUID(b), 3)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    set_db_stock(db, b, 2)
    bus.run(order_id)
    assert state(db, order_id)[0::2] == ("FAILED", "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK")
    assert (db_stock(db, a), db_stock(db, b)) == (5, 2)  # a's units were not kept either


def test_post_payment_happy_path(make_system, new_product, db, bus_for):
    system = make_system(strategy="post-payment")
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=1, stock=4)
    bus.run(order_id, hold={"inventory.queue"})
    assert state(db, order_id) == ("PROCESSING", "SUCCESS", "NOT_STARTED", None, "AWAITING_INVENTORY")
    assert db_stock(db, product) == 4  # charged, nothing reserved yet
    bus.run(order_id)
    assert state(db, order_id) == ("COMPLETED", "SUCCESS", "RESERVED", None, "COMPLETED")
    assert db_stock(db, product) == 3
    assert order_row(db, order_id)["strategy"] == "POST_PAYMENT"


def test_post_payment_out_of_stock_refunds(make_system, new_product, db, bus_for):
    system = make_system(strategy="post-payment")
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=1, stock=1, price="7.50")
    set_db_stock(db, product, 0)
    bus.run(order_id, hold={("payment.queue", "STOCK_FAILED")})
    assert state(db, order_id) == ("FAILED", "SUCCESS", "OUT_OF_STOCK", "OUT_OF_STOCK", "REFUND_IN_PROGRESS")
    bus.run(order_id)
    assert state(db, order_id) == ("FAILED", "REFUNDED", "OUT_OF_STOCK", "OUT_OF_STOCK", "REFUNDED")
    payment = db.execute("SELECT * FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()
    assert payment["status"] == "REFUNDED" and payment["refunded_at"] is not None and payment["amount"] == 7.5
    assert db_stock(db, product) == 0


def test_post_payment_decline_takes_no_stock(make_system, new_product, db, bus_for):
    system = make_system(strategy="post-payment", payment_decline_rate=1.0)
    bus = bus_for(system)
    order_id, product, _ = checkout(system, new_product, quantity=2, stock=5)
    bus.run(order_id)
    assert state(db, order_id) == ("FAILED", "DECLINED", "NOT_STARTED", "PAYMENT_FAILED", "FAILED_PAYMENT")
    assert db_stock(db, product) == 5
    assert not any(q == "inventory.queue" for q, _ in bus.delivered)


def test_every_order_update_reaches_the_view_and_a_stale_one_is_ignored(system, new_product, db, bus_for):
    bus = bus_for(system)
    order_id, _, _ = checkout(system, new_product)
    held = bus.run(order_id, hold={"order-view.queue"})
    updates = [e for q, e in held if q == "order-view.queue"]
    assert [u.payload["status"] for u in updates] == ["CREATED", "PROCESSING", "COMPLETED"]
    handler = bus.handlers["order-view.queue"]["ORDER_UPDATED"]
    for update in reversed(updates):  # newest first, as a redelivery race could bring them
        handler(update)
    assert view_status(db, order_id) == "COMPLETED"
