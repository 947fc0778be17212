"""The CDC outbox relay (``PULSE_OUTBOX_MODE=cdc``): reads ``shared.outbox`` inserts from the PostgreSQL WAL.

How it reads the slot, and why
------------------------------
psycopg 3 has no streaming-replication API (psycopg/psycopg#71), so the plan was SQL-level reads:
``pg_logical_slot_peek_binary_changes`` (never ``get_*``, which consumes before publishing), publish, then
``pg_replication_slot_advance``. Measured here, that misses the latency goal under load: every peek and every
advance is a new decoding session that re-reads the WAL from the slot's restart point, which trails by one or
two running-xacts snapshots (15-30 s of the whole cluster's WAL; ~0.8 kB per event). At ~600 events/s with the
other lab processes writing, the restart lag reached 14-35 MB and one peek took 22-90 ms, an advance as long
again, so the cost of a cycle grows with everyone's WAL: the peek relay's p99 was 92 ms (273 ms on a busier run)
against the 50 ms goal. Streaming, in the same benchmark at 1,000 events/s: p50 1.2 ms, p99 5.7 ms on a calm
machine (p99 64 ms while other sessions kept both cores busy; polling: 54 ms in both).

So the relay streams instead, still with psycopg 3 alone: its libpq layer (``psycopg.pq``) speaks the
replication protocol's COPY BOTH mode. One ``START_REPLICATION ... LOGICAL`` session decodes the WAL once, as
a walsender does for any subscriber, and pushes each transaction when it commits. Crash safety is unchanged:
the slot's confirmed position moves only by our standby status updates, which we send only for transactions
whose every event RabbitMQ confirmed (and whose rows we deleted). A crash anywhere replays from that position:
duplicates, absorbed by the inboxes; never a loss. psycopg2's streaming connection would do the same with a
second driver. No LISTEN/NOTIFY wake-up is needed: the walsender pushes. Figures: bench/results/relay.json.

Exactly one active relay: each relay takes a session-level advisory lock keyed by the slot name on its
control connection; a standby retries every second and takes over within seconds when the holder's session
ends (client keepalives and wal_sender_timeout bound this even when its host vanishes). The slot itself
admits one streaming reader, so even a relay that lost its lock cannot read next to the new holder.

Unroutable events (no queue bound to their type; the publish is mandatory): the relay marks the row
``unroutable_at`` and keeps it, and treats the event as done for the slot, because the slot cannot hold one event
back without holding back every later one, and a binding may take days to appear. The marked row in the table is
then the event's only copy, so the relay retries the marked rows every ``unroutable_retry_s`` (the polling relay's
retry pass), and the start-up sweep publishes them too.

Idle slots: when nothing is pending, the relay confirms the walsender's keepalive position, as
pg_recvlogical does, so the WAL that other databases write does not pile up behind the slot.

Lost slots: with ``max_slot_wal_keep_size`` set (scripts/services.sh and docker/compose.yaml set 4GB), a
checkpoint removes WAL a slot still needs once it trails by more than that, and marks the slot ``lost``
(``wal_status``); it can never stream again. The relay then drops it and creates it anew, which loses no event:
rows leave ``shared.outbox`` only after their confirm, and the start-up sweep publishes the rows still there.
Each recreation is one WARNING line and a row of ``infra.relay_slot_losses``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import struct
import threading
import time
import uuid

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from pulse.events import Envelope
from pulse.faults import NO_FAULTS, FaultInjected, naive_on
from pulse.infra import broker, db, pgoutput
from pulse.infra.relay_polling import (UNROUTABLE_RETRY_S, mark_unroutable, publish_unconfirmed, report_unroutable,
                                       retry_unroutable)

log = logging.getLogger(__name__)

OUTBOX_TABLE = ("shared", "outbox")
LOCK_CLASS = 0x70756C73  # 'puls': first key of the (int, int) advisory lock; the second is a hash of the slot name
LOCK_KEY_SQL = "hashtext(%s) & 2147483647"
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
EPOCH_2000 = 946_684_800  # PostgreSQL timestamps count microseconds from 2000-01-01
SWEEP = ("SELECT id, aggregate_type, aggregate_id, event_type, payload, seq FROM shared.outbox "
         "WHERE seq <= %s AND seq > %s ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED")


class CdcUnavailable(RuntimeError):
    """The server cannot run the CDC relay (wal_level, slot of another database...); the message says how to fix it."""


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def wal_level_problem(wal_level: str) -> str | None:
    """The one-sentence fix when the server's wal_level cannot feed the CDC relay, else None."""
    if wal_level == "logical":
        return None
    return (f"PostgreSQL runs with wal_level={wal_level}, but PULSE_OUTBOX_MODE=cdc needs logical: run "
            "ALTER SYSTEM SET wal_level = logical and restart PostgreSQL, or set PULSE_OUTBOX_MODE=polling.")


