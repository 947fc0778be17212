"""The transactional outbox: events are rows written in the same transaction as the change they announce.

Every statement on ``shared.outbox`` that the write side, the relays and the operators' tools run lives here, so
the rules a row follows (claimed in ``seq`` order, deleted only after the broker confirmed it, kept and marked
when no queue takes it) are read in one place. The lab's reporting views and ``pulse check`` keep their own
read-only queries.

Functions take any connection (tuple or dict rows) and return dict rows, so the polling relay (dict-row
connection) and the CDC relay (tuple-row control connection) share them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, cast

import orjson
import psycopg
from psycopg.rows import DictRow, dict_row, tuple_row

from pulse.events import Envelope, Event, dumps
from pulse.infra import db

# Any row factory: every statement here sets its own cursor's.
AnyConn = psycopg.Connection[Any]

COLUMNS = "id, aggregate_type, aggregate_id, event_type, payload, seq"

# Why seq order is the commit order that matters: a table row only becomes visible at its commit, so a
# poll sees committed rows only, in insert order. Two rows can be claimed out of commit order only when
# their transactions overlapped, i.e. were concurrent and so independent; every saga step is written by
# a handler that ran after the previous step's event was published, so the events of one order are
# always in both insert and commit order. Exact commit order across unrelated transactions needs the
# WAL (the cdc relay) or serialising every writer on one lock, which the polling relay does not pay for.
CLAIM = f"SELECT {COLUMNS} FROM shared.outbox WHERE unroutable_at IS NULL ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED"
CLAIM_UNROUTABLE = (
    f"SELECT {COLUMNS} FROM shared.outbox "
    "WHERE unroutable_at IS NOT NULL AND seq > %s ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED"
)
# The CDC relay's start-up sweep: every row up to the highest seq seen at start, marked or not, by seq.
CLAIM_SWEEP = (
    f"SELECT {COLUMNS} FROM shared.outbox WHERE seq <= %s AND seq > %s ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED"
)


def append(
    conn: AnyConn, event_type: str, aggregate_type: str, aggregate_id: object, payload: dict[str, Any]
) -> uuid.UUID:
    """Add one event to ``shared.outbox`` inside the caller's transaction; returns its id (the dedup key).

    Inside a consumer batch the row is buffered and the batch writes all its rows in one INSERT just before it
    commits (rows of one batch keep their order): one statement per batch instead of one per event. The row is
    then outside any savepoint the handler takes, so a handler must not append inside a savepoint it may roll
    back (none does: inventory appends after its retried savepoint).
    """
    event_id = uuid.uuid4()
    row = (event_id, aggregate_type, str(aggregate_id), _kind(event_type), dumps(payload))
    current = db.open_batch(conn)
    if current is None:
        _insert(conn, [row])
        return event_id
    current.buffer("outbox", _insert).append(row)
    return event_id


# psycopg keeps a statement's parsed form only up to 50 parameters: a VALUES list of more than 10 rows was parsed
# again on every call, and its text changed with the row count, so it was never prepared either (py-spy: 5 % of the
# consumers' samples at saturation). Such a batch travels as one JSON array instead, read back in its order: one
# fixed statement with one parameter, encoded by orjson. Up to 10 rows VALUES costs less (bench/NOTES.md).
VALUES_MAX_ROWS = 10
INSERT_ROWS = (
    "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) "
    "SELECT (r->>0)::uuid, r->>1, r->>2, r->>3, r->4 FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(r, n) "
    "ORDER BY n"
)


def _insert(conn: AnyConn | psycopg.Cursor[Any], rows: list[tuple[object, ...]]) -> None:
    """One INSERT of ``rows`` (``seq`` follows the list's order, as separate inserts in that order would give)."""
    if len(rows) > VALUES_MAX_ROWS:
        # The payload is JSON text already: a Fragment is copied into the array as it is.
        array = [(str(i), a, g, k, orjson.Fragment(cast(str, payload))) for i, a, g, k, payload in rows]
        conn.execute(INSERT_ROWS, (orjson.dumps(array).decode(),))
        return
    conn.execute(
        "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) VALUES "
        + ", ".join(["(%s, %s, %s, %s, %s::jsonb)"] * len(rows)),
        [value for row in rows for value in row],
    )


def _kind(event_type: object) -> str:
    return str(getattr(event_type, "value", event_type))


def append_event(conn: AnyConn, event: Event) -> uuid.UUID:
    """Add one typed saga event (its order is the aggregate) to ``shared.outbox`` inside the caller's transaction."""
    return append(conn, event.TYPE, "ORDER", event.order_id, event.to_payload())


def append_events(conn: AnyConn | psycopg.Cursor[Any], events: list[Event]) -> list[uuid.UUID]:
    """Add several typed saga events in one INSERT (one statement and round trip, not one each)."""
    ids = [uuid.uuid4() for _ in events]
    rows: list[tuple[object, ...]] = [
        (event_id, "ORDER", str(e.order_id), _kind(e.TYPE), dumps(e.to_payload()))
        for event_id, e in zip(ids, events, strict=True)
    ]
    _insert(conn, rows)
    return ids


def envelope_of(row: DictRow) -> Envelope:
    """The wire envelope of an outbox row (as read by the polling relay or decoded by the CDC relay)."""
    return Envelope(
        id=row["id"] if isinstance(row["id"], uuid.UUID) else uuid.UUID(str(row["id"])),
        event_type=row["event_type"],
        aggregate_id=row["aggregate_id"],
        payload=row["payload"],
    )


def _rows(conn: AnyConn, query: str, params: tuple[object, ...]) -> list[DictRow]:
    return conn.cursor(row_factory=dict_row).execute(query, params).fetchall()


def _ids(conn: AnyConn, query: str, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    return {r[0] for r in conn.cursor(row_factory=tuple_row).execute(query, (ids,))}


def claim(conn: AnyConn, limit: int) -> list[DictRow]:
    """Lock up to ``limit`` routable rows, oldest ``seq`` first, skipping rows another relay holds.

    Call inside a transaction: the rows stay claimed until it ends, and are deleted in it once confirmed."""
    return _rows(conn, CLAIM, (limit,))


def claim_unroutable(conn: AnyConn, after_seq: int, limit: int) -> list[DictRow]:
    """Lock up to ``limit`` rows marked unroutable with ``seq`` above ``after_seq`` (a retry pass pages by seq)."""
    return _rows(conn, CLAIM_UNROUTABLE, (after_seq, limit))


def claim_sweep(conn: AnyConn, top_seq: int, after_seq: int, limit: int) -> list[DictRow]:
    """Lock up to ``limit`` rows with ``after_seq < seq <= top_seq``, marked or not: the CDC start-up sweep."""
    return _rows(conn, CLAIM_SWEEP, (top_seq, after_seq, limit))


def delete(conn: AnyConn, ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Delete the rows of events the broker confirmed; returns the ids that were found (and so deleted)."""
    ids = list(ids)
    if not ids:
        return set()
    return _ids(conn, "DELETE FROM shared.outbox WHERE id = ANY(%s) RETURNING id", ids)


def mark_unroutable(conn: AnyConn, ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Mark the rows of events the broker returned as unroutable, keeping the first mark (how long the event has
    waited for a binding); returns the ids found."""
    ids = list(ids)
    if not ids:
        return set()
    return _ids(
        conn,
        "UPDATE shared.outbox SET unroutable_at = coalesce(unroutable_at, now()) WHERE id = ANY(%s) RETURNING id",
        ids,
    )


def max_seq(conn: AnyConn) -> int | None:
    """The highest ``seq`` in the table now (None when it is empty): where a sweep stops."""
    top: int | None = _rows(conn, "SELECT max(seq) AS top FROM shared.outbox", ())[0]["top"]
    return top


def count(conn: AnyConn) -> int:
    """How many rows wait in the outbox, unroutable ones included."""
    n: int = _rows(conn, "SELECT count(*) AS n FROM shared.outbox", ())[0]["n"]
    return n


def late_count(conn: AnyConn, older_than_s: float) -> int:
    """Routable rows older than ``older_than_s``: events the relay has not published yet although it should have.

    Unroutable rows wait for a binding, not for the relay, so they are not counted."""
    n: int = _rows(
        conn,
        "SELECT count(*) AS n FROM shared.outbox WHERE unroutable_at IS NULL AND "
        "created_at < now() - make_interval(secs => %s)",
        (older_than_s,),
    )[0]["n"]
    return n


def unroutable_by_type(conn: AnyConn) -> list[DictRow]:
    """Rows kept because no queue is bound to their type: ``[{event_type, n, oldest}]``, oldest mark first."""
    return _rows(
        conn,
        "SELECT event_type, count(*) AS n, min(unroutable_at) AS oldest FROM shared.outbox "
        "WHERE unroutable_at IS NOT NULL GROUP BY event_type ORDER BY min(unroutable_at)",
        (),
    )
