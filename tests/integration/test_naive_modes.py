"""Each naive switch breaks an invariant visibly; with the switch off the same scenario keeps it."""

import contextlib
import datetime as dt
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from pulse import faults, faults_control
from pulse.errors import Conflict, Unavailable
from pulse.events import Envelope
from pulse.infra import db as pulse_db
from pulse.inventory import handlers as inventory
from pulse.orders.watchdog import Watchdog
from pulse.tools.check import invariants as inv
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
ON_OFF = [pytest.param(True, id="naive-on"), pytest.param(False, id="naive-off")]


def _scope(products, since=None):
    return inv.Scope(since=since or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5), products=products)


def _conn(settings):
    return pulse_db.connect(settings.database_url, autocommit=True)


def _naive(flag, name):
    return frozenset({name}) if flag else frozenset()


@pytest.mark.parametrize("naive", ON_OFF)
def test_reserve_get_set_oversells_carts(settings, make_system, new_product, naive):
    system = make_system(naive=_naive(naive, "reserve-get-set"))
    product = new_product(stock=5)

    def add(_):
        with contextlib.suppress(Conflict):
            system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(add, range(40)))
    with _conn(settings) as conn:
        result = inv.no_oversell(conn, _scope([product]))
    assert result.passed is not naive, result.to_dict()


@pytest.mark.parametrize("naive", ON_OFF)
def test_no_inbox_applies_a_redelivered_event_twice(settings, make_system, new_product, naive):
    since = dt.datetime.now(dt.UTC)
    system = make_system(naive=_naive(naive, "no-inbox"))
    product = new_product(stock=10)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 2)
    order = system.orders.create(user, f"k-{user}")
    with _conn(settings) as conn:
        row = conn.execute(
            "SELECT * FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_CREATED'", (order["orderId"],)
        ).fetchone()
    envelope = Envelope(row["id"], row["event_type"], row["aggregate_id"], row["payload"])
    system.dispatcher("inventory.queue")(envelope)
    system.dispatcher("inventory.queue")(envelope)  # the broker redelivers after a crash before the ack
    with _conn(settings) as conn:
        results = [
            inv.stock_conservation(conn, _scope([product], since)),
            inv.effects_once(conn, _scope([product], since)),
        ]
        conn.execute("DELETE FROM shared.outbox WHERE aggregate_id = %s", (order["orderId"],))  # no relay here
    assert [r.passed for r in results] == [not naive, not naive], [r.to_dict() for r in results]


@pytest.mark.parametrize("naive", ON_OFF)
def test_reconcile_full_scan_overwrites_an_in_flight_reservation(settings, make_system, new_product, naive):
    system = make_system(naive=_naive(naive, "reconcile-full-scan"))
    product = uuid.UUID(new_product(stock=2))
    faults_control.arm(settings.database_url, "cart.after_redis", action="delay", ms=800)
    try:
        time.sleep(0.7)  # the system's registry refreshes every 0.5 s
        slow = threading.Thread(target=system.carts.add_item, args=(uuid.uuid4(), product, 1))
        slow.start()
        time.sleep(0.3)  # the first unit is reserved in Redis, its DB row not yet committed
        system.reconciler.run_once()
        slow.join()
    finally:
        faults_control.disarm(settings.database_url, "cart.after_redis")
    time.sleep(0.6)
    for _ in range(2):
        with contextlib.suppress(Conflict):
            system.carts.add_item(uuid.uuid4(), product, 1)
    with _conn(settings) as conn:
        result = inv.no_oversell(conn, _scope([str(product)]))
    assert result.passed is not naive, result.to_dict()