def check_server(conn) -> None:
    """Raise :class:`CdcUnavailable` if this server cannot do logical decoding."""
    problem = wal_level_problem(conn.execute("SHOW wal_level").fetchone()[0])
    if problem:
        raise CdcUnavailable(problem)


def ensure_publication(conn, publication: str) -> bool:
    """Create the insert-only publication of ``shared.outbox`` if missing (or fix its table and actions)."""
    name = sql.Identifier(publication)
    if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE shared.outbox").format(name))
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert')").format(name))
        return False
    try:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE shared.outbox WITH (publish = 'insert')").format(name))
    except psycopg.errors.DuplicateObject:  # created by another relay or migrator in the meantime
        return False
    return True


def ensure_slot(conn, slot: str) -> bool:
    """Create the pgoutput logical slot in this database if missing; True when it was created."""
    row = conn.execute("SELECT database, plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s",
                       (slot,)).fetchone()
    dbname = conn.info.dbname
    if row is not None:
        if row[0] != dbname or row[1] != "pgoutput":
            raise CdcUnavailable(f"Replication slot {slot} belongs to database {row[0]} (plugin {row[1]}), "
                                 f"not to {dbname} with pgoutput: set PULSE_CDC_SLOT to another name.")
        return False
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    except psycopg.errors.DuplicateObject:  # another relay or migrator won the race: check what it created
        ensure_slot(conn, slot)
        return False
    log.info("created logical replication slot %s", slot)
    return True


