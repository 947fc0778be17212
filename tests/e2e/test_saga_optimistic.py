"""Optimistic strategy over HTTP, the real broker and a real `pulse serve`: happy path and out of stock."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.e2e.support import client, new_product, stock_of, zero_db_stock

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(launch):
    c = client(launch("optimistic", PULSE_PAYMENT_DECLINE_RATE=0))
    yield c
    c.close()


def test_happy_path_completes(api, rds):
    product = new_product(api, stock=10, price=25.0)
    user = api.new_user()
    cart = api.add_item(user, product, 2)
    assert cart["total"] == 50.0
    created = api.checkout(user)
    assert created["status"] == "CREATED" and created["totalAmount"] == 50.0
    order = api.wait_settled(created["orderId"], timeout_s=20)
    assert order == {
        "orderId": created["orderId"],
        "status": "COMPLETED",
        "displayStatus": "COMPLETED",
        "paymentStatus": "SUCCESS",
        "inventoryStatus": "RESERVED",
        "failureReason": None,
        "strategy": "OPTIMISTIC",
        "totalAmount": 50.0,
    }
    assert stock_of(api, product) == 8
    wait_for(lambda: api.cart(user)["items"] == [], message="cart cleared after the order")
    wait_for(
        lambda: rds.get(f"reserved:{product}") == "0" and rds.get(f"stock:{product}") == "8",
        message="Redis reservation released and stock cache refreshed",
    )


def test_a_retried_checkout_returns_the_same_order(api):
    product, user = new_product(api, stock=3), api.new_user()
    api.add_item(user, product, 1)
    first = api.checkout(user, "retry-key-" + user)
    assert api.checkout(user, "retry-key-" + user) == first
    api.wait_settled(first["orderId"], timeout_s=20)
    assert api.checkout(user, "retry-key-" + user) == first  # even after the saga: stored response
    assert stock_of(api, product) == 2


def test_out_of_stock_fails_the_order(api, settings):
    product, user = new_product(api, stock=1), api.new_user()
    api.add_item(user, product, 1)
    zero_db_stock(settings.database_url, product)
    order = api.wait_settled(api.checkout(user)["orderId"], timeout_s=20)
    assert (
        order["status"],
        order["failureReason"],
        order["inventoryStatus"],
        order["paymentStatus"],
        order["displayStatus"],
    ) == ("FAILED", "OUT_OF_STOCK", "OUT_OF_STOCK", "NOT_STARTED", "FAILED_OUT_OF_STOCK")
    assert stock_of(api, product) == 0
