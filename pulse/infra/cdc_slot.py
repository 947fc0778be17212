"""The CDC relay's server-side state: publication, replication slot, relay lock, heartbeat and slot losses.

The relay, ``pulse db migrate`` and ``pulse relay status|drop-slot`` all read or change these objects; keeping
their SQL here means the lock key a standby waits on and the one ``drop-slot`` checks can never differ.

Exactly one active relay: each relay takes a session-level advisory lock keyed by the slot name on its control
connection; a standby retries every second and takes over within seconds when the holder's session ends (client
keepalives and wal_sender_timeout bound this even when its host vanishes). The slot itself admits one streaming
reader, so even a relay that lost its lock cannot read next to the new holder.

Lost slots: with ``max_slot_wal_keep_size`` set (scripts/services.sh and docker/compose.yaml set 4GB), a checkpoint
removes WAL a slot still needs once it trails by more than that, and marks the slot ``lost`` (``wal_status``); it
can never stream again. The relay then drops it and creates it anew (:func:`recreate`), which loses no event: rows
leave ``shared.outbox`` only after their confirm, and the start-up sweep publishes the rows still there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from pulse.infra import outbox
from pulse.infra.outbox import AnyConn

log = logging.getLogger(__name__)

LOCK_CLASS = 0x70756C73  # 'puls': first key of the (int, int) advisory lock; the second is a hash of the slot name
LOCK_KEY_SQL = "hashtext(%s) & 2147483647"
# A holder whose host vanishes must lose the lock (and its walsender) in seconds, not after TCP's two hours.
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
# How PostgreSQL 13-17 word a refused START_REPLICATION on a lost slot: "This slot has been invalidated because it
# exceeded the maximum reserved size." and "requested WAL segment ... has already been removed".
SLOT_LOST_MARKERS = ("has been invalidated", "has already been removed")

SLOT_SQL = """
SELECT s.database, s.active, s.active_pid, s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
       s.wal_status, s.safe_wal_size,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes
