"""The expired-cart sweeper: releases in Redis (Lua), clears in the DB, and reconciliation does not revive it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from pulse.cart.sweeper import sweep_once
from pulse.config import PROJECT_ROOT
from tests.integration.support import db_cart, redis_cart, reserved

pytestmark = pytest.mark.integration


def test_an_expired_cart_is_released_in_redis_and_cleared_in_the_db(make_system, new_product, db, rds):
    system = make_system(cart_ttl_s=1)
    p, q = new_product(stock=10), new_product(stock=10)
    expired, fresh = uuid.uuid4(), uuid.uuid4()
    system.carts.add_item(expired, uuid.UUID(p), 2)
    system.carts.add_item(expired, uuid.UUID(q), 1)
    time.sleep(1.2)
    system.carts.add_item(fresh, uuid.UUID(p), 3)
    counts = sweep_once(system.deps)
    assert counts["redisCartsSwept"] >= 1 and counts["dbCartsCleared"] >= 1
    assert not rds.exists(f"cart:{expired}") and rds.zscore("cart:cleanup:queue", str(expired)) is None
    assert reserved(rds, p) == 3 and reserved(rds, q) == 0
    assert db_cart(db, expired) == {}
    tombstones = db.execute(
        "SELECT quantity FROM inventory.cart_items ci JOIN inventory.carts c ON c.id = ci.cart_id WHERE c.user_id = %s",
        (expired,),
    ).fetchall()
    assert [t["quantity"] for t in tombstones] == [0, 0]  # kept as tombstones so the delta sees the deletion
    assert redis_cart(rds, fresh) == {p: 3} == db_cart(db, fresh)
    # PostgreSQL agrees with Redis now, so reconciliation must not bring the cart back.
    system.reconciler.run_once(cooldown_s=0)
    assert not rds.exists(f"cart:{expired}") and rds.zscore("cart:cleanup:queue", str(expired)) is None
    assert reserved(rds, p) == 3 and reserved(rds, q) == 0
    # The units are free for others again.
    other = uuid.uuid4()
    system.carts.add_item(other, uuid.UUID(p), 7)
    assert reserved(rds, p) == 10


def test_sweeping_twice_releases_once(make_system, new_product, rds):
    system = make_system(cart_ttl_s=0.5)
    p, user = new_product(stock=5), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(p), 2)
    system.carts.add_item(uuid.uuid4(), uuid.UUID(p), 1)
    time.sleep(0.7)
    system.carts.add_item(uuid.uuid4(), uuid.UUID(p), 1)
    sweep_once(system.deps)
    sweep_once(system.deps)
    assert reserved(rds, p) == 1


def test_the_cli_sweeps_once_and_prints_json(serve_env):
    out = subprocess.run(
        [sys.executable, "-m", "pulse", "sweep", "--once"],
        env={**os.environ, **serve_env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.strip())
    assert {"redisCartsSwept", "dbCartsCleared", "tombstonesPurged"} <= set(counts)
