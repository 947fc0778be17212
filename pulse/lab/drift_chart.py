"""Drift over time: how far Redis's ``stock:``/``reserved:`` stray from the database, per product, sampled
during a scenario (:class:`pulse.lab.sampler.Sampler`), with the faults that struck and the reconciliation
passes marked. :func:`drift_series`, :func:`missing_spans` and :func:`strike_groups` are the data steps;
:func:`drift_timeline` and :func:`drift_figure` draw.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from pulse.lab.charts import no_data


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
