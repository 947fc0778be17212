"""RabbitMQ topology per strategy, and the dead-letter queue that keeps the reason."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pulse import topology
from pulse.infra import broker
from tests.conftest import wait_for
from tests.integration.support import envelope, order_row, publish

pytestmark = pytest.mark.integration


def ready(channel, queue) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def test_setup_declares_every_queue_with_its_dead_letter_queue(settings, channel):
    bound = broker.setup(settings.amqp_url, topology.bindings())
    assert bound["inventory.queue"] == [
        "ORDER_CREATED (OPTIMISTIC)",
        "PAYMENT_FAILED (OPTIMISTIC)",
        "PAYMENT_PROCESSED (POST_PAYMENT)",
    ]
    for queue in topology.QUEUES:
        assert channel.queue_declare(queue, passive=True).method.queue == queue
        assert channel.queue_declare(f"{queue}.dlq", passive=True).method.queue == f"{queue}.dlq"
    channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", passive=True)
    channel.exchange_declare(broker.STRATEGY_EXCHANGE, exchange_type="headers", passive=True)


def fetch(channel, queue, message_id, timeout_s=15.0):
    """Take one message by id from ``queue``; every other message is put back untouched."""
    others, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            method, props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                time.sleep(0.05)
                continue
            if props.message_id == message_id:
                channel.basic_ack(method.delivery_tag)
                return props, body
            others.append(method.delivery_tag)
        pytest.fail(f"no message {message_id} in {queue} within {timeout_s:.0f}s")
    finally:
        for tag in others:
            channel.basic_nack(tag, requeue=True)


@pytest.mark.parametrize("strategy", ["OPTIMISTIC", "POST_PAYMENT"])
def test_an_event_reaches_only_the_queues_whose_module_acts_on_it_for_the_order_strategy(
    strategy, system, settings, new_product, channel, tidy_outbox
):
    """No queue hears the other strategy's events, and a switch of strategy strands nothing: the binding
    follows the strategy the event carries. A binding an older topology made by routing key alone (payment.queue
    took every ORDER_CREATED) is removed by setup."""
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(new_product(stock=5)), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]  # a real order: the events stay harmless
    tidy_outbox.append(order_id)
    broker.setup(settings.amqp_url, topology.bindings())
    channel.queue_bind("payment.queue", broker.EXCHANGE, routing_key="ORDER_CREATED")
    broker.setup(settings.amqp_url, topology.bindings())
    payload = {"orderId": order_id, "userId": str(user), "strategy": strategy, "reason": "DECLINED", "items": []}
    for event_type in ("ORDER_CREATED", "PAYMENT_FAILED", "PAYMENT_PROCESSED", "STOCK_RESERVED", "STOCK_FAILED"):
        env = envelope(event_type, payload)
        before = {q: ready(channel, q) for q in topology.QUEUES}
        publish(settings, [env])
        got = sorted(q for q in topology.QUEUES if ready(channel, q) == before[q] + 1)
        assert got == sorted(topology.consumers_of(event_type, strategy)), event_type
        for queue in got:  # taken off again: nothing consumes these events later
            fetch(channel, queue, str(env.id))


def test_a_poison_message_is_dead_lettered_with_its_reason_after_bounded_retries(
    make_system, settings, channel, new_product, db
):
    system = make_system(workers=True, handler_retries=3)
    order_consumer = next(c for c in system.threads if getattr(c, "queue", None) == "order.queue")
    missing = str(uuid.uuid4())
    # A well-formed event for an order that does not exist: the handler fails on every attempt (a payload that
    # does not parse would be dead-lettered at once, see test_consumer_dead_letter.py).
    poison = envelope(
        "STOCK_RESERVED",
        {"orderId": missing, "userId": str(uuid.uuid4()), "totalPrice": "1.00", "items": [], "strategy": "OPTIMISTIC"},
    )
    started = time.monotonic()
    publish(settings, [poison], exchange="", routing_key="order.queue")
    props, body = fetch(channel, "order.queue.dlq", str(poison.id))
    assert json.loads(body)["id"] == str(poison.id)  # the message itself, unchanged
    assert props.headers["x-pulse-queue"] == "order.queue"
    reason = props.headers["x-pulse-reason"]
    assert "LookupError" in reason and missing in reason, reason
    assert props.type == "STOCK_RESERVED" and props.delivery_mode == 2
    # three attempts with backoff in between (0.1 s, 0.2 s), not an endless requeue loop
    assert time.monotonic() - started >= 0.3
    assert order_consumer.is_alive() and order_consumer.dead_lettered >= 1, order_consumer.dead_lettered
    # The consumer goes on with the next message.
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(new_product(stock=3)), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    wait_for(
        lambda: order_row(db, order_id)["status"] == "COMPLETED",
        message="the next order to complete after the poison message",
    )


def test_a_malformed_body_and_an_unexpected_type_go_to_the_dead_letter_queue(make_system, settings, channel):
    make_system(workers=True, handler_retries=2)
    conn = broker.connect(settings.amqp_url)
    try:
        import pika

        ch = conn.channel()
        ch.confirm_delivery()
        garbage_id = str(uuid.uuid4())
        ch.basic_publish(
            "",
            "payment.queue",
            b"{this is not an envelope",
            pika.BasicProperties(message_id=garbage_id, delivery_mode=2),
        )
    finally:
        conn.close()
    props, body = fetch(channel, "payment.queue.dlq", garbage_id)
    assert body == b"{this is not an envelope"
    assert "not an event envelope" in props.headers["x-pulse-reason"]
    stray = envelope("ORDER_UPDATED", {"orderId": str(uuid.uuid4())})
    publish(settings, [stray], exchange="", routing_key="payment.queue")
    props, _ = fetch(channel, "payment.queue.dlq", str(stray.id))
    assert "payment.queue has no route for ORDER_UPDATED" in props.headers["x-pulse-reason"]
