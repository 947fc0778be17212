"""Issue 10's reproduced broken promises: a cart hold that lapsed too early, an order stranded by a strategy
switch, and a saga re-drive that emptied the shopper's next cart. Each test failed on the code before the fix."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pulse.cart.sweeper import sweep_once
from pulse.errors import Conflict
from pulse.orders.watchdog import Watchdog
from tests.conftest import wait_for
from tests.integration.support import db_cart, redis_cart, reserved

pytestmark = pytest.mark.integration


def _order(system, product: str, quantity: int = 1):
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), quantity)
    return user, system.orders.create(user, f"k-{user}")["orderId"]


def test_a_cart_hold_lasts_until_inventory_decides(system, bus_for, new_product, rds):
    """Ten carts hold all ten units; while their orders wait for inventory, no late add may be accepted."""
    product = new_product(stock=10)
    bus = bus_for(system)
    orders = [_order(system, product)[1] for _ in range(10)]
    for order_id in orders:
        bus.run(order_id, hold={"inventory.queue"})  # redis-stock has seen ORDER_CREATED, inventory not yet
    with pytest.raises(Conflict):
        system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)
    for order_id in orders:
        bus.run(order_id)
        assert system.orders.get(uuid.UUID(order_id))["status"] == "COMPLETED"
    with pytest.raises(Conflict):
        system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)
    assert reserved(rds, product) == 0 and rds.get(f"stock:{product}") == "0"


def test_order_cleanup_removes_only_the_ordered_quantities(system, bus_for, new_product, rds, db):
    """Items the shopper added after pressing "order" stay in the cart, and stay held."""
    first, later = new_product(stock=5), new_product(stock=5)
    user, order_id = _order(system, first, 2)
    system.carts.add_item(user, uuid.UUID(later), 1)
    system.carts.add_item(user, uuid.UUID(first), 1)
    bus_for(system).run(order_id)
    assert redis_cart(rds, user) == {first: 1, later: 1}
    assert db_cart(db, user) == {first: 1, later: 1}
    assert reserved(rds, first) == 1 and reserved(rds, later) == 1


def test_an_order_charged_before_a_strategy_switch_completes_after_it(make_system, bus_for, new_product, db):
    """Post-payment order charged, then the system restarts as optimistic before inventory acts."""
    before = make_system(strategy="post-payment")
    product = new_product(stock=5)
    _, order_id = _order(before, product)
    held = [
        e for _, e in bus_for(before).run(order_id, hold={"inventory.queue"}) if e.event_type == "PAYMENT_PROCESSED"
    ]
    assert len(held) == 1 and before.orders.get(uuid.UUID(order_id))["paymentStatus"] == "SUCCESS"
    for envelope in held:  # still in flight: back into the outbox, for the next system's relay
        db.execute(
            "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "VALUES (%s, 'ORDER', %s, %s, %s::jsonb)",
            (envelope.id, envelope.aggregate_id, envelope.event_type, json.dumps(envelope.payload)),
        )
    after = make_system(workers=True, strategy="optimistic")
    wait_for(
        lambda: after.orders.get(uuid.UUID(order_id))["displayStatus"] == "COMPLETED",
        20,
        message="the charged order completed under the new process strategy",
    )
    assert after.orders.get(uuid.UUID(order_id))["strategy"] == "POST_PAYMENT"


def test_a_re_driven_order_created_leaves_the_next_cart_alone(system, bus_for, new_product, rds, db):
    """ORDER_CREATED lost on its way to inventory; the shopper starts a new cart; the watchdog re-drives."""
    product, other = new_product(stock=5), new_product(stock=5)
    bus = bus_for(system)
    user, order_id = _order(system, product)
    bus.run(order_id, hold={"inventory.queue"})
    bus.pending = []  # the held delivery is lost
    system.carts.add_item(user, uuid.UUID(other), 2)
    result = Watchdog(system.deps, deadline_s=0).run_once()
    assert result["redriven"].get("ORDER_CREATED", 0) >= 1
    bus.run(order_id)
    assert system.orders.get(uuid.UUID(order_id))["status"] == "COMPLETED"
    assert redis_cart(rds, user) == {other: 2} and db_cart(db, user) == {other: 2}
    assert reserved(rds, other) == 2


def test_a_cart_read_between_the_redis_sweep_and_the_db_sweep_does_not_release_twice(make_system, new_product, rds):
    """The sweeper releases in Redis, then clears the DB; a cart read in between must not cache the expired
    cart again, or the next sweep releases its units a second time (another shopper's hold)."""
    system = make_system(cart_ttl_s=0.5)
    product, user = new_product(stock=5), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 2)
    time.sleep(0.7)
    system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)  # a live cart's hold on the same product
    system.deps.scripts.remove_expired_reserves([], [int(time.time() * 1000)])  # the sweep's Redis half
    assert reserved(rds, product) == 1
    assert system.carts.get(user)["items"] == []  # read before the sweep's DB half: expired, not revived
    sweep_once(system.deps)
    assert reserved(rds, product) == 1


def test_the_hold_and_the_cart_hash_are_written_in_one_redis_step(system, new_product, rds):
    """reserve_stock.lua records the hold in the cart hash itself: no round trip between the two."""
    product, user = new_product(stock=3), uuid.uuid4()
    sent = []
    script = system.deps.scripts.reserve_stock
    trip = script.trip

    def spy(*commands):  # one call is one round trip
        sent.append([c[0] for c in commands])
        return trip(*commands)

    script.trip = spy
    try:
        system.carts.add_item(user, uuid.UUID(product), 2)
    finally:
        script.trip = trip
    # (twice on a cold cache: the first answer is "stock not cached", and the stock is loaded in between)
    assert sent and all(s == ["EVALSHA", "HGETALL"] for s in sent), sent
    assert reserved(rds, product) == 2 and redis_cart(rds, user) == {product: 2}


def test_a_redis_side_pending_across_a_reconciliation_is_not_applied_twice(system, bus_for, new_product, rds, db):
    """redis-stock committed the release of a hold, then crashed before its Lua step; reconciliation rebuilt
    reserved:/stock: from the database; the redelivered STOCK_RESERVED must not release and lower a second time."""
    product = new_product(stock=5)
    bus = bus_for(system)
    _, order_id = _order(system, product, 2)
    held = bus.run(order_id, hold={("redis-stock.queue", "STOCK_RESERVED")})
    stock_reserved = [e for q, e in held if q == "redis-stock.queue"][0]
    from pulse.redisstock import handlers as redisstock

    redisstock._claimed(
        system.deps,
        stock_reserved.id,
        redisstock.RELEASE,  # the database half, committed
        {
            "order": order_id,
            "user": stock_reserved.event.user_id,
            "items": json.dumps(redisstock._items(stock_reserved.event)),
        },
    )
    system.reconciler.run_once(cooldown_s=0, full=True)
    assert reserved(rds, product) == 0 and rds.get(f"stock:{product}") == "3"
    bus.run(order_id)  # the redelivery: a duplicate for the inbox, its Redis half runs again
    assert reserved(rds, product) == 0 and rds.get(f"stock:{product}") == "3"
    system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 3)  # exactly the 3 units left, no more
    with pytest.raises(Conflict):
        system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)