def prepare(database_url: str, slot: str, publication: str) -> dict:
    """What `pulse db migrate` does in cdc mode: the publication, and the slot when wal_level allows it."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        created_pub = ensure_publication(conn, publication)
        problem = wal_level_problem(conn.execute("SHOW wal_level").fetchone()[0])
        if problem:
            log.warning("%s", problem)
            return {"publication": publication, "publicationCreated": created_pub, "slot": None, "problem": problem}
        return {"publication": publication, "publicationCreated": created_pub, "slot": slot,
                "slotCreated": ensure_slot(conn, slot)}


def _envelope(row: dict) -> Envelope:
    return Envelope(id=uuid.UUID(row["id"]), event_type=row["event_type"], aggregate_id=row["aggregate_id"],
                    payload=json.loads(row["payload"]))


def decode_batch(messages) -> list[tuple[int, list[Envelope]]]:
    """Whole transactions of a peek: ``[(commit end LSN, outbox envelopes in insert order)]``, in commit order.

    Relation messages are remembered, inserts into other tables and every other message are ignored. A
    transaction without outbox inserts still yields its end LSN, so the slot can move past it.
    """
    rows = pgoutput.RowDecoder()
    transactions, pending = [], []
    for data in messages:
        msg = pgoutput.parse(data)
        if isinstance(msg, pgoutput.Begin):
            pending = []
        elif isinstance(msg, pgoutput.Relation):
            rows.add(msg)
        elif isinstance(msg, pgoutput.Insert):
            relation, row = rows.row(msg)
            if (relation.namespace, relation.name) == OUTBOX_TABLE:
                pending.append(_envelope(row))
        elif isinstance(msg, pgoutput.Commit):
            transactions.append((msg.end_lsn, pending))
            pending = []
    return transactions


def confirmed_prefix(transactions, confirmed: list[bool]) -> tuple[int | None, list]:
    """The end LSN of the last transaction such that it and all before it were confirmed, and their event ids."""
    target, ids, i = None, [], 0
    for end_lsn, envelopes in transactions:
        flags = confirmed[i:i + len(envelopes)]
        i += len(envelopes)
        if not all(flags):
            break
        target = end_lsn
        ids.extend(e.id for e in envelopes)
    return target, ids


class SlotLost(psycopg.OperationalError):
    """START_REPLICATION was refused because the slot was invalidated or the WAL it needs is gone."""


# How PostgreSQL 13-17 word the refusal: "This slot has been invalidated because it exceeded the maximum reserved
# size." and "requested WAL segment ... has already been removed".
SLOT_LOST_MARKERS = ("has been invalidated", "has already been removed")


def slot_lost_reason(conn, slot: str) -> str | None:
    """Why the slot can no longer stream (``wal_status = 'lost'``), else None (also when there is no slot)."""
    row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return "wal_status = lost" if row is not None and row[0] == "lost" else None


class StreamEnded(RuntimeError):
    """The server ended the replication stream (slot dropped, walsender terminated, server shutdown)."""


class WalStream:
    """The slot's pgoutput stream over one replication connection, with psycopg's libpq layer (COPY BOTH).

    ``read`` returns whole transactions, in commit order; a transaction cut by the read limit stays pending
    until its Commit arrives. ``confirm(lsn)`` tells the server everything before ``lsn`` is done with.
    """

    def __init__(self, database_url: str, slot: str, publication: str, start_lsn: int, application_name: str):
        conninfo = make_conninfo(database_url, replication="database", connect_timeout=5,
                                 application_name=application_name, **KEEPALIVES)
        self.pgconn = pq.PGconn.connect(conninfo.encode())
        if self.pgconn.status != pq.ConnStatus.OK:
            error = self._error()
            self.pgconn.finish()
            raise db.DatabaseUnavailable(f"PostgreSQL refused a replication connection: {error}")
        command = (f"START_REPLICATION SLOT {sql.Identifier(slot).as_string(None)} LOGICAL {lsn_text(start_lsn)} "
                   f"(proto_version '1', publication_names {sql.Literal(publication).as_string(None)})")
        result = self.pgconn.exec_(command.encode())
        if result.status != pq.ExecStatus.COPY_BOTH:
            error = self._error()
            self.pgconn.finish()
            lost = any(marker in error for marker in SLOT_LOST_MARKERS)
            raise (SlotLost if lost else psycopg.OperationalError)(f"could not start streaming slot {slot}: {error}")
        self.pgconn.nonblocking = 1
        self.wal_end = start_lsn  # the server has sent every transaction that committed before this position
        self.reply_requested = False
        self.rows = pgoutput.RowDecoder()
        self.pending: list[Envelope] | None = None  # events of a transaction whose Commit has not arrived yet

    def _error(self) -> str:
        return self.pgconn.error_message.decode(errors="replace").strip() or "no detail"

    @property
    def in_transaction(self) -> bool:
        return self.pending is not None

    def read(self, timeout_s: float, max_events: int) -> list[tuple[int, list[Envelope]]]:
        """Wait up to ``timeout_s`` for data, then take whatever has arrived (up to about ``max_events``)."""
        transactions, events = [], 0
        deadline = time.monotonic() + timeout_s
        while events < max_events:
            size, data = self.pgconn.get_copy_data(1)
            if size == 0:
                remaining = deadline - time.monotonic()
                if transactions or remaining <= 0:
                    break
                select.select([self.pgconn.socket], [], [], remaining)
                self.pgconn.consume_input()
                continue
            if size < 0:
                raise StreamEnded(f"the replication stream ended: {self._error()}")
            tx = self._on_copy_data(bytes(data))
            if tx is not None:
                transactions.append(tx)
                events += len(tx[1])
        return transactions

    def _on_copy_data(self, data: bytes):
        kind = data[:1]
        if kind == b"k":  # keepalive: server WAL end, server clock, reply-requested flag
            wal_end, _clock, reply = struct.unpack_from(">QqB", data, 1)
            self.wal_end = max(self.wal_end, wal_end)
            self.reply_requested = self.reply_requested or bool(reply)
            return None
        if kind != b"w":
            return None
        msg = pgoutput.parse(data[25:])  # after the XLogData header: start LSN, end LSN, server clock
        if isinstance(msg, pgoutput.Begin):
            self.pending = []
        elif isinstance(msg, pgoutput.Relation):
            self.rows.add(msg)
        elif isinstance(msg, pgoutput.Insert):
            relation, row = self.rows.row(msg)
            if (relation.namespace, relation.name) == OUTBOX_TABLE and self.pending is not None:
                self.pending.append(_envelope(row))
        elif isinstance(msg, pgoutput.Commit):
            tx, self.pending = (msg.end_lsn, self.pending or []), None
            self.wal_end = max(self.wal_end, msg.end_lsn)
            return tx
        return None

    def confirm(self, lsn: int) -> None:
        """Standby status update: written = flushed = applied = ``lsn`` (the slot's confirmed position moves there)."""
        now_us = int((time.time() - EPOCH_2000) * 1e6)
        self.pgconn.put_copy_data(b"r" + struct.pack(">QQQqB", lsn, lsn, lsn, now_us, 0))
        while self.pgconn.flush() == 1:
            select.select([], [self.pgconn.socket], [], 1.0)
        self.reply_requested = False

    def close(self) -> None:
        try:
            self.pgconn.finish()
        except Exception:  # closing a broken connection must not hide the original error
            pass


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

    def __init__(self, settings, publisher: broker.ConfirmingPublisher, faults=None):
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
        self._conn: psycopg.Connection | None = None
        self._stream: WalStream | None = None
        self._confirmed_lsn = 0  # the slot's position: every event before it was confirmed by the broker
        self._last_confirm = 0.0
        # Before the start-up sweep: (LSN to catch up to, stream position last seen, deadline without progress).
        self._sweep_after: tuple[int, int, float] | None = None
        self._beat = (0.0, 0)
        self._undeleted: dict = {}  # event id -> when its DELETE first found no row (see _delete)
        self._unflushed: list = []  # ids of events the broker confirmed whose rows are not deleted yet
        self._unflushed_lsn: int | None = None  # the slot may move here once those rows are deleted
        self._last_flush = 0.0
        self._unroutable_retry_at = 0.0
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
        if self._sweep_after is not None and self._caught_up():
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

    def _relay_batch(self, conn) -> int:
        stream = self._stream
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
                not transactions or refused or len(self._unflushed) >= self.batch
                or time.monotonic() - self._last_flush >= self.flush_s):
            self._flush(conn)
        if (not refused and self._unflushed_lsn is None and not stream.in_transaction
                and stream.wal_end > self._confirmed_lsn
                and (stream.reply_requested or time.monotonic() - self._last_confirm >= self.idle_confirm_s)):
            # Every transaction that committed before wal_end has reached us, been published and flushed.
            self._confirm(stream.wal_end)
        elif stream.reply_requested:
            self._confirm(self._confirmed_lsn)
        if refused:
            # The stream already moved past the refused events: start a new one from the confirmed position.
            self._close_stream()
            raise broker.BrokerUnavailable(f"RabbitMQ refused {refused_count} of {len(envelopes)} "
                                           "events; they stay in the slot and are published again.")
        return len(ids)

    def _mark_unroutable(self, conn, envelopes) -> None:
        """Mark the rows of events the broker returned as unroutable. As in ``_delete``, the walsender may send a
        transaction a moment before its commit is visible, so rows not found yet are looked for again briefly;
        one still missing after that is left unmarked (the start-up sweep still publishes it)."""
        wanted, deadline = {e.id for e in envelopes}, time.monotonic() + 0.5
        while True:
            wanted -= {r[0] for r in conn.execute(
                "UPDATE shared.outbox SET unroutable_at = coalesce(unroutable_at, now()) WHERE id = ANY(%s) "
                "RETURNING id", (list(wanted),))}
            if not wanted or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if wanted:
            log.warning("cdc relay: %d unroutable event(s) have no outbox row to mark", len(wanted))
        report_unroutable([e.event_type for e in envelopes], self.unroutable_retry_s, log)

    def _flush(self, conn) -> None:
        """Delete the rows of the events published since the last flush, then move the slot past them.

        In that order: a crash in between republishes these events (duplicates the inboxes absorb), it does
        not strand their rows."""
        ids, lsn = self._unflushed, self._unflushed_lsn
        self._delete(conn, ids)
        self._unflushed, self._unflushed_lsn = [], None
        self._last_flush = time.monotonic()
        if lsn is not None:
            self._confirm(lsn)

    def _delete(self, conn, ids) -> None:
        """Delete the rows of published events. The walsender sends a transaction as soon as its commit record
        is flushed, a moment before the commit is visible to other sessions; a DELETE in that moment finds no
        row (seen under load: the row then stayed in the outbox for good). Ids not found are tried again with
        the next batches for ``undeleted_retry_s``."""
        wanted = list(ids) + list(self._undeleted)
        gone = {r[0] for r in conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s) RETURNING id", (wanted,))}
        now = time.monotonic()
        for event_id in wanted:
            if event_id in gone:
                self._undeleted.pop(event_id, None)
            elif now - self._undeleted.setdefault(event_id, now) > self.undeleted_retry_s:
                del self._undeleted[event_id]  # deleted by someone else (a sweep, an operator): nothing to do

    def _naive(self) -> bool:
        return naive_on("publish-no-confirm", self.settings.naive, self.faults)

    def _relay_unconfirmed(self, conn, transactions, envelopes) -> int:
        """The lab's naive mode (issue 4, ``publish-no-confirm``): hand the events to the client library, delete
        their rows and move the slot past them before anything reached the broker. A crash (or a cut
        connection) before the flush loses the whole batch: no row and no slot position is left to replay it."""
        if self._unflushed or self._unflushed_lsn is not None:
            self._flush(conn)  # the confirmed events before the switch: their rows go before the slot moves
        flush = publish_unconfirmed(self.publisher, envelopes)
        conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", ([e.id for e in envelopes],))
        self._confirm(transactions[-1][0])
        self._count(len(envelopes))
        self.faults.point("relay.after_publish", events=len(envelopes))
        flush()
        return len(envelopes)

    def _confirm(self, lsn: int) -> None:
        self._confirmed_lsn = max(self._confirmed_lsn, lsn)
        self._stream.confirm(self._confirmed_lsn)
        self._last_confirm = time.monotonic()

    def _count(self, n: int) -> None:
        if n:
            self.published += n
            self.last_publish_at = time.time()

    # --- start-up: slot, stream, rows the slot will never deliver ---

    def _start_up(self, conn) -> None:
        check_server(conn)
        ensure_publication(conn, self.publication)
        ensure_slot(conn, self.slot)
        self._wait_slot_released(conn)
        lost = slot_lost_reason(conn, self.slot)
        if lost:
            self._recreate_slot(conn, lost)
        try:
            self._start_stream(conn)
        except SlotLost as exc:  # lost between our look at wal_status and START_REPLICATION
            self._recreate_slot(conn, " ".join(str(exc).split()))
            self._start_stream(conn)

    def _start_stream(self, conn) -> None:
        self._confirmed_lsn = lsn_int(conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,)).fetchone()[0])
        # Read the slot up to the present before sweeping the table, so the sweep sees only what the slot misses.
        now_lsn = lsn_int(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])
        self._sweep_after = (now_lsn, self._confirmed_lsn, time.monotonic() + self.catch_up_limit_s)
        self._stream = WalStream(self.settings.database_url, self.slot, self.publication, self._confirmed_lsn,
                                 self.app_name)
        log.info("cdc relay streaming slot %s (publication %s) from %s", self.slot, self.publication,
                 lsn_text(self._confirmed_lsn))

    def _recreate_slot(self, conn, reason: str) -> None:
        """Drop the lost slot and create it at the present. The events it still held are rows of the outbox
        (a row goes only after its confirm), and the start-up sweep publishes those: duplicates, never a loss."""
        rows = conn.execute("SELECT count(*) FROM shared.outbox").fetchone()[0]
        conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        ensure_slot(conn, self.slot)
        self.slot_recreated_at = time.time()
        log.warning("cdc relay: replication slot %s was lost, the server removed WAL it still needed (see "
                    "max_slot_wal_keep_size; %s). Created it again; the %d rows still in shared.outbox are "
                    "published again, so no event is lost.", self.slot, reason, rows)
        try:
            conn.execute("INSERT INTO infra.relay_slot_losses (slot, reason, outbox_rows, pid, host) "
                         "VALUES (%s, %s, %s, %s, %s)", (self.slot, reason, rows, os.getpid(), socket.gethostname()))
        except psycopg.errors.UndefinedTable:
            log.info("cdc relay: no infra.relay_slot_losses table to record that in (run `pulse db migrate`)")

    def _wait_slot_released(self, conn, timeout_s: float = 5.0) -> None:
        """A previous stream's walsender (ours after a broker error, or a dead holder's) exits a moment after
        its client; until then the slot is active and START_REPLICATION would be refused."""
        deadline = time.monotonic() + timeout_s
        while conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                           (self.slot,)).fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)

    def _caught_up(self) -> bool:
        """True once the stream has passed the WAL position of the start-up, or has stopped making progress
        for ``catch_up_limit_s`` (late is fine: the sweep may then repeat some events, never lose any)."""
        target, progress, deadline = self._sweep_after
        stream, now = self._stream, time.monotonic()
        if stream.wal_end >= target and not stream.in_transaction:
            return True
        if stream.wal_end > progress:
            self._sweep_after = (target, stream.wal_end, now + self.catch_up_limit_s)
            return False
        return now > deadline

    def _sweep(self, conn) -> int:
        """Publish rows the slot will not deliver: committed before the slot existed (polling mode, or a slot
        dropped and created again) or already past its position but not deleted (a crash). The slot has been
        read to the present first, so a row it delivered is gone already; a row committed meanwhile may go
        out twice, never zero times. Bounded by the current highest seq, so a busy outbox cannot keep the
        sweep going."""
        top = conn.execute("SELECT max(seq) FROM shared.outbox").fetchone()[0]
        count = kept = after = 0  # after: unroutable rows stay in the table, so the sweep moves on by seq
        while top is not None:
            flush, unroutable = None, []
            with conn.transaction():
                rows = conn.execute(SWEEP, (top, after, self.batch)).fetchall()
                if not rows:
                    break
                after = rows[-1][5]
                envs = [Envelope(id=r[0], event_type=r[3], aggregate_id=r[2], payload=r[4]) for r in rows]
                if self._naive():  # as in _relay_unconfirmed: the rows go before the broker has anything
                    flush, ids = publish_unconfirmed(self.publisher, envs), [e.id for e in envs]
                else:
                    confirmed, unroutable, _ = broker.sort_out(envs, self.publisher.publish_batch(envs))
                    ids = [e.id for e in confirmed]
                    self.faults.point("relay.after_publish", events=len(envs))
                    mark_unroutable(conn, [e.id for e in unroutable])
                    kept += len(unroutable)
                    report_unroutable([e.event_type for e in unroutable], self.unroutable_retry_s, log)
                conn.execute("DELETE FROM shared.outbox WHERE id = ANY(%s)", (ids,))
            if flush is not None:
                self.faults.point("relay.after_publish", events=len(envs))
                flush()
            self._count(len(ids))
            count += len(ids)
            if len(ids) + len(unroutable) < len(envs):
                raise broker.BrokerUnavailable("RabbitMQ refused events of the start-up sweep; "
                                               "they stay in the outbox.")
        if count or kept:
            log.info("cdc relay published %d outbox rows the slot does not cover (left by polling mode, a crash or "
                     "no queue bound before); %d are still unroutable", count, kept)
        return count

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
                log.warning("cdc relay: %s; reconnecting in %.1fs.", db.first_line(exc), backoff,
                            exc_info=not isinstance(exc, (psycopg.Error, db.DatabaseUnavailable, StreamEnded)))
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

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._reset()
            try:
                # A holder whose host vanishes must lose the lock in seconds, not after TCP's two hours.
                self._conn = psycopg.connect(self.settings.database_url, autocommit=True, connect_timeout=5,
                                             application_name=self.app_name, **KEEPALIVES)
            except psycopg.OperationalError as exc:
                raise db.DatabaseUnavailable(f"PostgreSQL is not reachable at {db.redact(self.settings.database_url)}:"
                                             f" {db.first_line(exc)}") from exc
        return self._conn

    def _try_lock(self, conn) -> bool:
        got = conn.execute(f"SELECT pg_try_advisory_lock(%s, {LOCK_KEY_SQL})", (LOCK_CLASS, self.slot)).fetchone()[0]
        if got:
            self.is_active = True
            log.info("cdc relay took the relay lock for slot %s", self.slot)
        return got

    def _heartbeat(self, conn) -> None:
        now = time.monotonic()
        last_at, last_count = self._beat
        if now - last_at < self.heartbeat_s:
            return
        rate = (self.published - last_count) / (now - last_at) if last_at else 0.0
        self._beat = (now, self.published)
        conn.execute(
            "INSERT INTO infra.relay_heartbeat AS h (slot, mode, pid, host, started_at, updated_at, published, "
            "events_per_s, last_publish_at) VALUES (%s, 'cdc', %s, %s, to_timestamp(%s), now(), %s, %s, "
            "to_timestamp(%s)) ON CONFLICT (slot) DO UPDATE SET mode = EXCLUDED.mode, pid = EXCLUDED.pid, "
            "host = EXCLUDED.host, started_at = EXCLUDED.started_at, updated_at = now(), "
            "published = EXCLUDED.published, events_per_s = EXCLUDED.events_per_s, "
            "last_publish_at = coalesce(EXCLUDED.last_publish_at, h.last_publish_at)",
            (self.slot, os.getpid(), socket.gethostname(), self.started_at, self.published, rate,
             self.last_publish_at))

    def _check_wal_level(self) -> None:
        try:
            with psycopg.connect(self.settings.database_url, connect_timeout=5) as conn:
                check_server(conn)
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
            try:
                conn.close()
            except Exception:  # a dead connection may fail to close; we are discarding it anyway
                pass
