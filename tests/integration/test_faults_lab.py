"""Faults and naive switches are obeyed only in lab mode, and every armed fault expires (issue 10, item 4)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from pulse import faults, faults_control
from pulse.lab.client import PulseClient
from pulse.tools.launcher import ServeProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def disarm_after(settings):
    yield
    faults_control.disarm(settings.database_url)


def test_a_server_not_in_lab_mode_ignores_armed_faults_and_says_so(
    settings, serve_env, new_product, tmp_path, disarm_after
):
    """Written first: on the old code any `pulse serve` obeyed infra.faults, so this order FAILED (declined)."""
    faults_control.arm(settings.database_url, "payment.decline", probability=1.0)
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


def _checkout(system, new_product, bus_for) -> str:
    """One order of a fresh product, driven through the whole saga in-process; returns its final status."""
    product, user = new_product(stock=5), uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    bus_for(system).run(order_id)
    return system.orders.get(uuid.UUID(order_id))["status"]


def test_in_process_lab_system_obeys_and_plain_system_ignores(
    settings, make_system, new_product, bus_for, caplog, disarm_after
):
    faults_control.arm(settings.database_url, "payment.decline", probability=1.0)
    lab = make_system()  # the suite's settings are in lab mode
    assert isinstance(lab.deps.faults, faults.FaultRegistry)
    assert _checkout(lab, new_product, bus_for) == "FAILED"
    with caplog.at_level("WARNING", logger="pulse.faults"):
        plain = make_system(lab=False, naive=frozenset({"no-inbox"}))
    assert not isinstance(plain.deps.faults, faults.FaultRegistry)
    assert not plain.deps.naive("no-inbox") and plain.settings.naive == frozenset()
    assert _checkout(plain, new_product, bus_for) == "COMPLETED"
    said = [r.getMessage() for r in caplog.records if r.name == "pulse.faults"]
    assert len([m for m in said if "payment.decline" in m]) == 1, said
    assert len([m for m in said if "PULSE_NAIVE" in m]) == 1, said


def test_an_expired_fault_is_not_obeyed(settings, make_system, new_product, bus_for, disarm_after):
    armed = faults_control.arm(settings.database_url, "payment.decline", probability=1.0, ttl_s=0.5)
    assert armed["expiresAt"] > armed["armedAt"]
    time.sleep(0.7)
    assert faults_control.list_armed(settings.database_url) == []
    assert _checkout(make_system(), new_product, bus_for) == "COMPLETED"


def test_a_registry_stops_obeying_at_expiry_without_reading_again(settings, disarm_after):
    """A lab process that cannot reach the database keeps its last view, but not past a fault's expiry."""
    faults_control.arm(settings.database_url, "payment.decline", probability=1.0, ttl_s=1.0)
    registry = faults.FaultRegistry(settings.database_url, refresh_s=3600)
    try:
        assert registry.fires("payment.decline") and registry.armed_names() == ["payment.decline"]
        time.sleep(1.2)
        assert not registry.fires("payment.decline") and registry.armed_names() == []
    finally:
        registry.close()


def test_list_shows_the_time_left_and_arm_refuses_a_ttl_of_zero(settings, disarm_after):
    faults_control.arm(settings.database_url, "payment.latency", ttl_s=120, ms=10)
    faults_control.arm(settings.database_url, "no-inbox")
    listed = {f["name"]: f for f in faults_control.list_armed(settings.database_url)}
    assert 110 < listed["payment.latency"]["ttlLeftS"] <= 120
    assert faults.DEFAULT_TTL_S - 10 < listed["no-inbox"]["ttlLeftS"] <= faults.DEFAULT_TTL_S
    with pytest.raises(faults.UnknownFault):
        faults_control.arm(settings.database_url, "payment.latency", ttl_s=0)


def test_health_reports_lab_mode_and_armed_faults(settings, make_system, disarm_after):
    from fastapi.testclient import TestClient

    from pulse.api.app import create_app

    faults_control.arm(settings.database_url, "consumer.lose", probability=0.1)
    with TestClient(create_app(make_system())) as client:
        lab = client.get("/health").json()
    with TestClient(create_app(make_system(lab=False))) as client:
        plain = client.get("/health").json()
    assert (lab["labMode"], lab["faultsArmed"]) == (True, ["consumer.lose"])
    assert (plain["labMode"], plain["faultsArmed"]) == (False, ["consumer.lose"])


def test_serve_with_the_lab_flag_obeys(settings, serve_env, new_product, tmp_path, disarm_after):
    """`pulse serve --lab` is in lab mode although PULSE_LAB is unset."""
    faults_control.arm(settings.database_url, "payment.decline", probability=1.0)
    with ServeProcess(env={**serve_env, "PULSE_LAB": ""}, args=("--lab",), log_path=tmp_path / "serve.log") as server:
        api = PulseClient(server.url)
        health = httpx.get(server.url + "/health", timeout=5).json()
        product, user = new_product(stock=5), api.new_user()
        api.add_item(user, product, 1)
        order = api.wait_settled(api.checkout(user)["orderId"], timeout_s=30)
        api.close()
    assert (health["labMode"], health["faultsArmed"]) == (True, ["payment.decline"])
    assert order["status"] == "FAILED" and order["paymentStatus"] == "DECLINED"


def test_the_lab_runs_in_lab_mode_without_being_told(serve_env, tmp_path, disarm_after):
    from pulse.lab import Lab
    from pulse.seed import IPHONE

    env = {k: v for k, v in serve_env.items() if k != "PULSE_LAB"}
    lab = Lab(strategy="optimistic", outbox_mode="polling", env=env, log_dir=tmp_path).start(tap=False)
    try:
        assert lab.settings.lab
        lab.arm("payment.decline", ttl_s=60)
        assert lab.checkout({IPHONE: 1})["displayStatus"] == "FAILED_PAYMENT"
        assert httpx.get(lab.url + "/health", timeout=5).json()["labMode"] is True
    finally:
        lab.stop()