FROM pg_replication_slots s WHERE s.slot_name = %s"""

HOLDER_SQL = f"""
SELECT l.pid AS backend_pid, a.application_name, a.client_addr::text AS client_addr, a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.database = (
      SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %s AND l.objid::bigint = {LOCK_KEY_SQL}"""


class CdcUnavailable(RuntimeError):
    """The server cannot run the CDC relay (wal_level, slot of another database...); the message says how to fix it."""


class SlotLost(psycopg.OperationalError):
    """START_REPLICATION was refused because the slot was invalidated or the WAL it needs is gone."""


def _one(conn: AnyConn, query: str, params: tuple[object, ...] = ()) -> DictRow | None:
    return conn.cursor(row_factory=dict_row).execute(query, params).fetchone()


def _row(conn: AnyConn, query: str, params: tuple[object, ...] = ()) -> DictRow:
    """The row of a query that always returns one (a setting, a function's result, an existing slot)."""
    row = _one(conn, query, params)
    if row is None:
        raise LookupError(f"no row from: {query}")
    return row


def lsn_text(lsn: int) -> str:
    """An LSN as PostgreSQL writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_int(text: str) -> int:
    """The LSN PostgreSQL writes as ``16/B374D848``, as an integer."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def wal_level_problem(wal_level: str) -> str | None:
    """The one-sentence fix when the server's wal_level cannot feed the CDC relay, else None."""
    if wal_level == "logical":
        return None
    return (
        f"PostgreSQL runs with wal_level={wal_level}, but PULSE_OUTBOX_MODE=cdc needs logical: run "
        "ALTER SYSTEM SET wal_level = logical and restart PostgreSQL, or set PULSE_OUTBOX_MODE=polling."
    )


def wal_level(conn: AnyConn) -> str:
    """The server's ``wal_level`` setting."""
    level: str = _row(conn, "SHOW wal_level")["wal_level"]
    return level


def check_server(conn: AnyConn) -> None:
    """Raise :class:`CdcUnavailable` if this server cannot do logical decoding."""
    problem = wal_level_problem(wal_level(conn))
    if problem:
        raise CdcUnavailable(problem)


def ensure_publication(conn: AnyConn, publication: str) -> bool:
    """Create the insert-only publication of ``shared.outbox`` if missing (or fix its table and actions)."""
    name = sql.Identifier(publication)
    if publication_exists(conn, publication):
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE shared.outbox").format(name))
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish = 'insert')").format(name))
        return False
    try:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE shared.outbox WITH (publish = 'insert')").format(name))
    except psycopg.errors.DuplicateObject:  # created by another relay or migrator in the meantime
        return False
    return True


def publication_exists(conn: AnyConn, publication: str) -> bool:
    """True if the publication exists in this database."""
    return _one(conn, "SELECT 1 AS ok FROM pg_publication WHERE pubname = %s", (publication,)) is not None


def ensure_slot(conn: AnyConn, slot: str) -> bool:
    """Create the pgoutput logical slot in this database if missing; True when it was created."""
    row = _one(conn, "SELECT database, plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    dbname = conn.info.dbname
    if row is not None:
        if row["database"] != dbname or row["plugin"] != "pgoutput":
            raise CdcUnavailable(
                f"Replication slot {slot} belongs to database {row['database']} (plugin "
                f"{row['plugin']}), not to {dbname} with pgoutput: set PULSE_CDC_SLOT to another "
                "name."
            )
        return False
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    except psycopg.errors.DuplicateObject:  # another relay or migrator won the race: check what it created
        ensure_slot(conn, slot)
        return False
    log.info("created logical replication slot %s", slot)
    return True


def prepare(database_url: str, slot: str, publication: str) -> dict[str, Any]:
    """What `pulse db migrate` does in cdc mode: the publication, and the slot when wal_level allows it."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        created_pub = ensure_publication(conn, publication)
        problem = wal_level_problem(wal_level(conn))
        if problem:
            log.warning("%s", problem)
            return {"publication": publication, "publicationCreated": created_pub, "slot": None, "problem": problem}
        return {
            "publication": publication,
            "publicationCreated": created_pub,
            "slot": slot,
            "slotCreated": ensure_slot(conn, slot),
        }


def try_lock(conn: AnyConn, slot: str) -> bool:
    """Take the relay lock of ``slot`` on this session if it is free (held until the session ends)."""
    got: bool = _row(conn, f"SELECT pg_try_advisory_lock(%s, {LOCK_KEY_SQL}) AS got", (LOCK_CLASS, slot))["got"]
    return got


def holder(conn: AnyConn, slot: str) -> DictRow | None:
    """The backend holding the relay lock of ``slot`` (pid, application, client address, since), or None."""
    return _one(conn, HOLDER_SQL, (LOCK_CLASS, slot))


def slot_info(conn: AnyConn, slot: str) -> DictRow | None:
    """The slot's row with its lag and retained WAL in bytes, or None when there is no such slot."""
    return _one(conn, SLOT_SQL, (slot,))


def slot_lost_reason(conn: AnyConn, slot: str) -> str | None:
    """Why the slot can no longer stream (``wal_status = 'lost'``), else None (also when there is no slot)."""
    row = _one(conn, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    return "wal_status = lost" if row is not None and row["wal_status"] == "lost" else None


def confirmed_lsn(conn: AnyConn, slot: str) -> int:
    """The slot's confirmed position: every change before it is done with."""
    return lsn_int(
        _row(conn, "SELECT confirmed_flush_lsn::text AS lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))[
            "lsn"
        ]
    )


def flush_lsn(conn: AnyConn) -> int:
    """The server's WAL flush position now."""
    return lsn_int(_row(conn, "SELECT pg_current_wal_flush_lsn()::text AS lsn")["lsn"])


def advance(conn: AnyConn, slot: str, lsn: int) -> int:
    """Move the slot's confirmed position to ``lsn`` (never back), as a client confirming it would; returns the
    new position. The server decodes the WAL in between without sending it."""
    try:
        row = _row(
            conn,
            "SELECT end_lsn::text AS lsn FROM pg_replication_slot_advance(%s, GREATEST(%s::pg_lsn, "
            "(SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s)))",
            (slot, lsn_text(lsn), slot),
        )
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:  # "cannot be advanced": invalidated meanwhile
        raise SlotLost(f"could not advance slot {slot}: {exc}") from exc
    return lsn_int(row["lsn"])


def wait_released(conn: AnyConn, slot: str, timeout_s: float = 5.0) -> None:
    """A previous stream's walsender (ours after a broker error, or a dead holder's) exits a moment after
    its client; until then the slot is active and START_REPLICATION would be refused."""
    deadline = time.monotonic() + timeout_s
    while (
        _row(conn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))["active"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)


def recreate(conn: AnyConn, slot: str, reason: str) -> int:
    """Drop the lost slot, create it at the present and record the loss; returns the outbox rows then waiting
    (the events the slot still held are among them: a row goes only after its confirm)."""
    rows = outbox.count(conn)
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    ensure_slot(conn, slot)
    try:
        conn.execute(
            "INSERT INTO infra.relay_slot_losses (slot, reason, outbox_rows, pid, host) VALUES (%s, %s, %s, %s, %s)",
            (slot, reason, rows, os.getpid(), socket.gethostname()),
        )
    except psycopg.errors.UndefinedTable:
        log.info("cdc relay: no infra.relay_slot_losses table to record that in (run `pulse db migrate`)")
    return rows


def last_slot_loss(conn: AnyConn, slot: str) -> dict[str, Any] | None:
    """The last time the cdc relay found ``slot`` lost and created it again (``infra.relay_slot_losses``), or None."""
    if not _row(conn, "SELECT to_regclass('infra.relay_slot_losses') IS NOT NULL AS ok")["ok"]:
        return None
    row = _one(
        conn,
        "SELECT recreated_at, reason, outbox_rows, pid, host, extract(epoch FROM now() - recreated_at) "
        "AS age_s, count(*) OVER () AS times FROM infra.relay_slot_losses WHERE slot = %s "
        "ORDER BY recreated_at DESC LIMIT 1",
        (slot,),
    )
    if row is None:
        return None
    return {
        "at": row["recreated_at"].isoformat(),
        "reason": row["reason"],
        "outboxRows": row["outbox_rows"],
        "pid": row["pid"],
        "host": row["host"],
        "ageS": round(float(row["age_s"]), 1),
        "times": row["times"],
    }


def write_heartbeat(
    conn: AnyConn, slot: str, *, started_at: float, published: int, rate: float, last_publish_at: float | None
) -> None:
    """Upsert the holder's ``infra.relay_heartbeat`` row: who relays the slot, how fast, and when it last published."""
    conn.execute(
        "INSERT INTO infra.relay_heartbeat AS h (slot, mode, pid, host, started_at, updated_at, published, "
        "events_per_s, last_publish_at) VALUES (%s, 'cdc', %s, %s, to_timestamp(%s), now(), %s, %s, "
        "to_timestamp(%s)) ON CONFLICT (slot) DO UPDATE SET mode = EXCLUDED.mode, pid = EXCLUDED.pid, "
        "host = EXCLUDED.host, started_at = EXCLUDED.started_at, updated_at = now(), "
        "published = EXCLUDED.published, events_per_s = EXCLUDED.events_per_s, "
        "last_publish_at = coalesce(EXCLUDED.last_publish_at, h.last_publish_at)",
        (slot, os.getpid(), socket.gethostname(), started_at, published, rate, last_publish_at),
    )


def heartbeat(conn: AnyConn, slot: str) -> DictRow | None:
    """The relay heartbeat of ``slot`` with its age in seconds, or None (no row, or no table yet)."""
    if not _row(conn, "SELECT to_regclass('infra.relay_heartbeat') IS NOT NULL AS ok")["ok"]:
        return None
    return _one(
        conn,
        "SELECT *, extract(epoch FROM now() - updated_at) AS age_s FROM infra.relay_heartbeat WHERE slot = %s",
        (slot,),
    )


def drop(conn: AnyConn, slot: str) -> dict[str, Any]:
    """Drop ``slot`` unless a relay holds its lock or streams it; returns what was dropped."""
    info = slot_info(conn, slot)
    if info is None:
        return {"slot": slot, "dropped": False, "reason": "no such slot"}
    owner = holder(conn, slot)
    if owner is not None or info["active"]:
        pid = owner["backend_pid"] if owner else info["active_pid"]
        raise RuntimeError(f"Slot {slot} is in use by a running cdc relay (backend {pid}); stop it first.")
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    return {"slot": slot, "dropped": True, "freedBytes": info["retained_bytes"]}
