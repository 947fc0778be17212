"""Matplotlib charts of the lab (object-oriented API only: safe to draw from a background thread).

Each chart has a pure data step (a DataFrame in, a DataFrame out: unit-tested) and a drawing step.
Times are seconds since the scenario started; a panel with nothing to show says so in one line.
"""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

# Emitters on the left, the pipe in the middle, consumers that only consume on the right: the arrows
# module → outbox → broker read left to right, and deliveries fan out from the broker.
SEQUENCE_LANES = ("orders", "inventory", "payment", "outbox", "broker", "order-view", "redis-stock")
LANES = SEQUENCE_LANES
EMITTER = {
    "ORDER_CREATED": "orders",
    "ORDER_UPDATED": "orders",
    "STOCK_RESERVED": "inventory",
    "STOCK_RELEASED": "inventory",
    "STOCK_FAILED": "inventory",
    "PAYMENT_PROCESSED": "payment",
    "PAYMENT_FAILED": "payment",
    "PAYMENT_REFUNDED": "payment",
}
EVENT_COLORS = {
    "ORDER_CREATED": "tab:blue",
    "STOCK_RESERVED": "tab:green",
    "STOCK_FAILED": "tab:orange",
    "STOCK_RELEASED": "tab:olive",
    "PAYMENT_PROCESSED": "tab:purple",
    "PAYMENT_FAILED": "tab:red",
    "PAYMENT_REFUNDED": "tab:pink",
    "ORDER_UPDATED": "tab:gray",
}
COLORS = {
    "COMPLETED": "tab:green",
    "FAILED PAYMENT_FAILED": "tab:red",
    "FAILED OUT_OF_STOCK": "tab:orange",
    "restocks": "tab:blue",
    "refunds": "tab:purple",
}
ARROW_COLUMNS = ["eventId", "eventType", "kind", "src", "dst", "t0", "t1", "label", "dashed", "derived"]


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


# ----- the sequence (Lamport) diagram ---------------------------------------------------------------


