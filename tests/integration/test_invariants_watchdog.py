"""The saga watchdog heals an order whose event a consumer lost (consumer.lose), and the checker agrees."""

import datetime as dt
import time
import uuid

import pytest

from pulse import faults_control
from pulse.orders.watchdog import Watchdog
from pulse.tools.check.invariants import Scope, check_all
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_a_lost_event_is_re_driven_and_every_invariant_holds(settings, make_system, new_product):
    since = dt.datetime.now(dt.UTC)
    system = make_system(workers=True)
    product = new_product(stock=5)
    order_id = order_with_a_lost_event(settings, system, product)
    result = Watchdog(system.deps, deadline_s=0.5).run_once()
    # Earlier tests of the session may leave other orders to re-drive (say, a cart nobody cleared): look at ours.
    assert result["redriven"].get("STOCK_RESERVED", 0) >= 1
    with system.deps.pool.connection() as conn:
        assert (
            conn.execute("SELECT event_type FROM infra.saga_redrives WHERE order_id = %s", (order_id,)).fetchone()[
                "event_type"
            ]
            == "STOCK_RESERVED"
        )
    wait_for(lambda: system.orders.get(order_id)["displayStatus"] == "COMPLETED", 20, message="re-driven to COMPLETED")
    wait_for(lambda: _outbox_empty(system), 20, message="outbox drained")
    time.sleep(0.5)
    results = check_all(settings, Scope(since=since, products=[product]))["results"]
    assert [r.to_dict() for r in results if not r.passed] == []
    delivery = next(r for r in results if r.name == "delivery")
    assert delivery.data["lostByInjection"] == 1


def order_with_a_lost_event(settings, system, product: str) -> uuid.UUID:
    """An order whose STOCK_RESERVED a consumer.lose fault dropped on its way to payment: stalled in PROCESSING."""
    faults_control.arm(settings.database_url, "consumer.lose", queue="payment.queue", max=1)
    time.sleep(0.7)  # the workers' registry refreshes every 0.5 s
    try:
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), 1)
        order_id = uuid.UUID(system.orders.create(user, f"k-{user}")["orderId"])
        wait_for(lambda: system.orders.get(order_id)["inventoryStatus"] == "RESERVED", 20, message="reserved")
        time.sleep(1.0)
        assert system.orders.get(order_id)["status"] == "PROCESSING"  # STOCK_RESERVED never reached payment
    finally:
        faults_control.disarm(settings.database_url)
    return order_id


def _outbox_empty(system):
    with system.deps.pool.connection() as conn:
        return conn.execute("SELECT count(*) AS n FROM shared.outbox").fetchone()["n"] == 0
