"""Optimistic strategy with every payment declined: the order fails and the reserved stock comes back."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.e2e.support import client, new_product, stock_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(launch):
    c = client(launch("optimistic", PULSE_PAYMENT_DECLINE_RATE=1))
    yield c
    c.close()


def test_a_declined_payment_fails_the_order_and_restocks(api, rds, db):
    product, user = new_product(api, stock=10), api.new_user()
    api.add_item(user, product, 3)
    order_id = api.checkout(user)["orderId"]
    order = api.wait_settled(order_id, timeout_s=20)
    assert (
        order["status"],
        order["failureReason"],
        order["paymentStatus"],
        order["inventoryStatus"],
        order["displayStatus"],
        order["strategy"],
    ) == ("FAILED", "PAYMENT_FAILED", "DECLINED", "RELEASED", "FAILED_PAYMENT", "OPTIMISTIC")
    assert stock_of(api, product) == 10  # reserved by the saga, then given back
    wait_for(lambda: rds.get(f"stock:{product}") == "10", message="stock cache refreshed after the restock")
    assert (
        db.execute("SELECT status FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone()["status"]
        == "DECLINED"
    )
    # The units are really free: another cart can take all ten.
    assert api.add_item(api.new_user(), product, 10)["items"][0]["quantity"] == 10
