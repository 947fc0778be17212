"""The CDC outbox relay (``PULSE_OUTBOX_MODE=cdc``): publishes ``shared.outbox`` inserts as the WAL delivers them.

This module is the relay's policy: when a position may be confirmed, when rows are deleted, what the start-up
sweep covers. The stream and its decoding are :mod:`pulse.infra.pgoutput_stream`'s, the slot, publication and
relay lock :mod:`pulse.infra.cdc_slot`'s, the outbox statements :mod:`pulse.infra.outbox`'s.

Crash safety: the slot's confirmed position moves only by our standby status updates, which we send only for
transactions whose every event RabbitMQ confirmed (and whose rows we deleted). A crash anywhere replays from that
position: duplicates, absorbed by the inboxes; never a loss.

Unroutable events (no queue bound to their type; the publish is mandatory): the relay marks the row
``unroutable_at`` and keeps it, and treats the event as done for the slot, because the slot cannot hold one event
back without holding back every later one, and a binding may take days to appear. The marked row in the table is
then the event's only copy, so the relay retries the marked rows every ``unroutable_retry_s`` (the polling relay's
retry pass), and the start-up sweep publishes them too.

Idle slots: when nothing is pending, the relay confirms the walsender's keepalive position, as
pg_recvlogical does, so the WAL that other databases write does not pile up behind the slot.

Lost slots are dropped and created again (:func:`pulse.infra.cdc_slot.recreate`); each recreation is one WARNING
line and a row of ``infra.relay_slot_losses``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence

import psycopg
from psycopg.rows import TupleRow

from pulse.config import Settings
from pulse.events import Envelope
from pulse.faults import NO_FAULTS, FaultInjected, NoFaults, naive_on
from pulse.infra import broker, cdc_slot, cdc_sweep, db, outbox
from pulse.infra.cdc_slot import CdcUnavailable, SlotLost, lsn_text
from pulse.infra.cdc_slot import prepare as prepare  # `pulse db migrate` calls relay_cdc.prepare
from pulse.infra.pgoutput_stream import StreamEnded, Transaction, WalStream
from pulse.infra.relay_publish import UNROUTABLE_RETRY_S, publish_unconfirmed, report_unroutable, retry_unroutable

log = logging.getLogger(__name__)

# The relay's control connection (lock, slot, outbox statements): plain tuple rows.
ControlConn = psycopg.Connection[TupleRow]


def confirmed_prefix(transactions: Sequence[Transaction], confirmed: list[bool]) -> tuple[int | None, list[uuid.UUID]]:
    """The end LSN of the last transaction such that it and all before it were confirmed, and their event ids."""
    target, i = None, 0
    ids: list[uuid.UUID] = []
    for end_lsn, envelopes in transactions:
        flags = confirmed[i : i + len(envelopes)]
        i += len(envelopes)
        if not all(flags):
            break
        target = end_lsn
        ids.extend(e.id for e in envelopes)
    return target, ids


class CdcRelay:
    """Relays outbox inserts from a logical replication slot to RabbitMQ, at least once, in commit order.

    ``run(stop)`` is the worker loop (standby until it holds the relay lock); ``run_once()`` does one step
    (waiting at most the poll interval for events) and returns how many events the broker confirmed.
    ``published`` and ``last_publish_at`` count them.
    """

    standby_retry_s = 1.0
    heartbeat_s = 1.0
    idle_confirm_s = 1.0
    catch_up_limit_s = 15.0  # the walsender may decode other databases' WAL for seconds without sending anything
    max_backoff_s = 5.0
    undeleted_retry_s = 30.0
    unroutable_retry_s = UNROUTABLE_RETRY_S
    # Published events' rows are deleted, and the slot confirmed past them, once per this interval (and whenever
    # the stream goes quiet), not after every read: under load the walsender sends one or two transactions per
    # read, and a DELETE plus a commit per read cost PostgreSQL more than the saga's own writes.
    flush_s = 0.1

    def __init__(
        self, settings: Settings, publisher: broker.ConfirmingPublisher, faults: NoFaults | None = None
    ) -> None:
        self.settings, self.publisher, self.faults = settings, publisher, faults or NO_FAULTS
        self.slot, self.publication = settings.cdc_slot, settings.cdc_publication
        self.batch = max(1, settings.relay_batch)
        self.poll_s = settings.relay_poll_s
        self.published = 0
        self.batches = 0  # publish rounds: published / batches is the batch size the load produced
        self.last_publish_at: float | None = None
        self.slot_recreated_at: float | None = None  # when this relay last found its slot lost and made it again
        self.is_active = False
        self.started_at = time.time()
        self.app_name = f"pulse-relay pid={os.getpid()} host={socket.gethostname()}"[:63]
        self._conn: ControlConn | None = None
        self._stream: WalStream | None = None
        self._confirmed_lsn = 0  # the slot's position: every event before it was confirmed by the broker
        self._last_confirm = 0.0
        # Until the start-up sweep has run: how far the stream must read first (None once swept).
        self._sweep_after: cdc_sweep.CatchUp | None = None
        self._beat = (0.0, 0)
        self._undeleted: dict[uuid.UUID, float] = {}  # event id -> when its DELETE first found no row (see _delete)
        self._unflushed: list[uuid.UUID] = []  # ids of events the broker confirmed whose rows are not deleted yet
        self._unflushed_lsn: int | None = None  # the slot may move here once those rows are deleted
        self._last_flush = 0.0
        self._unroutable_retry_at = 0.0
        self._skip_to_present = False  # set when the lock is taken: see _start_stream
        self._check_wal_level()

    @property
    def ready(self) -> bool:
        """True once this relay holds the lock, streams the slot and has published the rows the slot misses."""
        return self.is_active and self._stream is not None and self._sweep_after is None

    # --- one step ---

    def run_once(self) -> int:
        """Take the relay lock if free, then relay what the stream delivers within the poll interval."""
        conn = self._connection()
        if not self.is_active and not self._try_lock(conn):
            return 0
        if self._stream is None:
            self._start_up(conn)
        count = self._relay_batch(conn)
        assert self._stream is not None, "opened above; _relay_batch raises when it closes it"
        if self._sweep_after is not None and self._sweep_after.reached(self._stream):
            count += self._sweep(conn)
            self._sweep_after = None
            self._unroutable_retry_at = time.monotonic() + self.unroutable_retry_s  # the sweep just retried them
        elif self._sweep_after is None and time.monotonic() >= self._unroutable_retry_at:
            retried = retry_unroutable(conn, self.publisher, self.batch, self.unroutable_retry_s, log)
            self._unroutable_retry_at = time.monotonic() + self.unroutable_retry_s
            self._count(retried)
            count += retried
        self._heartbeat(conn)
        return count

    def _relay_batch(self, conn: ControlConn) -> int:
        stream = self._stream
        assert stream is not None, "run_once opens the stream first"
        transactions = stream.read(self.poll_s, self.batch)
        envelopes = [e for _, batch in transactions for e in batch]
        if envelopes and self._naive():
            return self._relay_unconfirmed(conn, transactions, envelopes)
        outcomes = self.publisher.publish_batch(envelopes) if envelopes else []
        # An unroutable event is done for the slot once its row is marked: the row, not the slot, keeps it.
        target, ids = confirmed_prefix(transactions, [o is not broker.Delivery.UNCONFIRMED for o in outcomes])
        if envelopes:
            self.faults.point("relay.after_publish", events=len(envelopes))
        done = set(ids)
        unroutable = [e for e in broker.sort_out(envelopes, outcomes)[1] if e.id in done]
        if unroutable:
            self._mark_unroutable(conn, unroutable)  # before anything below may confirm the slot past them
            ids = [i for i in ids if i not in {e.id for e in unroutable}]
        refused_count = len(envelopes) - len(done)
        self._count(len(ids))
        self.batches += bool(envelopes)
        self._unflushed.extend(ids)
        if target is not None:
            self._unflushed_lsn = target
        refused = refused_count > 0
        if (self._unflushed_lsn is not None or self._unflushed or self._undeleted) and (
            not transactions
            or refused
            or len(self._unflushed) >= self.batch
            or time.monotonic() - self._last_flush >= self.flush_s
        ):
            self._flush(conn)
        if (
            not refused
            and self._unflushed_lsn is None
            and not stream.in_transaction
            and stream.wal_end > self._confirmed_lsn
            and (stream.reply_requested or time.monotonic() - self._last_confirm >= self.idle_confirm_s)
        ):
            # Every transaction that committed before wal_end has reached us, been published and flushed.
            self._confirm(stream.wal_end)
        elif stream.reply_requested:
            self._confirm(self._confirmed_lsn)
        if refused:
            # The stream already moved past the refused events: start a new one from the confirmed position.
            self._close_stream()
            raise broker.BrokerUnavailable(
                f"RabbitMQ refused {refused_count} of {len(envelopes)} "
                "events; they stay in the slot and are published again."
            )
        return len(ids)

    def _mark_unroutable(self, conn: ControlConn, envelopes: list[Envelope]) -> None:
        """Mark the rows of events the broker returned as unroutable. As in ``_delete``, the walsender may send a
        transaction a moment before its commit is visible, so rows not found yet are looked for again briefly;
        one still missing after that is left unmarked (the start-up sweep still publishes it)."""
        wanted, deadline = {e.id for e in envelopes}, time.monotonic() + 0.5
        while True:
            wanted -= outbox.mark_unroutable(conn, wanted)
            if not wanted or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if wanted:
            log.warning("cdc relay: %d unroutable event(s) have no outbox row to mark", len(wanted))
        report_unroutable([e.event_type for e in envelopes], self.unroutable_retry_s, log)

    def _flush(self, conn: ControlConn) -> None:
        """Delete the rows of the events published since the last flush, then move the slot past them.

        In that order: a crash in between republishes these events (duplicates the inboxes absorb), it does
        not strand their rows."""
        ids, lsn = self._unflushed, self._unflushed_lsn
        self._delete(conn, ids)
        self._unflushed, self._unflushed_lsn = [], None
        self._last_flush = time.monotonic()
        if lsn is not None:
            self._confirm(lsn)

    def _delete(self, conn: ControlConn, ids: Iterable[uuid.UUID]) -> None:
        """Delete the rows of published events. The walsender sends a transaction as soon as its commit record
        is flushed, a moment before the commit is visible to other sessions; a DELETE in that moment finds no
        row (seen under load: the row then stayed in the outbox for good). Ids not found are tried again with
        the next batches for ``undeleted_retry_s``."""
        wanted = list(ids) + list(self._undeleted)
        gone = outbox.delete(conn, wanted)
        now = time.monotonic()
        for event_id in wanted:
            if event_id in gone:
                self._undeleted.pop(event_id, None)
            elif now - self._undeleted.setdefault(event_id, now) > self.undeleted_retry_s:
                del self._undeleted[event_id]  # deleted by someone else (a sweep, an operator): nothing to do

    def _naive(self) -> bool:
        return naive_on("publish-no-confirm", self.settings.naive, self.faults)

    def _relay_unconfirmed(self, conn: ControlConn, transactions: list[Transaction], envelopes: list[Envelope]) -> int:
        """The lab's naive mode (issue 4, ``publish-no-confirm``): hand the events to the client library, delete
        their rows and move the slot past them before anything reached the broker. A crash (or a cut
        connection) before the flush loses the whole batch: no row and no slot position is left to replay it."""
        if self._unflushed or self._unflushed_lsn is not None:
            self._flush(conn)  # the confirmed events before the switch: their rows go before the slot moves
        flush = publish_unconfirmed(self.publisher, envelopes)
        outbox.delete(conn, [e.id for e in envelopes])
        self._confirm(transactions[-1][0])
        self._count(len(envelopes))
        self.faults.point("relay.after_publish", events=len(envelopes))
        flush()
        return len(envelopes)

    def _confirm(self, lsn: int) -> None:
        self._confirmed_lsn = max(self._confirmed_lsn, lsn)
        assert self._stream is not None, "only a batch read from the stream confirms"
        self._stream.confirm(self._confirmed_lsn)
        self._last_confirm = time.monotonic()

    def _count(self, n: int) -> None:
        if n:
            self.published += n
            self.last_publish_at = time.time()

    # --- start-up: slot, stream, rows the slot will never deliver ---

    def _start_up(self, conn: ControlConn) -> None:
        cdc_slot.check_server(conn)
        cdc_slot.ensure_publication(conn, self.publication)
        cdc_slot.ensure_slot(conn, self.slot)
        cdc_slot.wait_released(conn, self.slot)
        lost = cdc_slot.slot_lost_reason(conn, self.slot)
        if lost:
            self._recreate_slot(conn, lost)
        try:
            self._start_stream(conn)
        except SlotLost as exc:  # lost between our look at wal_status and START_REPLICATION
            self._recreate_slot(conn, " ".join(str(exc).split()))
            self._start_stream(conn)

    def _start_stream(self, conn: ControlConn) -> None:
        now_lsn = cdc_slot.flush_lsn(conn)
        if self._skip_to_present:
            # A relay that has just taken the lock starts at the present, not where the slot was left: every
            # event committed before now is a row still in the table, which the start-up sweep publishes, or a
            # row already deleted, which happens only after the broker confirmed it. Replaying the slot would
            # publish again everything a polling relay sent since the slot last moved (a whole polling stretch
            # after a switch back to cdc). A stream restarted while holding the lock (a broker outage) resumes
            # from the slot, so the slot never moves past an event this relay has not had confirmed.
            cdc_slot.advance(conn, self.slot, now_lsn)
            self._skip_to_present = False
        self._confirmed_lsn = cdc_slot.confirmed_lsn(conn, self.slot)
        self._sweep_after = cdc_sweep.CatchUp(now_lsn, self._confirmed_lsn, self.catch_up_limit_s)
        self._stream = WalStream(
            self.settings.database_url, self.slot, self.publication, self._confirmed_lsn, self.app_name
        )
        log.info(
            "cdc relay streaming slot %s (publication %s) from %s",
            self.slot,
            self.publication,
            lsn_text(self._confirmed_lsn),
        )

    def _recreate_slot(self, conn: ControlConn, reason: str) -> None:
        """Drop the lost slot and create it at the present. The events it still held are rows of the outbox
        (a row goes only after its confirm), and the start-up sweep publishes those: duplicates, never a loss."""
        rows = cdc_slot.recreate(conn, self.slot, reason)
        self.slot_recreated_at = time.time()
        log.warning(
            "cdc relay: replication slot %s was lost, the server removed WAL it still needed (see "
            "max_slot_wal_keep_size; %s). Created it again; the %d rows still in shared.outbox are "
            "published again, so no event is lost.",
            self.slot,
            reason,
            rows,
        )

    def _sweep(self, conn: ControlConn) -> int:
        return cdc_sweep.sweep(
            conn,
            self.publisher,
            batch=self.batch,
            naive=self._naive(),
            faults=self.faults,
            retry_s=self.unroutable_retry_s,
            count=self._count,
            logger=log,
        )

    # --- the worker loop ---

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set: standby while another relay holds the lock, back off while a service is down."""
        backoff = 0.5
        while not stop.is_set():
            try:
                self.run_once()
                backoff = 0.5
                if not self.is_active:
                    stop.wait(self.standby_retry_s)
            except CdcUnavailable as exc:
                log.error("cdc relay cannot run: %s", exc)
                self._reset()
                stop.wait(30.0)
            except (broker.BrokerUnavailable, FaultInjected) as exc:
                # The lock stays; the stream restarts from the slot's position, where the unconfirmed events wait.
                self._close_stream()
                log.warning("cdc relay: %s Retrying in %.1fs.", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except Exception as exc:  # a relay must never die silently: log, drop the sessions, start over
                log.warning(
                    "cdc relay: %s; reconnecting in %.1fs.",
                    db.first_line(exc),
                    backoff,
                    exc_info=not isinstance(exc, (psycopg.Error, db.DatabaseUnavailable, StreamEnded)),
                )
                self._reset()
                stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        self.close()
        log.info("cdc relay: published %d events in %d batches", self.published, self.batches)

    def close(self) -> None:
        """Release the stream and the lock (a standby takes over at once) and close the broker connection."""
        if self._stream is not None and self._conn is not None and (self._unflushed or self._unflushed_lsn):
            try:  # a clean stop leaves no published rows behind (they would only be published again)
                self._flush(self._conn)
            except Exception as exc:
                log.debug("cdc relay: final flush failed (%s); the next relay republishes those events", exc)
        self._reset()
        self.publisher.close()

    # --- connections, lock, heartbeat ---

    def _connection(self) -> ControlConn:
        if self._conn is None or self._conn.closed:
            self._reset()
            try:
                self._conn = psycopg.connect(
                    self.settings.database_url,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=self.app_name,
                    **cdc_slot.KEEPALIVES,
                )
            except psycopg.OperationalError as exc:
                raise db.DatabaseUnavailable(
                    f"PostgreSQL is not reachable at {db.redact(self.settings.database_url)}: {db.first_line(exc)}"
                ) from exc
        return self._conn

    def _try_lock(self, conn: ControlConn) -> bool:
        got = cdc_slot.try_lock(conn, self.slot)
        if got:
            self.is_active, self._skip_to_present = True, True
            log.info("cdc relay took the relay lock for slot %s", self.slot)
        return got

    def _heartbeat(self, conn: ControlConn) -> None:
        now = time.monotonic()
        last_at, last_count = self._beat
        if now - last_at < self.heartbeat_s:
            return
        rate = (self.published - last_count) / (now - last_at) if last_at else 0.0
        self._beat = (now, self.published)
        cdc_slot.write_heartbeat(
            conn,
            self.slot,
            started_at=self.started_at,
            published=self.published,
            rate=rate,
            last_publish_at=self.last_publish_at,
        )

    def _check_wal_level(self) -> None:
        try:
            with psycopg.connect(self.settings.database_url, connect_timeout=5) as conn:
                cdc_slot.check_server(conn)
        except psycopg.OperationalError:
            pass  # PostgreSQL down: run() keeps retrying; a wrong wal_level is the error worth failing at start for

    def _close_stream(self) -> None:
        # The next stream starts from the confirmed position and delivers the unflushed events again.
        self._unflushed, self._unflushed_lsn = [], None
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _reset(self) -> None:
        self._close_stream()
        conn, self._conn = self._conn, None
        self.is_active, self._sweep_after = False, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close; we discard it anyway
                conn.close()
