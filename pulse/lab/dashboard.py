"""The live dashboard: controls to drive and break the system, charts that show what it did.

``dash = lab.dashboard(); dash.show()`` displays the controls and starts a background thread that
redraws the charts every ``interval_s`` seconds, so the kernel stays free for the next cell.
``dash.render()`` draws everything once as static output: that is what a headless run (papermill,
CI) records, and what a notebook calls at the end of an experiment.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import threading
import time

import pandas as pd

from pulse.lab import charts, drift_chart, sequence_chart
from pulse.lab import faults as lab_faults
from pulse.lab.load import LoadDriver

log = logging.getLogger(__name__)


# Invariants cheap enough to run every few seconds while load runs: each is one indexed query over the
# dashboard's own orders (scope: since it started), none reconciles, none reads the broker. Left out:
# money-balance and delivery (in-flight orders count against them until they settle), redis-matches-db (it
# needs a reconciliation pass first), outbox-drained and dlq-explained (a queue is never empty under load).
# orders-terminal only judges orders untouched for STUCK_AFTER_S, so orders in flight are not reported.
LIVE_INVARIANTS = (
    "no_oversell",
    "stock_conservation",
    "cart_promise_kept",
    "effects_once",
    "one_charge_per_order",
    "failed_orders_refunded",
    "idempotency_lock_exclusive",
    "events_routed",
    "orders_terminal",
)
STUCK_AFTER_S = 20.0


def live_invariants(database_url: str, since: dt.datetime) -> list[dict]:
    """Run :data:`LIVE_INVARIANTS` once for orders created since ``since``: ``[{name, passed, count, details}]``.

    These are no-oversell, stock-conservation, cart-promise-kept, effects-once, one-charge-per-order,
    failed-orders-refunded, idempotency-lock-exclusive, events-routed and orders-terminal (orders untouched
    for 20 s): each is one query, fast enough to repeat every few seconds while load runs.
    """
    from pulse.infra import db
    from pulse.tools.check import invariants

    scope = invariants.Scope(since=since)
    out = []
    with db.connect(database_url, autocommit=True) as conn:
        for name in LIVE_INVARIANTS:
            check = getattr(invariants, name)
            result = check(conn, scope, STUCK_AFTER_S) if name == "orders_terminal" else check(conn, scope)
            out.append(
                {
                    "name": result.name,
                    "passed": result.passed,
                    "count": len(result.offending),
                    "details": result.details,
                }
            )
    return out


def invariants_html(results: list[dict], *, checked_at: str = "") -> str:
    """The invariants panel: one badge per invariant, green when it holds, red with its violation count."""
    if not results:
        return "<div class='pulse-invariants'><b>Invariants</b>: not checked yet</div>"
    badges = []
    for r in results:
        color = "#2e7d32" if r["passed"] else "#c62828"
        text = r["name"] if r["passed"] else f"{r['name']} ✗ {r['count'] or ''}".rstrip()
        title = html.escape(r["details"], quote=True)
        badges.append(
            f"<span title='{title}' style='display:inline-block;margin:2px;padding:2px 8px;"
            f"border-radius:10px;background:{color};color:white;font-size:12px'>{html.escape(text)}</span>"
        )
    broken = sum(not r["passed"] for r in results)
    head = "all hold" if not broken else f"{broken} broken"
    when = f" · checked {checked_at}" if checked_at else ""
    return f"<div class='pulse-invariants'><b>Invariants ({head}{when})</b><br>" + "".join(badges) + "</div>"


class Dashboard:
    """Charts (terminal states, compensations, drift now and over time, reconciliation fixes, relay lag, one
    order's sequence diagram), a live invariants panel, and controls (strategy, outbox mode, decline rate,
    naive switches, load rate, fault probabilities, reconcile / sweep / flush / crash buttons) for one
    :class:`pulse.lab.Lab`. Times are seconds since the dashboard was created."""

    def __init__(
        self,
        lab,
        *,
        interval_s: float = 2.0,
        products: list[str] | None = None,
        bucket_s: float = 1.0,
        invariants_every_s: float = 3.0,
    ):
        from pulse.lab.sampler import Sampler
        from pulse.seed import AIRPODS, IPHONE, KINDLE, MACBOOK

        self.lab, self.interval_s, self.bucket_s = lab, interval_s, bucket_s
        self.invariants_every_s = invariants_every_s
        self.products = products or [IPHONE, AIRPODS, MACBOOK, KINDLE]
        self.traced_order: str | None = None
        self.load = LoadDriver(lambda: lab.url, self.products, rate=0)
        self.sampler = Sampler(lab, self.products, interval_ms=500).start()
        self.started_at = self.sampler.started_at
        self.last_invariants: list[dict] = []
        self._checked_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._widgets = None
        self.errors: list[str] = []

    # ----- data -------------------------------------------------------------------------------------

    def trace(self, order_id: str) -> None:
        """Show this order in the sequence chart (default: the latest order the tap saw)."""
        self.traced_order = str(order_id)

    def _traced(self) -> str | None:
        if self.traced_order:
            return self.traced_order
        tap = self.lab.tap
        created = [e["orderId"] for e in (tap.events if tap else []) if e["eventType"] == "ORDER_CREATED"]
        return created[-1] if created else None

    def snapshot(self) -> dict:
        """Everything the charts show, read now (DataFrames and lists)."""
        q = self.lab.q
        order = self._traced()
        timeline = (
            self.lab.timeline(order)
            if order
            else pd.DataFrame(columns=["eventId", "eventType", "stage", "at", "derived"])
        )
        return {
            "start": self.started_at,
            "terminal": q.terminal_over_time(self.bucket_s),
            "compensations": q.compensations_over_time(self.bucket_s),
            "drift": q.drift(self.products),
            "reconcile_runs": list(self.lab.reconcile_runs),
            "lag_frame": self.sampler.lag(),
            "timeline": timeline,
            "timeline_title": f"Order {order[:8]}…: module → outbox → broker → modules"
            if order
            else "One order's messages",
            "samples": self.sampler.frame(),
            "strikes": self.sampler.strikes(),
            "passes": self.sampler.passes(),
            "lag": q.relay_lag(),
            "outcomes": q.outcome_totals(),
            "compensation_totals": q.compensation_totals(),
            "drift_summary": q.drift_summary(self.products),
            "status_counts": q.status_counts(),
        }

    def invariants(self) -> list[dict]:
        """Run the live invariants now (see :func:`live_invariants`) for orders since the dashboard started."""
        since = dt.datetime.fromtimestamp(self.started_at, dt.UTC)
        self.last_invariants = live_invariants(self.lab.settings.database_url, since)
        self._checked_at = time.time()
        return self.last_invariants

    def summary(self, snap: dict | None = None) -> dict:
        """The numbers behind the charts, fit for :func:`pulse.lab.record`."""
        snap = snap or self.snapshot()
        return {
            "outcomes": snap["outcomes"],
            "compensations": snap["compensation_totals"],
            "drift": snap["drift_summary"],
            "relayLag": snap["lag"],
            "restarts": self.lab.restarts,
            "reconcileRuns": len(snap["reconcile_runs"]),
            "load": dict(self.load.counts),
            "invariants": {r["name"]: r["count"] for r in self.last_invariants},
        }

    def figures(self, snap: dict) -> dict:
        """The dashboard's figures: ``panels``, ``drift`` (over time) and ``sequence``."""
        return {
            "panels": charts.dashboard_figure(snap),
            "drift": drift_chart.drift_figure(snap["samples"], snap["strikes"], snap["passes"]),
            "sequence": sequence_chart.sequence_figure(snap["timeline"], snap["timeline_title"]),
        }

    # ----- static output ----------------------------------------------------------------------------

    def render(self) -> dict:
        """Draw every chart and table once as static output (works headless); returns :meth:`summary`."""
        from IPython.display import HTML, Image, display

        self.sampler.sample()
        snap = self.snapshot()
        self.invariants()
        display(HTML(invariants_html(self.last_invariants, checked_at=self._clock())))
        for fig in self.figures(snap).values():
            display(Image(data=charts.png(fig)))
        display(HTML("<b>Orders</b>" + snap["status_counts"].to_html(index=False)))
        display(HTML("<b>Redis vs PostgreSQL</b>" + _drift_table(snap["drift"]).to_html(index=False)))
        return self.summary(snap)

    def _clock(self) -> str:
        return f"{time.time() - self.started_at:.0f} s"

    # ----- live widgets -----------------------------------------------------------------------------

    def show(self) -> None:
        """Display the controls and charts and keep them updating in a background thread."""
        from IPython.display import display

        if self._widgets is None:
            self._widgets = self._build()
        display(self._widgets["root"])
        self.start()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="pulse-lab-dashboard", daemon=True)
            self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)

    def refresh(self) -> None:
        """Redraw the live widgets once (the background thread calls this every ``interval_s``); the
        invariants panel is re-checked every ``invariants_every_s``."""
        if self._widgets is None or not self.lab.running:
            return
        w = self._widgets
        try:
            if time.time() - self._checked_at >= self.invariants_every_s:
                self.invariants()
                w["invariants"].value = invariants_html(self.last_invariants, checked_at=self._clock())
        except Exception as exc:  # the server restarting under a switch: the panel keeps its last colours
            self.errors.append(f"invariants: {type(exc).__name__}: {exc}")
            log.debug("invariants refresh failed", exc_info=True)
        try:
            snap = self.snapshot()
            figures = self.figures(snap)
            for name in ("panels", "drift", "sequence"):
                w[name].value = charts.png(figures[name])
            w["tables"].value = (
                "<b>Orders</b>"
                + snap["status_counts"].to_html(index=False)
                + "<b>Redis vs PostgreSQL</b>"
                + _drift_table(snap["drift"]).to_html(index=False)
            )
            w["status"].value = self._status_text()
        except Exception as exc:  # a refresh during a restart may find the server away; the next one retries
            self.errors.append(f"{type(exc).__name__}: {exc}")
            log.debug("dashboard refresh failed", exc_info=True)

    def _status_text(self) -> str:
        s = self.lab.settings
        load = ", ".join(f"{k} {v}" for k, v in self.load.counts.items())
        return (
            f"<b>{s.strategy}</b> saga, <b>{s.outbox_mode}</b> relay, decline rate {s.payment_decline_rate:g}, "
            f"naive: {', '.join(sorted(s.naive)) or 'none'} · restarts {self.lab.restarts} · load: {load}"
        )

    def stop(self) -> None:
        """Stop redrawing, sampling and the load; safe to call twice."""
        self._stop.set()
        self.load.stop()
        self.sampler.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _build(self) -> dict:
        import ipywidgets as W

        s = self.lab.settings
        strategy = W.Dropdown(options=["optimistic", "post-payment"], value=s.strategy, description="strategy")
        mode = W.Dropdown(options=["polling", "cdc"], value=s.outbox_mode, description="outbox")
        decline = W.FloatSlider(value=s.payment_decline_rate, min=0, max=1, step=0.05, description="decline rate")
        naive = {n: W.Checkbox(value=n in s.naive, description=n, indent=False) for n in lab_faults.NAIVE_SWITCHES}
        apply = W.Button(description="Apply (restart)", button_style="warning")
        rate = W.FloatSlider(value=0, min=0, max=50, step=1, description="orders/s")
        probs = {
            n: W.FloatSlider(value=0, min=0, max=1, step=0.05, description=n, style={"description_width": "140px"})
            for n in lab_faults.KNOWN_FAULTS
        }
        arm = W.Button(description="Arm faults", button_style="danger")
        buttons = {name: W.Button(description=name) for name in ("Reconcile now", "Sweep now", "Flush Redis", "Crash")}
        message = W.HTML()
        status = W.HTML(self._status_text())
        images = {
            name: W.Image(format="png", layout=W.Layout(width="100%")) for name in ("panels", "drift", "sequence")
        }
        invariants = W.HTML(invariants_html(self.last_invariants))
        tables = W.HTML()

        def act(label, action):
            def handler(_):
                try:
                    message.value = f"{label}: {action()}"
                except Exception as exc:  # shown in the panel: a control must never raise into the frontend
                    message.value = f"<span style='color:red'>{label} failed: {exc}</span>"
                self.refresh()

            return handler

        apply.on_click(
            act(
                "restarted",
                lambda: (
                    self.lab.switch(
                        strategy=strategy.value,
                        outbox_mode=mode.value,
                        decline_rate=decline.value,
                        naive={n for n, box in naive.items() if box.value},
                    )
                    and "ok"
                ),
            )
        )
        rate.observe(lambda change: self._set_rate(change["new"]), names="value")
        arm.on_click(act("faults", lambda: self._arm({n: p.value for n, p in probs.items()})))
        buttons["Reconcile now"].on_click(act("reconcile", lambda: self.lab.reconcile_now()))
        buttons["Sweep now"].on_click(act("sweep", lambda: self.lab.sweep_now()))
        buttons["Flush Redis"].on_click(act("flushed keys", lambda: self.lab.flush_redis()))
        buttons["Crash"].on_click(act("crash", lambda: self.lab.crash() or "SIGKILL sent; the supervisor restarts it"))
        controls = W.Tab(
            children=[
                W.VBox([W.HBox([strategy, mode]), decline, W.HBox(list(naive.values())), apply]),
                W.VBox([rate]),
                W.VBox([*probs.values(), arm]),
                W.HBox(list(buttons.values())),
            ]
        )
        for i, title in enumerate(("System", "Load", "Faults", "Actions")):
            controls.set_title(i, title)
        root = W.VBox([status, invariants, controls, message, *images.values(), tables])
        return {
            "root": root,
            **images,
            "invariants": invariants,
            "tables": tables,
            "status": status,
            "message": message,
            "rate": rate,
            "probs": probs,
            "naive": naive,
            "apply": apply,
            "strategy": strategy,
            "mode": mode,
            "decline": decline,
        }

    def _set_rate(self, rate: float) -> None:
        self.load.rate = rate
        if rate > 0:
            self.load.start()

    def _arm(self, probabilities: dict[str, float]) -> str:
        for name, p in probabilities.items():
            if p > 0:
                self.lab.arm(name, p)
            else:
                self.lab.disarm(name)
        return ", ".join(f"{n}={p:g}" for n, p in probabilities.items() if p > 0) or "all disarmed"


def _drift_table(df: pd.DataFrame) -> pd.DataFrame:
    return df[["name", "db_stock", "redis_stock", "db_reserved", "redis_reserved", "stock_drift", "reserved_drift"]]