def sequence_arrows(timeline: pd.DataFrame, start=None, strategy: str | None = None) -> pd.DataFrame:
    """One row per arrow of an order's sequence diagram, from its timeline (see ``Queries.order_timeline``).

    Kinds: ``write`` (emitting module → outbox, one transaction), ``publish`` (outbox → broker),
    ``republish`` (the broker saw the event again: dashed, "dup"), ``deliver`` (broker → each module that
    processed it), ``redeliver`` (redeliveries its inbox absorbed: dashed, "dup ×n") and, given the
    order's ``strategy``, ``lost`` (a module that should have acted and has no inbox row). t0/t1 are
    seconds since ``start`` (default: the timeline's first time).
    """
    if timeline.empty:
        return pd.DataFrame(columns=ARROW_COLUMNS)
    tl = timeline.assign(t=seconds_since(timeline["at"], start).to_numpy())
    if "duplicates" not in tl:
        tl["duplicates"] = 0
    if "redriven" not in tl:
        tl["redriven"] = False
    rows = []
    for event_id, ev in tl.groupby("eventId", sort=False):
        kind = ev["eventType"].iloc[0]
        redriven = bool(ev["redriven"].any())
        base = {"eventId": event_id, "eventType": kind}
        outbox = ev[ev["stage"] == "outbox"].sort_values("t")
        broker = ev[ev["stage"] == "broker"].sort_values("t")
        t_out = float(outbox["t"].iloc[0]) if not outbox.empty else None
        derived = bool(outbox["derived"].iloc[0]) if not outbox.empty else False
        if t_out is not None and EMITTER.get(kind):
            rows.append(
                {
                    **base,
                    "kind": "write",
                    "src": EMITTER[kind],
                    "dst": "outbox",
                    "t0": t_out,
                    "t1": t_out,
                    "label": kind + (" (re-driven)" if redriven else ""),
                    "dashed": False,
                    "derived": derived,
                }
            )
        processed = ev[~ev["stage"].isin(["outbox", "broker"])]
        # The tap is one more consumer: its copy may arrive after a module already handled the event, so the
        # broker's moment is the earliest sighting, never before the outbox write.
        sightings = list(broker["t"].iloc[:1]) + list(processed["t"])
        t_pub = min(sightings) if sightings else t_out
        if t_pub is not None and t_out is not None:
            t_pub = max(t_pub, t_out)
        if t_out is not None and not broker.empty:
            rows.append(
                {
                    **base,
                    "kind": "publish",
                    "src": "outbox",
                    "dst": "broker",
                    "t0": t_out,
                    "t1": t_pub,
                    "label": "",
                    "dashed": False,
                    "derived": derived,
                }
            )
        for t_again in broker["t"].iloc[1:]:
            rows.append(
                {
                    **base,
                    "kind": "republish",
                    "src": "outbox",
                    "dst": "broker",
                    "t0": t_out if t_out is not None else t_pub,
                    "t1": float(t_again),
                    "label": "dup",
                    "dashed": True,
                    "derived": derived,
                }
            )
        # A redelivery's own moment is not recorded (the inbox keeps the first); it comes from the last
        # publish of the event, or from the first if the broker redelivered it by itself.
        t_again = float(broker["t"].iloc[-1]) if len(broker) > 1 else t_pub
        for row in processed.itertuples():
            t0 = t_pub if t_pub is not None else float(row.t)
            rows.append(
                {
                    **base,
                    "kind": "deliver",
                    "src": "broker",
                    "dst": row.stage,
                    "t0": t0,
                    "t1": float(row.t),
                    "label": "",
                    "dashed": False,
                    "derived": False,
                }
            )
            if int(row.duplicates) > 0:
                t_dup = max(t_again if t_again is not None else t0, float(row.t))
                rows.append(
                    {
                        **base,
                        "kind": "redeliver",
                        "src": "broker",
                        "dst": row.stage,
                        "t0": t_dup,
                        "t1": t_dup,
                        "label": f"dup ×{int(row.duplicates)}",
                        "dashed": True,
                        "derived": False,
                    }
                )
        if strategy and not redriven and t_pub is not None:
            for module in sorted(set(expected_modules(kind, strategy)) - set(processed["stage"])):
                rows.append(
                    {
                        **base,
                        "kind": "lost",
                        "src": "broker",
                        "dst": module,
                        "t0": t_pub,
                        "t1": t_pub,
                        "label": "not processed",
                        "dashed": True,
                        "derived": False,
                    }
                )
    return pd.DataFrame(rows, columns=ARROW_COLUMNS)


def expected_modules(event_type: str, strategy: str) -> list[str]:
    """The modules that act on this event for an order of this strategy (from the saga topology)."""
    from pulse import topology

    return [topology.BY_NAME[q].module for q in topology.consumers_of(event_type, strategy)]


def sequence_rows(arrows: pd.DataFrame) -> dict[float, int]:
    """Row (0 = top) of each distinct time in the arrows: time flows down, one row per moment.

    Rows follow the order of the times, not their distances, so events a millisecond apart stay readable;
    the tick labels give the real seconds. A redelivery and a lost delivery take a row of their own below
    the delivery they belong to."""
    times = sorted(set(arrows["t0"]).union(arrows["t1"]))
    return {t: i for i, t in enumerate(times)}


