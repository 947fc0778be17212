"""Mandatory publishes (issue 10 item 2, SPEC §2): an event no queue takes stays in the outbox, marked and reported.

Each test uses an event type of its own that nothing in the session's vhost is bound to, next to a routable
one (bound to a private queue of the test), written in the same transaction so both relays see them in one batch.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import psycopg
import pytest

from pulse.cli.relay import relay_status
from pulse.events import Envelope
from pulse.infra import broker, outbox
from pulse.infra.relay_cdc import CdcRelay
from pulse.infra.relay_polling import PollingRelay
from pulse.tools.check import invariants
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


class Queue:
    """A private exclusive queue on the outbox exchange; ``bind(key)`` makes ``key`` routable."""

    def __init__(self, amqp_url: str):
        self.conn = broker.connect(amqp_url)
        self.channel = self.conn.channel()
        self.channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
        self.name = self.channel.queue_declare("", exclusive=True).method.queue

    def bind(self, key: str) -> None:
        self.channel.queue_bind(self.name, broker.EXCHANGE, routing_key=key)

    def ids(self) -> list[str]:
        got = []
        while True:
            method, _props, body = self.channel.basic_get(self.name, auto_ack=True)
            if method is None:
                return got
            got.append(json.loads(body)["id"])

    def close(self):
        if self.conn.is_open:
            self.conn.close()


@pytest.fixture
def queue(settings):
    q = Queue(settings.amqp_url)
    yield q
    q.close()


@pytest.fixture
def keys():
    """(routable, unroutable) event types unique to this test."""
    tag = uuid.uuid4().hex[:8].upper()
    return f"MANDATORY_OK_{tag}", f"NOBODY_LISTENS_{tag}"


def write(url: str, routable: str, unroutable: str) -> tuple[str, str, str]:
    """One transaction: a routable event, then an unroutable one; returns (aggregate, routable id, unroutable id)."""
    aggregate = str(uuid.uuid4())
    with psycopg.connect(url) as conn, conn.transaction():
        ok = outbox.append(conn, routable, "TEST", aggregate, {"n": 1})
        lost = outbox.append(conn, unroutable, "TEST", aggregate, {"n": 2})
    return aggregate, str(ok), str(lost)


def row(db, event_id: str):
    return db.execute("SELECT * FROM shared.outbox WHERE id = %s", (event_id,)).fetchone()


def assert_reported(db, settings, caplog, unroutable: str, event_id: str) -> None:
    """The row stays, marked; the relay's log, `pulse relay status` and `pulse check` all name it."""
    left = row(db, event_id)
    assert left is not None, "an unroutable event was confirmed and deleted from the outbox: lost"
    assert left["unroutable_at"] is not None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and unroutable in r.getMessage()]
    assert warned and "no queue is bound to it" in warned[0], caplog.text
    status = relay_status(settings)
    assert status["unroutable"]["rows"] >= 1 and status["unroutable"]["oldestAt"]
    assert any("unroutable" in w for w in status["warnings"])
    result = invariants.events_routed(db, invariants.Scope())
    assert not result.passed and unroutable in result.details
    assert event_id in [str(i) for i in result.offending]


def test_the_publisher_tells_unroutable_from_confirmed_per_envelope(settings, queue, keys):
    routable, unroutable = keys
    queue.bind(routable)
    envs = [
        Envelope(id=uuid.uuid4(), event_type=t, aggregate_id="a", payload={})
        for t in (routable, unroutable, routable, unroutable)
    ]
    publisher = broker.ConfirmingPublisher(settings.amqp_url)
    try:
        D = broker.Delivery
        assert publisher.publish_batch(envs) == [D.CONFIRMED, D.UNROUTABLE, D.CONFIRMED, D.UNROUTABLE]
        assert publisher.publish_batch(envs[:1]) == [D.CONFIRMED]  # no return carried over from the last batch
    finally:
        publisher.close()
    assert queue.ids() == [str(envs[0].id), str(envs[2].id), str(envs[0].id)]


def test_polling_keeps_an_unroutable_event_and_retries_it_once_bound(settings, db, queue, keys, caplog):
    routable, unroutable = keys
    queue.bind(routable)
    relay = PollingRelay(settings.database_url, broker.ConfirmingPublisher(settings.amqp_url), unroutable_retry_s=0.3)
    aggregate, ok_id, lost_id = write(settings.database_url, routable, unroutable)
    try:
        with caplog.at_level(logging.WARNING, logger="pulse.infra.relay_polling"):
            deadline = time.monotonic() + 10
            while row(db, ok_id) is not None and time.monotonic() < deadline:
                relay.run_once()
        assert row(db, ok_id) is None, "the routable event of the batch is delivered and deleted"
        assert queue.ids() == [ok_id]
        assert_reported(db, settings, caplog, unroutable, lost_id)

        marked_at = row(db, lost_id)["unroutable_at"]
        assert relay.run_once() == 0  # marked rows are not claimed again on every pass
        assert row(db, lost_id)["unroutable_at"] == marked_at

        queue.bind(unroutable)  # a binding appears: the slow retry delivers the event
        wait_for(lambda: relay.run_once() or row(db, lost_id) is None, 10, message="retry delivered the event")
        assert row(db, lost_id) is None
        assert queue.ids() == [lost_id]
        assert unroutable not in invariants.events_routed(db, invariants.Scope()).details
    finally:
        relay.publisher.close()
        relay._reset()
        db.execute("DELETE FROM shared.outbox WHERE aggregate_id = %s", (aggregate,))


