"""The polling outbox relay: claim rows, publish with confirms, delete what the broker confirmed.

Polling needs nothing from PostgreSQL beyond a table, so it is the default and the fallback when the server
cannot do logical decoding. Its claim, delete and mark statements are :mod:`pulse.infra.outbox`'s; what a
broker's answer means for a row (unroutable kept and retried) is :mod:`pulse.infra.relay_publish`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import psycopg

from pulse.faults import NO_FAULTS, FaultInjected, NoFaults, naive_on
from pulse.infra import broker, db, outbox
from pulse.infra.outbox import CLAIM, envelope_of  # noqa: F401 - CLAIM is shown in notebook 03
from pulse.infra.relay_publish import UNROUTABLE_RETRY_S, publish_unconfirmed, report_unroutable, retry_unroutable

log = logging.getLogger(__name__)


class PollingRelay:
    """One pass claims up to ``batch`` rows with FOR UPDATE SKIP LOCKED (so several relays never
    publish the same row at once), publishes them, waits for the confirms of the whole batch and
    deletes only confirmed rows in the same transaction that held the claim. A crash before the
    commit leaves the rows in place: they are published again (duplicates, absorbed by the inboxes),
    never lost. Under a backlog one full batch stays in flight while the next is claimed and published
    (see ``_relay_batch``): two transactions, on two connections, at most.
    """

    def __init__(
        self,
        database_url: str,
        publisher: broker.ConfirmingPublisher,
        *,
        batch: int = 500,
        poll_s: float = 0.05,
        faults: NoFaults | None = None,
        naive: frozenset[str] = frozenset(),
        unroutable_retry_s: float = UNROUTABLE_RETRY_S,
    ) -> None:
        self.database_url, self.publisher = database_url, publisher
        self.batch, self.poll_s, self.faults = batch, poll_s, faults or NO_FAULTS
        self.naive = naive
        self.unroutable_retry_s = unroutable_retry_s
        self._retry_at = 0.0  # the first pass retries at once: a restart may follow a fixed binding
        self.published = 0
        self.last_publish_at: float | None = None
        self._conns: list[db.Conn | None] = [None, None]
        self._in_flight: _InFlight | None = None

    def run_once(self) -> int:
        """Relay one batch (and, every ``unroutable_retry_s``, the unroutable rows); returns how many events the
        broker confirmed. A full batch may be left in flight: the next call settles it."""
        conn = self._connection()
        retried = 0
        if time.monotonic() >= self._retry_at:
            retried = retry_unroutable(conn, self.publisher, self.batch, self.unroutable_retry_s, log)
            self._retry_at = time.monotonic() + self.unroutable_retry_s
            self._count(retried)
        return retried + self._relay_batch(conn)

    def _relay_batch(self, conn: db.Conn) -> int:
        """Claim and publish the next batch, then settle the one still in flight, if any.

        A full batch means a backlog: it stays in flight (claimed, published, its transaction open) while the next
        one is claimed and sent on the other connection, so the broker confirms one batch while the relay
        prepares the next instead of idling through every claim, delete and commit. A batch that is not full
        is settled at once: with no backlog there is nothing to overlap, and its rows should not wait.
        """
        if self._naive():
            return self._settle_in_flight() + self._relay_unconfirmed(conn)
        older, self._in_flight = self._in_flight, None
        try:
            current = self._start(conn)
        except BaseException:
            if older is not None:
                self._abandon(older)
            raise
        relayed = 0
        try:
            if older is not None:
                relayed += self._finish(older)
        except BaseException:
            if current is not None:
                self._abandon(current)
            raise
        if current is not None:
            if len(current.rows) >= self.batch:
                self._in_flight = current
            else:
                relayed += self._finish(current)
        return relayed

    def _start(self, conn: db.Conn) -> _InFlight | None:
        """Claim a batch in a transaction of ``conn`` left open, and publish it without waiting for the broker."""
        transaction = contextlib.ExitStack()
        transaction.enter_context(conn.transaction())
        try:
            rows = outbox.claim(conn, self.batch)
            if not rows:
                transaction.close()
                return None
            pending = self.publisher.publish([envelope_of(r) for r in rows])
        except BaseException:
            _roll_back(transaction)
            raise
        return _InFlight(conn, transaction, rows, pending)

    def _finish(self, batch: _InFlight) -> int:
        """Collect the broker's answers to a batch in flight, delete what it confirmed, mark what it returned, commit."""
        try:
            outcomes = self.publisher.confirm(batch.pending)
            self.faults.point("relay.after_publish", events=len(batch.rows))
            confirmed, unroutable, _ = broker.sort_out(batch.rows, outcomes)
            ids = [r["id"] for r in confirmed]
            outbox.delete(batch.conn, ids)
            outbox.mark_unroutable(batch.conn, [r["id"] for r in unroutable])
        except BaseException:
            self._abandon(batch)
            raise
        batch.transaction.close()
        self._count(len(ids))
        report_unroutable([r["event_type"] for r in unroutable], self.unroutable_retry_s, log)
        refused = len(batch.rows) - len(ids) - len(unroutable)
        if refused:
            log.warning("broker refused %d of %d events; they stay in the outbox", refused, len(batch.rows))
        return len(ids)

    def _abandon(self, batch: _InFlight) -> None:
        """Give a batch in flight up: its rows stay in the outbox and go out again (duplicates, never a loss)."""
        self.publisher.forget(batch.pending)
        _roll_back(batch.transaction)

    def _settle_in_flight(self) -> int:
        batch, self._in_flight = self._in_flight, None
        return self._finish(batch) if batch is not None else 0

    def _relay_unconfirmed(self, conn: db.Conn) -> int:
        """The lab's naive mode: rows deleted as soon as the client library took the messages (issue 4)."""
        with conn.transaction():
            rows = outbox.claim(conn, self.batch)
            if not rows:
                return 0
            flush = publish_unconfirmed(self.publisher, [envelope_of(r) for r in rows])
            outbox.delete(conn, [r["id"] for r in rows])
        # The rows are gone and only now does the client write to the socket.
        self.faults.point("relay.after_publish", events=len(rows))
        flush()
        self._count(len(rows))
        return len(rows)

    def _count(self, n: int) -> None:
        if n:
            self.published += n
            self.last_publish_at = time.time()

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, backing off while PostgreSQL or RabbitMQ is down."""
        backoff = 0.5
        while not stop.is_set():
            try:
                if self.run_once() == 0 and self._in_flight is None:
                    stop.wait(self.poll_s)
                backoff = 0.5
            except Exception as exc:  # the relay thread must outlive any single failed batch (outage, fault)
                level = (
                    logging.WARNING
                    if isinstance(exc, (broker.BrokerUnavailable, psycopg.Error, db.DatabaseUnavailable, FaultInjected))
                    else logging.ERROR
                )
                log.log(
                    level,
                    "polling relay: %s; retrying in %.1fs",
                    db.first_line(exc),
                    backoff,
                    exc_info=level == logging.ERROR,
                )
                self._reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        with contextlib.suppress(Exception):  # on the way out: what it cannot settle goes out again next start
            self._settle_in_flight()
        self._reset()
        self.publisher.close()

    def _naive(self) -> bool:
        return naive_on("publish-no-confirm", self.naive, self.faults)

    def _connection(self) -> db.Conn:
        """An open connection that no batch in flight holds (there are two: one per batch in flight)."""
        busy = self._in_flight.conn if self._in_flight is not None else None
        for i, conn in enumerate(self._conns):
            if conn is not None and conn is busy:
                continue
            if conn is None or conn.closed:
                # Bounded waits: a claim stuck behind a lock (DDL of a restarting peer) fails and is retried
                # instead of silently stopping the relay.
                conn = self._conns[i] = db.connect(
                    self.database_url,
                    autocommit=True,
                    options="-c lock_timeout=5s -c statement_timeout=30s",
                    application_name=f"pulse-relay-polling:{os.getpid()}",
                )
            return conn
        raise AssertionError("both relay connections are busy")  # at most one batch is ever in flight

    def _reset(self) -> None:
        """Give up a batch in flight and close the connections (after an error, or on the way out)."""
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            self._abandon(batch)
        for i, conn in enumerate(self._conns):
            if conn is not None:
                with contextlib.suppress(Exception):  # a dead connection may fail to close; we discard it anyway
                    conn.close()
            self._conns[i] = None


@dataclasses.dataclass
class _InFlight:
    """A batch claimed in ``conn``'s open ``transaction`` and published; :meth:`PollingRelay._finish` settles it."""

    conn: db.Conn
    transaction: contextlib.ExitStack
    rows: list[dict[str, Any]]
    pending: broker.Pending


def _roll_back(transaction: contextlib.ExitStack) -> None:
    with contextlib.suppress(Exception):  # the connection may be gone, which rolls back just the same
        transaction.__exit__(RuntimeError, RuntimeError("batch given up"), None)
