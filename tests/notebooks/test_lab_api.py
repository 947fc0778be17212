"""The notebooks' API against this session's private services: start, checkout, switch, crash, stop."""

from __future__ import annotations

import pytest

from pulse.lab import Lab
from pulse.seed import IPHONE, KINDLE

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(serve_env, tmp_path):
    lab = Lab(strategy="optimistic", outbox_mode="polling", env=serve_env, log_dir=tmp_path).start()
    yield lab
    lab.stop()


def test_checkout_switch_and_timeline(lab):
    order = lab.checkout({IPHONE: 1})
    assert order["displayStatus"] == "COMPLETED"
    timeline = lab.timeline(order["orderId"])
    assert {"outbox", "broker", "inventory", "payment", "orders"} <= set(timeline["stage"])
    lab.switch(strategy="post-payment", decline_rate=1.0)
    declined = lab.checkout({KINDLE: 1})
    assert (declined["strategy"], declined["displayStatus"]) == ("POST_PAYMENT", "FAILED_PAYMENT")
    assert lab.q.outcome_totals() == {"COMPLETED": 1, "FAILED_PAYMENT_FAILED": 1}
    assert not lab.q.terminal_over_time().empty


def test_crash_restarts_and_drift_is_repaired(lab):
    first = lab.supervisor.process.proc.pid
    lab.crash()
    lab.wait_up(60)
    assert lab.restarts == 1 and lab.supervisor.process.proc.pid != first
    lab.checkout({IPHONE: 2})
    assert lab.flush_redis() > 0
    assert lab.q.drift_summary()["missingStockKeys"] > 0
    fixes = lab.reconcile_now(cooldown_s=0)
    assert fixes["stock"] >= 1
    assert lab.q.drift_summary() == {"productsDrifting": 0, "stockUnits": 0, "reservedUnits": 0, "missingStockKeys": 0}


def test_invariants_hold_after_orders(lab):
    product = lab.new_product(stock=5)
    result = lab.run_orders(8, [product], concurrency=4)
    # A cart's hold lasts until inventory decides, so exactly as many carts as units reach checkout.
    assert result["placed"] + result["cart-rejected"] == 8 and result["placed"] == 5, result
    lab.wait_quiet(30)
    assert lab.q.outcome_totals().get("COMPLETED") == 5
    failed = [c for c in lab.check({product: 5}) if not c["ok"]]
    assert failed == []


def test_stop_is_idempotent(serve_env, tmp_path):
    lab = Lab(env=serve_env, outbox_mode="polling", log_dir=tmp_path).start(tap=False)
    proc = lab.supervisor.process.proc
    lab.stop()
    lab.stop()
    assert proc.poll() is not None and not lab.running


def test_two_reconcilers_keep_their_own_windows(system, rds):
    """The lab's kernel and ``pulse serve`` both reconcile one Redis: neither may make the other's
    next pass a full one, while a flush (the marker gone) still makes every next pass full."""
    from pulse.reconcile.service import MARKER_KEY, Reconciler

    kernel, server = Reconciler(system.deps), Reconciler(system.deps)
    assert kernel.run_once(0)["full"] and server.run_once(0)["full"]
    assert not kernel.run_once(0)["full"] and not server.run_once(0)["full"]
    rds.delete(MARKER_KEY)
    assert kernel.run_once(0)["full"] and server.run_once(0)["full"]
