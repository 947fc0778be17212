"""Named fault points. This module is the hook every component calls; with nothing armed each call is free.

Components call five hooks: ``point(name, **ctx)`` where a fault may crash, raise or delay;
``fires(name)`` where a fault changes a decision (a declined card); ``strike_params(name)`` where it changes a
value (a cart's time to live), returning the fault's params; ``lose_message(queue)`` where the
consumer may ack without handling; ``naive(name)`` where a pattern may be switched off.

Only a process in lab mode (``pulse serve --lab``, ``PULSE_LAB=1``) obeys faults: it gets a
:class:`FaultRegistry`, which reads the armed faults from ``infra.faults`` (at most one SELECT per
``refresh_s``, shared by all threads), so ``pulse faults arm`` takes effect in every lab process within half
a second, without a restart. Any other process gets :class:`IgnoredFaults`: every hook is a no-op, and it
only tells (start log line, ``/health``) that faults are armed. Every armed fault expires (``expires_at``),
so a notebook killed between arm and disarm cannot leave the next server declining cards for good.
A fault that strikes is first logged in ``infra.fault_log`` on its own autocommit connection, then acts:
a crash is counted even though the process is gone a moment later.

Arming, disarming and reading the strike log from outside is :mod:`pulse.faults_control`; what the
environment faults do is :mod:`pulse.faults_environment`; what faults exist is :mod:`pulse.faults_catalogue`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from pulse import faults_catalogue
from pulse.errors import Invalid
from pulse.faults_environment import ENVIRONMENT_ACTIONS
from pulse.infra.db import one

if TYPE_CHECKING:
    import psycopg

    from pulse.config import Settings

    Connection = psycopg.Connection[tuple[Any, ...]]

log = logging.getLogger(__name__)

ACTIONS = ("crash", "error", "drop", "delay", "trigger", "naive")
CRASH_STATUS = 137  # what a shell reports for SIGKILL, which a crash fault imitates
DEFAULT_TTL_S = 15 * 60

# Derived from the one catalogue (pulse.faults_catalogue): each named point and the action it gets when arm()
# is not told one; the faults that are events of the environment rather than places in the code (a process
# with a registry fires them from its tick, with their probability per tick); the naive switches.
POINTS = {e.name: e.action for e in faults_catalogue.entries("point")}
ENVIRONMENT_FAULTS = tuple(e.name for e in faults_catalogue.CATALOGUE if e.environment)
NAIVE_SWITCHES = tuple(e.name for e in faults_catalogue.entries("naive"))


class FaultInjected(RuntimeError):
    """An armed fault made this operation fail on purpose (the ``error`` action)."""


class UnknownFault(Invalid):
    """A fault name, action or parameter that the registry does not accept."""


def naive_on(name: str, configured: Collection[str], faults: NoFaults) -> bool:
    """A naive switch is on when configured at start (``PULSE_NAIVE``, kept only in lab mode) or switched on at
    run time in the registry."""
    return name in configured or faults.naive(name)


class NoFaults:
    """The no-op registry: no fault is ever armed, no naive switch is on. Every hook is here, so callers never
    check for a missing registry."""

    lab = False

    def point(self, name: str, **context: object) -> None:
        """Where a named fault may strike (crash, error, delay) when armed."""

    def fires(self, name: str, **context: object) -> bool:
        """True when an armed fault of this name strikes now (for faults that change a decision)."""
        return False

    def strike_params(self, name: str, **context: object) -> dict[str, Any] | None:
        """The armed fault's params when a fault of this name strikes now (it changes a value), else None."""
        return None

    def lose_message(self, queue: str, **context: object) -> bool:
        """True when the consumer should ack this message without handling it (a lost event)."""
        return False

    def naive(self, name: str) -> bool:
        """True when the naive switch ``name`` is on at run time."""
        return False

    def tick(self) -> None:
        """Give environment faults their chance to strike (the server's scheduler calls it twice a second)."""

    def armed_names(self) -> list[str]:
        """Names of the faults armed (and not expired) right now, as far as this registry knows."""
        return []

    def close(self) -> None:
        """Nothing to release."""


# The default of every component that takes a registry, so none of them checks for a missing one.
NO_FAULTS = NoFaults()


