"""Matplotlib charts of the lab (object-oriented API only: safe to draw from a background thread)."""

from __future__ import annotations

import io

import pandas as pd
from matplotlib.figure import Figure

LANES = ("outbox", "broker", "orders", "inventory", "payment", "order-view", "redis-stock")
COLORS = {"COMPLETED": "tab:green", "FAILED PAYMENT_FAILED": "tab:red", "FAILED OUT_OF_STOCK": "tab:orange",
          "restocks": "tab:blue", "refunds": "tab:purple"}


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (for an ipywidgets Image or IPython's Image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def cumulative(ax, df: pd.DataFrame, title: str, empty: str) -> None:
    """Step lines of cumulative counts (one per column) over wall-clock time."""
    ax.set_title(title, fontsize=10)
    if df.empty:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    for column in df.columns:
        ax.step(df.index, df[column], where="post", label=column, color=COLORS.get(column))
    if len(df.index) == 1:  # one point: matplotlib would span years around it
        ax.set_xlim(df.index[0] - pd.Timedelta(seconds=5), df.index[0] + pd.Timedelta(seconds=5))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(axis="x", labelsize=7, rotation=30)


def drift(ax, df: pd.DataFrame, reconcile_runs: list[dict]) -> None:
    """Units Redis differs from PostgreSQL per product (stock and reserved); the title counts the last fixes."""
    last = reconcile_runs[-1] if reconcile_runs else None
    fixed = f" — last reconcile fixed {last['stock']} stock, {last['reserved']} reserved" if last else ""
    ax.set_title("Redis − PostgreSQL per product" + fixed, fontsize=10)
    shown = df.head(12)
    x = range(len(shown))
    missing = shown["redis_stock"].isna()
    ax.bar([i - 0.2 for i in x], shown["stock_drift"].fillna(0).astype(float), width=0.4, label="stock:",
           color="tab:blue")
    ax.bar([i + 0.2 for i in x], shown["reserved_drift"].astype(float), width=0.4, label="reserved:",
           color="tab:orange")
    for i, miss in zip(x, missing):
        if miss:
            ax.text(i - 0.2, 0, "missing", rotation=90, fontsize=7, ha="center", va="bottom", color="grey")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(list(x), [n[:14] for n in shown["name"]], rotation=30, fontsize=7, ha="right")
    ax.legend(fontsize=7)


def reconcile_fixes(ax, runs: list[dict]) -> None:
    """Fixes per reconciliation run (stock, reserved, carts, queue entries) and deferred items."""
    ax.set_title("Reconciliation runs: fixes (bars), deferred by cooldown (x)", fontsize=10)
    if not runs:
        ax.text(0.5, 0.5, "no run yet — press 'Reconcile now'", ha="center", va="center",
                transform=ax.transAxes, color="grey")
        return
    kinds = ("stock", "reserved", "carts", "cleanupQueue")
    bottom = [0] * len(runs)
    for kind in kinds:
        values = [r.get(kind, 0) for r in runs]
        ax.bar(range(len(runs)), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(range(len(runs)), [r.get("deferred", 0) for r in runs], "kx", label="deferred")
    ax.set_xticks(range(len(runs)), [f"#{i + 1}{' full' if r.get('full') else ''}" for i, r in enumerate(runs)],
                  fontsize=7)
    ax.legend(fontsize=7)


def relay_lag(ax, history: list[tuple[float, int, float]]) -> None:
    """Outbox rows waiting (left axis) and age of the oldest in seconds (right axis), as sampled."""
    ax.set_title("Relay lag: outbox rows waiting / oldest age", fontsize=10)
    if not history:
        ax.text(0.5, 0.5, "no sample yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    t = pd.to_datetime([h[0] for h in history], unit="s", utc=True)
    ax.plot(t, [h[1] for h in history], color="tab:blue", label="rows")
    ax.set_ylabel("rows", fontsize=8)
    right = ax.twinx()
    right.plot(t, [h[2] for h in history], color="tab:red", linestyle="--", label="oldest age (s)")
    right.set_ylabel("seconds", fontsize=8)
    ax.tick_params(axis="x", labelsize=7, rotation=30)


def sequence(ax, timeline: pd.DataFrame, title: str = "One order's messages") -> None:
    """A sequence chart: one lane per stage (outbox, broker, each module's inbox), one arrow per hop."""
    ax.set_title(title, fontsize=10)
    ax.set_yticks(range(len(LANES)), LANES, fontsize=8)
    ax.invert_yaxis()
    if timeline.empty:
        ax.text(0.5, 0.5, "no order traced yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    start = timeline["at"].min()
    ms = (timeline["at"] - start).dt.total_seconds() * 1000
    tl = timeline.assign(ms=ms, lane=timeline["stage"].map({s: i for i, s in enumerate(LANES)}))
    palette = {}
    for event_id, hops in tl.groupby("eventId", sort=False):
        hops = hops.sort_values("ms")
        kind = hops["eventType"].iloc[0]
        color = palette.setdefault(kind, f"C{len(palette) % 10}")
        ax.plot(hops["ms"], hops["lane"], "-o", color=color, markersize=3, linewidth=1,
                label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
        derived = hops[hops["derived"]]
        ax.plot(derived["ms"], derived["lane"], "o", markerfacecolor="white", color=color, markersize=4)
    ax.set_xlabel("ms since the order was created", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")


def dashboard_figure(snapshot: dict) -> Figure:
    """All six panels of the dashboard from one :meth:`Dashboard.snapshot`."""
    fig = Figure(figsize=(14, 8.5), layout="constrained")
    axes = fig.subplots(2, 3)
    cumulative(axes[0][0], snapshot["terminal"], "Orders reaching a terminal state (cumulative)", "no order yet")
    cumulative(axes[0][1], snapshot["compensations"], "Compensations: restocks and refunds (cumulative)",
               "no compensation yet")
    drift(axes[0][2], snapshot["drift"], snapshot["reconcile_runs"])
    reconcile_fixes(axes[1][0], snapshot["reconcile_runs"])
    relay_lag(axes[1][1], snapshot["lag_history"])
    sequence(axes[1][2], snapshot["timeline"], snapshot.get("timeline_title", "One order's messages"))
    return fig
