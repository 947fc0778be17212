"""A small chaos campaign per strategy, every fault kind, against the session's private services."""

import json

import pytest

from pulse import chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("strategy", ["optimistic", "post-payment"])
def test_campaign_under_every_fault_has_no_violation(serve_env, strategy, tmp_path):
    campaign = chaos.Campaign(orders=80, seed=7, strategy=strategy, outbox_mode="polling", env=serve_env,
                              progress=False, quiesce_timeout_s=90, fault_every_s=1.0, log_dir=str(tmp_path))
    summary = campaign.run()
    print(json.dumps(summary, indent=1, default=str))
    assert summary["violations"] == [], json.dumps(summary["violations"], indent=1, default=str)
    assert summary["quiesced"]
    assert sum(summary["ordersByState"].values()) >= 40
    assert summary["faultsInjected"], "no fault struck: the campaign proved nothing"
    assert summary["delivery"]["lost"] == 0
