"""Chaos campaigns against the session's private services: every fault kind, both strategies, both relays.

Issue 4 asks CI for "a few hundred orders, every fault kind" per strategy: 200 orders each for the two
strategies over the polling relay, and a smaller one over the CDC relay. Each kind stays armed until it struck
(chaos.Campaign._hold_until_struck), so every kind must strike; the campaign's options keep the file at a few
minutes on a 2-core machine.
"""

import json
import time

import pytest

from pulse.tools import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = ("COMPLETED", "FAILED")


def _campaign(serve_env, tmp_path, strategy, outbox_mode, orders, strike_wait_s=8):
    campaign = chaos.Campaign(
        orders=orders,
        seed=7,
        strategy=strategy,
        outbox_mode=outbox_mode,
        env=serve_env,
        progress=False,
        threads=8,
        quiesce_timeout_s=90,
        fault_every_s=0.5,
        strike_wait_s=strike_wait_s,
        max_drive_s=150,
        log_dir=str(tmp_path),
    )
    started = time.monotonic()
    summary = campaign.run()
    print(json.dumps(summary, indent=1, default=str))
    print(f"campaign {strategy}/{outbox_mode}, {orders} orders: {time.monotonic() - started:.1f}s")
    return summary


def _assert_clean(summary, orders):
    assert summary["violations"] == [], json.dumps(summary["violations"], indent=1, default=str)
    assert summary["quiesced"]
    assert summary["faultKindsNotStruck"] == [], summary["faultTurns"]
    assert "not-started" not in summary["checkouts"], summary["checkouts"]  # the time box was not needed
    # One scarce product among ample ones: many orders, and some shoppers must find the shelf empty.
    assert summary["checkouts"].get("ordered", 0) >= orders // 3, summary["checkouts"]
    assert summary["checkouts"].get("cart-rejected", 0) > 0, summary["checkouts"]
    placed = sum(summary["ordersByState"].values())
    assert placed >= orders // 3, summary["ordersByState"]
    assert all(state.startswith(TERMINAL) for state in summary["ordersByState"]), summary["ordersByState"]
    assert summary["invariants"]["orders-terminal"]
    assert summary["delivery"]["lost"] == 0
    crashes = [
        k for k, (action, _, _) in chaos.FAULT_PLANS.items() if action == "crash" and summary["faultsInjected"].get(k)
    ]
    assert summary["fixes"]["serverRestarts"] >= len(crashes)  # each crash that struck took the server down


@pytest.mark.parametrize("strategy", ["optimistic", "post-payment"])
def test_campaign_under_every_fault_has_no_violation(campaign_env, strategy, tmp_path):
    summary = _campaign(campaign_env, tmp_path, strategy, "polling", 200)
    _assert_clean(summary, 200)


def test_campaign_with_the_cdc_relay_has_no_violation(campaign_env, tmp_path):
    summary = _campaign(campaign_env, tmp_path, "post-payment", "cdc", 100)  # its slot goes with its services
    assert summary["outboxMode"] == "cdc"
    _assert_clean(summary, 100)
    assert summary["invariants"]["replication-slot"]
