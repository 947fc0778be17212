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
    from tests.conftest import wait_for

    wait_for(
        lambda: (
            db.execute("SELECT status FROM orders.orders WHERE id = %s", (order_id,)).fetchone()["status"]
            == "COMPLETED"
        ),
        message="order COMPLETED",
    )
    wait_for(lambda: remaining(db, order_id) == 0, message="the order's events relayed and deleted")
