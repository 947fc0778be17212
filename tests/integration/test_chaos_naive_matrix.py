"""Issue 10, item 7: the checker sees every naive switch in a campaign, and nothing without one.

The matrix is every naive switch × both strategies, plus a campaign without switches per strategy. The
conditions each switch needs come from the campaign's contention phase (pulse.tools.contention), which every
campaign runs whatever its size, so CI runs small campaigns without the fault rounds: a few orders, a short
quiescence (an order a late event revived never settles, and waiting longer shows nothing more), and only the
two fault kinds below. The full
300-order, seed-11 campaigns with every fault kind are run by hand (see the README).
"""

import json
import time

import pytest

from pulse import faults
from pulse.tools import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRATEGIES = ("optimistic", "post-payment")
# What each switch is expected to trip, where known; a switch added later needs only some violation.
CAUGHT_BY = {
    "reserve-get-set": "no-oversell",
    "reconcile-full-scan": "no-oversell",
    "release-on-order-created": "cart-promise-kept",
    "cart-native-ttl": "reserved-before-repair",
    "no-version-check": "stock-conservation",
    "dlq-drop": "delivery",
    "no-watchdog": "orders-terminal",
    "no-compensation": None,
    "unguarded-state": "orders-terminal",
    "lock-no-owner": "idempotency-lock-exclusive",
    "no-inbox": None,
    "publish-no-confirm": None,
}
# Two crash kinds are what the switches the contention phase does not cover need: a crash right after a publish
# (publish-no-confirm loses what was in flight) and one before an ack (no-inbox applies the redelivery twice).
SMALL_FAULTS = ("relay.after_publish", "consumer.before_ack")
CELLS = [(strategy, None) for strategy in STRATEGIES] + [
    (strategy, switch) for switch in faults.NAIVE_SWITCHES for strategy in STRATEGIES
]


@pytest.mark.parametrize(("strategy", "switch"), CELLS, ids=[f"{s}-{n or 'none'}" for s, n in CELLS])
def test_each_naive_switch_is_reported_and_none_without(campaign_env, tmp_path, strategy, switch):
    campaign = chaos.Campaign(
        orders=12,
        seed=11,
        fault_kinds=SMALL_FAULTS,
        strategy=strategy,
        outbox_mode="polling",
        env=campaign_env,
        naive=switch or "",
        progress=False,
        threads=4,
        quiesce_timeout_s=8,
        fault_every_s=0.5,
        strike_wait_s=6,
        log_dir=str(tmp_path),
    )
    started = time.monotonic()
    summary = campaign.run()
    names = sorted({v["name"] for v in summary["violations"]})
    print(f"cell {strategy}/{switch or 'none'}: {names} in {time.monotonic() - started:.1f}s")
    detail = json.dumps(summary["violations"], indent=1, default=str)
    if switch is None:
        assert names == [], detail
        assert summary["quiesced"]
    else:
        assert names, f"{switch} went unnoticed: {json.dumps(summary, default=str)[:2000]}"
        if CAUGHT_BY.get(switch):
            assert CAUGHT_BY[switch] in names, detail
