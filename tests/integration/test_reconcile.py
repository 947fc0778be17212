"""Redis <-> PostgreSQL reconciliation (SPEC §4): PostgreSQL is the truth; the cooldown protects requests in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from pulse.config import PROJECT_ROOT
from tests.integration.support import db_cart, redis_cart, reserved, set_db_stock

pytestmark = pytest.mark.integration


def U(text) -> uuid.UUID:
    return uuid.UUID(str(text))


def test_the_first_run_repairs_stock_reserved_carts_and_the_cleanup_queue(system, new_product, db, rds):
    p, q, user = new_product(stock=10), new_product(stock=10), uuid.uuid4()
    system.carts.add_item(user, U(p), 2)
    rds.set(f"stock:{p}", 99)
    rds.set(f"reserved:{p}", 7)
    rds.delete(f"cart:{user}")
    rds.hset(f"cart:{user}", mapping={p: 5, q: 1})
    rds.zrem("cart:cleanup:queue", str(user))
    result = system.reconciler.run_once(cooldown_s=0)
    assert result["full"] is True and result["windowFrom"] is None
    assert result["stock"] >= 1 and result["reserved"] >= 1 and result["carts"] >= 1 and result["cleanupQueue"] >= 1
    assert rds.get(f"stock:{p}") == "10"
    assert reserved(rds, p) == 2 and reserved(rds, q) == 0
    assert redis_cart(rds, user) == {p: 2} == db_cart(db, user)
    updated = db.execute("SELECT updated_at FROM inventory.carts WHERE user_id = %s", (user,)).fetchone()["updated_at"]
    assert rds.zscore("cart:cleanup:queue", str(user)) == pytest.approx(
        updated.timestamp() * 1000 + system.settings.cart_ttl_s * 1000, abs=2
    )
    again = system.reconciler.run_once(cooldown_s=0)
    assert again["full"] is False and again["windowFrom"] == result["windowTo"]


def test_a_delta_run_repairs_what_changed_since_the_last_run(system, new_product, db, rds):
    p, user = new_product(stock=10), uuid.uuid4()
    system.carts.add_item(user, U(p), 1)
    system.reconciler.run_once(cooldown_s=0)
    set_db_stock(db, p, 4)  # the warehouse changed the stock; the cache still says 10
    assert rds.get(f"stock:{p}") == "10"
    system.carts.add_item(user, U(p), 2)
    rds.set(f"reserved:{p}", 0)  # and the reservation counter drifted
    result = system.reconciler.run_once(cooldown_s=0)
    assert result["full"] is False
    assert result["stock"] == 1 and result["reserved"] == 1
    assert rds.get(f"stock:{p}") == "4" and reserved(rds, p) == 3


def test_a_missing_cleanup_queue_entry_is_put_back(system, new_product, db, rds):
    p, user = new_product(stock=10), uuid.uuid4()
    system.reconciler.run_once(cooldown_s=0)
    system.carts.add_item(user, U(p), 1)
    rds.zrem("cart:cleanup:queue", str(user))  # the cart would never expire: its units held forever
    result = system.reconciler.run_once(cooldown_s=0)
    assert result["cleanupQueue"] == 1 and result["carts"] == 0
    assert rds.zscore("cart:cleanup:queue", str(user)) is not None


def test_a_change_younger_than_the_cooldown_is_left_alone_and_fixed_by_a_later_run(system, new_product, db, rds):
    p, user = new_product(stock=10), uuid.uuid4()
    system.carts.add_item(user, U(p), 2)
    rds.set(f"reserved:{p}", 0)
    first = system.reconciler.run_once(cooldown_s=1.0)
    assert reserved(rds, p) == 0  # in flight: not touched
    assert first["deferred"] >= 1
    time.sleep(1.1)
    second = system.reconciler.run_once(cooldown_s=1.0)
    assert second["full"] is False and second["reserved"] >= 1
    assert reserved(rds, p) == 2


def test_a_redis_only_cart_after_a_crash_between_redis_and_db_is_repaired(system, new_product, db, rds):
    p, user, keeper = new_product(stock=10), uuid.uuid4(), uuid.uuid4()
    system.carts.add_item(keeper, U(p), 1)
    # What CartService.add_item does before its DB write; the process "dies" right there.
    system.carts.reserve(U(p), 3)
    rds.hincrby(f"cart:{user}", p, 3)
    rds.zadd("cart:cleanup:queue", {str(user): int((time.time() + system.settings.cart_ttl_s) * 1000)})
    assert reserved(rds, p) == 4
    system.reconciler.run_once(cooldown_s=1.0)
    assert redis_cart(rds, user) == {p: 3} and reserved(rds, p) == 4  # could still be about to commit
    time.sleep(1.1)
    result = system.reconciler.run_once(cooldown_s=1.0)
    assert result["carts"] >= 1 and result["reserved"] >= 1
    assert not rds.exists(f"cart:{user}") and rds.zscore("cart:cleanup:queue", str(user)) is None
    assert reserved(rds, p) == 1  # only the keeper's unit, as the DB says
    assert redis_cart(rds, keeper) == {p: 1}


def test_a_flushed_redis_is_rebuilt_by_the_next_run(system, new_product, db, rds):
    p, user = new_product(stock=6), uuid.uuid4()
    system.carts.add_item(user, U(p), 2)
    system.reconciler.run_once(cooldown_s=0)
    for key in (f"stock:{p}", f"reserved:{p}", f"cart:{user}", "pulse:reconcile:marker"):
        rds.delete(key)  # what FLUSHDB does to this test's keys (the marker goes with them)
    rds.zrem("cart:cleanup:queue", str(user))
    result = system.reconciler.run_once(cooldown_s=0)
    assert result["full"] is True  # the lost marker tells it Redis forgot everything
    assert rds.get(f"stock:{p}") == "6" and reserved(rds, p) == 2 and redis_cart(rds, user) == {p: 2}
    assert rds.zscore("cart:cleanup:queue", str(user)) is not None


def test_the_cli_runs_one_pass_and_prints_json(serve_env, new_product, rds):
    p = new_product(stock=3)
    rds.set(f"stock:{p}", 1)
    out = subprocess.run(
        [sys.executable, "-m", "pulse", "reconcile", "--once", "--cooldown", "0"],
        env={**os.environ, **serve_env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    counts = json.loads(lines[0])
    assert {"stock", "reserved", "carts", "cleanupQueue", "full"} <= set(counts) and counts["stock"] >= 1
    assert rds.get(f"stock:{p}") == "3"
