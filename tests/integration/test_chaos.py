"""Small chaos campaigns against the session's private services: every fault kind, both strategies, both relays."""

import json

import pytest

from pulse import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _campaign(serve_env, tmp_path, strategy, outbox_mode):
    campaign = chaos.Campaign(orders=60, seed=7, strategy=strategy, outbox_mode=outbox_mode, env=serve_env,
                              progress=False, quiesce_timeout_s=90, fault_every_s=0.5, log_dir=str(tmp_path))
    summary = campaign.run()
    print(json.dumps(summary, indent=1, default=str))
    return summary


def _assert_clean(summary):
    assert summary["violations"] == [], json.dumps(summary["violations"], indent=1, default=str)
    assert summary["quiesced"]
    assert sum(summary["ordersByState"].values()) >= 30
    # Each kind stays armed until it struck (chaos.Campaign._hold_until_struck), at most 10 s. On a busy machine
    # some kinds (environment faults, crash-prone windows) still miss it in a 60-order campaign, so "every kind"
    # is not asserted yet; the summary's faultKindsNotStruck names them.
    struck = set(chaos.DEFAULT_FAULTS) - set(summary["faultKindsNotStruck"])
    assert len(struck) >= len(chaos.DEFAULT_FAULTS) // 2, summary["faultsInjected"]
    assert summary["delivery"]["lost"] == 0


@pytest.mark.parametrize("strategy", ["optimistic", "post-payment"])
def test_campaign_under_every_fault_has_no_violation(serve_env, strategy, tmp_path):
    _assert_clean(_campaign(serve_env, tmp_path, strategy, "polling"))


def test_campaign_with_the_cdc_relay_has_no_violation(serve_env, settings, tmp_path):
    import psycopg

    try:
        summary = _campaign(serve_env, tmp_path, "post-payment", "cdc")
    finally:
        # Later tests of the session relay by polling; a slot left behind would hold WAL and replay old events.
        # A fresh connection: the campaign's db.restart terminates every session of the database.
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s "
                         "AND NOT active", (settings.cdc_slot,))
    assert summary["outboxMode"] == "cdc"
    _assert_clean(summary)
    assert summary["invariants"]["replication-slot"]
