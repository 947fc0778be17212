"""The notebooks' small experiments and display helpers: concurrent cart adds, checkouts, duplicate submits,
publish latency and inbox duplicates, each returning plain numbers; and ``show*`` to draw them as static PNGs
(live in JupyterLab, recorded headless). Notebooks reach them as ``sc.*`` (:mod:`pulse.lab.scenarios`).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
from matplotlib.figure import Figure

from pulse.lab import charts, sequence_chart
from pulse.lab.client import PulseClient, PulseError


def show(fig: Figure) -> None:
    """Display a matplotlib Figure as a static PNG (live in JupyterLab, recorded headless)."""
    from IPython.display import Image, display

    display(Image(data=charts.png(fig)))


def show_sequence(lab, order_id: str, title: str | None = None) -> pd.DataFrame:
    """Draw one order's sequence diagram (module → outbox → broker → modules); returns its timeline."""
    timeline = lab.timeline(order_id)
    show(sequence_chart.sequence_figure(timeline, title or f"Order {order_id[:8]}…"))
    return timeline


def show_bars(
    values: dict[str, float], title: str, *, ylabel: str = "", line: float | None = None, line_label: str = ""
) -> None:
    """A bar per key (e.g. units accepted naive vs Lua), with an optional reference line (e.g. the stock)."""
    fig = Figure(figsize=(6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(list(values), list(values.values()), color=[f"C{i}" for i in range(len(values))])
    if line is not None:
        ax.axhline(line, color="black", linestyle="--", label=line_label)
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    show(fig)


def concurrent_adds(lab, product: str, users: int, *, quantity: int = 1) -> dict:
    """``users`` different users each add ``quantity`` of one product at the same moment.

    Returns ``{'accepted', 'rejected', 'users': [ids of accepted carts], 'redisReserved', 'dbCartUnits'}``:
    with the Lua script, accepted × quantity never exceeds the stock; with the naive GET/SET it can.
    """
    ids = [str(uuid.uuid4()) for _ in range(users)]
    # "The same moment" must hold on a loaded machine too: every shopper has an open connection (warmed by a
    # health call) and waits at a barrier, so the adds leave together instead of trickling out as threads
    # start and connect, which could let a naive GET/SET finish before the next one reads.
    start = threading.Barrier(users)

    def add(user):
        client = PulseClient(lab.url)
        try:
            try:
                client.health()
            finally:  # at the barrier even when the warm-up failed, so nobody waits for this shopper in vain
                with contextlib.suppress(threading.BrokenBarrierError):
                    start.wait(timeout=30)
            client.add_item(user, product, quantity)
            return user
        except PulseError:
            return None
        finally:
            client.close()

    with ThreadPoolExecutor(users) as pool:
        accepted = [u for u in pool.map(add, ids) if u]
    drift = lab.q.drift([product]).iloc[0]
    return {
        "accepted": len(accepted),
        "rejected": users - len(accepted),
        "users": accepted,
        "redisReserved": int(drift["redis_reserved"]),
        "dbCartUnits": int(drift["db_reserved"]),
    }


def checkout_all(lab, users: list[str], *, workers: int = 8) -> pd.DataFrame:
    """Order every given user's cart and wait for each saga; one row per order (status, display, reason)."""

    def order(user):
        client = PulseClient(lab.url)
        try:
            return client.wait_settled(client.checkout(user)["orderId"])
        finally:
            client.close()

    with ThreadPoolExecutor(workers) as pool:
        orders = list(pool.map(order, users))
    return pd.DataFrame(orders)


def duplicate_submits(lab, product: str, submits: int, *, same_key: bool = True, workers: int = 12) -> dict:
    """One user's cart submitted ``submits`` times at once, with one idempotency key (or a new key each time).

    Returns ``{'answers': {status: count}, 'distinctOrders': n, 'ordersInDb': n}``: 200 answers carry the
    same order id when the key is shared; 409 answers mean "already being created, retry".
    """
    user, key = str(uuid.uuid4()), str(uuid.uuid4())
    lab.client.add_item(user, product, 1)

    def submit(i):
        client = PulseClient(lab.url)
        try:
            return 200, client.checkout(user, key if same_key else str(uuid.uuid4()))["orderId"]
        except PulseError as exc:
            return exc.status, None
        finally:
            client.close()

    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(submit, range(submits)))
    statuses = pd.Series([a[0] for a in answers]).value_counts().to_dict()
    in_db = int(
        lab.q.sql("SELECT count(*) AS n FROM orders.orders WHERE user_id = CAST(:u AS uuid)", u=user).iloc[0]["n"]
    )
    return {
        "answers": {int(k): int(v) for k, v in statuses.items()},
        "distinctOrders": len({a[1] for a in answers if a[1]}),
        "ordersInDb": in_db,
        "userId": user,
        "orderIds": sorted({a[1] for a in answers if a[1]}),
    }


def publish_latency(lab, since: int = 0) -> pd.DataFrame:
    """Commit → broker latency (ms) of the events the tap saw (from its ``since``-th on), measured against
    the outbox insert times kept in ``infra.event_log``; empty when the schema has no event log."""
    present = lab.q.sql("SELECT to_regclass('infra.event_log') IS NOT NULL AS p").iloc[0]["p"]
    if lab.tap is None or len(lab.tap.events) <= since or not present:
        return pd.DataFrame(columns=["eventId", "eventType", "latency_ms"])
    tapped = pd.DataFrame(list(lab.tap.events)[since:])
    logged = lab.q.sql(
        'SELECT event_id::text AS "eventId", created_at FROM infra.event_log '
        "WHERE event_id = ANY(CAST(:ids AS uuid[]))",
        ids=list(tapped["eventId"]),
    )
    df = tapped.merge(logged, on="eventId")
    broker_at = pd.to_datetime(df["brokerAt"], unit="s", utc=True)
    df["latency_ms"] = (broker_at - pd.to_datetime(df["created_at"], utc=True)).dt.total_seconds() * 1000
    return df[["eventId", "eventType", "latency_ms"]]


def inbox_duplicates(lab) -> dict[str, int]:
    """Redeliveries each module's inbox absorbed (the ``duplicates`` column, where the schema has it)."""
    from pulse.topology import INBOX_TABLES

    out = {}
    for module, table in INBOX_TABLES.items():
        schema, name = table.split(".")
        has = lab.q.sql(
            "SELECT count(*) AS n FROM information_schema.columns WHERE table_schema = :s "
            "AND table_name = :t AND column_name = 'duplicates'",
            s=schema,
            t=name,
        ).iloc[0]["n"]
        if has:
            out[module] = int(lab.q.sql(f"SELECT coalesce(sum(duplicates), 0) AS n FROM {table}").iloc[0]["n"])
    return out


def show_drift(lab, products: list[str], title: str) -> pd.DataFrame:
    """Chart and return Redis − PostgreSQL per product (stock and reserved units)."""
    df = lab.q.drift(products)
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    charts.drift(fig.subplots(), df, lab.reconcile_runs)
    fig.suptitle(title, fontsize=10)
    show(fig)
    return df[["name", "db_stock", "redis_stock", "db_reserved", "redis_reserved", "stock_drift", "reserved_drift"]]


def count(lab, sql: str, **params) -> int:
    """One number from a query whose single row has a column ``n``."""
    return int(lab.q.sql(sql, **params).iloc[0]["n"])
