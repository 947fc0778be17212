"""The polling outbox relay: claim rows, publish with confirms, delete what the broker confirmed.

Polling needs nothing from PostgreSQL beyond a table, so it is the default and the fallback when the server
cannot do logical decoding. Its claim, delete and mark statements are :mod:`pulse.infra.outbox`'s; what a
broker's answer means for a row (unroutable kept and retried) is :mod:`pulse.infra.relay_publish`'s.
"""

from __future__ import annotations

import contextlib
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
    never lost.
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
        self._conn: db.Conn | None = None

    def run_once(self) -> int:
        """Relay one batch (and, every ``unroutable_retry_s``, the unroutable rows); returns how many events the
        broker confirmed."""
        conn = self._connection()
        retried = 0
        if time.monotonic() >= self._retry_at:
            retried = retry_unroutable(conn, self.publisher, self.batch, self.unroutable_retry_s, log)
            self._retry_at = time.monotonic() + self.unroutable_retry_s
            self._count(retried)
        return retried + self._relay_batch(conn)

    def _relay_batch(self, conn: db.Conn) -> int:
        unroutable: list[dict[str, Any]] = []
        with conn.transaction():
            rows = outbox.claim(conn, self.batch)
            if not rows:
                return 0
            if self._naive():
                flush = publish_unconfirmed(self.publisher, [envelope_of(r) for r in rows])
                confirmed = rows
            else:
                flush = None
                outcomes = self.publisher.publish_batch([envelope_of(r) for r in rows])
                self.faults.point("relay.after_publish", events=len(rows))
                confirmed, unroutable, _ = broker.sort_out(rows, outcomes)
            ids = [r["id"] for r in confirmed]
            outbox.delete(conn, ids)
            outbox.mark_unroutable(conn, [r["id"] for r in unroutable])
        if flush is not None:
            # Naive mode: the rows are gone and only now does the client write to the socket.
            self.faults.point("relay.after_publish", events=len(rows))
            flush()
        self._count(len(ids))
        report_unroutable([r["event_type"] for r in unroutable], self.unroutable_retry_s, log)
        refused = len(rows) - len(ids) - len(unroutable)
        if refused:
            log.warning("broker refused %d of %d events; they stay in the outbox", refused, len(rows))
        return len(ids)

    def _count(self, n: int) -> None:
        if n:
            self.published += n
            self.last_publish_at = time.time()

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, backing off while PostgreSQL or RabbitMQ is down."""
        backoff = 0.5
        while not stop.is_set():
            try:
                if self.run_once() == 0:
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
        self._reset()
        self.publisher.close()

    def _naive(self) -> bool:
        return naive_on("publish-no-confirm", self.naive, self.faults)

    def _connection(self) -> db.Conn:
        if self._conn is None or self._conn.closed:
            # Bounded waits: a claim stuck behind a lock (DDL of a restarting peer) fails and is retried
            # instead of silently stopping the relay.
            self._conn = db.connect(
                self.database_url,
                autocommit=True,
                options="-c lock_timeout=5s -c statement_timeout=30s",
                application_name=f"pulse-relay-polling:{os.getpid()}",
            )
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close; we discard it anyway
                self._conn.close()
        self._conn = None
