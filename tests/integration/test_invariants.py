import datetime as dt
import json
import os
import subprocess
import sys
import uuid

import pytest

from pulse.infra import keys
from pulse.tools.check.invariants import Scope, check_all
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def _checkouts(system, products, n=4):
    orders = []
    for i in range(n):
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(products[i % len(products)]), 1)
        orders.append(system.orders.create(user, f"k-{user}")["orderId"])
    for order_id in orders:
        wait_for(
            lambda order_id=order_id: (
                system.orders.get(uuid.UUID(order_id))["displayStatus"] in ("COMPLETED", "FAILED_PAYMENT")
            ),
            30,
            message=f"order {order_id} settled",
        )
    wait_for(lambda: _outbox_empty(system), 20, message="outbox drained")
    return orders


def _outbox_empty(system):
    with system.deps.pool.connection() as conn:
        return conn.execute("SELECT count(*) AS n FROM shared.outbox").fetchone()["n"] == 0


def _by_name(outcome):
    return {r.name: r for r in outcome["results"]}


@pytest.fixture
def campaign(settings, make_system, new_product):
    since = dt.datetime.now(dt.UTC)
    system = make_system(workers=True)
    products = [new_product(stock=10), new_product(stock=10)]
    orders = _checkouts(system, products)
    return since, products, orders, system


def test_a_clean_run_passes_every_invariant(settings, campaign):
    since, products, _, _ = campaign
    outcome = check_all(settings, Scope(since=since, products=products))
    failed = [r.to_dict() for r in outcome["results"] if not r.passed]
    assert not failed
    delivery = _by_name(outcome)["delivery"]
    assert delivery.data["expected"] >= 4 * 6  # ORDER_CREATED x2 queues, ORDER_UPDATED, STOCK_RESERVED x3, ...


def test_the_checker_has_teeth(settings, campaign, db, rds):
    since, products, orders, system = campaign
    scope = Scope(since=since, products=products)
    # A stock movement the system never made, a charge nobody refunded, a lost delivery and a stale Redis cart.
    db.execute(
        "UPDATE inventory.inventory_items SET available_quantity = available_quantity + 1 WHERE product_id = %s",
        (products[0],),
    )
    db.execute(
        "UPDATE orders.orders SET status = 'FAILED', failure_reason = 'OUT_OF_STOCK' WHERE id = %s", (orders[0],)
    )
    db.execute(
        "DELETE FROM payment.inbox WHERE event_id = (SELECT event_id FROM infra.event_log WHERE "
        "aggregate_id = %s AND event_type = 'STOCK_RESERVED' LIMIT 1)",
        (orders[1],),
    )
    db.execute("INSERT INTO orders.inbox (event_id) VALUES (%s)", (uuid.uuid4(),))
    db.execute("UPDATE orders.orders SET status = 'PROCESSING' WHERE id = %s", (orders[2],))
    results = _by_name(check_all(settings, scope))
    assert not results["stock-conservation"].passed and products[0] in map(str, results["stock-conservation"].offending)
    assert not results["failed-orders-refunded"].passed
    assert not results["money-balance"].passed
    assert [str(i) for i in results["orders-terminal"].offending] == [orders[2]]
    assert not results["delivery"].passed
    assert results["delivery"].data["lost"] == 1 and results["delivery"].data["unexpected"] == 1
    assert results["redis-matches-db"].passed  # the pre-check reconcile repaired stock:


def test_redis_drift_is_reported_without_reconcile_and_repaired_with_it(settings, campaign, rds):
    since, products, _, _ = campaign
    scope = Scope(since=since, products=products)
    rds.set(keys.reserved(products[1]), 7)
    assert not _by_name(check_all(settings, scope, reconcile=False))["redis-matches-db"].passed
    outcome = check_all(settings, scope)
    assert outcome["reconcile"]["reserved"] >= 1
    assert _by_name(outcome)["redis-matches-db"].passed


# Names are a contract (SPEC §8): notebooks, chaos reports and the fault catalogue's caughtBy refer to them.
EXPECTED_INVARIANTS = {
    "no-oversell",
    "stock-conservation",
    "one-charge-per-order",
    "failed-orders-refunded",
    "money-balance",
    "orders-terminal",
    "cart-promise-kept",
    "effects-once",
    "outbox-drained",
    "dlq-explained",
    "delivery",
    "redis-matches-db",
    "replication-slot",
    "events-routed",
}


def test_cli_check_prints_and_exits(settings, serve_env, campaign):
    since, products, _, _ = campaign
    env = {**os.environ, **serve_env}
    args = [sys.executable, "-m", "pulse", "check", "--since", since.isoformat()]
    for p in products:
        args += ["--product", p]
    done = subprocess.run(args + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    names = [r["name"] for r in report["results"]]
    assert report["passed"] and len(names) == len(set(names)) and set(names) >= EXPECTED_INVARIANTS, names
    plain = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert plain.stdout.count("PASS") == len(names)


def test_an_order_moved_while_the_check_runs_is_still_judged(settings, campaign, db):
    """``updated_at`` is the clock of the statement that moved the order, which can be later than the
    check's ``now()``: such an order must still be in the check, or a moving order passes as settled."""
    from pulse.infra import db as pulse_db
    from pulse.tools.check import invariants as inv

    since, products, orders, _ = campaign
    with pulse_db.connect(settings.database_url) as checker:
        checker.execute("SELECT 1")  # the checker's transaction, and its now(), start here
        db.execute(
            "UPDATE orders.orders SET status = 'PROCESSING', updated_at = clock_timestamp() WHERE id = %s",
            (orders[2],),
        )
        result = inv.orders_terminal(checker, Scope(since=since, products=products))
    assert [str(i) for i in result.offending] == [orders[2]], result.to_dict()
