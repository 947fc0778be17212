"""A consumer thread that dies is restarted and counted, and /health lists the consumers."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from pulse import faults, faults_control, topology
from pulse.api.app import create_app
from pulse.infra import broker
from pulse.infra.consumer import Consumer
from pulse.infra.workers import ConsumerSupervisor
from tests.conftest import wait_for
from tests.integration.support import envelope, order_row, publish

pytestmark = pytest.mark.integration


class Escapes(BaseException):
    """Not an Exception: it gets past the consumer's handler retries, as a bug outside its try would."""


@pytest.fixture
def private_queue(settings):
    conn = broker.connect(settings.amqp_url)
    channel = conn.channel()
    name = f"test-sup-{uuid.uuid4().hex[:10]}"
    channel.queue_declare(name, durable=True)
    channel.queue_declare(broker.dead_letter_queue(name), durable=True)
    yield name
    for queue in (name, broker.dead_letter_queue(name)):
        channel.queue_delete(queue)
    conn.close()


def test_a_dead_consumer_is_restarted_counted_and_its_queue_still_consumed(settings, private_queue, caplog):
    handled, calls = [], []

    def dispatch(env):
        calls.append(env.id)
        if len(calls) == 1:
            raise Escapes("a bug outside the handler's try")
        handled.append(env.id)

    stop = threading.Event()
    supervisor = ConsumerSupervisor(stop)
    first = supervisor.add(Consumer(settings.amqp_url, private_queue, dispatch, stop=stop, retries=1))
    watcher = threading.Thread(target=supervisor.run, daemon=True)
    watcher.start()
    try:
        killer = envelope("STOCK_RESERVED", {"orderId": str(uuid.uuid4())})
        with caplog.at_level(logging.WARNING, logger="pulse.infra.workers"):
            publish(settings, [killer], exchange="", routing_key=private_queue)
            wait_for(lambda: not first.is_alive(), 10, message="the consumer thread to die")
            died = time.monotonic()
            wait_for(
                lambda: supervisor.status()[0]["alive"] and supervisor.slots[0].current is not first,
                5,
                message="a fresh consumer",
            )
        assert time.monotonic() - died < 3.0
        assert isinstance(first.last_error, Escapes)
        [status] = supervisor.status()
        assert status["queue"] == private_queue and status["restarts"] == 1, status
        assert status["lastError"] == "Escapes: a bug outside the handler's try"
        assert supervisor.restarts() == {private_queue: 1}
        restart_logs = [r for r in caplog.records if r.name == "pulse.infra.workers"]
        assert len(restart_logs) == 1 and restart_logs[0].levelno == logging.WARNING
        assert "Escapes" in restart_logs[0].getMessage() and first.name in restart_logs[0].getMessage()
        # The message the dead thread held unacked came back, and the queue is consumed again.
        wait_for(lambda: handled == [killer.id], 10, message="the unacked message handled by the new thread")
        later = envelope("STOCK_RESERVED", {"orderId": str(uuid.uuid4())})
        publish(settings, [later], exchange="", routing_key=private_queue)
        wait_for(lambda: handled == [killer.id, later.id], 10, message="a later message handled")
        wait_for(lambda: supervisor.status()[0]["handled"] == 2, 5, message="the handled count")
        assert supervisor.status()[0]["restarts"] == 1
    finally:
        stop.set()
        watcher.join(5)
        supervisor.slots[0].current.join(10)
    assert not watcher.is_alive() and not supervisor.slots[0].current.is_alive()
    assert supervisor.check_once() == 0  # a consumer that ended because we stop is not restarted


def test_a_fault_raised_before_the_ack_kills_a_consumer_that_is_restarted_and_shown_by_health(
    settings, make_system, new_product, db
):
    registry = faults.FaultRegistry(settings.database_url, refresh_s=0.05)
    try:
        faults_control.arm(settings.database_url, "consumer.before_ack", "error", max=1)
        system = make_system(workers=True, faults=registry)
        health = TestClient(create_app(system)).get("/health").json()
        listed = {c["queue"] for c in health["consumers"]}
        assert listed == set(topology.QUEUES), health
        assert all(c["alive"] and c["restarts"] == 0 for c in health["consumers"]), health
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(new_product(stock=3)), 1)
        order_id = system.orders.create(user, f"k-{user}")["orderId"]
        wait_for(
            lambda: sum(c["restarts"] for c in system.consumer_status()) == 1,
            15,
            message="a consumer killed by the fault and restarted",
        )
        wait_for(lambda: order_row(db, order_id)["status"] == "COMPLETED", 20, message="the order to complete")
        health = TestClient(create_app(system)).get("/health").json()
        [restarted] = [c for c in health["consumers"] if c["restarts"]]
        assert restarted["alive"] and restarted["restarts"] == 1
        assert restarted["lastError"] == "FaultInjected: fault consumer.before_ack injected"
        assert set(restarted) >= {"queue", "thread", "alive", "restarts", "handled", "deadLettered"}
        assert all(c["alive"] for c in health["consumers"]), health
        # the restarted thread is the one shutdown joins
        assert sum(1 for t in system.threads if getattr(t, "queue", None)) == len(topology.QUEUES)
    finally:
        faults_control.disarm(settings.database_url, "consumer.before_ack")
        registry.close()
