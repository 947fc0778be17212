"""PostgreSQL access: a connection pool, database creation, and one-transaction helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

# What every pooled connection is: rows come back as dicts (make_pool's row_factory).
Conn = psycopg.Connection[DictRow]
Pool = ConnectionPool[Conn]


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL did not answer at the configured URL."""


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it is missing; return True when it was created."""
    params = conninfo_to_dict(url)
    name = str(params.get("dbname", "postgres"))
    admin = make_conninfo(url, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
            log.info("created database %s", name)
            return True
    except psycopg.errors.DuplicateDatabase:
        return False
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"PostgreSQL is not reachable at {redact(url)}: {first_line(exc)}") from exc


def make_pool(url: str, *, min_size: int = 1, max_size: int = 20, name: str = "pulse") -> Pool:
    """An opened pool whose connections return rows as dicts."""
    # check: a connection killed by a database restart is replaced before use instead of failing one request.
    pool: Pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        check=check_connection,
        kwargs={
            "row_factory": dict_row,
            "connect_timeout": 5,
            # Prepare a statement on its second run on a connection, not its sixth: the pool opens connections as
            # load grows, and every statement's first runs on a new one were each parsed and planned again.
            "prepare_threshold": 1,
            # A lock holder or stuck session in pg_stat_activity then names its process.
            "application_name": f"{name}:{os.getpid()}",
            # Bounded waits: a lock held by a stuck or leaked transaction fails the handler
            # (which is retried) instead of stalling its queue, and the server ends a
            # transaction left idle by a client that lost track of it.
            "options": "-c lock_timeout=5s -c idle_in_transaction_session_timeout=20s",
        },
    )
    try:
        pool.open(wait=True, timeout=10)
    except Exception as exc:
        pool.close()
        raise DatabaseUnavailable(f"PostgreSQL is not reachable at {redact(url)}: {first_line(exc)}") from exc
    return pool


def check_connection(conn: Conn) -> None:
    """The pool's check before it hands out a connection, without a round trip when nothing is wrong.

    psycopg_pool's own check sends an empty query every time: a round trip on every checkout, i.e. on every
    handler and every API call. An idle connection has nothing to read unless the server is closing it (a
    restart sends a FATAL error, then EOF; a killed server's socket reads EOF), so only a readable socket, or a
    connection already marked bad, is worth the real check, which raises if the connection is dead.
    """
    pgconn = conn.pgconn
    if pgconn.status == psycopg.pq.ConnStatus.OK:
        poller = select.poll()  # not select(): a busy process may have descriptors past FD_SETSIZE
        poller.register(pgconn.socket, select.POLLIN)
        if not poller.poll(0):
            return
    ConnectionPool.check_connection(conn)


@contextlib.contextmanager
def transaction(pool: Pool) -> Iterator[Conn]:
    """A connection inside one transaction: committed on exit, rolled back on any exception."""
    with pool.connection() as conn, conn.transaction():
        yield conn


@contextlib.contextmanager
def pipelined(pool: Pool) -> Iterator[Conn]:
    """:func:`transaction` in pipeline mode: BEGIN travels with the first statement and COMMIT with the writes
    before it, so only the statements whose rows are fetched cost a round trip each (plus one at the end).

    A write that fails raises when its results are next read (a fetch, or the end of the block), still before
    anything commits."""
    with pool.connection() as conn, conn.pipeline(), conn.transaction():
        yield conn


@contextlib.contextmanager
def autocommit(pool: Pool) -> Iterator[Conn]:
    """A pooled connection in autocommit, for a single statement that is atomic on its own (one round trip)."""
    with pool.connection() as conn:
        conn.autocommit = True
        try:
            yield conn
        finally:
            if not conn.broken and not conn.closed:  # a broken one is discarded by the pool anyway
                conn.autocommit = False  # the pool hands it to others who expect transactions


class Batch:
    """One consumer's shared transaction: the connection, and the after-commit work of the message in hand."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.callbacks: list[Callable[[], object]] = []
        # Inbox claims taken for the whole batch up front (pulse.infra.inbox.claim_batch): (table, event id) → new.
        self.claims: dict[tuple[str, object], bool] = {}
        # Rows the batch's pre-lock read and locked, by (table, id), for its handlers to use instead of reading
        # them again; a handler that changes one keeps it current here.
        self.locked: dict[tuple[str, str], Any] = {}
        # What the batch's prepare step (Route.prepare) found or did before the transaction opened, by key.
        self.prepared: dict[tuple[str, str], Any] = {}
        # Rows the batch's handlers wrote, by kind, each kind written in one statement just before the commit.
        self.rows: dict[str, list[tuple[object, ...]]] = {}
        self.before_commit: list[Callable[[Conn], object]] = []

    def buffer(self, kind: str, write: Callable[[Conn, list[tuple[object, ...]]], object]) -> list[tuple[object, ...]]:
        """The rows of ``kind`` this batch holds, which ``write(conn, rows)`` writes in one go just before the commit
        (kinds in the order first used, rows in the order appended)."""
        rows = self.rows.get(kind)
        if rows is None:
            rows = self.rows[kind] = []
            self.before_commit.append(lambda conn: write(conn, rows))
        return rows


# The batch a consumer thread has open; handlers find it here so their signatures stay handler(deps, envelope).
_local = threading.local()


@contextlib.contextmanager
def batch(pool: Pool) -> Iterator[Batch]:
    """One transaction for many messages on this thread: :func:`unit` inside it neither commits nor takes a savepoint.

    Committed when the block exits normally (one WAL flush and one pool checkout for the whole batch), after the
    batch's ``before_commit`` work (the buffered rows: outbox, order view). A handler
    that raises leaves its statements in the transaction, so the batch's owner must not commit after one: it rolls
    the whole batch back and takes each message alone (pulse.infra.consumer._process_batch).
    """
    with pool.connection() as conn, conn.transaction():
        current = Batch(conn)
        _local.batch = current
        try:
            yield current
            for fn in current.before_commit:
                fn(conn)
        finally:
            _local.batch = None


def open_batch(conn: object) -> Batch | None:
    """The consumer batch open on this thread, if ``conn`` is its connection (None otherwise)."""
    current: Batch | None = getattr(_local, "batch", None)
    return current if current is not None and current.conn is conn else None


@contextlib.contextmanager
def unit(pool: Pool) -> Iterator[Conn]:
    """A handler's transaction: the thread's open batch as it is, else a transaction of its own.

    No savepoint per handler in a batch: SAVEPOINT and RELEASE were two round trips of every message (16 of the
    59 statements of a checkout), paid to keep a batch going after a handler fails, which is rare. A failure rolls
    the whole batch back instead (see :func:`batch`); handlers that need to undo part of their own work (a version
    conflict) still take a savepoint of their own.
    """
    current = getattr(_local, "batch", None)
    if current is None:
        with transaction(pool) as conn:
            yield conn
        return
    yield current.conn


def after_commit(fn: Callable[[], object]) -> None:
    """Run ``fn()`` once the effects are committed: now outside a batch, after the batch's commit inside one."""
    current = getattr(_local, "batch", None)
    if current is None:
        fn()
    else:
        current.callbacks.append(fn)


def take_claim(table: str, event_id: object) -> bool | None:
    """The batch's up-front inbox claim of this event, used once (None: not claimed up front, or no batch)."""
    current: Batch | None = getattr(_local, "batch", None)
    if current is None or not current.claims:
        return None
    return current.claims.pop((table, event_id), None)


def prepared(key: tuple[str, str]) -> Any:
    """What the open batch's prepare step left under ``key`` (None: nothing, or no batch open on this thread)."""
    current: Batch | None = getattr(_local, "batch", None)
    return None if current is None else current.prepared.get(key)


def connect(url: str, **kwargs: Any) -> Conn:
    """A single dict-row connection, for tools that need one outside the pool (relays, checks)."""
    return psycopg.connect(url, row_factory=dict_row, connect_timeout=5, **kwargs)


def redact(url: str) -> str:
    """The URL without its password, fit for a message."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


Row = TypeVar("Row")


def one(cursor: psycopg.Cursor[Row]) -> Row:
    """The row of a statement that always returns one (``UPDATE ... RETURNING`` of a locked row, an aggregate,
    ``INSERT ... RETURNING`` without ON CONFLICT): psycopg types ``fetchone()`` as Optional for every query, and a
    missing row here is a bug, not a case to handle."""
    row = cursor.fetchone()
    if row is None:
        raise LookupError("the statement returned no row")
    return row
