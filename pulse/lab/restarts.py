"""A broker restart and a database restart mid-saga (issue 11) on the lab's private services, and its chart."""

from __future__ import annotations

import time
import uuid

import pandas as pd

from pulse.lab import charts
from pulse.lab.client import PulseClient, PulseError
from pulse.lab.experiments import inbox_duplicates, show


def restarts_mid_saga(
    lab,
    *,
    orders: int = 10,
    gap_s: float = 0.4,
    latency_ms: int = 300,
    broker_down_s: float = 2.0,
    database_down_s: float = 1.0,
    placed_before: int = 3,
    settle_s: float = 90.0,
) -> dict:
    """Shoppers check out one order every ``gap_s`` while the lab restarts its RabbitMQ, then its PostgreSQL.

    Needs ``Lab(services="own")`` (the lab restarts only servers it started). ``payment.latency`` keeps sagas in
    flight, so both restarts land mid-saga: during the broker's outage checkouts still commit and their events
    wait in the outbox; unacknowledged messages come back after it and the inboxes absorb the repeats; the database
    restart ends every session (the relay's and the consumers' included) and rolls back what was in flight.
    A shopper whose request fails while the database is down tries again with the same idempotency key.

    Returns the orders' final display statuses, the restarts' moments, a sampled ``timeline`` (orders placed,
    orders settled, outbox rows; NaN while the database is down), the inbox repeats absorbed and the violations
    ``lab.check`` reported for this scenario's orders and product.
    """
    import threading

    import httpx
    import psycopg

    start, began = lab.now(), time.time()
    product = lab.new_product(stock=orders + 5, name="Restart demo")
    repeats_before = sum(inbox_duplicates(lab).values())
    placed: list[str] = []
    refused = {"n": 0}
    samples: list[dict] = []
    done = threading.Event()

    def shop():
        client = PulseClient(lab.url)
        try:
            for _ in range(orders):
                user, key, added = client.new_user(), str(uuid.uuid4()), False
                for _attempt in range(100):  # a shopper keeps trying while the database is away
                    try:
                        # A failed add may have been applied: look before adding again.
                        if not added and not client.cart(user)["items"]:
                            client.add_item(user, product, 1)
                        added = True
                        placed.append(client.checkout(user, key)["orderId"])
                        break
                    except (httpx.TransportError, PulseError) as exc:
                        if isinstance(exc, PulseError) and exc.status < 500:
                            raise
                        refused["n"] += 1
                        time.sleep(0.25)
                time.sleep(gap_s)
        finally:
            client.close()

    def sample():
        url = lab.settings.database_url
        while not done.is_set():
            row = {"t": time.time() - began, "placed": len(placed), "settled": float("nan"), "outbox": float("nan")}
            try:
                with psycopg.connect(url, connect_timeout=1, autocommit=True) as conn:
                    row["settled"], row["outbox"] = conn.execute(
                        "SELECT (SELECT count(*) FROM orders.orders o JOIN orders.order_items i ON i.order_id = o.id "
                        "        WHERE i.product_id = %s AND o.status IN ('COMPLETED', 'FAILED')), "
                        "(SELECT count(*) FROM shared.outbox)",
                        (product,),
                    ).fetchone()
            except psycopg.Error:  # the database is restarting: a gap in the chart
                pass
            samples.append(row)
            done.wait(0.2)

    lab.arm("payment.latency", 1.0, ms=latency_ms)
    sampler, shopper = threading.Thread(target=sample, daemon=True), threading.Thread(target=shop, daemon=True)
    sampler.start()
    shopper.start()
    try:
        while len(placed) < min(placed_before, orders) and shopper.is_alive():
            time.sleep(0.05)
        broker = lab.restart_broker(down_s=broker_down_s)
        database = lab.restart_database(down_s=database_down_s)
        shopper.join(timeout=settle_s)
    finally:
        lab.disarm("payment.latency")
    client = PulseClient(lab.url)
    try:
        final = [client.wait_settled(order_id, timeout_s=settle_s)["displayStatus"] for order_id in placed]
    finally:
        client.close()
    lab.wait_quiet(timeout_s=settle_s)
    time.sleep(0.5)
    done.set()
    sampler.join(timeout=5)
    restarts = [
        {
            "service": m["service"],
            "began": m["began"] - began,
            "down": m["down"] - began,
            "up": m["up"] - began,
            "outage_s": m["up"] - m["began"],
        }
        for m in (broker, database)
    ]
    violations = [c["name"] for c in lab.check(since=start, products=[product]) if not c["ok"]]
    return {
        "orders": len(placed),
        "completed": final.count("COMPLETED"),
        "final": pd.Series(final, dtype=object).value_counts().to_dict(),
        "refusedRequests": refused["n"],
        "inboxRepeats": sum(inbox_duplicates(lab).values()) - repeats_before,
        "outboxPeak": int(pd.DataFrame(samples)["outbox"].max()),
        "restarts": restarts,
        "timeline": pd.DataFrame(samples),
        "violations": violations,
        "products": [product],
    }


def show_restarts(result: dict) -> pd.DataFrame:
    """Chart the restarts' timeline (orders placed and settled, outbox rows, each outage shaded); returns the
    restarts as a table (seconds from the scenario's start)."""
    show(charts.restarts_figure(result["timeline"], result["restarts"]))
    return pd.DataFrame(result["restarts"]).set_index("service").round(2)
