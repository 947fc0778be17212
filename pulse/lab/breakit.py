"""The break-it scenarios: each makes its own products, returns numbers plus ``"products"``, and is run by
``lab.demonstrate`` twice, with its safeguard off and on (see :mod:`pulse.lab.teach`); the check judges.

A rush on the last units (Lua reservation), the promise window of a cart hold, redelivery into the inbox,
a late event after compensation, reconciliation meeting adds in flight, a triple click on one idempotency
key, and a relay crash between publish and mark.
"""

from __future__ import annotations

import time
import uuid

from pulse.lab.client import PulseError
from pulse.lab.experiments import concurrent_adds, count


def rush(lab, *, stock: int = 3, shoppers: int = 16) -> dict:
    """``shoppers`` add the last ``stock`` units of a new product at the same moment (through the API)."""
    product = lab.new_product(stock=stock, name="Rush")
    result = concurrent_adds(lab, product, shoppers)
    return {
        "stock": stock,
        "shoppers": shoppers,
        "accepted": result["accepted"],
        "redisReserved": result["redisReserved"],
        "products": [product],
    }


def promise_window(lab) -> dict:
    """A shopper orders the last unit; before inventory decides, a second shopper adds it to a cart.

    Runs with deliveries held (:meth:`Lab.hold`): the order's ORDER_CREATED reaches only the redis-stock
    module, then the second add is tried, then the rest of both sagas is delivered. With the cart's hold kept
    until inventory decides, the second add is refused; released at ORDER_CREATED, it is accepted, and that
    shopper's order fails out of stock after Redis said yes.
    """
    stepper = lab.hold()
    product = lab.new_product(stock=1, name="Last unit")
    first = lab.checkout({product: 1}, wait=False)
    stepper.step("redis-stock.queue", "ORDER_CREATED", show=False)
    second_user = lab.client.new_user()
    try:
        lab.client.add_item(second_user, product, 1)
        accepted = 1
        lab.client.checkout(second_user)
    except PulseError:
        accepted = 0
    stepper.run(show=False)
    failed = count(
        lab,
        "SELECT count(*) AS n FROM orders.orders o JOIN orders.order_items i ON i.order_id = o.id "
        "WHERE i.product_id = CAST(:p AS uuid) AND o.failure_reason = 'OUT_OF_STOCK'",
        p=product,
    )
    return {
        "stock": 1,
        "secondCartAccepted": accepted,
        "outOfStockOrders": failed,
        "firstOrder": lab.client.order(first["orderId"])["displayStatus"],
        "products": [product],
    }


def redelivery(lab, *, quantity: int = 2, stock: int = 10) -> dict:
    """The broker delivers one order's ORDER_CREATED to inventory twice (a consumer died before its ack)."""
    stepper = lab.hold()
    product = lab.new_product(stock=stock, name="Redelivered")
    lab.checkout({product: quantity}, wait=False)
    stepper.step("inventory.queue", "ORDER_CREATED", show=False)
    stepper.redeliver(show=False)
    stepper.run(show=False)
    left = count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {"ordered": quantity, "deliveries": 2, "unitsTaken": stock - left, "products": [product]}


def late_event(lab) -> dict:
    """A declined order fails and is compensated; then its first decision (STOCK_RESERVED) arrives again, late.

    Runs with deliveries held. The late event is re-announced for the orders module only (as a watchdog that
    took a slow event for a lost one would), so only the order's state machine meets it.
    """
    stepper = lab.hold()
    product = lab.new_product(stock=5, name="Declined")
    lab.arm("payment.decline", 1.0, max=1)
    try:
        order_id = lab.checkout({product: 1}, wait=False)["orderId"]
        stepper.run(show=False)
    finally:
        lab.disarm("payment.decline")
    before = lab.client.order(order_id)
    stepper.inject("STOCK_RESERVED", order_id, redriven=True, redriveFor="order.queue")
    stepper.run(show=False)
    after = lab.client.order(order_id)
    return {
        "statusBefore": before["status"],
        "statusAfter": after["status"],
        "inventoryAfter": after["inventoryStatus"],
        "lateEvents": 1,
        "stillFailed": int(after["status"] == "FAILED" and after["inventoryStatus"] == before["inventoryStatus"]),
        "products": [product],
    }


