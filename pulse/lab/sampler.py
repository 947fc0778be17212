"""Snapshots over time while a scenario runs: Redis − PostgreSQL per product, relay lag, reconciliation passes.

The database keeps end states; a drift that reconciliation repaired a second later leaves no trace there.
A :class:`Sampler` is a background thread that reads the drift every ``interval_ms`` until the caller stops it:

>>> with lab.sampler([IPHONE]) as s:       # or Sampler(lab, [IPHONE]).start() ... s.stop()
...     lab.flush_redis(); lab.reconcile_now(cooldown_s=0)
>>> s.frame()                               # one row per product per sample, t in seconds since start
>>> drift_chart.drift_figure(s)             # the drift timeline, with fault strikes and passes marked
"""

from __future__ import annotations

import logging
import threading
import time

import pandas as pd

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = [
    "t",
    "product_id",
    "name",
    "db_stock",
    "redis_stock",
    "db_reserved",
    "redis_reserved",
    "stock_drift",
    "reserved_drift",
]
LAG_COLUMNS = ["t", "rows", "oldest_age_s"]
PASS_COLUMNS = ["t", "source", "stock", "reserved", "carts"]
STRIKE_COLUMNS = ["t", "name", "action"]


class Sampler:
    """Records drift (per product) and relay lag every ``interval_ms`` from :meth:`start` until :meth:`stop`.

    Times are seconds since ``started_at`` (epoch seconds, set by :meth:`start`). Reconciliation passes are
    the lab's own (``lab.reconcile_runs``, with their fix counts) and any other reconciler's (the server's
    periodic one), seen as a new stamp in the reconcile marker between two samples.
    """

    def __init__(self, lab, products: list[str] | None = None, *, interval_ms: int = 250):
        self.lab, self.products, self.interval_s = lab, products, interval_ms / 1000
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self.errors: list[str] = []
        self._samples: list[dict] = []
        self._lag: list[dict] = []
        self._server_passes: list[dict] = []
        self._marks: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        """Take a first sample now and keep sampling in a background thread."""
        if self._thread is None:
            self.started_at = time.time()
            self.sample()
            self._thread = threading.Thread(target=self._run, name="pulse-lab-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> Sampler:
        """Take a last sample and stop the thread; safe to call twice."""
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            self._thread.join(5)
            self.sample()
            self.stopped_at = time.time()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Read drift, relay lag and the reconcile marker once (the thread calls this every interval)."""
        q = self.lab.q
        try:
            drift = q.drift(self.products)
            lag = q.relay_lag()
            marks = q.reconcile_marks()
        except Exception as exc:  # a restart or a flush in progress: this sample is skipped, the next one reads
            self.errors.append(f"{type(exc).__name__}: {exc}")
            log.debug("sample failed", exc_info=True)
            return
        t = time.time() - self.started_at
        rows = drift.assign(t=t)[SAMPLE_COLUMNS].to_dict("records")
        with self._lock:
            self._samples.extend(rows)
            self._lag.append({"t": t, "rows": lag["rows"], "oldest_age_s": lag["oldestAgeS"]})
            if self._marks is not None:
                for instance, at in marks.items():
                    if at != self._marks.get(instance):
                        self._server_passes.append({"t": at - self.started_at, "instance": instance})
            self._marks = marks

    # ----- the data, as DataFrames -------------------------------------------------------------------

    def frame(self) -> pd.DataFrame:
        """One row per product per sample: t (s since start), name, DB and Redis values, the drifts."""
        with self._lock:
            df = pd.DataFrame(self._samples, columns=SAMPLE_COLUMNS)
        df["t"] = df["t"].astype(float)
        return df

    def lag(self) -> pd.DataFrame:
        """Outbox rows waiting and the oldest row's age, per sample."""
        with self._lock:
            return pd.DataFrame(self._lag, columns=LAG_COLUMNS)

    def strikes(self) -> pd.DataFrame:
        """Faults that struck since the start (``infra.fault_log``): t, name, action."""
        df = self.lab.q.fault_strikes(self.started_at or 0.0)
        return pd.DataFrame(
            {"t": df["at"].astype(float) - (self.started_at or 0.0), "name": df["name"], "action": df["action"]},
            columns=STRIKE_COLUMNS,
        )

    def passes(self) -> pd.DataFrame:
        """Reconciliation passes since the start: the lab's (with fix counts) and the others' seen in the marker.

        A marker stamp has a one-second resolution; one within a second of a lab pass is that pass."""
        start = self.started_at or 0.0
        lab_runs = [
            {
                "t": r["at"] - start,
                "source": "lab",
                "stock": r.get("stock", 0),
                "reserved": r.get("reserved", 0),
                "carts": r.get("carts", 0),
            }
            for r in list(self.lab.reconcile_runs)
            if r["at"] >= start
        ]
        with self._lock:
            others = list(self._server_passes)
        rows = lab_runs + [
            {"t": p["t"], "source": "server", "stock": None, "reserved": None, "carts": None}
            for p in others
            if all(abs(p["t"] - r["t"]) > 1.0 for r in lab_runs)
        ]
        return pd.DataFrame(rows, columns=PASS_COLUMNS).sort_values("t", kind="stable").reset_index(drop=True)
