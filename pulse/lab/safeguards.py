"""The safeguards added with issue 11 §1, each shown by a scenario of its own: cart expiry, optimistic locking
under a crowd, dead letters (a poison message), the saga watchdog (a lost event) and compensation (a
declined order). Like the break-it scenarios (:mod:`pulse.lab.breakit`), each returns numbers plus
``"products"``.
"""

from __future__ import annotations

import time

from pulse.lab.experiments import checkout_all, count


def expiring_carts(lab, *, carts: int = 2, stock: int = 5, ttl_s: float = 1.0) -> dict:
    """``carts`` shoppers each put 1 unit in a cart that expires after ``ttl_s`` seconds; then the sweeper passes.

    The fault ``cart.short_ttl`` shortens the carts' life (the real TTL is minutes); :meth:`Lab.sweep_now` runs
    the same sweeper pass the server runs on its interval. Returns how many units ``reserved:`` still counts
    after the sweep (0 when every expired cart gave its hold back) and how many cart hashes Redis still has.
    """
    product = lab.new_product(stock=stock, name="Expiring")
    users = [lab.client.new_user() for _ in range(carts)]
    lab.arm("cart.short_ttl", 1.0, action="trigger", s=ttl_s)
    try:
        for user in users:
            lab.client.add_item(user, product, 1)
    finally:
        lab.disarm("cart.short_ttl")
    r = lab.redis()
    try:
        time.sleep(max(0.0, ttl_s - lab_refresh_s()) + 0.5)  # every cart has expired
        hashes_before = sum(int(r.exists(f"cart:{u}")) for u in users)
        swept = lab.sweep_now()
        reserved = int(r.get(f"reserved:{product}") or 0)
    finally:
        r.close()
    return {
        "carts": carts,
        "cartHashesAtSweep": hashes_before,
        "cartsSwept": int(swept["redisCartsSwept"]),
        "reservedAfterSweep": reserved,
        "products": [product],
    }


def lab_refresh_s() -> float:
    """How long :meth:`Lab.disarm` waits for every process to see a change (time already spent on a TTL)."""
    from pulse.lab import faults as lab_faults

    return lab_faults.REFRESH_WAIT_S


def crowd(lab, *, shoppers: int = 8, stock: int = 20) -> dict:
    """``shoppers`` carts of one product ordered at the same moment, so the server's inventory consumers
    (run it with ``lab.switch(consumer_threads=2)``) reserve the same stock row at once.

    Returns the units the orders took (their reservations) and the units that left the shelf
    (initial − available): equal when no update was lost.
    """
    product = lab.new_product(stock=stock, name="Crowd")
    users = [lab.client.new_user() for _ in range(shoppers)]
    for user in users:
        lab.client.add_item(user, product, 1)
    orders = checkout_all(lab, users, workers=shoppers)
    completed = int((orders["status"] == "COMPLETED").sum())
    left = count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {"shoppers": shoppers, "unitsOrdered": completed, "unitsLeftShelf": stock - left, "products": [product]}


def poison_message(lab, *, redrive_deadline_s: float = 1.0, wait_s: float = 20.0) -> dict:
    """One order whose payment call times out on every attempt: the payment consumer retries it
    ``handler_retries`` times and gives up. Then a saga watchdog pass (the server's, run here with a short
    deadline) re-drives the order from the database so it still completes.

    Returns whether the given-up message is in ``payment.queue.dlq`` (its copy kept for a human to look at)
    and how the order ended.
    """
    from pulse import faults_control
    from pulse.tools.check import invariants

    product = lab.new_product(stock=5, name="Poison")
    user = lab.client.new_user()
    lab.client.add_item(user, product, 1)
    retries = lab.settings.handler_retries
    since = lab.now()
    # A message alone is tried ``retries`` times; one that failed inside a batch once more: armed for both.
    lab.arm("payment.timeout", 1.0, action="error", max=retries + 1)
    try:
        order_id = lab.client.checkout(user)["orderId"]
        deadline = time.monotonic() + wait_s
        while (
            faults_control.fired_counts(lab.settings.database_url, since).get("payment.timeout", 0) < retries
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.3)  # no backoff after the last attempt: the consumer dead-letters (or drops) it at once
    finally:
        lab.disarm("payment.timeout")
    attempts = faults_control.fired_counts(lab.settings.database_url, since).get("payment.timeout", 0)
    dead = invariants.peek_dead_letters(lab.settings.amqp_url, since_epoch=since.timestamp())
    in_dlq = sum(1 for m in dead.get("payment.queue", []) if m["id"])
    order = _redrive_until_settled(lab, order_id, redrive_deadline_s, wait_s)
    return {
        "attempts": attempts,
        "deadLettered": in_dlq,
        "completed": int(order["status"] == "COMPLETED"),
        "products": [product],
    }


def lost_event(lab, *, deadline_s: float = 2.0, wait_s: float = 6.0) -> dict:
    """One order's event is acked by ``order.queue`` without being handled (``consumer.lose``); for ``wait_s``
    seconds the saga watchdog passes (the server's, run here with deadline ``deadline_s``) look for stalled
    orders and re-drive them. Returns the order's status when the stall was noticed and at the end."""
    from pulse import faults_control

    product = lab.new_product(stock=5, name="Lost event")
    since = lab.now()
    lab.arm("consumer.lose", 1.0, queue="order.queue", max=1)
    try:
        order_id = lab.checkout({product: 1}, wait=False)["orderId"]
        deadline = time.monotonic() + wait_s
        while (
            not faults_control.fired_counts(lab.settings.database_url, since).get("consumer.lose")
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.5)  # the rest of the saga that did arrive is handled
    finally:
        lab.disarm("consumer.lose")
    stalled = lab.client.order(order_id)
    try:
        order = _redrive_until_settled(lab, order_id, deadline_s, wait_s)
    except TimeoutError:
        order = lab.client.order(order_id)
    return {
        "stalledStatus": stalled["status"],
        "finalStatus": order["displayStatus"] or order["status"],
        "completed": int(order["status"] == "COMPLETED"),
        "products": [product],
    }


def declined_order(lab) -> dict:
    """An optimistic order whose card is declined after inventory reserved its unit: inventory must restock.

    Returns the units that went back on the shelf and the reservation's final status."""
    product = lab.new_product(stock=5, name="Declined card")
    lab.arm("payment.decline", 1.0, max=1)
    try:
        order = lab.checkout({product: 1})
    finally:
        lab.disarm("payment.decline")
    left = count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {
        "ordered": 1,
        "unitsBack": left - 4,
        "reservation": order["inventoryStatus"],
        "status": order["displayStatus"],
        "products": [product],
    }


def _redrive_until_settled(lab, order_id: str, deadline_s: float, wait_s: float) -> dict:
    """Run saga watchdog passes (:class:`pulse.orders.watchdog.Watchdog`, as the server does every interval, here
    with deadline ``deadline_s``) until the order settled; raises TimeoutError after ``wait_s`` seconds."""
    from pulse.lab.client import settled
    from pulse.orders.watchdog import Watchdog

    watchdog = Watchdog(lab.system.deps, deadline_s=deadline_s)
    end = time.monotonic() + wait_s
    while True:
        order = lab.client.order(order_id)
        if settled(order):
            return order
        if time.monotonic() > end:
            raise TimeoutError(f"order {order_id} did not settle within {wait_s:.0f}s; last state: {order}")
        watchdog.run_once()
        time.sleep(0.5)
