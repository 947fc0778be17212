"""The polling outbox relay: claim rows, publish with confirms, delete what the broker confirmed.

An event no queue is bound to is returned by the broker (mandatory publish): its row is marked ``unroutable_at``
and kept, because deleting it would lose the event for good while a missing binding is usually a deploy or
topology slip that gets fixed. Marked rows leave the claim, so they neither block nor spin the relay, and a slow
retry pass (``unroutable_retry_s``) publishes them again, so an event goes out once a queue is bound to its type.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import pika
import psycopg
from psycopg.rows import dict_row

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
         "WHERE unroutable_at IS NULL ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED")
CLAIM_UNROUTABLE = ("SELECT id, aggregate_type, aggregate_id, event_type, payload, seq FROM shared.outbox "
                    "WHERE unroutable_at IS NOT NULL AND seq > %s ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED")
UNROUTABLE_RETRY_S = 30.0


class PollingRelay:
    """One pass claims up to ``batch`` rows with FOR UPDATE SKIP LOCKED (so several relays never
    publish the same row at once), publishes them, waits for the confirms of the whole batch and
    deletes only confirmed rows in the same transaction that held the claim. A crash before the
    commit leaves the rows in place: they are published again (duplicates, absorbed by the inboxes),
    never lost.
    """

    def __init__(self, database_url: str, publisher: broker.ConfirmingPublisher, *, batch: int = 500,
                 poll_s: float = 0.05, faults=None, naive: frozenset = frozenset(),
                 unroutable_retry_s: float = UNROUTABLE_RETRY_S):
        self.database_url, self.publisher = database_url, publisher
        self.batch, self.poll_s, self.faults = batch, poll_s, faults or NO_FAULTS
        self.naive = naive
        self.unroutable_retry_s = unroutable_retry_s
        self._retry_at = 0.0  # the first pass retries at once: a restart may follow a fixed binding
        self.published = 0
        self.last_publish_at: float | None = None
        self._conn = None

    def run_once(self) -> int:
        """Relay one batch (and, every ``unroutable_retry_s``, the unroutable rows); returns how many events the
        broker confirmed."""
        conn = self._connection()
        retried = 0
        if time.monotonic() >= self._retry_at:
            retried = retry_unroutable(conn, self.publisher, self.batch, self.unroutable_retry_s)
            self._retry_at = time.monotonic() + self.unroutable_retry_s
            self._count(retried)
        return retried + self._relay_batch(conn)

    def _relay_batch(self, conn) -> int:
        unroutable = []
        with conn.transaction():
            rows = conn.execute(CLAIM, (self.batch,)).fetchall()
            if not rows:
                return 0
            if self._naive():
                flush = publish_unconfirmed(self.publisher, [envelope_of(r) for r in rows])
                confirmed = rows
            else:
                flush = None
                outcomes = self.publisher.publish_batch([envelope_of(r) for r in rows])
                self.faults.point("relay.after_publish")
                confirmed, unroutable, _ = broker.sort_out(rows, outcomes)
            ids = [r["id"] for r in confirmed]
            if ids:
                conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", (ids,))
            mark_unroutable(conn, [r["id"] for r in unroutable])
        if flush is not None:
            # Naive mode: the rows are gone and only now does the client write to the socket.
            self.faults.point("relay.after_publish")
            flush()
        self._count(len(ids))
        report_unroutable([r["event_type"] for r in unroutable], self.unroutable_retry_s)
        refused = len(rows) - len(ids) - len(unroutable)
        if refused:
            log.warning("broker refused %d of %d events; they stay in the outbox", refused, len(rows))
        return len(ids)

    def _count(self, n: int) -> None:
        if n:
            self.published += n
            self.last_publish_at = time.time()

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


def mark_unroutable(conn, ids) -> int:
    """Mark the rows of events the broker returned as unroutable (keeping the first mark); returns rows found."""
    if not ids:
        return 0
    return conn.execute("UPDATE shared.outbox SET unroutable_at = coalesce(unroutable_at, now()) "
                        "WHERE id = ANY(%s)", (list(ids),)).rowcount


def report_unroutable(event_types, retry_s: float, logger: logging.Logger = log) -> None:
    """One WARNING line for a batch's unroutable events: their types and counts."""
    if not event_types:
        return
    counts = collections.Counter(event_types)
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    logger.warning("unroutable: %s event(s) returned by RabbitMQ, no queue is bound to it; they stay in the outbox "
                   "(unroutable_at) and are retried every %gs", kinds, retry_s)


def retry_unroutable(conn, publisher: broker.ConfirmingPublisher, batch: int,
                     retry_s: float = UNROUTABLE_RETRY_S, logger: logging.Logger = log) -> int:
    """Publish the rows marked unroutable again, oldest first, and delete those the broker now routed and confirmed.

    Rows still unroutable keep their first mark (how long the event has waited); rows the broker did not confirm
    stay as they are. Returns how many were delivered."""
    delivered, after = 0, 0
    while True:
        with conn.transaction():
            rows = conn.cursor(row_factory=dict_row).execute(CLAIM_UNROUTABLE, (after, batch)).fetchall()
            if not rows:
                break
            outcomes = publisher.publish_batch([envelope_of(r) for r in rows])
            confirmed, unroutable, _ = broker.sort_out(rows, outcomes)
            if confirmed:
                conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", ([r["id"] for r in confirmed],))
            after = rows[-1]["seq"]
        delivered += len(confirmed)
        if confirmed:
            logger.info("delivered %d event(s) that were unroutable before: a queue is bound to them now",
                        len(confirmed))
        if unroutable:
            report_unroutable([r["event_type"] for r in unroutable], retry_s, logger)
        if len(rows) < batch:
            break
    return delivered


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