@pytest.fixture
def cdc(settings, db):
    """Settings in cdc mode on a fresh slot, dropped afterwards."""
    s = settings.replace(outbox_mode="cdc")
    db.execute("DELETE FROM shared.outbox")
    yield s
    wait_for(
        lambda: (
            not (
                r := db.execute(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (s.cdc_slot,)
                ).fetchone()
            )
            or not r["active"]
        ),
        10,
        message="slot released",
    )
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (s.cdc_slot,)
    )
    db.execute("DELETE FROM shared.outbox")
    db.execute("DELETE FROM infra.relay_heartbeat")


def test_cdc_keeps_an_unroutable_event_and_moves_the_slot_past_it(cdc, db, queue, keys, caplog):
    routable, unroutable = keys
    queue.bind(routable)
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    relay.unroutable_retry_s = 0.3
    try:
        with caplog.at_level(logging.WARNING):
            wait_for(lambda: relay.run_once() >= 0 and relay.ready, 20, message="cdc relay streaming")
            aggregate, ok_id, lost_id = write(cdc.database_url, routable, unroutable)
            end = db.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()["l"]
            wait_for(lambda: relay.run_once() >= 0 and row(db, ok_id) is None, 10, message="routable row deleted")
            assert queue.ids() == [ok_id]
            assert_reported(db, cdc, caplog, unroutable, lost_id)
            # The slot is not stuck behind the unroutable event: it moves past its transaction.
            wait_for(
                lambda: (
                    relay.run_once() >= 0
                    and db.execute(
                        "SELECT confirmed_flush_lsn >= %s::pg_lsn AS past FROM pg_replication_slots WHERE slot_name = %s",
                        (end, cdc.cdc_slot),
                    ).fetchone()["past"]
                ),
                10,
                message="slot confirmed past the unroutable event",
            )
            assert row(db, lost_id) is not None
            # Later events still flow.
            _, ok2, lost2 = write(cdc.database_url, routable, unroutable)
            wait_for(lambda: relay.run_once() >= 0 and ok2 in queue.ids(), 10, message="later events relayed")
            wait_for(
                lambda: relay.run_once() >= 0 and (r := row(db, lost2)) and r["unroutable_at"],
                10,
                message="second unroutable event marked",
            )

            queue.bind(unroutable)
            wait_for(
                lambda: relay.run_once() >= 0 and row(db, lost_id) is None and row(db, lost2) is None,
                10,
                message="the cdc relay's retry delivered the events once bound",
            )
            assert set(queue.ids()) == {lost_id, lost2}
    finally:
        relay.close()


def test_cdc_start_up_sweep_marks_leftover_unroutable_rows_and_finishes(cdc, db, queue, keys):
    """Rows the slot does not cover go out through the start-up sweep; an unroutable one is marked, kept, and
    does not keep the sweep going round (it used to stop when every row it selected had been deleted)."""
    routable, unroutable = keys
    queue.bind(routable)
    _, ok_id, lost_id = write(cdc.database_url, routable, unroutable)  # before the slot exists
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        wait_for(lambda: relay.run_once() >= 0 and relay.ready, 20, message="start-up sweep finished")
        assert row(db, ok_id) is None and queue.ids() == [ok_id]
        assert row(db, lost_id)["unroutable_at"] is not None
    finally:
        relay.close()


def test_two_batches_out_at_once_get_their_own_answers(settings, queue, keys):
    routable, unroutable = keys
    queue.bind(routable)

    def envs(*types):
        return [Envelope(id=uuid.uuid4(), event_type=t, aggregate_id="a", payload={}) for t in types]

    first, second = envs(routable, unroutable), envs(routable, routable)
    publisher = broker.ConfirmingPublisher(settings.amqp_url)
    try:
        D = broker.Delivery
        a, b = publisher.publish(first), publisher.publish(second)
        assert publisher.confirm(b) == [D.CONFIRMED, D.CONFIRMED]  # answered out of order: no return of `first`
        assert publisher.confirm(a) == [D.CONFIRMED, D.UNROUTABLE]
        stale = publisher.publish(envs(routable))
        publisher.close()  # the channel it went out on is gone: its answers never come
        assert publisher.confirm(stale) == [D.UNCONFIRMED]
    finally:
        publisher.close()