def sequence(
    ax, timeline: pd.DataFrame, title: str = "One order's messages", *, start=None, strategy: str | None = None
) -> None:
    """Draw an order's sequence diagram: a lane per module, outbox and broker; time flows down."""
    strategy = strategy or timeline.attrs.get("strategy")
    arrows = sequence_arrows(timeline, start, strategy)
    ax.set_title(title, fontsize=10, loc="left")
    if arrows.empty:
        no_data(ax, "No event of this order was seen yet (the tap starts with lab.start()).")
        return
    x = {lane: i for i, lane in enumerate(SEQUENCE_LANES)}
    rows = sequence_rows(arrows)

    # Extra rows: each dashed arrow ends half a row below the solid one it repeats.
    def y(t, kind):
        return rows[t] + (0.5 if kind in ("redeliver", "lost") else 0.0)

    height = len(rows)
    for i in x.values():
        ax.axvline(i, color="#bbbbbb", linewidth=1, zorder=0)
    ax.set_xlim(-0.6, len(SEQUENCE_LANES) - 0.4)
    ax.set_ylim(height, -1)
    ax.xaxis.tick_top()
    ax.set_xticks(range(len(SEQUENCE_LANES)), SEQUENCE_LANES, fontsize=8)
    for side in ("right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ticks = arrows[arrows["kind"].isin(["write"])].drop_duplicates("t0")
    if ticks.empty:
        ticks = arrows.drop_duplicates("t0")
    labels = [f"{t:.3f} s" for t in ticks["t0"]]
    labels = [text if i == 0 or text != labels[i - 1] else "" for i, text in enumerate(labels)]  # same ms: once
    ax.set_yticks([rows[t] for t in ticks["t0"]], labels, fontsize=7)
    ax.set_ylabel("seconds since the order's first event (time flows down)", fontsize=8)
    for a in arrows.itertuples():
        color = EVENT_COLORS.get(a.eventType, "black")
        x0, x1, y0, y1 = x[a.src], x[a.dst], y(a.t0, "deliver"), y(a.t1, a.kind)
        style = dict(
            arrowstyle="-|>",
            color=color,
            linewidth=1.3,
            linestyle="--" if a.dashed else "-",
            shrinkA=2,
            shrinkB=2,
            mutation_scale=10,
        )
        if a.kind == "lost":
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={**style, "arrowstyle": "-", "color": "red"})
            ax.plot([x1], [y1], "x", color="red", markersize=8, markeredgewidth=2)
            ax.text(x1, y1 + 0.35, a.label, color="red", fontsize=7, ha="center", va="top")
            continue
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=style)
        if a.kind == "write":
            ax.plot([x0], [y0], "o", color=color, markersize=4, markerfacecolor="white" if a.derived else color)
            ax.text(
                (x0 + x1) / 2,
                y0 - 0.15,
                a.label,
                color=color,
                fontsize=7,
                ha="center",
                va="bottom",
                fontweight="bold",
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.8),
            )
        elif a.label:  # beyond the arrowhead, away from the line it ends
            left = x1 < x0
            ax.text(
                x1 + (-0.08 if left else 0.08),
                y1,
                a.label,
                color=color,
                fontsize=7,
                ha="right" if left else "left",
                va="center",
                fontweight="bold",
                bbox=dict(facecolor="white", edgecolor=color, pad=1, linewidth=0.6),
            )


def sequence_figure(timeline: pd.DataFrame, title: str = "One order's messages", *, start=None) -> Figure:
    """A figure sized to the order's number of moments, holding its :func:`sequence` diagram."""
    arrows = sequence_arrows(timeline, start, timeline.attrs.get("strategy"))
    n = len(sequence_rows(arrows)) if not arrows.empty else 1
    fig = Figure(figsize=(10, 1.2 + 0.3 * n if not arrows.empty else 0.6), layout="constrained")
    sequence(fig.subplots(), timeline, title, start=start)
    return fig


# ----- drift over time ----------------------------------------------------------------------------


def drift_series(samples: pd.DataFrame, column: str) -> pd.DataFrame:
    """Samples (see :class:`pulse.lab.sampler.Sampler`) as one column per product name, indexed by t (s).

    A missing Redis key (NaN drift) stays NaN, so the line breaks where the key was gone."""
    if samples.empty:
        return pd.DataFrame(index=pd.Index([], dtype=float, name="t"))
    names = samples.drop_duplicates("product_id").set_index("product_id")["name"].astype(str).str.slice(0, 22)
    clash = names.duplicated(keep=False)
    labels = {p: n + (f" …{p[-4:]}" if clash[p] else "") for p, n in names.items()}
    wide = samples.assign(label=samples["product_id"].map(labels)).pivot_table(
        index="t", columns="label", values=column, aggfunc="last", dropna=False
    )
    wide.columns.name = None
    return wide.astype(float).sort_index()


def missing_spans(wide: pd.DataFrame) -> list[tuple[float, float]]:
    """Time spans (start, end) in which at least one product's value is NaN (its Redis key was missing).

    A span runs from the first sample that misses a key to the next sample that has them all."""
    if wide.empty:
        return []
    gone = wide.isna().any(axis=1)
    spans, begin = [], None
    for t, missing in gone.items():
        if missing and begin is None:
            begin = t
        elif not missing and begin is not None:
            spans.append((float(begin), float(t)))
            begin = None
    if begin is not None:
        spans.append((float(begin), float(wide.index[-1])))
    return spans


