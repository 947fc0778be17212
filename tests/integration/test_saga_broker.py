"""Every saga path through the real relay, broker and consumers of one in-process system."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import wait_for
from tests.integration.support import db_cart, db_stock, reserved, set_db_stock

pytestmark = pytest.mark.integration

TERMINAL_VIEWS = {"COMPLETED", "FAILED_PAYMENT", "FAILED_OUT_OF_STOCK", "REFUNDED"}


def settle(system, order_id, want_inventory=None, want_payment=None):
    def done():
        o = system.orders.get(uuid.UUID(order_id))
        ok = o["status"] in ("COMPLETED", "FAILED") and o["displayStatus"] in TERMINAL_VIEWS
        ok = ok and (want_inventory is None or o["inventoryStatus"] == want_inventory)
        ok = ok and (want_payment is None or o["paymentStatus"] == want_payment)
        return ok and o

    return wait_for(done, timeout_s=20, message=f"order {order_id} settled")


def buy(system, product, quantity):
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), quantity)
    return user, system.orders.create(user, f"k-{user}")["orderId"]


def test_optimistic_happy_path(make_system, new_product, db, rds):
    system = make_system(workers=True)
    product = new_product(stock=10, price="20.00")
    user, order_id = buy(system, product, 3)
    order = settle(system, order_id)
    assert order == {
        "orderId": order_id,
        "status": "COMPLETED",
        "displayStatus": "COMPLETED",
        "paymentStatus": "SUCCESS",
        "inventoryStatus": "RESERVED",
        "failureReason": None,
        "strategy": "OPTIMISTIC",
        "totalAmount": 60.0,
    }
    assert db_stock(db, product) == 7
    wait_for(lambda: rds.get(f"stock:{product}") == "7" and reserved(rds, product) == 0, message="redis in step")
    assert db_cart(db, user) == {} and not rds.exists(f"cart:{user}")


def test_optimistic_out_of_stock(make_system, new_product, db):
    system = make_system(workers=True)
    product = new_product(stock=2)
    _, order_id = buy(system, product, 2)
    set_db_stock(db, product, 1)  # the warehouse lost a unit after the cart reserved it
    order = settle(system, order_id)
    assert (
        order["status"],
        order["failureReason"],
        order["inventoryStatus"],
        order["paymentStatus"],
        order["displayStatus"],
    ) == ("FAILED", "OUT_OF_STOCK", "OUT_OF_STOCK", "NOT_STARTED", "FAILED_OUT_OF_STOCK")
    assert db_stock(db, product) == 1
    assert db.execute("SELECT 1 FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone() is None


def test_optimistic_decline_restocks(make_system, new_product, db, rds):
    system = make_system(workers=True, payment_decline_rate=1.0)
    product = new_product(stock=10)
    _, order_id = buy(system, product, 4)
    order = settle(system, order_id, want_inventory="RELEASED")
    assert (order["status"], order["failureReason"], order["paymentStatus"], order["displayStatus"]) == (
        "FAILED",
        "PAYMENT_FAILED",
        "DECLINED",
        "FAILED_PAYMENT",
    )
    assert db_stock(db, product) == 10
    wait_for(lambda: rds.get(f"stock:{product}") == "10", message="stock cache refreshed after the restock")


def test_post_payment_happy_path(make_system, new_product, db):
    system = make_system(workers=True, strategy="post-payment")
    product = new_product(stock=5, price="3.50")
    _, order_id = buy(system, product, 2)
    order = settle(system, order_id)
    assert order == {
        "orderId": order_id,
        "status": "COMPLETED",
        "displayStatus": "COMPLETED",
        "paymentStatus": "SUCCESS",
        "inventoryStatus": "RESERVED",
        "failureReason": None,
        "strategy": "POST_PAYMENT",
        "totalAmount": 7.0,
    }
    assert db_stock(db, product) == 3


def test_post_payment_out_of_stock_refunds(make_system, new_product, db):
    system = make_system(workers=True, strategy="post-payment")
    product = new_product(stock=1)
    _, order_id = buy(system, product, 1)
    set_db_stock(db, product, 0)
    order = settle(system, order_id, want_payment="REFUNDED")
    assert (order["status"], order["failureReason"], order["inventoryStatus"], order["displayStatus"]) == (
        "FAILED",
        "OUT_OF_STOCK",
        "OUT_OF_STOCK",
        "REFUNDED",
    )
    assert (
        db.execute("SELECT status FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()["status"]
        == "REFUNDED"
    )
    assert db_stock(db, product) == 0


def test_post_payment_decline(make_system, new_product, db):
    system = make_system(workers=True, strategy="post-payment", payment_decline_rate=1.0)
    product = new_product(stock=3)
    _, order_id = buy(system, product, 1)
    order = settle(system, order_id)
    assert (order["status"], order["failureReason"], order["inventoryStatus"], order["displayStatus"]) == (
        "FAILED",
        "PAYMENT_FAILED",
        "NOT_STARTED",
        "FAILED_PAYMENT",
    )
    assert db_stock(db, product) == 3
