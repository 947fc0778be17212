"""Matplotlib charts of the lab (object-oriented API only: safe to draw from a background thread).

Each chart has a pure data step (a DataFrame in, a DataFrame out: unit-tested) and a drawing step.
Times are seconds since the scenario started; a panel with nothing to show says so in one line.

Here: what every chart shares (time axes, PNG output, an empty panel), the dashboard's panels and the
restart scenario's figure. The sequence diagram is :mod:`pulse.lab.sequence_chart`; drift over time is
:mod:`pulse.lab.drift_chart`.
"""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd
from matplotlib.figure import Figure

COLORS = {
    "COMPLETED": "tab:green",
    "FAILED PAYMENT_FAILED": "tab:red",
    "FAILED OUT_OF_STOCK": "tab:orange",
    "restocks": "tab:blue",
    "refunds": "tab:purple",
}


def png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (for an ipywidgets Image or IPython's Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def no_data(ax, message: str) -> None:
    """An axes reduced to one line of text saying why there is nothing to show."""
    ax.set_axis_off()
    ax.text(0.0, 0.5, message, ha="left", va="center", transform=ax.transAxes, color="dimgrey", fontsize=9)


# ----- time ----------------------------------------------------------------------------------------


def seconds_since(times, start=None) -> pd.Series:
    """Seconds (float) from ``start`` to each time; ``start`` defaults to the earliest.

    ``times``: datetimes (tz-aware, or naive meaning UTC) or epoch seconds; ``start`` likewise, or None.
    """
    s = pd.Series(times)
    if s.empty:
        return pd.Series([], dtype=float, index=s.index)
    if pd.api.types.is_numeric_dtype(s):
        origin = float(
            start
            if start is not None and not isinstance(start, (dt.datetime, pd.Timestamp))
            else (_epoch(start) if start is not None else s.min())
        )
        return (s.astype(float) - origin).rename(s.name)
    stamps = pd.to_datetime(s, utc=True)
    origin = stamps.min() if start is None else _timestamp(start)
    return ((stamps - origin).dt.total_seconds()).rename(s.name)


def _timestamp(value) -> pd.Timestamp:
    if isinstance(value, (int, float)):
        return pd.Timestamp(value, unit="s", tz="UTC")
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _epoch(value) -> float:
    return _timestamp(value).timestamp()


def seconds_index(df: pd.DataFrame, start=None) -> pd.DataFrame:
    """The same frame indexed by seconds since ``start`` (a datetime index becomes floats)."""
    if df.empty:
        return df.set_axis(pd.Index([], dtype=float, name="s"), axis=0)
    return df.set_axis(pd.Index(seconds_since(df.index.to_series(), start).to_numpy(), name="s"), axis=0)


# ----- dashboard panels ---------------------------------------------------------------------------


def cumulative(ax, df: pd.DataFrame, title: str, start=None) -> None:
    """Step lines of cumulative counts (one per column) over seconds since ``start``."""
    ax.set_title(title, fontsize=10, loc="left")
    data = with_zero_start(seconds_index(df, start))
    for column in data.columns:
        ax.step(
            data.index,
            data[column],
            where="post",
            label=column,
            color=COLORS.get(column),
            marker="o" if len(data) <= 12 else None,
            markersize=3,
        )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the start", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(labelsize=7)


def with_zero_start(data: pd.DataFrame) -> pd.DataFrame:
    """A cumulative frame (seconds index) starting from a row of zeros at 0 s (or just before its first
    point when that is earlier), so a single count still draws a step up from nothing."""
    if data.empty:
        return data
    first = float(data.index[0])
    origin = 0.0 if first > 0 else first - 1.0
    zero = pd.DataFrame([[0] * len(data.columns)], columns=data.columns, index=pd.Index([origin], name=data.index.name))
    return pd.concat([zero, data])


def drift(ax, df: pd.DataFrame, reconcile_runs: list[dict]) -> None:
    """Units Redis differs from PostgreSQL per product now (stock and reserved); the title counts the last fixes."""
    last = reconcile_runs[-1] if reconcile_runs else None
    fixed = f" (last reconcile: {last['stock']} stock, {last['reserved']} reserved fixed)" if last else ""
    ax.set_title("Redis − PostgreSQL now" + fixed, fontsize=10, loc="left")
    shown = df.head(12)
    x = range(len(shown))
    missing = shown["redis_stock"].isna()
    ax.bar(
        [i - 0.2 for i in x], shown["stock_drift"].fillna(0).astype(float), width=0.4, label="stock:", color="tab:blue"
    )
    ax.bar(
        [i + 0.2 for i in x], shown["reserved_drift"].astype(float), width=0.4, label="reserved:", color="tab:orange"
    )
    for i, miss in zip(x, missing, strict=True):
        if miss:
            ax.text(i - 0.2, 0, "missing", rotation=90, fontsize=7, ha="center", va="bottom", color="grey")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(list(x), [n[:14] for n in shown["name"]], rotation=30, fontsize=7, ha="right")
    if (
        not (shown["stock_drift"].fillna(0) != 0).any()
        and not (shown["reserved_drift"] != 0).any()
        and not missing.any()
    ):
        ax.set_ylim(-1, 1)
        ax.text(
            0.5,
            0.75,
            "Redis equals PostgreSQL for every product",
            transform=ax.transAxes,
            ha="center",
            color="dimgrey",
            fontsize=9,
        )
    ax.legend(fontsize=7)


def reconcile_fixes(ax, runs: list[dict]) -> None:
    """Fixes per reconciliation run (stock, reserved, carts, queue entries) and deferred items."""
    ax.set_title("Reconciliation runs: fixes (bars), deferred by cooldown (x)", fontsize=10, loc="left")
    kinds = ("stock", "reserved", "carts", "cleanupQueue")
    bottom = [0] * len(runs)
    for kind in kinds:
        values = [r.get(kind, 0) for r in runs]
        ax.bar(range(len(runs)), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.plot(range(len(runs)), [r.get("deferred", 0) for r in runs], "kx", label="deferred")
    ax.set_xticks(
        range(len(runs)), [f"#{i + 1}{' full' if r.get('full') else ''}" for i, r in enumerate(runs)], fontsize=7
    )
    ax.legend(fontsize=7)


def relay_lag(ax, lag: pd.DataFrame) -> None:
    """Outbox rows waiting (left axis) and age of the oldest in seconds (right axis), per sample (t in s)."""
    ax.set_title("Relay lag: outbox rows waiting / oldest age", fontsize=10, loc="left")
    ax.plot(lag["t"], lag["rows"], color="tab:blue", label="rows")
    ax.set_ylabel("rows", fontsize=8)
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(lag["t"], lag["oldest_age_s"], color="tab:red", linestyle="--", label="oldest age (s)")
    right.set_ylabel("oldest age (s)", fontsize=8, color="tab:red")
    right.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the start", fontsize=8)
    ax.tick_params(labelsize=7)
    right.tick_params(labelsize=7)


def dashboard_panels(snapshot: dict) -> tuple[list[tuple[str, callable]], list[str]]:
    """The panels with something to show (title, draw(ax)), and one line for each left out."""
    start = snapshot.get("start")
    shown, notes = [], []

    def panel(has_data, name, draw, note):
        (shown.append((name, draw)) if has_data else notes.append(note))

    panel(
        not snapshot["terminal"].empty,
        "terminal",
        lambda ax: cumulative(ax, snapshot["terminal"], "Orders reaching a terminal state (cumulative)", start),
        "no order has finished yet",
    )
    panel(
        not snapshot["compensations"].empty,
        "compensations",
        lambda ax: cumulative(ax, snapshot["compensations"], "Compensations: restocks and refunds (cumulative)", start),
        "no compensation (restock or refund) yet",
    )
    d = snapshot["drift"]
    # A missing stock: key alone is a cache miss (keys load on first use), not a drift: the drift timeline
    # shades those spans.
    drifting = not d.empty and bool(((d["stock_drift"].fillna(0) != 0) | (d["reserved_drift"] != 0)).any())
    missing = int(d["redis_stock"].isna().sum()) if not d.empty else 0
    panel(
        drifting,
        "drift",
        lambda ax: drift(ax, d, snapshot["reconcile_runs"]),
        "Redis equals PostgreSQL for every product now"
        + (f" ({missing} stock: key(s) not loaded in Redis)" if missing else ""),
    )
    panel(
        bool(snapshot["reconcile_runs"]),
        "reconcile",
        lambda ax: reconcile_fixes(ax, snapshot["reconcile_runs"]),
        "no reconciliation run from the lab yet ('Reconcile now')",
    )
    lag = snapshot.get("lag_frame")
    panel(lag is not None and len(lag) >= 2, "lag", lambda ax: relay_lag(ax, lag), "relay lag: fewer than 2 samples")
    return shown, notes


def dashboard_figure(snapshot: dict) -> Figure:
    """The dashboard's panels from one :meth:`Dashboard.snapshot`; empty ones are listed in a footer line."""
    shown, notes = dashboard_panels(snapshot)
    columns = 2 if len(shown) in (2, 4) else min(3, max(1, len(shown)))
    n_rows = max(1, -(-len(shown) // columns))
    fig = Figure(figsize=(5 * columns, 3.4 * n_rows + (0.3 if notes else 0)), layout="constrained")
    axes = fig.subplots(n_rows, columns, squeeze=False).ravel()
    # The grid may have more cells than panels; the spare ones are switched off below.
    for ax, (_, draw) in zip(axes, shown, strict=False):
        draw(ax)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    if not shown:
        no_data(axes[0], "Nothing to chart yet: place an order.")
    if notes:
        fig.supxlabel("Not shown: " + "; ".join(notes) + ".", fontsize=8, color="dimgrey")
    return fig


def restarts_figure(timeline: pd.DataFrame, restarts: list[dict]) -> Figure:
    """Orders placed and settled, and outbox rows, over the seconds of a restart scenario; each service's outage
    (from the moment it began stopping until it answered again) shaded. Gaps: the database could not be read."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    colors = {"RabbitMQ": "tab:orange", "PostgreSQL": "tab:purple"}
    for r in restarts:
        ax.axvspan(
            r["began"],
            r["up"],
            color=colors.get(r["service"], "grey"),
            alpha=0.18,
            label=f"{r['service']} restarting ({r['up'] - r['began']:.1f} s)",
        )
    if timeline.empty:
        no_data(ax, "no samples")
        return fig
    ax.step(timeline["t"], timeline["placed"], where="post", color="tab:blue", label="orders placed")
    ax.plot(timeline["t"], timeline["settled"], color="tab:green", label="orders settled")
    ax.plot(timeline["t"], timeline["outbox"], color="tab:red", linestyle="--", label="outbox rows waiting")
    ax.set_xlabel("seconds since the scenario started")
    ax.set_ylabel("count")
    ax.set_title("A broker restart and a database restart mid-saga", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: no line hidden
    ax.grid(alpha=0.3)
    return fig
