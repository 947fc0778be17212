"""What a load run measured, and its report: latency histograms (HDR), the counters the sessions write into
(:class:`Tally`), create→COMPLETED timings (polled during the run, or read from the database after it) and
the summary dict :func:`pulse.tools.load.run_load` returns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, defaultdict
from typing import Any

from hdrh.histogram import HdrHistogram

TERMINAL = ("COMPLETED", "FAILED")


class LatencyHistogram:
    """Latencies from 1 µs to 10 min with 3 significant digits (an HDR histogram), reported in milliseconds."""

    LOWEST_US, HIGHEST_US, DIGITS = 1, 600_000_000, 3

    def __init__(self) -> None:
        self._h = HdrHistogram(self.LOWEST_US, self.HIGHEST_US, self.DIGITS)

    def record(self, seconds: float) -> None:
        """Add one latency given in seconds (clamped into the histogram's range)."""
        us = int(round(seconds * 1_000_000))
        self._h.record_value(min(max(us, self.LOWEST_US), self.HIGHEST_US))

    @property
    def count(self) -> int:
        count: int = self._h.get_total_count()
        return count

    def percentile_ms(self, percentile: float) -> float | None:
        """The latency below which ``percentile`` % of the recorded values fall, in ms (None when empty)."""
        if self.count == 0:
            return None
        value: int = self._h.get_value_at_percentile(percentile)
        return value / 1000.0

    def max_ms(self) -> float | None:
        return None if self.count == 0 else self._h.get_max_value() / 1000.0

    def mean_ms(self) -> float | None:
        return None if self.count == 0 else self._h.get_mean_value() / 1000.0

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        self._h.add(other._h)
        return self

    def summary(self) -> dict[str, Any]:
        """count, p50, p90, p99, max and mean (ms, rounded to µs)."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        return {
            "count": self.count,
            "p50": r(self.percentile_ms(50)),
            "p90": r(self.percentile_ms(90)),
            "p99": r(self.percentile_ms(99)),
            "max": r(self.max_ms()),
            "mean": r(self.mean_ms()),
        }


@dataclasses.dataclass
class Tally:
    """Counters and histograms the sessions of one run write into (one event loop, so no locks)."""

    requests: defaultdict[str, Counter[str]] = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    latency: defaultdict[str, LatencyHistogram] = dataclasses.field(
        default_factory=lambda: defaultdict(LatencyHistogram)
    )
    completion: LatencyHistogram = dataclasses.field(default_factory=LatencyHistogram)
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    orders: list[str] = dataclasses.field(default_factory=list)
    sessions: int = 0
    skipped: int = 0
    cart_adds: int = 0
    checkouts: int = 0

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.requests.values())


def completion_from_poll(tally: Tally) -> dict[str, Any]:
    return {
        "method": "poll",
        "tracked": sum(tally.outcomes.values()),
        **dict(tally.outcomes),
        "latency_ms": tally.completion.summary(),
    }


def completion_from_db(
    database_url: str | None, order_ids: list[str], *, timeout_s: float = 30.0, poll_s: float = 0.2
) -> dict[str, Any]:
    """Wait until these orders are terminal, then measure create→terminal from their own timestamps.

    ``sustained_per_s`` is the completed orders divided by the span from the first creation to the
    last completion: a server that builds a backlog during the run is charged for draining it.
    """
    if not database_url:
        raise ValueError("Measuring completion from the database needs its URL (PULSE_DATABASE_URL).")
    if not order_ids:
        return {"method": "db", "tracked": 0, "latency_ms": LatencyHistogram().summary()}
    from pulse.infra import db

    deadline = time.monotonic() + timeout_s
    with db.connect(database_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT status, EXTRACT(EPOCH FROM created_at) AS created, EXTRACT(EPOCH FROM updated_at) AS updated "
                "FROM orders.orders WHERE id = ANY(%s::uuid[])",
                (order_ids,),
            ).fetchall()
            pending = sum(1 for r in rows if r["status"] not in TERMINAL) + len(order_ids) - len(rows)
            if pending == 0 or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        steps = saga_steps(conn, order_ids)
    hist = LatencyHistogram()
    outcomes: Counter[str] = Counter()
    completed = [r for r in rows if r["status"] == "COMPLETED"]
    for r in rows:
        outcomes[r["status"] if r["status"] in TERMINAL else "TIMED_OUT"] += 1
    outcomes["TIMED_OUT"] += len(order_ids) - len(rows)
    for r in completed:
        hist.record(float(r["updated"] - r["created"]))
    span = (float(max(r["updated"] for r in completed)) - float(min(r["created"] for r in rows))) if completed else 0
    return {
        "method": "db",
        "tracked": len(order_ids),
        **dict(outcomes),
        "latency_ms": hist.summary(),
        "sustained_per_s": round(len(completed) / span, 2) if span > 0 else None,
        "steps": steps,
    }


# The saga's steps, by the event each one ends with. ORDER_UPDATED is left out: it echoes a status change to the
# view in the same transaction as the step that made it.
STEP_EVENTS = (
    "ORDER_CREATED",
    "STOCK_RESERVED",
    "STOCK_FAILED",
    "PAYMENT_PROCESSED",
    "PAYMENT_FAILED",
    "STOCK_RELEASED",
    "PAYMENT_REFUNDED",
)


def saga_steps(conn: Any, order_ids: list[str]) -> dict[str, Any]:
    """Where create→COMPLETED goes, step by step, for the completed orders that took the most common path.

    A step runs from the one before it (the order's creation first) to its event's row in ``infra.event_log``,
    stamped when the emitting transaction wrote it; the last step ends at the order's COMPLETED update. So a step
    holds the relay, the broker, the consumer and the handler of its event. A tail that shows in every step at
    once comes from what they share (a process's GIL, the machine), not from one module."""
    rows = conn.execute(
        "SELECT o.id, EXTRACT(EPOCH FROM o.created_at) AS created, EXTRACT(EPOCH FROM o.updated_at) AS updated, "
        "e.event_type, EXTRACT(EPOCH FROM min(e.created_at)) AS at FROM orders.orders o "
        "JOIN infra.event_log e ON e.aggregate_id = o.id::text "
        # Also on aggregate_id itself, so the event log is read through its index, not scanned whole.
        "WHERE o.id = ANY(%(ids)s::uuid[]) AND e.aggregate_id = ANY(%(ids)s::text[]) AND o.status = 'COMPLETED' "
        "AND e.event_type = ANY(%(types)s) AND NOT e.redriven "
        "GROUP BY o.id, o.created_at, o.updated_at, e.event_type",
        {"ids": [str(i) for i in order_ids], "types": list(STEP_EVENTS)},
    ).fetchall()
    marks: dict[Any, list[tuple[float, str]]] = defaultdict(list)
    for r in rows:
        marks[r["id"]].append((float(r["at"]), r["event_type"]))
    ends = {r["id"]: (float(r["created"]), float(r["updated"])) for r in rows}
    paths: dict[tuple[str, ...], list[list[float]]] = defaultdict(list)
    for order, events in marks.items():
        events.sort()
        times = [ends[order][0], *(t for t, _ in events), ends[order][1]]
        paths[tuple(e for _, e in events)].append([b - a for a, b in zip(times, times[1:], strict=False)])
    if not paths:
        return {"orders": 0, "path": [], "steps": []}
    path, gaps = max(paths.items(), key=lambda item: len(item[1]))
    names = ["placed", *path, "COMPLETED"]
    steps = []
    for i in range(len(names) - 1):
        hist = LatencyHistogram()
        for g in gaps:
            hist.record(max(g[i], 0.0))
        summary = hist.summary()
        steps.append({"from": names[i], "to": names[i + 1], "p50_ms": summary["p50"], "p99_ms": summary["p99"]})
    return {
        "orders": len(gaps),
        "other_paths": sum(map(len, paths.values())) - len(gaps),
        "path": names,
        "steps": steps,
    }


def report(
    tally: Tally,
    elapsed: float,
    urls: list[str],
    health: dict[str, Any],
    *,
    rate: float | None,
    concurrency: int | None,
    duration_s: float,
    mix: dict[str, Any],
    products: int,
    completion: dict[str, Any] | None,
    client: str,
) -> dict[str, Any]:
    t = tally
    server_errors = sum(n for c in t.requests.values() for s, n in c.items() if s.startswith("5"))
    transport_errors = sum(n for c in t.requests.values() for s, n in c.items() if s.startswith("error:"))
    return {
        "mode": "open" if rate else "closed",
        "client": client,
        "rate": rate,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed, 3),
        "urls": urls,
        "strategy": health.get("strategy"),
        "outbox_mode": health.get("outboxMode"),
        "mix": mix,
        "products": products,
        "sessions": t.sessions,
        "skipped_sessions": t.skipped,
        "requests": {route: dict(sorted(c.items())) for route, c in sorted(t.requests.items())},
        "requests_total": t.total(),
        "requests_per_s": round(t.total() / elapsed, 2),
        "server_errors": server_errors,
        "transport_errors": transport_errors,
        "latency_ms": {route: h.summary() for route, h in sorted(t.latency.items())},
        "cart_adds": t.cart_adds,
        "cart_adds_per_s": round(t.cart_adds / elapsed, 2),
        "checkouts": t.checkouts,
        "checkouts_per_s": round(t.checkouts / elapsed, 2),
        "completion": completion,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