@pytest.mark.parametrize("naive", ON_OFF)
def test_unguarded_state_lets_a_late_event_revive_a_failed_order(settings, make_system, new_product, naive):
    since = dt.datetime.now(dt.UTC)
    system = make_system(workers=True, payment_decline_rate=1.0, naive=_naive(naive, "unguarded-state"))
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    wait_for(
        lambda: (
            system.orders.get(uuid.UUID(order_id))["displayStatus"] == "FAILED_PAYMENT"
            and system.orders.get(uuid.UUID(order_id))["inventoryStatus"] == "RELEASED"
        ),
        30,
        message="declined",
    )
    # A late STOCK_RESERVED (a duplicate published under a new id) reaches the FAILED order.
    from pulse.infra import outbox

    with pulse_db.transaction(system.deps.pool) as conn:
        outbox.append(
            conn,
            "STOCK_RESERVED",
            "ORDER",
            order_id,
            {
                "orderId": order_id,
                "userId": str(user),
                "items": [{"productId": product, "quantity": 1}],
                "strategy": "OPTIMISTIC",
                "totalPrice": "10.00",
            },
        )
    watchdog = Watchdog(system.deps, deadline_s=0.2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.5)
        watchdog.run_once()
        with _conn(settings) as conn:
            result = inv.orders_terminal(conn, _scope([product], since))
        if result.passed:
            break
    assert result.passed is not naive, result.to_dict()


@pytest.mark.parametrize("naive", ON_OFF)
def test_lock_no_owner_lets_a_concurrent_duplicate_in(settings, make_system, new_product, naive):
    system = make_system(naive=_naive(naive, "lock-no-owner"), idempotency_lock_ttl_s=1)
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    inside, overlaps, calls = [], [], []
    original = system.orders._create_locked

    def slow_create(*args):
        first = not overlaps and not inside and not calls
        calls.append(1)
        if inside:
            overlaps.append(len(inside))
        inside.append(1)
        try:
            time.sleep(1.5)
            if first:
                raise Unavailable("request A dies half way; it commits nothing")
            return original(*args)
        finally:
            inside.pop()

    system.orders._create_locked = slow_create
    key = f"k-{user}"
    a = threading.Thread(target=_quietly, args=(system.orders.create, user, key))
    a.start()
    time.sleep(1.1)  # A's lock expired (TTL 1 s) while A is still working
    b = threading.Thread(target=system.orders.create, args=(user, key))
    b.start()
    a.join()  # A releases "its" lock: without an owner token it deletes B's
    try:
        system.orders.create(user, key)  # C, while B still works
        c_admitted = True
    except Conflict:
        c_admitted = False
    b.join()
    # The invariant: a lock is held by one request at a time, so C (B's duplicate) must get 409.
    assert c_admitted is naive
    assert bool(overlaps[1:]) is naive  # A and B overlap by TTL in both modes; B and C only without owner


def _quietly(function, *args):
    with contextlib.suppress(Unavailable):
        function(*args)


@pytest.fixture
def outbox_mode(request, settings, db):
    """The relay mode under test; in cdc mode the session's slot is dropped afterwards (polling tests follow)."""
    mode = request.param
    yield mode
    if mode == "cdc":
        _drop_slot(settings, db)


