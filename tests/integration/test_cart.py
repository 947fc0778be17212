"""The cart (SPEC §4): Lua reservation, Redis cart and cleanup queue, DB cart, reads, undo, concurrency."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest

from pulse.cart.service import CartService
from pulse.errors import Conflict, NotFound, Unavailable
from pulse.faults import NoFaults
from tests.integration.support import db_cart, redis_cart, reserved

pytestmark = pytest.mark.integration


def U(text) -> uuid.UUID:
    return uuid.UUID(str(text))


def test_add_item_reserves_in_redis_and_saves_the_db_cart(system, new_product, db, rds):
    product, user = new_product(stock=10, price="12.50"), uuid.uuid4()
    before_ms = time.time() * 1000
    cart = system.carts.add_item(user, U(product), 3)
    assert cart["userId"] == str(user) and cart["total"] == 37.5
    assert cart["items"] == [
        {"productId": product, "name": cart["items"][0]["name"], "quantity": 3, "unitPrice": 12.5, "subTotal": 37.5}
    ]
    assert rds.get(f"stock:{product}") == "10"  # loaded from the DB on the first reservation
    assert reserved(rds, product) == 3
    assert redis_cart(rds, user) == {product: 3}
    expiry = rds.zscore("cart:cleanup:queue", str(user))
    ttl_ms = system.settings.cart_ttl_s * 1000
    assert before_ms + ttl_ms <= expiry <= time.time() * 1000 + ttl_ms
    assert rds.ttl(f"cart:{user}") == -1  # no native TTL: only the sweeper drops a cart, releasing it
    assert db_cart(db, user) == {product: 3}


def test_several_items_and_repeated_adds_accumulate(system, new_product, db, rds):
    a, b, user = new_product(stock=10, price="2.00"), new_product(stock=5, price="3.00"), uuid.uuid4()
    system.carts.add_item(user, U(a), 1)
    system.carts.add_item(user, U(b), 2)
    cart = system.carts.add_item(user, U(a), 4)
    assert {i["productId"]: i["quantity"] for i in cart["items"]} == {a: 5, b: 2}
    assert cart["total"] == 5 * 2.0 + 2 * 3.0
    assert redis_cart(rds, user) == {a: 5, b: 2} == db_cart(db, user)
    assert (reserved(rds, a), reserved(rds, b)) == (5, 2)


def test_not_enough_stock_is_409_and_changes_nothing(system, new_product, db, rds):
    product, user, other = new_product(stock=4), uuid.uuid4(), uuid.uuid4()
    system.carts.add_item(user, U(product), 3)
    snapshot = (
        reserved(rds, product),
        redis_cart(rds, user),
        rds.zscore("cart:cleanup:queue", str(user)),
        db_cart(db, user),
        db.execute("SELECT count(*) AS n FROM inventory.cart_items").fetchone()["n"],
    )
    with pytest.raises(Conflict) as err:
        system.carts.add_item(user, U(product), 2)
    assert err.value.status == 409 and "Not enough stock" in str(err.value)
    with pytest.raises(Conflict):
        system.carts.add_item(other, U(product), 2)
    after = (
        reserved(rds, product),
        redis_cart(rds, user),
        rds.zscore("cart:cleanup:queue", str(user)),
        db_cart(db, user),
        db.execute("SELECT count(*) AS n FROM inventory.cart_items").fetchone()["n"],
    )
    assert after == snapshot
    assert not rds.exists(f"cart:{other}") and rds.zscore("cart:cleanup:queue", str(other)) is None
    assert db_cart(db, other) == {}
    system.carts.add_item(other, U(product), 1)  # the last unit is still there
    assert reserved(rds, product) == 4


def test_out_of_stock_product_is_409(system, new_product):
    with pytest.raises(Conflict):
        system.carts.add_item(uuid.uuid4(), U(new_product(stock=0)), 1)


def test_unknown_product_is_404_and_touches_nothing(system, rds, db):
    product, user = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(NotFound):
        system.carts.add_item(user, product, 1)
    assert not rds.exists(f"stock:{product}", f"reserved:{product}", f"cart:{user}")
    assert db_cart(db, user) == {}


def test_a_warm_cache_is_used_as_is(system, new_product, db, rds):
    """Once stock:{id} is cached the reservation is decided in Redis alone (the DB is not read)."""
    product = new_product(stock=10)
    rds.set(f"stock:{product}", 2)  # the cache says 2 (e.g. the DB changed and the refresh is on its way)
    system.carts.add_item(uuid.uuid4(), U(product), 2)
    with pytest.raises(Conflict):
        system.carts.add_item(uuid.uuid4(), U(product), 1)
    assert rds.get(f"stock:{product}") == "2" and reserved(rds, product) == 2


def test_a_cache_miss_loads_stock_once_with_set_nx(system, new_product, rds):
    product = new_product(stock=7)
    assert not rds.exists(f"stock:{product}")
    system.carts.add_item(uuid.uuid4(), U(product), 1)
    assert rds.get(f"stock:{product}") == "7"


def test_the_cart_is_read_from_redis(system, new_product, db):
    product, user = new_product(stock=10), uuid.uuid4()
    system.carts.add_item(user, U(product), 2)
    # Change the DB cart behind the cache's back: the read must come from Redis, not from the DB.
    db.execute("UPDATE inventory.cart_items SET quantity = 9 WHERE product_id = %s", (product,))
    assert [i["quantity"] for i in system.carts.get(user)["items"]] == [2]


def test_a_missing_redis_cart_falls_back_to_the_db_and_is_cached_again(system, new_product, db, rds):
    a, b, user = new_product(stock=10, price="1.00"), new_product(stock=10, price="4.00"), uuid.uuid4()
    system.carts.add_item(user, U(a), 2)
    system.carts.add_item(user, U(b), 1)
    rds.delete(f"cart:{user}")
    rds.zrem("cart:cleanup:queue", str(user))
    cart = system.carts.get(user)
    assert {i["productId"]: i["quantity"] for i in cart["items"]} == {a: 2, b: 1} and cart["total"] == 6.0
    assert redis_cart(rds, user) == {a: 2, b: 1}
    updated = db.execute("SELECT updated_at FROM inventory.carts WHERE user_id = %s", (user,)).fetchone()["updated_at"]
    expected = updated.timestamp() * 1000 + system.settings.cart_ttl_s * 1000
    assert abs(rds.zscore("cart:cleanup:queue", str(user)) - expected) < 2  # the expiry the DB cart implies


def test_an_empty_cart(system, rds):
    user = uuid.uuid4()
    assert system.carts.get(user) == {"userId": str(user), "items": [], "total": 0.0}
    assert not rds.exists(f"cart:{user}") and rds.zscore("cart:cleanup:queue", str(user)) is None


def test_tombstoned_db_items_are_not_shown(system, new_product, db, rds):
    product, user = new_product(stock=10), uuid.uuid4()
    system.carts.add_item(user, U(product), 2)
    db.execute("UPDATE inventory.cart_items SET quantity = 0 WHERE product_id = %s", (product,))
    rds.delete(f"cart:{user}")
    assert system.carts.get(user)["items"] == []


def test_lua_is_reloaded_after_script_flush(system, new_product, rds):
    product = new_product(stock=5)
    system.carts.add_item(uuid.uuid4(), U(product), 1)  # loads the script
    sha = system.deps.scripts.reserve_stock.sha
    assert rds.script_exists(sha) == [True]
    rds.script_flush()  # what a Redis restart does to the script cache
    assert rds.script_exists(sha) == [False]
    system.carts.add_item(uuid.uuid4(), U(product), 1)
    assert rds.script_exists(sha) == [True] and reserved(rds, product) == 2


class DropProductAfterRedis(NoFaults):
    """Deletes the product between the Redis reservation and the DB write, so the DB insert really fails."""

    def __init__(self, url, product, armed=True):
        self.url, self.product, self.armed = url, product, armed

    def point(self, name, **context):
        if name == "cart.after_redis" and self.armed:
            from pulse.infra import db

            with db.connect(self.url) as conn, conn.transaction():
                conn.execute("DELETE FROM inventory.inventory_items WHERE product_id = %s", (self.product,))
                conn.execute("DELETE FROM inventory.products WHERE id = %s", (self.product,))


def test_a_failed_db_write_undoes_the_redis_side(make_system, settings, new_product, db, rds):
    kept, doomed, user = new_product(stock=10), new_product(stock=10), uuid.uuid4()
    fault = DropProductAfterRedis(settings.database_url, doomed, armed=False)
    system = make_system(faults=fault)
    system.carts.add_item(user, U(kept), 2)
    fault.armed = True
    queued = rds.zscore("cart:cleanup:queue", str(user))
    with pytest.raises(Unavailable) as err:
        system.carts.add_item(user, U(doomed), 3)
    assert err.value.status == 503 and "nothing was reserved" in str(err.value)
    assert reserved(rds, doomed) == 0
    assert redis_cart(rds, user) == {kept: 2} == db_cart(db, user)
    # The rest of the cart is still tracked for the sweeper (the failed add may have moved its expiry later).
    assert rds.zscore("cart:cleanup:queue", str(user)) >= queued
    assert reserved(rds, kept) == 2


def test_a_failed_db_write_on_a_new_cart_leaves_no_trace(make_system, settings, new_product, db, rds):
    doomed, user = new_product(stock=10), uuid.uuid4()
    system = make_system(faults=DropProductAfterRedis(settings.database_url, doomed))
    with pytest.raises(Unavailable):
        system.carts.add_item(user, U(doomed), 1)
    assert reserved(rds, doomed) == 0 and not rds.exists(f"cart:{user}")
    assert rds.zscore("cart:cleanup:queue", str(user)) is None
    assert db.execute("SELECT count(*) AS n FROM inventory.carts WHERE user_id = %s", (user,)).fetchone()["n"] == 0


def test_40_concurrent_adds_against_stock_10_reserve_exactly_10(system, new_product, db, rds):
    product = new_product(stock=10)
    users = [uuid.uuid4() for _ in range(40)]
    outcomes, start = [], threading.Barrier(40)

    def add(user):
        start.wait()
        try:
            system.carts.add_item(user, U(product), 1)
            outcomes.append(200)
        except Conflict:
            outcomes.append(409)
        except Exception as exc:  # anything else is a failure of the test
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=add, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes, key=str) == [200] * 10 + [409] * 30
    assert reserved(rds, product) == 10
    held = db.execute(
        "SELECT COALESCE(SUM(quantity), 0) AS n FROM inventory.cart_items WHERE product_id = %s", (product,)
    ).fetchone()["n"]
    assert held == 10
    assert sum(1 for u in users if rds.hget(f"cart:{u}", product)) == 10


def test_cart_expiry_follows_the_injected_clock(system, new_product, rds):
    """The cart's expiry is domain time read from ``Deps.clock``: a test sets it instead of waiting out the TTL."""
    product, user = new_product(stock=10), uuid.uuid4()
    ttl_s = system.settings.cart_ttl_s
    now = float(int(time.time()) + 3600)  # an hour ahead: nothing else here runs on this clock
    carts_at = CartService(dataclasses.replace(system.deps, clock=lambda: now))
    carts_at.add_item(user, U(product), 2)
    assert rds.zscore("cart:cleanup:queue", str(user)) == int((now + ttl_s) * 1000)

    rds.delete(f"cart:{user}")  # Redis lost the cart: the next read loads it from the database, unless expired
    past_expiry = CartService(dataclasses.replace(system.deps, clock=lambda: time.time() + ttl_s + 60))
    assert past_expiry.get(user)["items"] == []
    assert [i["quantity"] for i in system.carts.get(user)["items"]] == [2]
