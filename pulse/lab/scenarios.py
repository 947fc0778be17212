"""Small experiments the guided notebooks run, each returning plain numbers a notebook can chart and record."""

from __future__ import annotations

import time
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


def concurrent_adds(lab, product: str, users: int, *, quantity: int = 1, workers: int = 16) -> dict:
    """``users`` different users each add ``quantity`` of one product at the same moment.

    Returns ``{'accepted', 'rejected', 'users': [ids of accepted carts], 'redisReserved', 'dbCartUnits'}``:
    with the Lua script, accepted × quantity never exceeds the stock; with the naive GET/SET it can.
    """
    ids = [str(uuid.uuid4()) for _ in range(users)]

    def add(user):
        client = PulseClient(lab.url)
        try:
            client.add_item(user, product, quantity)
            return user
        except PulseError:
            return None
        finally:
            client.close()

    with ThreadPoolExecutor(workers) as pool:
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


# ----- the break-it scenarios: each makes its own products and returns numbers plus "products" -------------
# lab.demonstrate runs each twice, with its safeguard off and on (see pulse.lab.teach); the check judges.


def rush(lab, *, stock: int = 3, shoppers: int = 16) -> dict:
    """``shoppers`` add the last ``stock`` units of a new product at the same moment (through the API)."""
    product = lab.new_product(stock=stock, name="Rush")
    result = concurrent_adds(lab, product, shoppers)
    return {
        "stock": stock,
        "shoppers": shoppers,
        "accepted": result["accepted"],
        "redisReserved": result["redisReserved"],
        "products": [product],
    }


def promise_window(lab) -> dict:
    """A shopper orders the last unit; before inventory decides, a second shopper adds it to a cart.

    Runs with deliveries held (:meth:`Lab.hold`): the order's ORDER_CREATED reaches only the redis-stock
    module, then the second add is tried, then the rest of both sagas is delivered. With the cart's hold kept
    until inventory decides, the second add is refused; released at ORDER_CREATED, it is accepted, and that
    shopper's order fails out of stock after Redis said yes.
    """
    stepper = lab.hold()
    product = lab.new_product(stock=1, name="Last unit")
    first = lab.checkout({product: 1}, wait=False)
    stepper.step("redis-stock.queue", "ORDER_CREATED", show=False)
    second_user = lab.client.new_user()
    try:
        lab.client.add_item(second_user, product, 1)
        accepted = 1
        lab.client.checkout(second_user)
    except PulseError:
        accepted = 0
    stepper.run(show=False)
    failed = _count(
        lab,
        "SELECT count(*) AS n FROM orders.orders o JOIN orders.order_items i ON i.order_id = o.id "
        "WHERE i.product_id = CAST(:p AS uuid) AND o.failure_reason = 'OUT_OF_STOCK'",
        p=product,
    )
    return {
        "stock": 1,
        "secondCartAccepted": accepted,
        "outOfStockOrders": failed,
        "firstOrder": lab.client.order(first["orderId"])["displayStatus"],
        "products": [product],
    }


def redelivery(lab, *, quantity: int = 2, stock: int = 10) -> dict:
    """The broker delivers one order's ORDER_CREATED to inventory twice (a consumer died before its ack)."""
    stepper = lab.hold()
    product = lab.new_product(stock=stock, name="Redelivered")
    lab.checkout({product: quantity}, wait=False)
    stepper.step("inventory.queue", "ORDER_CREATED", show=False)
    stepper.redeliver(show=False)
    stepper.run(show=False)
    left = _count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {"ordered": quantity, "deliveries": 2, "unitsTaken": stock - left, "products": [product]}


def late_event(lab) -> dict:
    """A declined order fails and is compensated; then its first decision (STOCK_RESERVED) arrives again, late.

    Runs with deliveries held. The late event is re-announced for the orders module only (as a watchdog that
    took a slow event for a lost one would), so only the order's state machine meets it.
    """
    stepper = lab.hold()
    product = lab.new_product(stock=5, name="Declined")
    lab.arm("payment.decline", 1.0, max=1)
    try:
        order_id = lab.checkout({product: 1}, wait=False)["orderId"]
        stepper.run(show=False)
    finally:
        lab.disarm("payment.decline")
    before = lab.client.order(order_id)
    stepper.inject("STOCK_RESERVED", order_id, redriven=True, redriveFor="order.queue")
    stepper.run(show=False)
    after = lab.client.order(order_id)
    return {
        "statusBefore": before["status"],
        "statusAfter": after["status"],
        "inventoryAfter": after["inventoryStatus"],
        "lateEvents": 1,
        "stillFailed": int(after["status"] == "FAILED" and after["inventoryStatus"] == before["inventoryStatus"]),
        "products": [product],
    }


