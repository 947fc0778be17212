"""The polling outbox relay: claim rows, publish with confirms, delete what the broker confirmed."""

from __future__ import annotations

import logging
import os
import threading
import time

import pika
import psycopg

from pulse.faults import NO_FAULTS, FaultInjected, naive_on
from pulse.infra import broker, db
from pulse.infra.outbox import envelope_of

log = logging.getLogger(__name__)

# Why seq order is the commit order that matters: a table row only becomes visible at its commit, so a
# poll sees committed rows only, in insert order. Two rows can be claimed out of commit order only when
# their transactions overlapped, i.e. were concurrent and so independent; every saga step is written by
# a handler that ran after the previous step's event was published, so the events of one order are
# always in both insert and commit order. Exact commit order across unrelated transactions needs the
# WAL (the cdc relay) or serialising every writer on one lock, which this relay does not pay for.
CLAIM = ("SELECT id, aggregate_type, aggregate_id, event_type, payload FROM shared.outbox "
         "ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED")


class PollingRelay:
    """One pass claims up to ``batch`` rows with FOR UPDATE SKIP LOCKED (so several relays never
    publish the same row at once), publishes them, waits for the confirms of the whole batch and
    deletes only confirmed rows in the same transaction that held the claim. A crash before the
    commit leaves the rows in place: they are published again (duplicates, absorbed by the inboxes),
    never lost.
    """

    def __init__(self, database_url: str, publisher: broker.ConfirmingPublisher, *, batch: int = 500,
                 poll_s: float = 0.05, faults=None, naive: frozenset = frozenset()):
        self.database_url, self.publisher = database_url, publisher
        self.batch, self.poll_s, self.faults = batch, poll_s, faults or NO_FAULTS
        self.naive = naive
        self.published = 0
        self.last_publish_at: float | None = None
        self._conn = None

    def run_once(self) -> int:
        """Relay one batch; returns how many events the broker confirmed."""
        conn = self._connection()
        with conn.transaction():
            rows = conn.execute(CLAIM, (self.batch,)).fetchall()
            if not rows:
                return 0
            if self._naive():
                flush = publish_unconfirmed(self.publisher, [envelope_of(r) for r in rows])
                confirmed = [True] * len(rows)
            else:
                flush = None
                confirmed = self.publisher.publish_batch([envelope_of(r) for r in rows])
                self.faults.point("relay.after_publish")
            ids = [r["id"] for r, ok in zip(rows, confirmed) if ok]
            if ids:
                conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", (ids,))
        if flush is not None:
            # Naive mode: the rows are gone and only now does the client write to the socket.
            self.faults.point("relay.after_publish")
            flush()
        self.published += len(ids)
        self.last_publish_at = time.time()
        if len(ids) < len(rows):
            log.warning("broker refused %d of %d events; they stay in the outbox", len(rows) - len(ids), len(rows))
        return len(ids)

    def run(self, stop: threading.Event):
        """Relay until ``stop`` is set, backing off while PostgreSQL or RabbitMQ is down."""
        backoff = 0.5
        while not stop.is_set():
            try:
                if self.run_once() == 0:
                    stop.wait(self.poll_s)
                backoff = 0.5
            except Exception as exc:  # the relay thread must outlive any single failed batch (outage, fault)
                level = logging.WARNING if isinstance(exc, (broker.BrokerUnavailable, psycopg.Error,
                                                            db.DatabaseUnavailable, FaultInjected)) else logging.ERROR
                log.log(level, "polling relay: %s; retrying in %.1fs", db.first_line(exc), backoff,
                        exc_info=level == logging.ERROR)
                self._reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._reset()
        self.publisher.close()

    def _naive(self) -> bool:
        return naive_on("publish-no-confirm", self.naive, self.faults)

    def _connection(self):
        if self._conn is None or self._conn.closed:
            # Bounded waits: a claim stuck behind a lock (DDL of a restarting peer) fails and is retried
            # instead of silently stopping the relay.
            self._conn = db.connect(self.database_url, autocommit=True,
                                    options="-c lock_timeout=5s -c statement_timeout=30s",
                                    application_name=f"pulse-relay-polling:{os.getpid()}")
        return self._conn

    def _reset(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a dead connection may fail to close; we are discarding it anyway
                pass
        self._conn = None


def publish_unconfirmed(publisher: broker.ConfirmingPublisher, envelopes) -> object:
    """The lab's naive publish (issue 4, ``publish-no-confirm``): hand the messages to the client library
    and return at once; the returned ``flush()`` writes them to the socket. Whoever deletes the outbox
    rows before that (as the original did, trusting "publish returned") loses the batch in a crash.
    Delivery tags are still counted so the confirming path stays in step when the switch goes off."""
    publisher._ensure_open()
    channel = publisher._channel
    for env in envelopes:
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=str(env.id),
                                     type=env.event_type)
        channel._impl.basic_publish(broker.EXCHANGE, env.event_type, env.to_json(), props)
        publisher._next_tag += 1
    return lambda: channel._flush_output(lambda: True)
