"""Faults and naive switches are obeyed only in lab mode, and every armed fault expires (issue 10, item 4)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from pulse import faults
from pulse.lab.client import PulseClient
from pulse.lab.launcher import ServeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def disarm_after(settings):
    yield
    faults.disarm(settings.database_url)


def test_a_server_not_in_lab_mode_ignores_armed_faults_and_says_so(settings, serve_env, new_product, tmp_path,
                                                                   disarm_after):
    """Written first: on the old code any `pulse serve` obeyed infra.faults, so this order FAILED (declined)."""
    faults.arm(settings.database_url, "payment.decline", probability=1.0)
    log_path = tmp_path / "serve.log"
    env = {**serve_env, "PULSE_LAB": "0", "PULSE_NAIVE": "no-inbox"}
    with ServeProcess(env=env, log_path=log_path) as server:
        api = PulseClient(server.url)
        product, user = new_product(stock=5), api.new_user()
        api.add_item(user, product, 1)
        order = api.wait_settled(api.checkout(user)["orderId"], timeout_s=30)
        health = httpx.get(server.url + "/health", timeout=5).json()
        api.close()
    assert order["status"] == "COMPLETED", order
    lines = log_path.read_text(errors="replace").splitlines()
    armed_lines = [line for line in lines if "payment.decline" in line and "lab mode" in line]
    naive_lines = [line for line in lines if "PULSE_NAIVE" in line and "lab mode" in line]
    assert len(armed_lines) == 1, lines
    assert len(naive_lines) == 1, lines
    assert health["labMode"] is False and health["faultsArmed"] == ["payment.decline"]
