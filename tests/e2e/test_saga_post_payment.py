"""Post-payment strategy over HTTP and the real broker: happy path, and out of stock after payment -> refund."""

from __future__ import annotations

import pytest

from tests.e2e.support import client, new_product, stock_of, zero_db_stock

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(launch):
    c = client(launch("post-payment", PULSE_PAYMENT_DECLINE_RATE=0))
    yield c
    c.close()


def test_happy_path_completes(api):
    product, user = new_product(api, stock=4, price=12.5), api.new_user()
    api.add_item(user, product, 2)
    created = api.checkout(user)
    order = api.wait_settled(created["orderId"], timeout_s=20)
    assert order == {
        "orderId": created["orderId"],
        "status": "COMPLETED",
        "displayStatus": "COMPLETED",
        "paymentStatus": "SUCCESS",
        "inventoryStatus": "RESERVED",
        "failureReason": None,
        "strategy": "POST_PAYMENT",
        "totalAmount": 25.0,
    }
    assert stock_of(api, product) == 2


def test_out_of_stock_after_payment_is_refunded(api, settings, db):
    product, user = new_product(api, stock=1), api.new_user()
    api.add_item(user, product, 1)
    zero_db_stock(settings.database_url, product)
    order_id = api.checkout(user)["orderId"]
    order = api.wait_settled(order_id, timeout_s=20)
    assert (
        order["status"],
        order["failureReason"],
        order["paymentStatus"],
        order["inventoryStatus"],
        order["displayStatus"],
        order["strategy"],
    ) == ("FAILED", "OUT_OF_STOCK", "REFUNDED", "OUT_OF_STOCK", "REFUNDED", "POST_PAYMENT")
    payment = db.execute("SELECT status, refunded_at FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()
    assert payment["status"] == "REFUNDED" and payment["refunded_at"] is not None
    assert stock_of(api, product) == 0
