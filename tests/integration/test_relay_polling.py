"""What only the polling relay does: several relays share the claim, none publishing a row twice.

Order, at-least-once across a crash and nothing deleted before its confirm are tested for both relays in
test_relay_contract.py."""

from __future__ import annotations

import json
import threading
import uuid

import pytest

from pulse.infra import broker, outbox
from pulse.infra import db as pulse_db
from pulse.infra.relay_polling import PollingRelay
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

# A routing key no module is bound to: the test's own queue is the only receiver.
KEY = "RELAY_TEST"


@pytest.fixture
def listener(settings):
    """An exclusive queue bound to the outbox exchange for KEY; returns a function that drains it."""
    conn = broker.connect(settings.amqp_url)
    channel = conn.channel()
    channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, broker.EXCHANGE, routing_key=KEY)

    def drain():
        got = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((props, json.loads(body)))

    yield drain
    conn.close()


def write_events(settings, aggregate, n):
    with pulse_db.connect(settings.database_url) as conn, conn.transaction():
        return [outbox.append(conn, KEY, "TEST", aggregate, {"n": i}) for i in range(n)]


def remaining(db, aggregate) -> int:
    return db.execute("SELECT count(*) AS n FROM shared.outbox WHERE aggregate_id = %s", (aggregate,)).fetchone()["n"]


def relay_all(relay, db, aggregate, limit=200):
    for _ in range(limit):
        if remaining(db, aggregate) == 0:
            return
        relay.run_once()
    pytest.fail("the relay did not empty the outbox")


def make_relay(settings, **kwargs):
    return PollingRelay(settings.database_url, broker.ConfirmingPublisher(settings.amqp_url), **kwargs)


def test_several_relays_at_once_publish_each_row_once(settings, db, listener):
    aggregate = str(uuid.uuid4())
    ids = write_events(settings, aggregate, 300)
    relays = [make_relay(settings, batch=20) for _ in range(3)]
    errors = []

    def run(relay):
        try:
            while remaining(db, aggregate):
                relay.run_once()
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            relay.publisher.close()
            relay._reset()

    threads = [threading.Thread(target=run, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    got = [b["id"] for _, b in listener() if b["aggregateId"] == aggregate]
    assert sorted(got) == sorted(str(i) for i in ids)  # every row, none twice
    assert sum(1 for r in relays if r.published) >= 2  # the work was really shared


def test_the_relay_of_a_running_system_empties_the_outbox(make_system, new_product, db):
    system = make_system(workers=True)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(new_product(stock=2)), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]

    wait_for(
        lambda: (
            db.execute("SELECT status FROM orders.orders WHERE id = %s", (order_id,)).fetchone()["status"]
            == "COMPLETED"
        ),
        message="order COMPLETED",
    )
    wait_for(lambda: remaining(db, order_id) == 0, message="the order's events relayed and deleted")


def test_under_a_backlog_a_full_batch_stays_in_flight_while_the_next_goes_out(settings, db, listener):
    aggregate = str(uuid.uuid4())
    ids = [str(i) for i in write_events(settings, aggregate, 25)]
    relay = make_relay(settings, batch=10)
    try:
        assert relay.run_once() == 0  # the first full batch is published and left unsettled
        first: list[str] = []
        wait_for(
            lambda: first.extend(b["id"] for _, b in listener() if b["aggregateId"] == aggregate) or len(first) >= 10,
            5,
            message="the first batch published",
        )
        assert first == ids[:10]
        assert remaining(db, aggregate) == 25  # not deleted before its confirms are collected
        assert relay.run_once() == 10  # the second batch went out, then the first was settled
        assert remaining(db, aggregate) == 15
        assert relay.run_once() == 15  # the second batch, and the last: not full, so settled at once
        assert remaining(db, aggregate) == 0
        rest = [b["id"] for _, b in listener() if b["aggregateId"] == aggregate]
        assert first + rest == ids  # in outbox order, each once
    finally:
        relay.publisher.close()
        relay._reset()


def test_a_batch_given_up_in_flight_stays_in_the_outbox_and_goes_out_again(settings, db, listener):
    aggregate = str(uuid.uuid4())
    ids = [str(i) for i in write_events(settings, aggregate, 10)]
    relay = make_relay(settings, batch=10)
    relay.run_once()
    relay.publisher.close()
    relay._reset()  # an error (or a crash) with a batch in flight: its transaction rolls back
    assert remaining(db, aggregate) == 10
    again = make_relay(settings, batch=10)
    try:
        relay_all(again, db, aggregate)
    finally:
        again.publisher.close()
        again._reset()
    got = [b["id"] for _, b in listener() if b["aggregateId"] == aggregate]
    assert got == ids + ids  # published twice (the inboxes absorb that), never lost


def test_a_stopping_relay_settles_its_batch_in_flight(settings, db, listener):
    aggregate = str(uuid.uuid4())
    write_events(settings, aggregate, 10)
    relay = make_relay(settings, batch=10)
    stop = threading.Event()
    relay.run_once()
    assert remaining(db, aggregate) == 10
    stop.set()
    relay.run(stop)  # returns at once: stopped before its first pass, it settles what it holds
    assert remaining(db, aggregate) == 0
