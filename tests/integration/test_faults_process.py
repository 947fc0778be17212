"""Faults that need a whole process: crashes under `pulse supervise`, and broker connections force-closed."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from pulse import faults, faults_control
from pulse.tools.launcher import free_port
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def _healthy(url):
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_supervise_restarts_a_crashed_server(settings, serve_env, new_product, tmp_path, db):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **serve_env}
    env.pop("PULSE_LAB")  # `supervise --lab` puts its server in lab mode, or the crash fault would be ignored
    with open(tmp_path / "supervise.log", "wb") as log:  # the child holds its own descriptor once started
        proc = subprocess.Popen(
            [sys.executable, "-m", "pulse", "supervise", "--lab", "--", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        wait_for(lambda: _healthy(url), 60, 0.2, message="pulse serve up")
        # Other tests of this session log cart.after_redis strikes too: count only this test's.
        armed_at = db.execute("SELECT now() AS t").fetchone()["t"]
        faults_control.arm(settings.database_url, "cart.after_redis", action="crash", max=1)
        time.sleep(0.8)  # the server's registry refreshes every 0.5 s
        product = new_product(stock=5)
        with pytest.raises(httpx.HTTPError):
            httpx.put(f"{url}/api/cart/{uuid.uuid4()}/items", json={"productId": product, "quantity": 1}, timeout=10)
        wait_for(lambda: _healthy(url), 60, 0.2, message="pulse serve restarted")
        response = httpx.put(
            f"{url}/api/cart/{uuid.uuid4()}/items", json={"productId": product, "quantity": 1}, timeout=10
        )
        assert response.status_code == 200  # max=1: the fault struck once and the restarted server works
    finally:
        faults_control.disarm(settings.database_url)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["restarts"] == 1
    assert summary["exits"][0]["status"] == faults.CRASH_STATUS
    assert proc.returncode == 0
    assert (
        db.execute(
            "SELECT count(*) AS n FROM infra.fault_log WHERE name = 'cart.after_redis' "
            "AND action = 'crash' AND fired_at >= %s",
            (armed_at,),
        ).fetchone()["n"]
        == 1
    )


def test_broker_restart_closes_our_connections_and_consumers_come_back(settings, make_system, new_product, db):
    if settings.amqp_url.endswith("/%2F"):
        pytest.skip("the session uses the shared default vhost; broker.restart refuses it")
    system = make_system(workers=True)
    registry = faults.FaultRegistry(
        settings.database_url, refresh_s=0.0, redis_url=settings.redis_url, amqp_url=settings.amqp_url
    )
    try:
        faults_control.arm(settings.database_url, "broker.restart", max=1)
        registry.tick()
        # The strike is logged as "striking" first; the outcome replaces that context once rabbitmqctl is done.
        wait_for(
            lambda: db.execute(
                "SELECT context FROM infra.fault_log WHERE name = 'broker.restart' AND NOT context ? 'phase'"
            ).fetchone(),
            120,
            0.2,
            message="broker.restart acted",
        )
        context = db.execute("SELECT context FROM infra.fault_log WHERE name = 'broker.restart'").fetchone()["context"]
        assert "connectionsClosed" in context, context  # else rabbitmqctl failed: the context says how
        assert int(context["connectionsClosed"]) >= 5, context  # at least one consumer per queue
    finally:
        faults_control.disarm(settings.database_url)
        registry.close()
    product = new_product(stock=3)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    order = system.orders.create(user, f"k-{user}")
    wait_for(
        lambda: system.orders.get(uuid.UUID(order["orderId"]))["displayStatus"] == "COMPLETED",
        60,
        message="checkout completes after the consumers reconnected",
    )