class IgnoredFaults(NoFaults):
    """What a process outside lab mode gets: obeys nothing, but can say what is armed.

    :meth:`armed_names` reads ``infra.faults`` at most once per ``refresh_s`` (``/health`` may be polled often),
    on a short connection of its own; when the database cannot answer it keeps the last answer.
    """

    def __init__(self, database_url: str, *, refresh_s: float = 5.0) -> None:
        self.database_url, self.refresh_s = database_url, refresh_s
        self._names: list[str] = []
        self._loaded_at: float | None = None
        self._lock = threading.Lock()

    def armed_names(self) -> list[str]:
        now = time.monotonic()
        if (self._loaded_at is None or now - self._loaded_at >= self.refresh_s) and self._lock.acquire(blocking=False):
            try:
                self._loaded_at = now
                with connect(self.database_url) as conn:
                    self._names = [
                        r[0]
                        for r in conn.execute(
                            f"SELECT name FROM infra.faults WHERE {UNEXPIRED} ORDER BY name"
                        ).fetchall()
                    ]
            except Exception as exc:  # the database being down must not fail /health; keep the last answer
                log.debug("could not read the armed faults: %s", exc)
            finally:
                self._lock.release()
        return list(self._names)


UNEXPIRED = "expires_at > clock_timestamp()"


@dataclasses.dataclass
class Fault:
    """One armed fault as read from ``infra.faults``, with its own seeded random stream."""

    name: str
    action: str
    probability: float
    params: dict[str, Any]
    seed: int
    armed_at: str
    rng: random.Random
    fired: int = 0
    # time.monotonic() at which it expires: a process that cannot reach the database keeps its last view, and
    # must still stop obeying a fault whose time is up.
    expires: float = float("inf")

    def strikes(self) -> bool:
        limit = self.params.get("max")
        if limit is not None and self.fired >= int(limit):
            return False
        return self.rng.random() < self.probability


