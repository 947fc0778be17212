"""Where the machine's CPU went during a measurement: per-component CPU seconds read from /proc.

On a 2-core box the services, the server and the load generator all compete; this is the evidence for
what bounds a figure (a component near a full core, or the whole machine near 2 cores).

Inside a ``pulse serve`` process the threads are told apart by their OS names (pulse.infra.threadname): ``relay``,
``c:<queue>:<n>`` for consumers, the schedulers by name; the rest (the main thread's event loop, the threadpool
that runs sync endpoints, psycopg's pool workers) is the API. With a private PostgreSQL (bench/pgserver.py) only
its postmaster's children count as "postgres", and backends of the load generator's own role are set apart.
"""

from __future__ import annotations

import os
import time
from collections import Counter

TICK = os.sysconf("SC_CLK_TCK")
SERVE = "pulse serve"
SCHEDULERS = {"sweeper", "reconciler", "saga-watchdog", "fault-ticker", "consumer-superv"}
# The components, in its order, then what is not the system under test.
GROUPS = ("API", "consumers", "relay", "schedulers", "PostgreSQL", "RabbitMQ", "Redis")
SYSTEM = set(GROUPS)


def classify_thread(comm: str) -> str:
    """The part of ``pulse serve`` a thread of that OS name belongs to."""
    if comm == "relay":
        return "relay"
    if comm.startswith("c:"):
        return "consumers"
    if comm in SCHEDULERS:
        return "schedulers"
    return "API"


def group(component: str) -> str:
    """The issue's component a /proc component belongs to; anything outside the system under test keeps its name."""
    if component.startswith(SERVE + ": "):
        return component.split(": ", 1)[1]
    return {"postgres": "PostgreSQL", "rabbitmq": "RabbitMQ", "redis": "Redis"}.get(component, component)


class Postgres:
    """Which PostgreSQL processes are this run's: the private postmaster and its children, minus the backends of
    ``probe_role`` (the load generator's completion queries), which are charged to the load generator."""

    def __init__(self, postmaster: int | None = None, probe_role: str | None = None):
        self.postmaster, self.probe_role = postmaster, probe_role

    def component(self, pid: int, ppid: int, cmdline: str) -> str:
        if self.postmaster is None:
            return "postgres"
        if pid != self.postmaster and ppid != self.postmaster:
            return "postgres (other clusters)"
        if self.probe_role and cmdline.startswith(f"postgres: {self.probe_role} "):
            return "postgres (load generator)"
        return "postgres"


def _component(pid: int, ppid: int, comm: str, cmdline: str, mine: dict[int, str], pg: Postgres) -> str:
    if pid in mine:
        return mine[pid]
    if comm.startswith("pgbench"):
        return "pgbench"
    if comm.startswith("postgres") or cmdline.startswith("postgres:"):
        return pg.component(pid, ppid, cmdline)
    if comm == "beam.smp" or "rabbit" in cmdline:
        return "rabbitmq"
    if comm.startswith("redis-server"):
        return "redis"
    if comm.startswith("redis-benchmark"):
        return "redis-benchmark"
    if "pulse" in cmdline and "serve" in cmdline:
        return "pulse serve (other)"
    return "other"


def _ticks(stat: str) -> tuple[str, list[str]]:
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def _threads(pid: int) -> Counter:
    """CPU seconds of each part of one ``pulse serve`` process, by its threads' OS names."""
    out: Counter = Counter()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                comm, fields = _ticks(f.read())
        except OSError:
            continue  # the thread ended between the listing and the read
        out[f"{SERVE}: {classify_thread(comm)}"] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def snapshot(mine: dict[int, str] | None = None, pg: Postgres | None = None) -> tuple[float, Counter]:
    """(monotonic time, CPU seconds per component so far); ``mine`` names pids of this run's processes.

    A pid named ``"pulse serve"`` is split per thread; one named ``"pulse serve: API"`` (an API child of
    ``--processes``) is charged whole to that part.
    """
    mine, pg = mine or {}, pg or Postgres()
    totals: Counter = Counter()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        comm, fields = _ticks(raw)
        component = _component(pid, int(fields[1]), comm, cmdline, mine, pg)
        if component == SERVE:
            totals.update(_threads(pid))
        else:
            totals[component] += (int(fields[11]) + int(fields[12])) / TICK
    return time.monotonic(), totals


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def ms_per_unit(before: Counter, after: Counter, units: int, machine_busy_s: float | None = None) -> dict | None:
    """CPU milliseconds per unit of work (a checkout) between two snapshots, per issue component and in total.

    ``total`` is the system under test only (API, consumers, relay, schedulers, PostgreSQL, RabbitMQ, Redis); the
    load generator and whatever else ran on the machine are listed beside it, not in it. A process that exited
    during the window is missed (its ticks vanish), so a negative delta counts as 0.
    """
    if not units:
        return None
    by_group: Counter = Counter()
    for component in set(before) | set(after):
        by_group[group(component)] += max(0.0, after.get(component, 0) - before.get(component, 0))
    ms = {g: round(1000 * s / units, 2) for g, s in by_group.items()}
    out = {
        "units": units,
        "total": round(sum(v for g, v in ms.items() if g in SYSTEM), 2),
        "by_component": {g: ms.get(g, 0.0) for g in GROUPS},
        "outside_the_system": dict(
            sorted(((g, v) for g, v in ms.items() if g not in SYSTEM and v), key=lambda kv: -kv[1])
        ),
    }
    if machine_busy_s is not None:
        out["machine_busy"] = round(1000 * machine_busy_s / units, 2)
    return out


class CpuMeter:
    """``with CpuMeter({pid: "pulse serve"}) as m: ...`` then ``m.result()``: cores used per component."""

    def __init__(self, mine: dict[int, str] | None = None, pg: Postgres | None = None):
        self.mine = dict(mine or {})
        self.mine.setdefault(os.getpid(), "load generator")
        self.pg = pg

    def __enter__(self):
        self.t0, self.c0 = snapshot(self.mine, self.pg)
        self.m0 = machine_busy()
        return self

    def __exit__(self, *exc):
        self.t1, self.c1 = snapshot(self.mine, self.pg)
        self.m1 = machine_busy()

    def result(self) -> dict:
        """Average cores used by each component (a process that exited during the window is missed)."""
        wall = self.t1 - self.t0
        used = {k: round((self.c1[k] - self.c0.get(k, 0)) / wall, 2) for k in self.c1}
        busy = (self.m1[0] - self.m0[0]) / wall
        serve = sum(v for k, v in used.items() if k.startswith(SERVE + ": "))
        return {
            "cores": os.cpu_count(),
            "machine_busy_cores": round(busy, 2),
            "by_component_cores": dict(sorted(((k, v) for k, v in used.items() if v >= 0.01), key=lambda kv: -kv[1])),
            SERVE + " (all threads)": round(serve, 2),
        }

    def per_unit(self, units: int) -> dict | None:
        """CPU ms per unit of work in this window (see :func:`ms_per_unit`)."""
        return ms_per_unit(self.c0, self.c1, units, self.m1[0] - self.m0[0])
