"""The polling outbox relay: claim rows, publish with confirms, delete what the broker confirmed."""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from pulse.infra import broker, db
from pulse.infra.outbox import envelope_of

log = logging.getLogger(__name__)

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
                 poll_s: float = 0.05, faults=None):
        self.database_url, self.publisher = database_url, publisher
        self.batch, self.poll_s, self.faults = batch, poll_s, faults
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
            confirmed = self.publisher.publish_batch([envelope_of(r) for r in rows])
            if self.faults is not None:
                self.faults.point("relay.after_publish")
            ids = [r["id"] for r, ok in zip(rows, confirmed) if ok]
            if ids:
                conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", (ids,))
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
            except (broker.BrokerUnavailable, psycopg.Error, db.DatabaseUnavailable) as exc:
                log.warning("polling relay: %s; retrying in %.1fs", db.first_line(exc), backoff)
                self._reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self._reset()
        self.publisher.close()

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url, autocommit=True)
        return self._conn

    def _reset(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a dead connection may fail to close; we are discarding it anyway
                pass
        self._conn = None
