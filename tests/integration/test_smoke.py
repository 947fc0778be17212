import uuid

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_checkout_completes_through_the_broker(make_system, new_product):
    system = make_system(workers=True)
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 2)
    order = system.orders.create(user, f"key-{user}")
    done = wait_for(
        lambda: (o := system.orders.get(uuid.UUID(order["orderId"])))["displayStatus"] == "COMPLETED" and o,
        message="order COMPLETED",
    )
    assert done["status"] == "COMPLETED"
