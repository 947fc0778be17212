"""The saga watchdog holds back while events are still queued, and re-drives once the queues are drained."""

import time
import uuid

import pika
import pytest

from pulse import topology
from pulse.infra import broker
from pulse.orders.watchdog import Watchdog
from tests.conftest import wait_for
from tests.integration.test_invariants_watchdog import order_with_a_lost_event

pytestmark = pytest.mark.integration


class Depth:
    """Stands in for the broker's queue depth, so the test controls when a backlog exists."""

    def __init__(self, ready):
        self.value, self.asked = ready, []

    def ready(self, queues):
        self.asked.append(list(queues))
        return self.value

    def close(self):
        pass


def test_queue_depth_counts_ready_messages_on_the_real_broker(settings):
    queue = f"pulse-test-depth-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    channel.queue_declare(queue, auto_delete=False)
    depth = broker.QueueDepth(settings.amqp_url)
    try:
        assert depth.ready([queue]) == 0
        for _ in range(3):
            channel.basic_publish("", queue, b"x")
        wait_for(lambda: depth.ready([queue]) == 3, 5, message="three ready messages")
        assert depth.ready([f"{queue}-missing"]) is None  # unknown, not zero: nobody should wait on it
        assert depth.ready([queue]) == 3  # and the next question works again
    finally:
        depth.close()
        channel.queue_delete(queue)
        conn.close()


def test_a_stalled_order_waits_for_the_backlog_then_is_re_driven(settings, make_system, new_product):
    system = make_system(workers=True)
    order_id = order_with_a_lost_event(settings, system, new_product(stock=5))

    depth = Depth(ready=40)
    watchdog = Watchdog(system.deps, deadline_s=0.5, depth=depth)
    held = watchdog.run_once()
    assert held["redriven"] == {} and "40 message(s) queued" in held["deferred"]
    assert set(depth.asked[0]) == set(topology.QUEUES)
    with system.deps.pool.connection() as conn:
        assert conn.execute("SELECT 1 FROM infra.saga_redrives WHERE order_id = %s", (order_id,)).fetchone() is None

    depth.value = 0
    assert watchdog.run_once()["redriven"].get("STOCK_RESERVED", 0) >= 1
    wait_for(lambda: system.orders.get(order_id)["displayStatus"] == "COMPLETED", 20, message="re-driven to COMPLETED")


def test_events_stuck_in_the_outbox_hold_the_watchdog_back(settings, system):
    # No relay runs here, and the row is gone before any could: an event type no queue is bound to, in case.
    with system.deps.pool.connection() as conn:
        conn.execute(
            "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) "
            "VALUES (%s, 'ORDER', %s, 'WATCHDOG_TEST', '{}', now() - interval '1 hour')",
            (uuid.uuid4(), str(uuid.uuid4())),
        )
    try:
        held = Watchdog(system.deps, deadline_s=30).run_once()
        assert held["redriven"] == {} and "not relayed yet" in held["deferred"]
    finally:
        with system.deps.pool.connection() as conn:
            conn.execute("DELETE FROM shared.outbox WHERE created_at < now() - interval '30 minutes'")


def test_every_page_of_candidates_is_examined(settings, make_system, new_product):
    # Settled FAILED orders stay candidates; with one page of the oldest only, a long run's early failures
    # hid every order that stalled after them. A page of one here: the two stalled orders sit on two pages.
    # The database is shared with earlier tests, whose settled FAILED orders are candidates too: the lookback
    # covers this test's orders only, and enough pages are allowed to reach both.
    started = time.monotonic()
    system = make_system(workers=True)
    product = new_product(stock=5)
    stalled = [order_with_a_lost_event(settings, system, product) for _ in range(2)]
    lookback = time.monotonic() - started + 5
    result = Watchdog(
        system.deps, deadline_s=0.5, limit=1, max_pages=1000, lookback_s=lookback, depth=Depth(ready=0)
    ).run_once()
    assert result["examined"] >= 2
    with system.deps.pool.connection() as conn:
        redriven = {
            r["order_id"]
            for r in conn.execute(
                "SELECT order_id FROM infra.saga_redrives WHERE order_id = ANY(%s)", (stalled,)
            ).fetchall()
        }
    assert redriven == set(stalled)
    for order_id in stalled:
        wait_for(
            lambda order_id=order_id: system.orders.get(order_id)["displayStatus"] == "COMPLETED",
            20,
            message="re-driven",
        )
