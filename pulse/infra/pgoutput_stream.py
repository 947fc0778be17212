"""The CDC relay's reader: a logical replication stream of ``shared.outbox`` inserts, as whole transactions.

Why a stream and not SQL peeks
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
a walsender does for any subscriber, and pushes each transaction when it commits. psycopg2's streaming
connection would do the same with a second driver. No LISTEN/NOTIFY wake-up is needed: the walsender pushes.
Figures: bench/results/relay.json.

The decoding (:class:`TransactionDecoder`) is kept apart from the socket (:class:`WalStream`) so the code that
runs in production is the code the unit tests feed with captured and hand-built bytes.
"""

from __future__ import annotations

import contextlib
import select
import struct
import time
import uuid

import psycopg
from psycopg import pq, sql
from psycopg.conninfo import make_conninfo

from pulse.events import Envelope, loads
from pulse.infra import db, pgoutput
from pulse.infra.cdc_slot import KEEPALIVES, SLOT_LOST_MARKERS, SlotLost, lsn_text

OUTBOX_TABLE = ("shared", "outbox")
EPOCH_2000 = 946_684_800  # PostgreSQL timestamps count microseconds from 2000-01-01
_XLOG_HEADER = struct.Struct(">QQq")  # XLogData after its 'w': start LSN, end LSN, server clock
_KEEPALIVE = struct.Struct(">QqB")  # Primary keepalive after its 'k': server WAL end, server clock, reply requested

Transaction = tuple[int, list[Envelope]]  # (commit end LSN, the outbox events it inserted, in insert order)


class StreamEnded(RuntimeError):
    """The server ended the replication stream (slot dropped, walsender terminated, server shutdown)."""


def _envelope(row: dict[str, str | None]) -> Envelope:
    return Envelope(
        id=uuid.UUID(_value(row, "id")),
        event_type=_value(row, "event_type"),
        aggregate_id=_value(row, "aggregate_id"),
        payload=loads(_value(row, "payload")),
    )


def _value(row: dict[str, str | None], column: str) -> str:
    """A column of an outbox row: these are NOT NULL, so a null is a decoding fault, not a value."""
    value = row[column]
    if value is None:
        raise pgoutput.DecodeError(f"outbox row with a null {column}")
    return value


class TransactionDecoder:
    """Turns the COPY data of a pgoutput stream into whole transactions of outbox envelopes, in commit order.

    Relation messages are remembered, inserts into other tables and every other message are ignored. A
    transaction without outbox inserts still yields its end LSN, so the slot can move past it. ``wal_end`` is
    the position before which the server has sent every committed transaction; ``reply_requested`` is set when
    a keepalive asks for a status update.
    """

    def __init__(self, start_lsn: int = 0):
        self.wal_end = start_lsn
        self.reply_requested = False
        self.rows = pgoutput.RowDecoder()
        self.pending: list[Envelope] | None = None  # events of a transaction whose Commit has not arrived yet

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit."""
        return self.pending is not None

    def feed(self, data: bytes) -> Transaction | None:
        """One CopyData message of the stream (keepalive ``k`` or XLogData ``w``); a transaction once it commits."""
        kind = data[:1]
        if kind == b"k":
            wal_end, _clock, reply = _KEEPALIVE.unpack_from(data, 1)
            self.wal_end = max(self.wal_end, wal_end)
            self.reply_requested = self.reply_requested or bool(reply)
            return None
        if kind != b"w":
            return None
        return self.message(data[1 + _XLOG_HEADER.size :])

    def message(self, data: bytes) -> Transaction | None:
        """One pgoutput message (an XLogData body, or a row of ``pg_logical_slot_peek_binary_changes``)."""
        msg = pgoutput.parse(data)
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


class WalStream:
    """The slot's pgoutput stream over one replication connection, with psycopg's libpq layer (COPY BOTH).

    ``read`` returns whole transactions, in commit order; a transaction cut by the read limit stays pending
    until its Commit arrives. ``confirm(lsn)`` tells the server everything before ``lsn`` is done with.
    """

    def __init__(self, database_url: str, slot: str, publication: str, start_lsn: int, application_name: str):
        conninfo = make_conninfo(
            database_url, replication="database", connect_timeout=5, application_name=application_name, **KEEPALIVES
        )
        self.pgconn = pq.PGconn.connect(conninfo.encode())
        if self.pgconn.status != pq.ConnStatus.OK:
            error = self._error()
            self.pgconn.finish()
            raise db.DatabaseUnavailable(f"PostgreSQL refused a replication connection: {error}")
        command = (
            f"START_REPLICATION SLOT {sql.Identifier(slot).as_string(None)} LOGICAL {lsn_text(start_lsn)} "
            f"(proto_version '1', publication_names {sql.Literal(publication).as_string(None)})"
        )
        result = self.pgconn.exec_(command.encode())
        if result.status != pq.ExecStatus.COPY_BOTH:
            error = self._error()
            self.pgconn.finish()
            lost = any(marker in error for marker in SLOT_LOST_MARKERS)
            raise (SlotLost if lost else psycopg.OperationalError)(f"could not start streaming slot {slot}: {error}")
        self.pgconn.nonblocking = 1
        self.decoder = TransactionDecoder(start_lsn)

    def _error(self) -> str:
        return self.pgconn.error_message.decode(errors="replace").strip() or "no detail"

    @property
    def wal_end(self) -> int:
        """The server has sent every transaction that committed before this position."""
        return self.decoder.wal_end

    @property
    def reply_requested(self) -> bool:
        """The server asked for a status update (answer with ``confirm``)."""
        return self.decoder.reply_requested

    @property
    def in_transaction(self) -> bool:
        """A transaction has begun and its Commit has not arrived yet."""
        return self.decoder.in_transaction

    def read(self, timeout_s: float, max_events: int) -> list[Transaction]:
        """Wait up to ``timeout_s`` for data, then take whatever has arrived (up to about ``max_events``)."""
        transactions: list[Transaction] = []
        events = 0
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
            tx = self.decoder.feed(bytes(data))
            if tx is not None:
                transactions.append(tx)
                events += len(tx[1])
        return transactions

    def confirm(self, lsn: int) -> None:
        """Standby status update: written = flushed = applied = ``lsn`` (the slot's confirmed position moves there)."""
        now_us = int((time.time() - EPOCH_2000) * 1e6)
        self.pgconn.put_copy_data(b"r" + struct.pack(">QQQqB", lsn, lsn, lsn, now_us, 0))
        while self.pgconn.flush() == 1:
            select.select([], [self.pgconn.socket], [], 1.0)
        self.decoder.reply_requested = False

    def close(self) -> None:
        """End the replication session (its walsender exits a moment later and releases the slot)."""
        with contextlib.suppress(Exception):  # closing a broken connection must not hide the original error
            self.pgconn.finish()


# --- encoders of the stream's framing, for tests and the lab (the messages inside are pgoutput's encoders) ---


def encode_xlog_data(message: bytes, start_lsn: int = 0, end_lsn: int = 0, clock_us: int = 0) -> bytes:
    """An XLogData CopyData message carrying one pgoutput message."""
    return b"w" + _XLOG_HEADER.pack(start_lsn, end_lsn, clock_us) + message


def encode_keepalive(wal_end: int, reply_requested: bool = False, clock_us: int = 0) -> bytes:
    """A primary keepalive CopyData message."""
    return b"k" + _KEEPALIVE.pack(wal_end, clock_us, int(reply_requested))
