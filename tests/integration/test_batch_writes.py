"""A consumer batch writes its outbox rows in one INSERT at its end (in order, only if the batch commits), and
never commits an inbox claim taken up front that no handler read."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest

from pulse import topology
from pulse.events import Envelope, OrderUpdated
from pulse.events import EventType as E
from pulse.infra import db as pulse_db
from pulse.infra import outbox
from pulse.infra.consumer import Consumer
from tests.conftest import wait_for
from tests.integration.support import publish

pytestmark = pytest.mark.integration


def rows_of(conn, aggregate_id) -> list[str]:
    return [
        r["event_type"]
        for r in conn.execute(
            "SELECT event_type FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq", (aggregate_id,)
        ).fetchall()
    ]


def test_a_batch_writes_its_outbox_rows_once_at_its_end_in_order(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.batch(system.deps.pool) as current:
        for kind in ("FIRST", "SECOND", "THIRD"):
            outbox.append(current.conn, kind, "ORDER", aggregate, {"orderId": aggregate})
        # Buffered: not even the batch's own transaction sees them before the end.
        assert rows_of(current.conn, aggregate) == []
    assert rows_of(db, aggregate) == ["FIRST", "SECOND", "THIRD"]


def test_a_batch_that_fails_writes_no_outbox_row(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pytest.raises(RuntimeError), pulse_db.batch(system.deps.pool) as current:
        outbox.append(current.conn, "FIRST", "ORDER", aggregate, {"orderId": aggregate})
        raise RuntimeError("a handler failed")
    assert rows_of(db, aggregate) == []
    with pulse_db.batch(system.deps.pool) as current:  # and the next batch on this thread starts empty
        outbox.append(current.conn, "SECOND", "ORDER", aggregate, {"orderId": aggregate})
    assert rows_of(db, aggregate) == ["SECOND"]


def test_outside_a_batch_the_row_is_written_at_once(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.transaction(system.deps.pool) as conn:
        outbox.append(conn, "ALONE", "ORDER", aggregate, {"orderId": aggregate})
        assert rows_of(conn, aggregate) == ["ALONE"]


def test_a_batch_whose_handler_never_reads_its_up_front_claim_is_not_committed(settings, system, db, channel):
    """A route declared ``claims_always`` whose handler does not claim: committing the batch would mark its events
    handled with no effect (and drop their redeliveries), so the consumer rolls the batch back and takes each
    message alone, where nothing is claimed up front."""
    queue = f"test-claims-{uuid.uuid4().hex[:10]}"
    channel.queue_declare(queue, durable=True)
    inbox = "orders.order_view_inbox"
    calls: list[uuid.UUID] = []
    spec = topology.Queue(
        queue,
        "test",
        inbox,
        routes=(
            topology.Route(
                E.ORDER_UPDATED,
                lambda deps, event_id, event: calls.append(event_id),  # the bug: no inbox.claim
                claims_inbox=False,
                claims_always=True,
            ),
        ),
    )
    envelopes = [
        Envelope.of(
            OrderUpdated(
                order_id=str(uuid.uuid4()),
                user_id=str(uuid.uuid4()),
                strategy="OPTIMISTIC",
                status="PROCESSING",
                payment_status="NOT_STARTED",
                inventory_status="NOT_STARTED",
                failure_reason=None,
                total_amount="1.00",
                updated_at=dt.datetime.now(dt.UTC),
            )
        )
        for _ in range(4)
    ]
    publish(settings, envelopes, exchange="", routing_key=queue)  # all waiting: the consumer takes them as one batch
    consumer = Consumer(
        settings.amqp_url,
        queue,
        topology.Dispatcher(spec, system.deps),
        stop=threading.Event(),
        pool=system.deps.pool,
        batch=10,
        prefetch=10,
    )
    consumer.start()
    try:
        wait_for(lambda: consumer.handled == 4, message="the 4 messages acked")
    finally:
        consumer.stop.set()
        consumer.join(10)
        channel.queue_delete(queue)
    ids = [e.id for e in envelopes]
    assert set(calls) == set(ids)
    assert db.execute(f"SELECT count(*) AS n FROM {inbox} WHERE event_id = ANY(%s)", (ids,)).fetchone()["n"] == 0
