"""The lab restarts its own RabbitMQ and PostgreSQL mid-saga, and every order still settles; it refuses to
restart servers it did not start."""

from __future__ import annotations

import pytest

from pulse.lab import scenarios as sc
from pulse.lab.lab import Lab, LabError

pytestmark = pytest.mark.integration


@pytest.mark.slow
@pytest.mark.parametrize("outbox_mode", ["polling", "cdc"])
def test_every_order_settles_through_a_broker_and_a_database_restart(serve_env, tmp_path, outbox_mode):
    lab = Lab(strategy="optimistic", outbox_mode=outbox_mode, services="own", log_dir=tmp_path, env=serve_env).start(
        tap=False
    )
    try:
        assert lab.settings.database_url != serve_env["PULSE_DATABASE_URL"]
        result = sc.restarts_mid_saga(lab, orders=6, broker_down_s=1.0, database_down_s=0.5)
        assert [r["service"] for r in result["restarts"]] == ["RabbitMQ", "PostgreSQL"]
        assert [m["service"] for m in lab.service_restarts] == ["RabbitMQ", "PostgreSQL"]
        # Mid-saga: orders were placed before the broker went down, and checkouts during its outage committed
        # with their events waiting in the outbox.
        broker = result["restarts"][0]
        before = result["timeline"][result["timeline"]["t"] < broker["began"]]
        assert before["placed"].max() >= 1, result
        assert result["outboxPeak"] >= 1, result
        assert result["orders"] == 6 and result["final"] == {"COMPLETED": 6}, result
        assert result["violations"] == [], result
        # The server reconnected; it was not a crash the supervisor repaired.
        assert lab.restarts == 0
    finally:
        lab.stop()
    assert lab._owned is None


def test_restarts_are_refused_on_services_the_lab_did_not_start(serve_env, tmp_path):
    lab = Lab(strategy="optimistic", outbox_mode="polling", log_dir=tmp_path, env=serve_env)
    for restart, service in ((lab.restart_broker, "RabbitMQ"), (lab.restart_database, "PostgreSQL")):
        with pytest.raises(LabError) as refused:
            restart()
        message = str(refused.value)
        assert service in message and "services='own'" in message and message.count(". ") == 0, message
    assert lab.service_restarts == []