@pytest.mark.parametrize("outbox_mode", ["polling", "cdc"], indirect=True)
@pytest.mark.parametrize("naive", ON_OFF)
def test_publish_no_confirm_loses_events_in_a_relay_crash(
    settings, serve_env, make_system, new_product, naive, outbox_mode, tmp_path
):
    since = dt.datetime.now(dt.UTC)
    system = make_system()
    system.start_workers(relay=False, schedulers=False)
    product = new_product(stock=5)
    env = {
        **os.environ,
        **serve_env,
        "PULSE_NAIVE": "publish-no-confirm" if naive else "",
        "PULSE_OUTBOX_MODE": outbox_mode,
    }

    def relay():
        return subprocess.Popen(
            [sys.executable, "-m", "pulse", "serve", "--role", "relay"],
            env=env,
            stdout=open(tmp_path / "relay.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    first = relay()
    try:
        wait_for(lambda: _outbox_empty(settings), 30, message="leftovers of earlier tests relayed")
        faults_control.arm(settings.database_url, "relay.after_publish", action="crash", max=1)
        time.sleep(0.8)  # the relay's registry reads the fault
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), 1)
        order_id = system.orders.create(user, f"k-{user}")["orderId"]
        assert first.wait(30) == faults.CRASH_STATUS
    finally:
        faults_control.disarm(settings.database_url, "relay.after_publish")
        if first.poll() is None:
            first.kill()
    second = relay()  # the supervisor's restart
    try:
        wait_for(lambda: _outbox_empty(settings), 30, message="outbox drained by the restarted relay")
        time.sleep(2)  # let consumers finish what was delivered
        if not naive:
            wait_for(
                lambda: system.orders.get(uuid.UUID(order_id))["displayStatus"] == "COMPLETED",
                30,
                message="order completed from the re-published events",
            )
        with _conn(settings) as conn:
            result = inv.delivery(conn, _scope([product], since))
    finally:
        second.terminate()
        second.wait(30)
    assert result.passed is not naive, result.to_dict()
    if not naive:
        assert result.data["duplicates"] >= 1  # the crash made the relay publish the batch twice


def _outbox_empty(settings):
    with _conn(settings) as conn:
        return conn.execute("SELECT count(*) AS n FROM shared.outbox").fetchone()["n"] == 0


@pytest.mark.parametrize("mode", ["polling", "cdc"])
def test_relay_survives_an_error_after_publish_and_publishes_again(settings, make_system, db, mode):
    """An ``error`` fault after the broker took a batch: the relay thread logs, backs off and publishes it again."""
    from pulse.infra import outbox

    db.execute("DELETE FROM shared.outbox")  # earlier tests' leftovers: the errors must strike on our batch
    since = db.execute("SELECT now() AS t").fetchone()["t"]
    registry = faults.FaultRegistry(settings.database_url, refresh_s=0.1)
    tap = _Tap(settings.amqp_url)
    system = make_system(faults=registry, outbox_mode=mode)
    try:
        faults_control.arm(settings.database_url, "relay.after_publish", action="error", max=2)
        system.start_workers(consumers=False, schedulers=False)
        with pulse_db.connect(settings.database_url) as conn, conn.transaction():
            ids = [str(outbox.append(conn, "NAIVE_TEST_EVENT", "order", uuid.uuid4(), {"n": i})) for i in range(3)]
        wait_for(lambda: set(ids) <= set(tap.ids()), 30, message="events published after the injected errors")
        wait_for(lambda: _log_count(db, "relay.after_publish", since) >= 2, 10, message="both errors struck")
        relay_thread = next(t for t in system.threads if t.name == "relay")
        assert relay_thread.is_alive()
        wait_for(
            lambda: not db.execute("SELECT 1 FROM shared.outbox WHERE id = ANY(%s::uuid[])", (ids,)).fetchone(),
            10,
            message="rows deleted once confirmed",
        )
        assert tap.ids().count(ids[0]) >= 2  # the batch the first error interrupted went out again
    finally:
        faults_control.disarm(settings.database_url, "relay.after_publish")
        system.close()
        tap.close()
        if mode == "cdc":
            _drop_slot(settings, db)


def _drop_slot(settings, db):
    wait_for(
        lambda: (
            not db.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active", (settings.cdc_slot,)
            ).fetchone()
        ),
        15,
        message="slot released",
    )
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (settings.cdc_slot,),
    )


def _log_count(db, name, since):
    return db.execute(
        "SELECT count(*) AS n FROM infra.fault_log WHERE name = %s AND fired_at >= %s", (name, since)
    ).fetchone()["n"]


class _Tap:
    """A private queue bound to every routing key: each message the relay published, in arrival order."""

    def __init__(self, amqp_url):
        from pulse.infra import broker

        self.conn = broker.connect(amqp_url)
        self.channel = self.conn.channel()
        self.channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, broker.EXCHANGE, routing_key="NAIVE_TEST_EVENT")
        self.seen = []

    def ids(self):
        import json

        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return list(self.seen)
            self.seen.append(json.loads(body)["id"])

    def close(self):
        if self.conn.is_open:
            self.conn.close()


