"""The chart data steps of pulse.lab.charts on small hand-made frames: no services, no drawing."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from matplotlib.figure import Figure

from pulse.lab import charts, drift_chart, sequence_chart
from pulse.lab.dashboard import invariants_html

T0 = pd.Timestamp("2025-03-01 12:00:00", tz="UTC")


def at(ms: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(milliseconds=ms)


def timeline(rows) -> pd.DataFrame:
    df = pd.DataFrame(
        [
            {
                "eventId": e,
                "eventType": k,
                "stage": s,
                "at": at(ms),
                "derived": False,
                "duplicates": d,
                "redriven": False,
            }
            for e, k, s, ms, d in rows
        ]
    )
    return df


CREATED = [
    ("e1", "ORDER_CREATED", "outbox", 0, 0),
    ("e1", "ORDER_CREATED", "broker", 5, 0),
    ("e1", "ORDER_CREATED", "inventory", 9, 0),
    ("e1", "ORDER_CREATED", "redis-stock", 12, 0),
]


def test_seconds_since_from_datetimes_epochs_and_naive_times():
    s = charts.seconds_since(pd.Series([at(1500), at(0), at(250)]))
    assert list(s) == [1.5, 0.0, 0.25]
    assert list(charts.seconds_since(pd.Series([at(2000)]), start=T0)) == [2.0]
    assert list(charts.seconds_since(pd.Series([100.5, 102.0]), start=100.0)) == [0.5, 2.0]
    naive = pd.Series([pd.Timestamp("2025-03-01 12:00:03")])  # naive means UTC
    assert list(charts.seconds_since(naive, start=T0.timestamp())) == [3.0]
    assert charts.seconds_since(pd.Series([], dtype="datetime64[ns, UTC]")).empty


def test_seconds_index_replaces_a_datetime_index():
    df = pd.DataFrame({"COMPLETED": [1, 3]}, index=pd.DatetimeIndex([at(1000), at(4000)], name="t"))
    out = charts.seconds_index(df, start=T0)
    assert list(out.index) == [1.0, 4.0] and list(out["COMPLETED"]) == [1, 3]
    assert charts.seconds_index(pd.DataFrame(index=pd.DatetimeIndex([], tz="UTC"))).empty


def test_arrows_go_emitter_to_outbox_to_broker_to_each_consumer():
    arrows = sequence_chart.sequence_arrows(timeline(CREATED))
    hops = [(a.kind, a.src, a.dst, a.t0, a.t1) for a in arrows.itertuples()]
    assert hops == [
        ("write", "orders", "outbox", 0.0, 0.0),
        ("publish", "outbox", "broker", 0.0, 0.005),
        ("deliver", "broker", "inventory", 0.005, 0.009),
        ("deliver", "broker", "redis-stock", 0.005, 0.012),
    ]
    assert arrows.loc[arrows["kind"] == "write", "label"].item() == "ORDER_CREATED"


def test_broker_time_is_never_after_a_module_handled_the_event():
    late_tap = [r if r[2] != "broker" else ("e1", "ORDER_CREATED", "broker", 20, 0) for r in CREATED]
    arrows = sequence_chart.sequence_arrows(timeline(late_tap))
    publish = arrows[arrows["kind"] == "publish"].iloc[0]
    assert publish["t1"] == pytest.approx(0.009)
    assert (arrows["t1"] >= arrows["t0"]).all()


def test_duplicates_are_dashed_and_tagged():
    rows = CREATED[:2] + [
        ("e1", "ORDER_CREATED", "broker", 700, 0),
        ("e1", "ORDER_CREATED", "inventory", 9, 1),
        ("e1", "ORDER_CREATED", "redis-stock", 12, 0),
    ]
    arrows = sequence_chart.sequence_arrows(timeline(rows))
    republish = arrows[arrows["kind"] == "republish"]
    assert len(republish) == 1 and republish.iloc[0]["label"] == "dup" and republish.iloc[0]["dashed"]
    redeliver = arrows[arrows["kind"] == "redeliver"]
    assert list(redeliver["dst"]) == ["inventory"] and redeliver.iloc[0]["label"] == "dup ×1"
    assert redeliver.iloc[0]["t0"] == pytest.approx(0.7)  # the second publish brought it again
    assert not arrows[arrows["kind"].isin(["write", "publish", "deliver"])]["dashed"].any()


def test_a_consumer_that_should_have_acted_is_marked_lost():
    rows = [r for r in CREATED if r[2] != "redis-stock"]
    arrows = sequence_chart.sequence_arrows(timeline(rows), strategy="OPTIMISTIC")
    assert list(arrows.loc[arrows["kind"] == "lost", "dst"]) == ["redis-stock"]
    assert sequence_chart.sequence_arrows(timeline(CREATED), strategy="OPTIMISTIC")["kind"].ne("lost").all()
    assert sequence_chart.sequence_arrows(timeline(rows))["kind"].ne("lost").all()  # strategy unknown: no judgement


def test_rows_follow_time_order_one_per_moment():
    rows = sequence_chart.sequence_rows(sequence_chart.sequence_arrows(timeline(CREATED)))
    assert rows == {0.0: 0, 0.005: 1, 0.009: 2, 0.012: 3}


def test_empty_timeline_gives_no_arrows_and_a_one_line_panel():
    empty = pd.DataFrame(columns=["eventId", "eventType", "stage", "at", "derived"])
    assert sequence_chart.sequence_arrows(empty).empty
    fig = sequence_chart.sequence_figure(empty)
    ax = fig.axes[0]
    assert not ax.axison and len(ax.texts) == 1
    assert fig.get_size_inches()[1] < 1


def samples(rows) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "t": t,
                "product_id": p,
                "name": n,
                "db_stock": 5,
                "redis_stock": None,
                "db_reserved": 0,
                "redis_reserved": 0,
                "stock_drift": sd,
                "reserved_drift": rd,
            }
            for t, p, n, sd, rd in rows
        ]
    )


def test_drift_series_one_column_per_product_with_gaps_for_missing_keys():
    df = samples(
        [
            (0.0, "p-1", "Kindle", 0, 0),
            (0.0, "p-2", "Widget", 0, 1),
            (0.5, "p-1", "Kindle", None, 0),
            (0.5, "p-2", "Widget", 2, 1),
        ]
    )
    stock = drift_chart.drift_series(df, "stock_drift")
    assert list(stock.columns) == ["Kindle", "Widget"] and list(stock.index) == [0.0, 0.5]
    assert math.isnan(stock.loc[0.5, "Kindle"]) and stock.loc[0.5, "Widget"] == 2
    assert drift_chart.missing_spans(stock) == [(0.5, 0.5)]


def test_drift_series_names_clashing_products_by_id():
    df = samples([(0.0, "aaaa-0001", "Lab product", 0, 0), (0.0, "bbbb-0002", "Lab product", 1, 0)])
    assert list(drift_chart.drift_series(df, "stock_drift").columns) == ["Lab product …0001", "Lab product …0002"]


def test_missing_spans_close_when_keys_return():
    wide = pd.DataFrame({"a": [0, None, None, 1, None]}, index=[0.0, 1.0, 2.0, 3.0, 4.0], dtype=float)
    assert drift_chart.missing_spans(wide) == [(1.0, 3.0), (4.0, 4.0)]


def test_strikes_grouped_per_fault():
    strikes = pd.DataFrame(
        {
            "t": [1.0, 2.5, 4.0],
            "name": ["consumer.lose", "consumer.lose", "redis.flush"],
            "action": ["drop", "drop", "trigger"],
        }
    )
    g = drift_chart.strike_groups(strikes).set_index("name")
    assert g.loc["consumer.lose", "count"] == 2 and g.loc["consumer.lose", "last"] == 2.5
    assert drift_chart.strike_groups(strikes.iloc[:0]).empty


def test_drift_figure_without_samples_is_one_line():
    fig = drift_chart.drift_figure(
        samples([]).reindex(columns=["t", "product_id", "name", "stock_drift", "reserved_drift"])
    )
    assert len(fig.axes) == 1 and len(fig.axes[0].texts) == 1


def test_drift_figure_marks_strikes_and_passes():
    df = samples([(0.0, "p-1", "Kindle", 0, 0), (1.0, "p-1", "Kindle", 0, 2), (2.0, "p-1", "Kindle", 0, 0)])
    strikes = pd.DataFrame({"t": [0.8], "name": ["cart.after_redis"], "action": ["crash"]})
    passes = pd.DataFrame({"t": [1.9], "source": ["lab"], "stock": [0], "reserved": [2], "carts": [0]})
    fig = drift_chart.drift_figure(df, strikes, passes)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "fault cart.after_redis ×1" in labels and "reconcile pass" in labels
    assert "equal at every sample" in fig.axes[0].get_title(loc="left")  # stock never drifted
    assert "equal" not in fig.axes[1].get_title(loc="left")


def snapshot(**overrides) -> dict:
    empty_cumulative = pd.DataFrame(index=pd.DatetimeIndex([], tz="UTC", name="t"))
    base = {
        "start": T0,
        "terminal": empty_cumulative,
        "compensations": empty_cumulative,
        "drift": pd.DataFrame(
            {
                "name": ["Kindle"],
                "redis_stock": pd.array([5], dtype="Int64"),
                "stock_drift": pd.array([0], dtype="Int64"),
                "reserved_drift": [0],
            }
        ),
        "reconcile_runs": [],
        "lag_frame": pd.DataFrame(columns=["t", "rows", "oldest_age_s"]),
    }
    return {**base, **overrides}


def test_empty_panels_are_left_out_and_named_in_one_line():
    shown, notes = charts.dashboard_panels(snapshot())
    assert shown == [] and len(notes) == 5
    fig = charts.dashboard_figure(snapshot())
    assert "Not shown:" in fig._supxlabel.get_text()


def test_panels_with_data_are_drawn_on_a_seconds_axis():
    terminal = pd.DataFrame({"COMPLETED": [1, 2]}, index=pd.DatetimeIndex([at(1000), at(3000)], name="t"))
    shown, notes = charts.dashboard_panels(snapshot(terminal=terminal))
    assert [name for name, _ in shown] == ["terminal"] and len(notes) == 4
    fig = Figure()
    ax = fig.subplots()
    shown[0][1](ax)
    xs = ax.lines[0].get_xdata()
    assert list(xs) == [0.0, 1.0, 3.0] and "seconds" in ax.get_xlabel()


def test_invariants_panel_lights_up_per_invariant():
    html = invariants_html(
        [
            {"name": "no-oversell", "passed": True, "count": 0, "details": "ok"},
            {"name": "cart-promise-kept", "passed": False, "count": 3, "details": "3 broken"},
        ]
    )
    assert "1 broken" in html and "cart-promise-kept ✗ 3" in html and "#2e7d32" in html and "#c62828" in html
    assert "not checked yet" in invariants_html([])


def test_a_single_cumulative_count_steps_up_from_zero():
    data = charts.with_zero_start(pd.DataFrame({"COMPLETED": [1]}, index=pd.Index([2.5], name="s")))
    assert list(data.index) == [0.0, 2.5] and list(data["COMPLETED"]) == [0, 1]
    before = charts.with_zero_start(pd.DataFrame({"COMPLETED": [4]}, index=pd.Index([-3.0], name="s")))
    assert list(before.index) == [-4.0, -3.0]


def test_missing_stock_keys_alone_do_not_make_a_drift_panel():
    d = pd.DataFrame(
        {
            "name": ["Kindle"],
            "redis_stock": pd.array([None], dtype="Int64"),
            "stock_drift": pd.array([None], dtype="Int64"),
            "reserved_drift": [0],
        }
    )
    shown, notes = charts.dashboard_panels(snapshot(drift=d))
    assert "drift" not in [n for n, _ in shown]
    assert any("1 stock: key(s) not loaded" in note for note in notes)


def test_restarts_figure_shades_each_outage_and_leaves_a_gap_where_the_database_was_away():
    timeline = pd.DataFrame(
        {
            "t": [0.0, 1.0, 2.0, 3.0, 4.0],
            "placed": [1, 2, 3, 3, 3],
            "settled": [0, 1, math.nan, 2, 3],
            "outbox": [1, 1, math.nan, 1, 0],
        }
    )
    restarts = [
        {"service": "RabbitMQ", "began": 0.5, "down": 0.8, "up": 1.8},
        {"service": "PostgreSQL", "began": 1.8, "down": 1.9, "up": 2.6},
    ]
    fig = charts.restarts_figure(timeline, restarts)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "RabbitMQ restarting (1.3 s)" in labels and "PostgreSQL restarting (0.8 s)" in labels
    settled = next(line for line in ax.get_lines() if line.get_label() == "orders settled")
    assert math.isnan(settled.get_ydata()[2])  # a gap, not a line drawn through the outage
    assert charts.png(fig)[:4] == b"\x89PNG"
