"""A dead-letter publish is confirmed by the broker before the original message is acked."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from pulse.infra import broker
from pulse.infra.consumer import Consumer
from tests.conftest import wait_for
from tests.integration.support import envelope, publish

pytestmark = pytest.mark.integration


@pytest.fixture
def private_queue(settings, channel):
    """A queue of this test alone (its dead-letter queue is left to the test); both are deleted afterwards."""
    name = f"test-dlq-{uuid.uuid4().hex[:10]}"
    channel.queue_declare(name, durable=True)
    yield name
    for queue in (name, broker.dead_letter_queue(name)):
        channel.queue_delete(queue)


@pytest.fixture
def consumers(settings):
    """Start consumers whose handler always fails; each is stopped (and joined) after the test."""
    started = []

    def always_fails(env):
        raise ValueError(f"cannot handle {env.id}")

    def start(queue: str) -> Consumer:
        stop = threading.Event()
        consumer = Consumer(settings.amqp_url, queue, always_fails, stop=stop, retries=1)
        consumer.start()
        started.append(consumer)
        return consumer

    yield start
    for consumer in started:
        stop_and_join(consumer)


def stop_and_join(consumer: Consumer) -> None:
    consumer.stop.set()
    consumer.join(10)
    assert not consumer.is_alive()


def ready(channel, queue) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def take(channel, queue, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return props, body
        time.sleep(0.05)
    pytest.fail(f"nothing arrived in {queue} within {timeout_s:.0f}s")


def test_a_poison_message_ends_up_in_the_dead_letter_queue_with_its_reason(settings, channel, private_queue, consumers):
    dlq = broker.dead_letter_queue(private_queue)
    channel.queue_declare(dlq, durable=True)
    poison = envelope("STOCK_RESERVED", {"orderId": str(uuid.uuid4())})
    consumer = consumers(private_queue)
    publish(settings, [poison], exchange="", routing_key=private_queue)
    props, body = take(channel, dlq)
    assert json.loads(body)["id"] == str(poison.id)
    assert props.headers["x-pulse-reason"] == f"ValueError: cannot handle {poison.id}"
    assert props.headers["x-pulse-queue"] == private_queue
    wait_for(lambda: consumer.dead_lettered == 1, 5, message="the dead-letter count")
    stop_and_join(consumer)
    assert ready(channel, private_queue) == 0  # the original was acked once the DLQ copy was confirmed


def test_an_unconfirmed_dead_letter_publish_leaves_the_original_in_its_queue(
    settings, channel, private_queue, consumers
):
    dlq = broker.dead_letter_queue(private_queue)
    poison = envelope("STOCK_RESERVED", {"orderId": str(uuid.uuid4())})
    consumer = consumers(private_queue)  # no dead-letter queue: the mandatory publish comes back unroutable
    publish(settings, [poison], exchange="", routing_key=private_queue)
    time.sleep(2.0)  # several delivery, failure and dead-letter attempts
    assert consumer.is_alive() and consumer.dead_lettered == 0
    stop_and_join(consumer)
    assert ready(channel, private_queue) == 1, "the original was acked although its dead-letter copy went nowhere"
    # Once the dead-letter queue exists again, the message gets there and leaves its queue.
    channel.queue_declare(dlq, durable=True)
    consumer = consumers(private_queue)
    props, _ = take(channel, dlq)
    assert props.message_id == str(poison.id)
    wait_for(lambda: consumer.dead_lettered == 1, 5, message="the dead-letter count")
    stop_and_join(consumer)
    assert ready(channel, private_queue) == 0


def test_a_payload_its_module_cannot_read_is_dead_lettered_at_once_with_its_reason(settings, channel, private_queue):
    """A well-formed envelope whose payload lacks a field its event type requires: no retry can fix it, so it
    goes to the dead-letter queue after one attempt, like an envelope that does not parse, and the handler
    never sees it."""
    from pulse import topology
    from pulse.events import EventType as E

    handled = []

    class Deps:
        def naive(self, name):
            return False

    class Counting(topology.Dispatcher):
        calls = 0

        def __call__(self, env):
            self.calls += 1
            return super().__call__(env)

    spec = topology.Queue(
        private_queue,
        "test",
        "unused.inbox",
        routes=(
            topology.Route(
                E.STOCK_RESERVED, lambda deps, event_id, event: handled.append(event_id), claims_inbox=False
            ),
        ),
    )
    dispatch = Counting(spec, Deps())
    dlq = broker.dead_letter_queue(private_queue)
    channel.queue_declare(dlq, durable=True)
    poison = envelope("STOCK_RESERVED", {"orderId": str(uuid.uuid4()), "strategy": "OPTIMISTIC"})
    consumer = Consumer(settings.amqp_url, private_queue, dispatch, stop=threading.Event(), retries=5)
    consumer.start()
    try:
        publish(settings, [poison], exchange="", routing_key=private_queue)
        props, body = take(channel, dlq)
    finally:
        stop_and_join(consumer)
    assert json.loads(body)["id"] == str(poison.id)
    assert props.headers["x-pulse-reason"].startswith(
        "MalformedEnvelope: malformed STOCK_RESERVED payload: missing 'userId', 'totalPrice', 'items'"
    )
    assert dispatch.calls == 1 and handled == [] and consumer.dead_lettered == 1
    assert ready(channel, private_queue) == 0