# -- issue 11 §1: the safeguards that had no switch -------------------------------------------------------
def _registry(settings):
    return faults.FaultRegistry(settings.database_url, refresh_s=0.1)


@pytest.mark.parametrize("naive", ON_OFF)
def test_cart_native_ttl_leaves_an_expired_carts_hold_in_reserved(settings, make_system, new_product, rds, naive):
    from pulse.cart.sweeper import sweep_once

    registry = _registry(settings)
    system = make_system(faults=registry, naive=_naive(naive, "cart-native-ttl"))
    product = new_product(stock=5)
    faults_control.arm(settings.database_url, "cart.short_ttl", action="trigger", s=1)
    try:
        time.sleep(0.3)  # the registry refreshes every 0.1 s
        for _ in range(2):
            system.carts.add_item(uuid.uuid4(), uuid.UUID(product), 1)
    finally:
        faults_control.disarm(settings.database_url, "cart.short_ttl")
    assert int(rds.get(f"reserved:{product}")) == 2
    time.sleep(1.3)  # both carts expired
    sweep_once(system.deps)
    with _conn(settings) as conn:
        result = inv.reserved_before_repair(conn, rds, _scope([product]))
        carts = conn.execute(
            "SELECT count(*) AS n FROM inventory.cart_items WHERE product_id = %s AND quantity > 0", (product,)
        ).fetchone()["n"]
    assert carts == 0  # the sweeper's database pass cleared both carts in either mode
    assert result.passed is not naive, result.to_dict()
    if naive:
        assert result.data["drift"][product] == {"redis": 2, "database": 0}


def _order_created_envelopes(settings, system, product, n):
    envelopes = []
    for _ in range(n):
        user = uuid.uuid4()
        system.carts.add_item(user, uuid.UUID(product), 1)
        order = system.orders.create(user, f"k-{user}")
        with _conn(settings) as conn:
            row = conn.execute(
                "SELECT * FROM shared.outbox WHERE aggregate_id = %s AND event_type = 'ORDER_CREATED'",
                (order["orderId"],),
            ).fetchone()
            conn.execute("DELETE FROM shared.outbox WHERE aggregate_id = %s", (order["orderId"],))  # no relay here
        envelopes.append(Envelope(row["id"], row["event_type"], row["aggregate_id"], row["payload"]))
    return envelopes


@pytest.mark.parametrize("naive", ON_OFF)
def test_no_version_check_loses_updates_of_concurrent_reservations(settings, make_system, new_product, naive):
    system = make_system(naive=_naive(naive, "no-version-check"))
    product = new_product(stock=20)
    envelopes = _order_created_envelopes(settings, system, product, 8)
    with ThreadPoolExecutor(4) as pool:  # four inventory consumers at once
        list(pool.map(system.dispatcher("inventory.queue"), envelopes))
    with _conn(settings) as conn:
        conn.execute("DELETE FROM shared.outbox WHERE aggregate_id = ANY(%s)", ([e.aggregate_id for e in envelopes],))
        result = inv.stock_conservation(conn, _scope([product]))
        reserved = conn.execute(
            "SELECT count(*) AS n FROM inventory.reservations WHERE status = 'RESERVED' AND order_id = ANY(%s::uuid[])",
            ([e.aggregate_id for e in envelopes],),
        ).fetchone()["n"]
    assert reserved == 8  # every order got its unit in both modes; only the naive one forgot some decrements
    assert result.passed is not naive, result.to_dict()
    if naive:
        assert inventory.lock_batch(None, envelopes, naive=system.deps.naive) is None  # no pre-lock either