def reconcile_in_flight(lab, *, stock: int = 2, later_adds: int = 2) -> dict:
    """A reconciliation pass meets a cart add in flight (Redis reserved, the database row not yet committed);
    then ``later_adds`` shoppers add the same product. Runs in the kernel (the lab's in-kernel system)."""
    import threading

    from pulse.errors import Conflict

    system = lab.system
    product = uuid.UUID(lab.new_product(stock=stock, name="In flight"))
    lab.arm("cart.after_redis", 1.0, action="delay", ms=800)
    try:
        slow = threading.Thread(target=system.carts.add_item, args=(uuid.uuid4(), product, 1))
        slow.start()
        time.sleep(0.3)  # the unit is reserved in Redis; its cart row is not committed yet
        lab.reconcile_now()
        slow.join()
    finally:
        lab.disarm("cart.after_redis")
    accepted = 1
    for _ in range(later_adds):
        try:
            system.carts.add_item(uuid.uuid4(), product, 1)
            accepted += 1
        except Conflict:
            pass
    return {"stock": stock, "accepted": accepted, "products": [str(product)]}


def triple_click(lab, *, lock_ttl_s: int = 1, slow_ms: int = 1200, submits: int = 3) -> dict:
    """One cart submitted ``submits`` times at once with one idempotency key while order creation is slow
    (longer than the lock's TTL) and fails ``submits`` times; every submit retries through 409 like a shopper.

    Runs in the kernel, with an order service whose idempotency lock lives ``lock_ttl_s`` seconds.
    """
    import threading

    from pulse import bootstrap
    from pulse.errors import Conflict, Unavailable
    from pulse.faults import FaultInjected

    product = lab.new_product(stock=5, name="Triple click")
    user = uuid.uuid4()
    lab.client.add_item(str(user), product, 1)
    system = bootstrap.build(lab.settings.replace(idempotency_lock_ttl_s=lock_ttl_s), migrate=False, pool_size=4)
    key, created = str(uuid.uuid4()), []
    barrier = threading.Barrier(submits)

    def submit():
        barrier.wait()
        for _ in range(60):
            try:
                created.append(system.orders.create(user, key)["orderId"])
                return
            except (Conflict, Unavailable, FaultInjected):
                time.sleep(0.2)

    try:
        lab.arm("orders.create", 1.0, action="error", ms=slow_ms, max=submits)
        threads = [threading.Thread(target=submit) for _ in range(submits)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        lab.disarm("orders.create")
        system.close()
    for order_id in set(created):
        lab.client.wait_settled(order_id)
    return {"submits": submits, "ordersCreated": len(set(created)), "products": [product]}


def relay_crash(lab, *, wait_s: float = 20.0) -> dict:
    """The server dies right after its relay handed a batch to the broker; the supervisor restarts it.

    Waits up to ``wait_s`` for the order to settle (without confirms, only once the watchdog re-drove it).
    """
    product = lab.new_product(stock=5, name="Relay crash")
    user, key = lab.client.new_user(), str(uuid.uuid4())
    lab.client.add_item(user, product, 1)
    restarts = lab.restarts
    lab.arm("relay.after_publish", 1.0, max=1)
    try:
        # Any batch may be the one that crashes it (a re-drive of an earlier order, say): retry like a shopper.
        order_id = _through_crashes(lab, lambda: lab.client.checkout(user, key))["orderId"]
        deadline = time.monotonic() + 20
        while lab.restarts == restarts and time.monotonic() < deadline:
            time.sleep(0.1)
        lab.wait_up()
    finally:
        lab.disarm("relay.after_publish")
    try:
        status = _through_crashes(lab, lambda: lab.client.wait_settled(order_id, timeout_s=wait_s))["displayStatus"]
    except TimeoutError:
        status = _through_crashes(lab, lambda: lab.client.order(order_id))["displayStatus"]
    return {"crashes": lab.restarts - restarts, "completed": int(status == "COMPLETED"), "products": [product]}


def _through_crashes(lab, call, attempts: int = 5):
    """``call()``, again after the supervisor restarted a crashed server (the same idempotency key is safe)."""
    import httpx

    for attempt in range(attempts):
        try:
            return call()
        except (httpx.TransportError, PulseError) as exc:
            if isinstance(exc, PulseError) and exc.status < 500 or attempt == attempts - 1:
                raise
            time.sleep(0.5)
            lab.wait_up()


def _count(lab, sql: str, **params) -> int:
    return int(lab.q.sql(sql, **params).iloc[0]["n"])


# ----- the safeguards added with issue 11 §1 (cart expiry, optimistic locking, dead letters, watchdog, compensation)


def expiring_carts(lab, *, carts: int = 2, stock: int = 5, ttl_s: float = 1.0) -> dict:
    """``carts`` shoppers each put 1 unit in a cart that expires after ``ttl_s`` seconds; then the sweeper passes.

    The fault ``cart.short_ttl`` shortens the carts' life (the real TTL is minutes); :meth:`Lab.sweep_now` runs
    the same sweeper pass the server runs on its interval. Returns how many units ``reserved:`` still counts
    after the sweep (0 when every expired cart gave its hold back) and how many cart hashes Redis still has.
    """
    product = lab.new_product(stock=stock, name="Expiring")
    users = [lab.client.new_user() for _ in range(carts)]
    lab.arm("cart.short_ttl", 1.0, action="trigger", s=ttl_s)
    try:
        for user in users:
            lab.client.add_item(user, product, 1)
    finally:
        lab.disarm("cart.short_ttl")
    r = lab.redis()
    try:
        time.sleep(max(0.0, ttl_s - lab_refresh_s()) + 0.5)  # every cart has expired
        hashes_before = sum(int(r.exists(f"cart:{u}")) for u in users)
        swept = lab.sweep_now()
        reserved = int(r.get(f"reserved:{product}") or 0)
    finally:
        r.close()
    return {
        "carts": carts,
        "cartHashesAtSweep": hashes_before,
        "cartsSwept": int(swept["redisCartsSwept"]),
        "reservedAfterSweep": reserved,
        "products": [product],
    }


def lab_refresh_s() -> float:
    """How long :meth:`Lab.disarm` waits for every process to see a change (time already spent on a TTL)."""
    from pulse.lab import faults as lab_faults

    return lab_faults.REFRESH_WAIT_S


def crowd(lab, *, shoppers: int = 8, stock: int = 20) -> dict:
    """``shoppers`` carts of one product ordered at the same moment, so the server's inventory consumers
    (run it with ``lab.switch(consumer_threads=2)``) reserve the same stock row at once.

    Returns the units the orders took (their reservations) and the units that left the shelf
    (initial − available): equal when no update was lost.
    """
    product = lab.new_product(stock=stock, name="Crowd")
    users = [lab.client.new_user() for _ in range(shoppers)]
    for user in users:
        lab.client.add_item(user, product, 1)
    orders = checkout_all(lab, users, workers=shoppers)
    completed = int((orders["status"] == "COMPLETED").sum())
    left = _count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {"shoppers": shoppers, "unitsOrdered": completed, "unitsLeftShelf": stock - left, "products": [product]}


def poison_message(lab, *, redrive_deadline_s: float = 1.0, wait_s: float = 20.0) -> dict:
    """One order whose payment call times out on every attempt: the payment consumer retries it
    ``handler_retries`` times and gives up. Then a saga watchdog pass (the server's, run here with a short
    deadline) re-drives the order from the database so it still completes.

    Returns whether the given-up message is in ``payment.queue.dlq`` (its copy kept for a human to look at)
    and how the order ended.
    """
    from pulse import faults_control
    from pulse.tools.check import invariants

    product = lab.new_product(stock=5, name="Poison")
    user = lab.client.new_user()
    lab.client.add_item(user, product, 1)
    retries = lab.settings.handler_retries
    since = lab.now()
    # A message alone is tried ``retries`` times; one that failed inside a batch once more: armed for both.
    lab.arm("payment.timeout", 1.0, action="error", max=retries + 1)
    try:
        order_id = lab.client.checkout(user)["orderId"]
        deadline = time.monotonic() + wait_s
        while (
            faults_control.fired_counts(lab.settings.database_url, since).get("payment.timeout", 0) < retries
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.3)  # no backoff after the last attempt: the consumer dead-letters (or drops) it at once
    finally:
        lab.disarm("payment.timeout")
    attempts = faults_control.fired_counts(lab.settings.database_url, since).get("payment.timeout", 0)
    dead = invariants.peek_dead_letters(lab.settings.amqp_url, since_epoch=since.timestamp())
    in_dlq = sum(1 for m in dead.get("payment.queue", []) if m["id"])
    order = _redrive_until_settled(lab, order_id, redrive_deadline_s, wait_s)
    return {
        "attempts": attempts,
        "deadLettered": in_dlq,
        "completed": int(order["status"] == "COMPLETED"),
        "products": [product],
    }


def lost_event(lab, *, deadline_s: float = 2.0, wait_s: float = 6.0) -> dict:
    """One order's event is acked by ``order.queue`` without being handled (``consumer.lose``); for ``wait_s``
    seconds the saga watchdog passes (the server's, run here with deadline ``deadline_s``) look for stalled
    orders and re-drive them. Returns the order's status when the stall was noticed and at the end."""
    from pulse import faults_control

    product = lab.new_product(stock=5, name="Lost event")
    since = lab.now()
    lab.arm("consumer.lose", 1.0, queue="order.queue", max=1)
    try:
        order_id = lab.checkout({product: 1}, wait=False)["orderId"]
        deadline = time.monotonic() + wait_s
        while (
            not faults_control.fired_counts(lab.settings.database_url, since).get("consumer.lose")
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        time.sleep(0.5)  # the rest of the saga that did arrive is handled
    finally:
        lab.disarm("consumer.lose")
    stalled = lab.client.order(order_id)
    try:
        order = _redrive_until_settled(lab, order_id, deadline_s, wait_s)
    except TimeoutError:
        order = lab.client.order(order_id)
    return {
        "stalledStatus": stalled["status"],
        "finalStatus": order["displayStatus"] or order["status"],
        "completed": int(order["status"] == "COMPLETED"),
        "products": [product],
    }


def declined_order(lab) -> dict:
    """An optimistic order whose card is declined after inventory reserved its unit: inventory must restock.

    Returns the units that went back on the shelf and the reservation's final status."""
    product = lab.new_product(stock=5, name="Declined card")
    lab.arm("payment.decline", 1.0, max=1)
    try:
        order = lab.checkout({product: 1})
    finally:
        lab.disarm("payment.decline")
    left = _count(
        lab,
        "SELECT available_quantity AS n FROM inventory.inventory_items WHERE product_id = CAST(:p AS uuid)",
        p=product,
    )
    return {
        "ordered": 1,
        "unitsBack": left - 4,
        "reservation": order["inventoryStatus"],
        "status": order["displayStatus"],
        "products": [product],
    }


def _redrive_until_settled(lab, order_id: str, deadline_s: float, wait_s: float) -> dict:
    """Run saga watchdog passes (:class:`pulse.orders.watchdog.Watchdog`, as the server does every interval, here
    with deadline ``deadline_s``) until the order settled; raises TimeoutError after ``wait_s`` seconds."""
    from pulse.lab.client import settled
    from pulse.orders.watchdog import Watchdog

    watchdog = Watchdog(lab.system.deps, deadline_s=deadline_s)
    end = time.monotonic() + wait_s
    while True:
        order = lab.client.order(order_id)
        if settled(order):
            return order
        if time.monotonic() > end:
            raise TimeoutError(f"order {order_id} did not settle within {wait_s:.0f}s; last state: {order}")
        watchdog.run_once()
        time.sleep(0.5)


# ----- restarts of the broker and the database mid-saga (issue 11) ---------------------------------------------


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