def reconcile_in_flight(lab, *, stock: int = 2, later_adds: int = 2) -> dict:
    """A reconciliation pass meets a cart add in flight (Redis reserved, the database row not yet committed);
    then ``later_adds`` shoppers add the same product. Runs in the kernel (the lab's in-kernel system)."""
    import threading

    from pulse.errors import Conflict

    system = lab.system
    product = uuid.UUID(lab.new_product(stock=stock, name="In flight"))
    lab.arm("cart.after_redis", 1.0, action="delay", ms=800)
    try:
        slow = threading.Thread(target=system.carts.add_item, args=(uuid.uuid4(), product, 1))
        slow.start()
        time.sleep(0.3)  # the unit is reserved in Redis; its cart row is not committed yet
        lab.reconcile_now()
        slow.join()
    finally:
        lab.disarm("cart.after_redis")
    accepted = 1
    for _ in range(later_adds):
        try:
            system.carts.add_item(uuid.uuid4(), product, 1)
            accepted += 1
        except Conflict:
            pass
    return {"stock": stock, "accepted": accepted, "products": [str(product)]}


def triple_click(lab, *, lock_ttl_s: int = 1, slow_ms: int = 1200, submits: int = 3) -> dict:
    """One cart submitted ``submits`` times at once with one idempotency key while order creation is slow
    (longer than the lock's TTL) and fails ``submits`` times; every submit retries through 409 like a shopper.

    Runs in the kernel, with an order service whose idempotency lock lives ``lock_ttl_s`` seconds.
    """
    import threading

    from pulse import bootstrap
    from pulse.errors import Conflict, Unavailable
    from pulse.faults import FaultInjected

    product = lab.new_product(stock=5, name="Triple click")
    user = uuid.uuid4()
    lab.client.add_item(str(user), product, 1)
    system = bootstrap.build(lab.settings.replace(idempotency_lock_ttl_s=lock_ttl_s), migrate=False, pool_size=4)
    key, created = str(uuid.uuid4()), []
    barrier = threading.Barrier(submits)

    def submit():
        barrier.wait()
        for _ in range(60):
            try:
                created.append(system.orders.create(user, key)["orderId"])
                return
            except (Conflict, Unavailable, FaultInjected):
                time.sleep(0.2)

    try:
        lab.arm("orders.create", 1.0, action="error", ms=slow_ms, max=submits)
        threads = [threading.Thread(target=submit) for _ in range(submits)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        lab.disarm("orders.create")
        system.close()
    for order_id in set(created):
        lab.client.wait_settled(order_id)
    return {"submits": submits, "ordersCreated": len(set(created)), "products": [product]}


def relay_crash(lab, *, wait_s: float = 20.0) -> dict:
    """The server dies right after its relay handed a batch to the broker; the supervisor restarts it.

    Waits up to ``wait_s`` for the order to settle (without confirms, only once the watchdog re-drove it).
    """
    product = lab.new_product(stock=5, name="Relay crash")
    user, key = lab.client.new_user(), str(uuid.uuid4())
    lab.client.add_item(user, product, 1)
    restarts = lab.restarts
    lab.arm("relay.after_publish", 1.0, max=1)
    try:
        # Any batch may be the one that crashes it (a re-drive of an earlier order, say): retry like a shopper.
        order_id = _through_crashes(lab, lambda: lab.client.checkout(user, key))["orderId"]
        deadline = time.monotonic() + 20
        while lab.restarts == restarts and time.monotonic() < deadline:
            time.sleep(0.1)
        lab.wait_up()
    finally:
        lab.disarm("relay.after_publish")
    try:
        status = _through_crashes(lab, lambda: lab.client.wait_settled(order_id, timeout_s=wait_s))["displayStatus"]
    except TimeoutError:
        status = _through_crashes(lab, lambda: lab.client.order(order_id))["displayStatus"]
    return {"crashes": lab.restarts - restarts, "completed": int(status == "COMPLETED"), "products": [product]}


def _through_crashes(lab, call, attempts: int = 5):
    """``call()``, again after the supervisor restarted a crashed server (the same idempotency key is safe)."""
    import httpx

    for attempt in range(attempts):
        try:
            return call()
        except (httpx.TransportError, PulseError) as exc:
            if isinstance(exc, PulseError) and exc.status < 500 or attempt == attempts - 1:
                raise
            time.sleep(0.5)
            lab.wait_up()