@pytest.mark.parametrize("naive", ON_OFF)
def test_dlq_drop_loses_a_poison_message(settings, make_system, new_product, db, naive):
    since = dt.datetime.now(dt.UTC)
    db.execute("DELETE FROM shared.outbox")  # earlier tests' leftovers: the failures must strike on our event
    registry = _registry(settings)
    system = make_system(workers=True, faults=registry, handler_retries=2, naive=_naive(naive, "dlq-drop"))
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    armed = faults_control.arm(settings.database_url, "payment.timeout", action="error", max=3)  # every attempt fails
    try:
        time.sleep(0.3)
        order_id = system.orders.create(user, f"k-{user}")["orderId"]
        wait_for(
            lambda: faults_control.fired_counts(settings.database_url, armed["armedAt"]).get("payment.timeout", 0) >= 2,
            30,
            message="the payment event failed every retry",
        )
    finally:
        faults_control.disarm(settings.database_url, "payment.timeout")

    def judged():
        dead = inv.peek_dead_letters(settings.amqp_url)
        with _conn(settings) as conn:
            return inv.delivery(conn, _scope([product], since), {q: {m["id"] for m in ms} for q, ms in dead.items()})

    wait_for(lambda: judged().data["lost"] + judged().data["deadLettered"] >= 1, 15, message="poison message settled")
    result = judged()
    assert result.passed is not naive, result.to_dict()
    assert result.data["deadLettered"] == (0 if naive else 1), (order_id, result.to_dict())


@pytest.mark.parametrize("naive", ON_OFF)
def test_no_watchdog_leaves_an_order_whose_event_was_lost_hanging(settings, make_system, new_product, naive):
    since = dt.datetime.now(dt.UTC)
    registry = _registry(settings)
    system = make_system(workers=True, faults=registry, naive=_naive(naive, "no-watchdog"))
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    faults_control.arm(settings.database_url, "consumer.lose", action="drop", max=1, queue="payment.queue")
    try:
        time.sleep(0.3)
        system.orders.create(user, f"k-{user}")
        wait_for(
            lambda: faults_control.fired_counts(settings.database_url, since).get("consumer.lose"),
            20,
            message="an event was lost",
        )
    finally:
        faults_control.disarm(settings.database_url, "consumer.lose")
    watchdog = Watchdog(system.deps, deadline_s=0.5)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.5)
        watchdog.run_once()
        with _conn(settings) as conn:
            result = inv.orders_terminal(conn, _scope([product], since))
        if result.passed or (naive and time.monotonic() > deadline - 10):
            break  # re-driven and settled; or, naive, given the 5 s a watchdog would have needed
    assert result.passed is not naive, result.to_dict()


@pytest.mark.parametrize("strategy", ["optimistic", "post-payment"])
@pytest.mark.parametrize("naive", ON_OFF)
def test_no_compensation_keeps_the_stock_or_the_money_of_a_failed_order(
    settings, make_system, new_product, strategy, naive
):
    since = dt.datetime.now(dt.UTC)
    optimistic = strategy == "optimistic"
    system = make_system(
        workers=True,
        strategy=strategy,
        payment_decline_rate=1.0 if optimistic else 0.0,
        naive=_naive(naive, "no-compensation"),
    )
    product = new_product(stock=5)
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 1)
    if not optimistic:  # the shelf empties behind Redis's back, so inventory refuses the paid order
        with _conn(settings) as conn:
            conn.execute(
                "UPDATE inventory.inventory_items SET available_quantity = 0 WHERE product_id = %s", (product,)
            )
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    wait_for(lambda: system.orders.get(uuid.UUID(order_id))["status"] == "FAILED", 30, message="order failed")
    time.sleep(1.5)  # the compensation (restock or refund) has had its time
    with _conn(settings) as conn:
        scope = _scope([product], since)
        if optimistic:
            results = [inv.stock_conservation(conn, scope)]
        else:
            results = [inv.failed_orders_refunded(conn, scope), inv.money_balance(conn, scope)]
    assert [r.passed for r in results] == [not naive] * len(results), [r.to_dict() for r in results]