def strike_groups(strikes: pd.DataFrame) -> pd.DataFrame:
    """Fault strikes per fault name: first/last time and count (the legend of the strike marks)."""
    if strikes.empty:
        return pd.DataFrame(columns=["name", "count", "first", "last"])
    g = strikes.groupby("name")["t"].agg(["count", "min", "max"]).reset_index()
    return g.rename(columns={"min": "first", "max": "last"})


def drift_timeline(
    axes, samples: pd.DataFrame, strikes: pd.DataFrame | None = None, passes: pd.DataFrame | None = None
) -> None:
    """Two axes sharing x: stock: and reserved: Redis − PostgreSQL per product over seconds since the start,
    with fault strikes (ticks at the top, one colour per fault) and reconciliation passes (green lines)."""
    strikes = strikes if strikes is not None else pd.DataFrame(columns=["t", "name", "action"])
    passes = passes if passes is not None else pd.DataFrame(columns=["t", "source", "stock", "reserved", "carts"])
    palette = {}
    for ax, column, key in zip(axes, ("stock_drift", "reserved_drift"), ("stock:", "reserved:"), strict=True):
        wide = drift_series(samples, column)
        for label in wide.columns:
            color = palette.setdefault(label, f"C{len(palette) % 10}")
            ax.step(wide.index, wide[label], where="post", color=color, linewidth=1.6, label=label)
        if column == "stock_drift":
            for i, (a, b) in enumerate(missing_spans(wide)):
                ax.axvspan(
                    a,
                    b,
                    color="grey",
                    alpha=0.15,
                    linewidth=0,
                    label="stock: key not in Redis (line breaks)" if i == 0 else None,
                )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(f"{key} Redis − DB", fontsize=8)
        flat = wide.fillna(0).abs().to_numpy().sum() == 0 if not wide.empty else True
        if flat:
            ax.set_ylim(-1, 1)  # else matplotlib zooms into rounding noise and labels the axis "1e-17"
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # drift is counted in whole units
        ax.set_title(
            f"{key} Redis − PostgreSQL per product" + (" — equal at every sample" if flat else ""),
            fontsize=9,
            loc="left",
        )
        _mark_events(ax, strikes, passes, legend=ax is axes[0])
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("seconds since the scenario started", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _mark_events(ax, strikes: pd.DataFrame, passes: pd.DataFrame, legend: bool) -> None:
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, (name, group) in enumerate(strikes.groupby("name") if not strikes.empty else []):
        ax.vlines(
            group["t"],
            0.88,
            1.0,
            transform=top,
            color=f"C{(i + 6) % 10}",
            linewidth=1.5,
            label=f"fault {name} ×{len(group)}" if legend else None,
        )
    for i, p in enumerate(passes.itertuples()):
        ax.axvline(
            p.t, color="tab:green", linestyle="--", linewidth=1, label=("reconcile pass" if legend and i == 0 else None)
        )
        if legend and p.source == "lab" and any((p.stock or 0, p.reserved or 0)):
            ax.text(
                p.t,
                0.84,
                f"fixed {int(p.stock or 0)} stock, {int(p.reserved or 0)} reserved",
                transform=top,
                fontsize=7,
                color="tab:green",
                va="top",
                ha="right",
                rotation=90,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.8),
            )


def drift_figure(
    sampler_or_samples,
    strikes: pd.DataFrame | None = None,
    passes: pd.DataFrame | None = None,
    title: str | None = None,
) -> Figure:
    """The drift timeline of a :class:`~pulse.lab.sampler.Sampler` (or of its frames)."""
    if hasattr(sampler_or_samples, "frame"):
        s = sampler_or_samples
        samples, strikes, passes = s.frame(), s.strikes(), s.passes()
    else:
        samples = sampler_or_samples
    if samples.empty:
        fig = Figure(figsize=(10, 0.5))
        no_data(fig.subplots(), "No drift sample yet: start a sampler (lab.sampler()) while the scenario runs.")
        return fig
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    drift_timeline(axes, samples, strikes, passes)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


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
