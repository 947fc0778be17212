"""The sequence (Lamport) diagram of one order: a lane per module, the outbox and the broker, and an arrow per
message, from the order's timeline (``Queries.order_timeline``). :func:`sequence_arrows` is the pure data
step; :func:`sequence` and :func:`sequence_figure` draw it.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from pulse.lab.charts import no_data, seconds_since

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
ARROW_COLUMNS = ["eventId", "eventType", "kind", "src", "dst", "t0", "t1", "label", "dashed", "derived"]


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