class FaultRegistry(NoFaults):
    """Faults armed in PostgreSQL, refreshed at most every ``refresh_s`` by whichever thread asks first.

    Only lab processes use it (see :func:`from_settings`); expired rows are ignored.

    ``redis_url``/``amqp_url`` enable the environment faults (``redis.flush``, ``broker.restart``,
    ``db.restart``); they strike only from :meth:`tick`, which the server's scheduler calls.
    """

    def __init__(
        self, database_url: str, *, refresh_s: float = 0.5, redis_url: str | None = None, amqp_url: str | None = None
    ) -> None:
        self.database_url, self.refresh_s = database_url, refresh_s
        self.redis_url, self.amqp_url = redis_url, amqp_url
        self._armed: dict[str, Fault] = {}
        self._loaded_at = float("-inf")  # the first call reads, whatever the monotonic clock says
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._conn: Connection | None = None

    # -- the hooks ------------------------------------------------------------------------------
    def point(self, name: str, **context: object) -> None:
        fault = self._strike(name, context)
        if fault is None:
            return
        if fault.action == "delay" or (fault.action in ("error", "drop") and fault.params.get("ms")):
            time.sleep(float(fault.params.get("ms", 1000)) / 1000)  # chaos-naive: error/drop with ms fail late
        if fault.action == "crash":
            crash(name)
        elif fault.action in ("error", "drop"):
            raise FaultInjected(f"fault {name} injected")

    def fires(self, name: str, **context: object) -> bool:
        return self._strike(name, context) is not None

    def strike_params(self, name: str, **context: object) -> dict[str, Any] | None:
        fault = self._strike(name, context)
        return None if fault is None else dict(fault.params)

    def lose_message(self, queue: str, **context: object) -> bool:
        fault = self._current().get("consumer.lose")
        if fault is None or not _queue_matches(fault.params, queue):
            return False
        return self._strike("consumer.lose", {"queue": queue, **context}) is not None

    def naive(self, name: str) -> bool:
        fault = self._current().get(name)
        return fault is not None and fault.action == "naive"

    lab = True

    def armed(self) -> dict[str, Fault]:
        """The faults armed right now, as this process last read them."""
        return dict(self._current())

    def armed_names(self) -> list[str]:
        return sorted(self._current())

    def close(self) -> None:
        # Under the lock: another thread may be mid-query on this connection (a refresh), and closing a socket
        # under a thread that waits on it can leave that thread waiting on a reused descriptor, holding the
        # registry's locks, so every armed hook (consumer.before_ack among them) blocks.
        with self._log_lock:
            self._drop_connection()

    # -- internals ------------------------------------------------------------------------------
    def _strike(self, name: str, context: dict[str, object]) -> Fault | None:
        fault = self._current().get(name)
        if fault is None or fault.action == "naive":
            return None
        with self._lock:
            if not fault.strikes():
                return None
            fault.fired += 1
        self._log(fault, {**context, **({"ms": fault.params["ms"]} if "ms" in fault.params else {})})  # chaos-naive
        return fault

    def _current(self) -> dict[str, Fault]:
        now = time.monotonic()
        if now - self._loaded_at >= self.refresh_s and self._lock.acquire(blocking=False):
            # One thread refreshes; the others keep using what was read last rather than wait.
            try:
                self._refresh()
            finally:
                self._lock.release()
        # Every hot-path hook asks this, and almost always nothing is armed: no generator for an empty dict.
        armed = self._armed
        if armed and any(f.expires <= now for f in armed.values()):
            armed = self._armed = {n: f for n, f in armed.items() if f.expires > now}
        return armed

    def _refresh(self) -> None:
        self._loaded_at = time.monotonic()
        try:
            with self._log_lock:
                rows = (
                    self._connection()
                    .execute(
                        "SELECT f.name, f.action, f.probability, f.params, f.seed, f.armed_at::text AS armed_at, "
                        "(SELECT count(*) FROM infra.fault_log l WHERE l.name = f.name AND l.fired_at >= f.armed_at) "
                        "AS fired, extract(epoch FROM f.expires_at - clock_timestamp()) AS left_s "
                        f"FROM infra.faults f WHERE f.{UNEXPIRED}"
                    )
                    .fetchall()
                )
        except Exception as exc:  # the database being down must not stop the process; keep the last view
            log.debug("fault registry refresh failed: %s", exc)
            self._drop_connection()
            return
        armed: dict[str, Fault] = {}
        now = time.monotonic()
        for name, action, probability, params, seed, armed_at, fired, left_s in rows:
            # The database's clock says how long is left; counted down on ours (the two may differ).
            expires = now + float(left_s)
            old = self._armed.get(name)
            if old is not None and old.armed_at == armed_at:
                old.fired, old.expires = max(old.fired, int(fired)), expires
                armed[name] = old
                continue
            # Seeded by what already struck, so a restarted process continues the sequence instead of
            # replaying its first draw (which, for a crash, would crash every restart).
            rng = random.Random(f"{seed}:{name}:{fired}")
            armed[name] = Fault(
                name, action, float(probability), params or {}, int(seed), armed_at, rng, int(fired), expires
            )
        self._armed = armed

    def _environment_tick(self) -> None:
        if self.redis_url is None:
            return
        for name in ENVIRONMENT_FAULTS:
            fault = self._armed.get(name)
            if fault is None or fault.action != "trigger":
                continue
            with self._lock:
                if not fault.strikes():
                    continue
                fault.fired += 1
            # Off the caller's thread: a broker restart takes rabbitmqctl a few seconds.
            threading.Thread(target=self._act, args=(fault,), name=f"fault:{name}", daemon=True).start()

    def _act(self, fault: Fault) -> None:
        # Logged before acting, like every strike: the action may take seconds, and a crash fault elsewhere in
        # this process (or the campaign ending) must not make a strike that happened go uncounted.
        entry = self._log(fault, {"phase": "striking"})
        try:
            context = ENVIRONMENT_ACTIONS[fault.name](self, fault.params)
        except Exception as exc:
            context = {"failed": str(exc)[:200]}
            log.warning("fault %s could not act: %s", fault.name, exc)
        self._update_log(entry, context)
        log.warning("fault %s struck: %s", fault.name, context)

    def tick(self) -> None:
        """Refresh if due, then give each armed environment fault its chance to strike.

        Only the server's scheduler thread calls this (twice a second), so a short-lived CLI command
        that reads the registry never flushes Redis by accident.
        """
        self._current()
        self._environment_tick()

    def _log(self, fault: Fault, context: dict[str, object]) -> int | None:
        """Record a strike; returns the log row's id, or None when it could not be written."""
        payload = json.dumps({k: str(v) for k, v in context.items()})
        try:
            with self._log_lock:
                row = one(
                    self._connection().execute(
                        "INSERT INTO infra.fault_log (name, action, pid, context) VALUES (%s, %s, %s, %s::jsonb) "
                        "RETURNING id",
                        (fault.name, fault.action, os.getpid(), payload),
                    )
                )
            entry: int = row[0]
            return entry
        except Exception as exc:
            log.warning("could not log fault %s: %s", fault.name, exc)
            self._drop_connection()
            return None

    def _update_log(self, entry: int | None, context: dict[str, object]) -> None:
        if entry is None:
            return
        payload = json.dumps({k: str(v) for k, v in context.items()})
        try:
            with self._log_lock:
                self._connection().execute(
                    "UPDATE infra.fault_log SET context = %s::jsonb WHERE id = %s", (payload, entry)
                )
        except Exception as exc:  # the strike is counted already; only its outcome is missing
            log.warning("could not record the outcome of a fault: %s", exc)
            self._drop_connection()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            import psycopg

            self._conn = psycopg.connect(
                self.database_url,
                autocommit=True,
                connect_timeout=3,
                application_name=f"pulse-faults-log:{os.getpid()}",
            )
        return self._conn

    def _drop_connection(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:  # it is broken already; we only discard it
            pass
        self._conn = None


def crash(name: str) -> None:
    """Exit at once, as if killed: no cleanup, no flush, no finally blocks (the fault's whole point)."""
    log.critical("fault %s: crashing process %d", name, os.getpid())
    for handler in logging.getLogger().handlers:
        # A crash must happen even if the log cannot be written.
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(CRASH_STATUS)


def _queue_matches(params: dict[str, Any], queue: str) -> bool:
    wanted = params.get("queue") or params.get("queues")
    if not wanted:
        return True
    return queue in ([wanted] if isinstance(wanted, str) else wanted)


def connect(database_url: str) -> Connection:
    """A short connection to the fault tables, with timeouts (see below)."""
    import psycopg

    # Hooks run on the system's hot paths: a registry query must never hang them.
    return psycopg.connect(
        database_url,
        autocommit=True,
        connect_timeout=5,
        options="-c lock_timeout=2s -c statement_timeout=5s",
        application_name=f"pulse-faults:{os.getpid()}",
    )


def from_settings(settings: Settings, *, environment: bool = True) -> NoFaults:
    """The registry a process built from ``settings`` uses: a :class:`FaultRegistry` in lab mode (``environment``
    lets it execute environment faults), else :class:`IgnoredFaults`, which obeys nothing."""
    if not settings.lab:
        return IgnoredFaults(settings.database_url)
    return FaultRegistry(
        settings.database_url,
        redis_url=settings.redis_url if environment else None,
        amqp_url=settings.amqp_url if environment else None,
    )


def for_process(
    settings: Settings, faults: NoFaults | None = None, *, say_ignored: bool = True
) -> tuple[Settings, NoFaults]:
    """The settings and registry a process runs with; returns ``(settings, faults)``.

    Outside lab mode, ``PULSE_NAIVE`` is dropped and armed faults are ignored, each said in one log line, so an
    operator who finds a server behaving normally while faults are armed knows why (``say_ignored=False``: a
    server's API child, whose parent has said it). A registry passed in (a test's own hooks) is used as given.
    """
    lab = settings.lab
    if not lab and settings.naive:
        if say_ignored:
            log.warning(
                "PULSE_NAIVE=%s is ignored: naive switches are honoured only in lab mode "
                "(pulse serve --lab or PULSE_LAB=1)",
                ",".join(sorted(settings.naive)),
            )
        settings = settings.replace(naive=frozenset())
    if faults is None:
        faults = from_settings(settings)
        armed = [] if lab or not say_ignored else faults.armed_names()
        if armed:
            log.warning(
                "%d fault(s) armed in infra.faults are ignored because this process is not in lab mode: %s "
                "(they expire by themselves; pulse faults disarm --all removes them)",
                len(armed),
                ", ".join(armed),
            )
    return settings, faults
