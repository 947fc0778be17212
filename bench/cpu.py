"""Where the machine's CPU went during a measurement: per-component CPU seconds read from /proc.

On a 2-core box the services, the server and the load generator all compete; this is the evidence for
what bounds a figure (a component near a full core, or the whole machine near 2 cores).
"""

from __future__ import annotations

import os
import time
from collections import Counter

TICK = os.sysconf("SC_CLK_TCK")


def _component(pid: int, comm: str, cmdline: str, mine: dict[int, str]) -> str:
    if pid in mine:
        return mine[pid]
    if comm.startswith("postgres") or comm.startswith("pgbench"):
        return "pgbench" if comm.startswith("pgbench") else "postgres"
    if comm == "beam.smp" or "rabbit" in cmdline:
        return "rabbitmq"
    if comm.startswith("redis-server"):
        return "redis"
    if comm.startswith("redis-benchmark"):
        return "redis-benchmark"
    if "pulse" in cmdline and "serve" in cmdline:
        return "pulse serve (other)"
    return "other"


def snapshot(mine: dict[int, str] | None = None) -> tuple[float, Counter]:
    """(monotonic time, CPU seconds per component so far); ``mine`` names pids of this run's processes."""
    mine = mine or {}
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
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        totals[_component(pid, comm, cmdline, mine)] += (int(fields[11]) + int(fields[12])) / TICK
    return time.monotonic(), totals


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


class CpuMeter:
    """``with CpuMeter({pid: "pulse serve"}) as m: ...`` then ``m.result()``: cores used per component."""

    def __init__(self, mine: dict[int, str] | None = None):
        self.mine = dict(mine or {})
        self.mine.setdefault(os.getpid(), "load generator")

    def __enter__(self):
        self.t0, self.c0 = snapshot(self.mine)
        self.m0 = machine_busy()
        return self

    def __exit__(self, *exc):
        self.t1, self.c1 = snapshot(self.mine)
        self.m1 = machine_busy()

    def result(self) -> dict:
        """Average cores used by each component (a process that exited during the window is missed)."""
        wall = self.t1 - self.t0
        used = {k: round((self.c1[k] - self.c0.get(k, 0)) / wall, 2) for k in self.c1}
        busy = (self.m1[0] - self.m0[0]) / wall
        return {"cores": os.cpu_count(), "machine_busy_cores": round(busy, 2),
                "by_component_cores": dict(sorted(((k, v) for k, v in used.items() if v >= 0.01),
                                                  key=lambda kv: -kv[1]))}
