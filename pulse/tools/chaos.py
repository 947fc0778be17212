"""The chaos campaign: checkouts over contended products while faults strike, then every invariant.

``pulse chaos --orders N --seed S`` starts ``pulse serve`` under a
:class:`~pulse.tools.supervise.CommandSupervisor` (so crash faults restart it), creates a few fresh products
(one with scarce stock), drives N checkouts from a thread pool over HTTP while a second thread arms faults at
random (each for a moment, most with a cap on how often they strike), then disarms everything, waits until
every order of the campaign is settled
(the saga watchdog re-drives what ``consumer.lose`` dropped), reconciles Redis with cooldown 0 and runs
every invariant on the campaign's orders and products. The summary is one JSON document.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from pulse import config, faults, faults_catalogue
from pulse.infra import db, migrate, outbox
from pulse.rows import one
from pulse.tools.check import invariants as inv
from pulse.tools.checkout import CHAOS_WORDS, Checkout, Outcome, Shopper, through_faults

if TYPE_CHECKING:
    from pulse.tools.supervise import CommandSupervisor

T = TypeVar("T")

log = logging.getLogger(__name__)

# How each fault kind is armed during a campaign, (action, probability, params), from the one catalogue
# (pulse.faults_catalogue). Crashes strike once per arming.
FAULT_PLANS = {
    e.name: (e.action, e.chaos[0], dict(e.chaos[1])) for e in faults_catalogue.CATALOGUE if e.chaos is not None
}
DEFAULT_FAULTS = tuple(FAULT_PLANS)
SETTLED_CHECK_S = 0.5
# The contention phase (Campaign._contend) runs these on products of its own, before the fault rounds.
RUSH = {"stock": 3, "shoppers": 12}  # shoppers who add the same scarce product at the same moment
IN_FLIGHT = {"stock": 4, "wave": 4, "db_delay_ms": 2500}  # cart adds whose DB write lags reconciliation
# Orders that took a scarce product's last units and wait for inventory's (slowed) decision while others shop.
SOLD_OUT = {"stock": 2, "late_shoppers": 3, "decision_delay_ms": 2500}
LOCK_TTL_S = 2  # the idempotency lock TTL of the campaign's server: a slow creation outlives it in seconds
CROWD = {"stock": 20, "shoppers": 8}  # shoppers who order the same product at the same moment
CONSUMER_THREADS = 2  # per queue in the campaign's server, so two inventory batches can meet on one row
EXPIRY = {"stock": 5, "shoppers": 3, "ttl_s": 2}  # carts left to expire once the campaign is quiet
SWEEP_EVERY_S = 1.0  # the campaign's server sweeps expired carts this often
RECONCILE_EVERY_S = 1.0  # the campaign's server reconciles Redis this often, so passes meet adds in flight
DECISIONS = ("STOCK_RESERVED", "STOCK_FAILED", "PAYMENT_PROCESSED", "PAYMENT_FAILED")
SHOPPER = through_faults()  # the drive's checkouts: every request retried through crashes for up to a minute
# The contention phase's order submits: a slow creation that outlives its lock answers 409 for longer, and an
# order whose retries through faults ran out is given up at once.
SUBMITTER = dataclasses.replace(SHOPPER, order_retry_on=frozenset({409}), order_attempts=100)


class Campaign:
    """One campaign; :meth:`run` returns the summary (``violations`` empty when every invariant held)."""

    def __init__(
        self,
        *,
        orders: int = 200,
        seed: int = 1,
        fault_kinds: Iterable[str] = DEFAULT_FAULTS,
        strategy: str | None = None,
        outbox_mode: str | None = None,
        url: str | None = None,
        products: int = 3,
        threads: int = 8,
        quiesce_timeout_s: float = 120.0,
        naive: str = "",
        progress: bool = True,
        env: dict[str, str] | None = None,
        fault_every_s: float = 1.5,
        log_dir: str | None = None,
        strike_wait_s: float = 10.0,
        max_drive_s: float | None = None,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        base = config.from_env(self.env)
        changes = {k: v for k, v in (("strategy", strategy), ("outbox_mode", outbox_mode)) if v}
        self.settings = base.replace(**changes) if changes else base
        self.orders, self.seed, self.url = orders, seed, url
        self.fault_kinds = [f for f in fault_kinds if f and f != "none"]
        unknown = set(self.fault_kinds) - set(FAULT_PLANS)
        if unknown:
            raise faults.UnknownFault(
                f"Unknown fault kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(FAULT_PLANS)}."
            )
        self.n_products, self.threads = products, threads
        self.quiesce_timeout_s, self.naive, self.progress = quiesce_timeout_s, naive, progress
        self.fault_every_s = fault_every_s
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pulse-chaos-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.order_ids: list[str] = []
        self._lock = threading.Lock()
        # Two events, because Event.wait() sleeps only until its event is SET: waiting on ``_driving`` (set for
        # the whole drive) returned at once, so the injector neither paused nor held a kind until it struck,
        # and its token loop spun, releasing every checkout at once; small campaigns ended before half the
        # kinds had met traffic. ``_drive_over`` is what the injector sleeps on.
        self._driving = threading.Event()
        self._drive_over = threading.Event()
        self._injector_done = threading.Event()
        self._turns = threading.Condition()
        self.kinds_done, self._tokens = 0, 0  # fault kinds whose turn ended; extra checkouts let in (_wait_turn)
        self._first_round_done = False  # every kind had its turn (and its retry): the last share may start
        self._in_flight, self._started = 0, 0  # checkouts past their turn and not finished; all past their turn
        self.turns: list[dict[str, Any]] = []  # each fault kind's turn: struck or not, how long, what traffic it met
        self.strike_wait_s = strike_wait_s
        self.max_drive_s = max_drive_s
        self._drive_deadline: float | None = None
        self.pace_s = 0.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Campaign:
        kinds = args.faults.split(",") if args.faults else DEFAULT_FAULTS
        return cls(
            orders=args.orders,
            seed=args.seed,
            fault_kinds=kinds,
            strategy=args.strategy,
            outbox_mode=args.outbox_mode,
            url=args.url,
            products=args.products,
            threads=args.threads,
            quiesce_timeout_s=args.quiesce_timeout,
            naive=args.naive,
            progress=not args.no_progress,
            max_drive_s=args.max_drive_s,
        )

    # -- the campaign ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        url = self.settings.database_url
        migrate.migrate(url)
        faults.disarm(url)
        since = self._db_now()
        products = self._create_products()
        supervisor, thread = self._start_server() if self.url is None else (None, None)
        server_url = self.url or self._server_url
        try:
            self._wait_healthy(server_url, 90)
            checked = products + self._contend(server_url)  # the drive shops only for its own products
            self._driving.set()
            injector = threading.Thread(target=self._inject, name="chaos-faults", daemon=True)
            injector.start()
            self._drive(server_url, products)
            self._end_drive()
            injector.join()
            faults.disarm(url)
            quiet = self._quiesce(since, checked)
            checked.append(self._expire_carts(server_url))
            outcome = inv.check_all(self.settings, inv.Scope(since=since, products=checked))
        finally:
            self._end_drive()
            faults.disarm(url)
            if supervisor is not None and thread is not None:  # both or neither
                supervisor.stop()
                thread.join(30)
        return self._summary(since, outcome, quiet, supervisor, time.monotonic() - started)

    def _end_drive(self) -> None:
        self._driving.clear()
        self._drive_over.set()
        with self._turns:
            self._turns.notify_all()

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` on the injector's side, waking early when the drive is over."""
        self._drive_over.wait(seconds)

    # -- the contention phase ----------------------------------------------------------------------
    def _contend(self, server_url: str) -> list[str]:
        """Make, on products of its own, the conditions each safeguard exists for; returns those products.

        Every campaign runs it, with or without naive switches, before the fault rounds (so no other fault is
        armed meanwhile): a rush on a scarce product; cart adds in flight while the server reconciles; orders
        that fail after a module said yes, whose decision is then announced again (late); duplicate submits
        of one key while order creation is slow and fails; shoppers adding a product whose last units orders
        hold while inventory has not decided yet (the cart promise); orders of one product placed at the same
        moment (two inventory consumers reserve the row at once); an order whose payment event fails every retry
        (a poison message); an order one of whose events is lost. Its shoppers keep the carts they did not order
        from, so ``no-oversell`` sees every unit Redis promised; the invariants judge the rest. Carts that
        expire are made last, once the campaign is quiet (:meth:`_expire_carts`).
        """
        phase: list[str] = []
        self._phase_rng = random.Random(f"{self.seed}:contention")  # the drive's own draws stay as they were
        with httpx.Client(base_url=server_url, timeout=15) as http:
            rush = self._new_product("rush", RUSH["stock"])
            phase.append(rush)
            self._together([lambda: self._add(http, rush, 1)] * RUSH["shoppers"])

            in_flight = self._new_product("in flight", IN_FLIGHT["stock"])
            phase.append(in_flight)
            with self._armed("cart.after_redis", action="delay", ms=IN_FLIGHT["db_delay_ms"]):
                first = threading.Thread(
                    target=self._together, args=([lambda: self._add(http, in_flight, 1)] * IN_FLIGHT["wave"],)
                )
                first.start()
                time.sleep(RECONCILE_EVERY_S * 1.6)  # a reconciliation pass ran while the first wave is in flight
                self._together([lambda: self._add(http, in_flight, 1)] * IN_FLIGHT["wave"])
                first.join()

            sold_out = self._new_product("sold out in flight", SOLD_OUT["stock"])
            phase.append(sold_out)
            self._shop_while_in_flight(http, sold_out)

            late = self._new_product("late", 10)
            phase.append(late)
            failed = self._failed_orders(http, late, phase)
            self._announce_again(failed)

            slow = self._new_product("slow", 10)
            phase.append(slow)
            user, key = str(uuid.uuid4()), str(uuid.uuid4())
            if self._add(http, slow, 1, user) == 200:
                with self._armed("orders.create", action="error", ms=int(LOCK_TTL_S * 1200), max=3):
                    self._together([lambda: self._order(http, user, key)] * 3)  # a triple click

            crowd = self._new_product("crowd", CROWD["stock"])
            phase.append(crowd)
            shoppers = [str(uuid.uuid4()) for _ in range(CROWD["shoppers"])]
            for user in shoppers:
                self._add(http, crowd, 1, user)
            # Their events reach inventory together, where two consumers reserve the same row at once.
            self._settle(self._together([self._order_call(http, u) for u in shoppers]))

            phase.append(self._poison(http))
            phase.append(self._lost(http))
        log.info("chaos: contention phase done on %s", phase)
        return phase

    def _shop_while_in_flight(self, http: httpx.Client, product: str) -> None:
        """Orders take every unit of ``product``; while inventory decides slowly, other shoppers try to add it.
        A hold that lapses before the decision (``release-on-order-created``) lets them in, and their orders
        then fail out of stock: the promise ``cart-promise-kept`` watches."""
        first = [str(uuid.uuid4()) for _ in range(SOLD_OUT["stock"])]
        for user in first:
            self._add(http, product, 1, user)
        with self._armed("inventory.reserve", action="delay", ms=SOLD_OUT["decision_delay_ms"], max=len(first)):
            placed = self._together([self._order_call(http, u) for u in first])
            self._holds_moved(placed)  # redis-stock has moved the holds to the orders; inventory is still deciding
            late = [str(uuid.uuid4()) for _ in range(SOLD_OUT["late_shoppers"])]
            accepted = [
                u
                for u, status in zip(
                    late, self._together([self._add_call(http, product, u) for u in late]), strict=True
                )
                if status == 200
            ]
            if accepted:
                placed += self._together([self._order_call(http, u) for u in accepted])
        self._settle(placed)

    def _holds_moved(self, order_ids: Iterable[str | None], timeout_s: float = 10.0) -> None:
        """Wait until redis-stock has handled these orders' ORDER_CREATED (their holds left the carts)."""
        ids = [o for o in order_ids if o]
        deadline = time.monotonic() + timeout_s
        with db.connect(self.settings.database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                moved = one(
                    conn.execute(
                        "SELECT count(*) AS n FROM infra.order_holds WHERE order_id = ANY(%s::uuid[]) "
                        "AND moved_at IS NOT NULL",
                        (ids,),
                    )
                )["n"]
                if moved >= len(ids):
                    return
                time.sleep(0.05)

    def _failed_orders(self, http: httpx.Client, product: str, phase: list[str]) -> list[str]:
        """Orders that fail after a module decided for them: two declined cards (optimistic: after the stock
        was reserved), and an order whose cart Redis forgot (redis.flush), so inventory refuses it (post-payment:
        after the charge)."""
        shoppers = [str(uuid.uuid4()) for _ in range(2)]
        for user in shoppers:
            self._add(http, product, 1, user)
        with self._armed("payment.decline", action="drop", max=len(shoppers)):
            placed = self._together([self._order_call(http, u) for u in shoppers])
            self._settle(placed)
        forgotten = self._new_product("forgotten", 1)
        phase.append(forgotten)
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        self._add(http, forgotten, 1, first)
        with self._armed("redis.flush", action="trigger", max=1, wait_strike=True):
            pass
        self._add(http, forgotten, 1, second)  # Redis forgot the first hold, so it promises the unit again
        both = self._together([self._order_call(http, u) for u in (first, second)])
        self._settle(both)
        with db.connect(self.settings.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id::text AS id FROM orders.orders WHERE id = ANY(%s::uuid[]) AND status = 'FAILED'",
                ([o for o in placed + both if o],),
            ).fetchall()
        return [r["id"] for r in rows]

    def _poison(self, http: httpx.Client) -> str:
        """An order whose payment event fails every retry (the provider times out each time), so the consumer
        gives up on it: it belongs in the dead-letter queue, and the watchdog re-drives the order later."""
        product = self._new_product("poison", 5)
        user = str(uuid.uuid4())
        if self._add(http, product, 1, user) != 200:
            return product
        retries = self.settings.handler_retries
        with self._armed("payment.timeout", action="error", max=2 * retries) as armed:
            self._order(http, user, str(uuid.uuid4()))
            deadline = time.monotonic() + self.strike_wait_s + 5
            while (
                time.monotonic() < deadline
                and faults.fired_counts(self.settings.database_url, armed["armedAt"]).get("payment.timeout", 0)
                < retries
            ):
                time.sleep(0.2)
        return product

    def _lost(self, http: httpx.Client) -> str:
        """An order one of whose events a consumer acks without handling, so only the watchdog can finish it."""
        product = self._new_product("lost", 5)
        user = str(uuid.uuid4())
        if self._add(http, product, 1, user) == 200:
            with self._armed("consumer.lose", action="drop", max=1) as armed:
                self._order(http, user, str(uuid.uuid4()))
                deadline = time.monotonic() + self.strike_wait_s
                while time.monotonic() < deadline and not faults.fired_counts(
                    self.settings.database_url, armed["armedAt"]
                ).get("consumer.lose"):
                    time.sleep(0.2)
        return product

    def _expire_carts(self, server_url: str) -> str:
        """Once the campaign is quiet: a few carts that expire within seconds, and the sweeper's pass over them.

        Last, because a server that reconciles every second repairs a hold nobody gave back some seconds later
        (its cooldown): judged at once, the drift is still there to be seen (``reserved-before-repair``)."""
        product = self._new_product("expiring", EXPIRY["stock"])
        with (
            httpx.Client(base_url=server_url, timeout=15) as http,
            self._armed("cart.short_ttl", action="trigger", s=EXPIRY["ttl_s"]),
        ):
            for _ in range(EXPIRY["shoppers"]):
                self._add(http, product, 1)
        time.sleep(max(0.0, EXPIRY["ttl_s"] - 0.8) + 2 * SWEEP_EVERY_S + 0.5)  # expired, then swept
        return product

    def _announce_again(self, order_ids: list[str]) -> None:
        """Announce each order's first module decision once more, through the outbox with a new id, as a saga
        watchdog does when it took a late event for a lost one: the order has failed since, and must stay so."""
        if not order_ids:
            return
        with db.connect(self.settings.database_url) as conn, conn.transaction():
            for order_id in order_ids:
                first = conn.execute(
                    "SELECT event_type FROM infra.event_log WHERE aggregate_id = %s AND event_type = ANY(%s) "
                    "ORDER BY created_at, event_id LIMIT 1",
                    (order_id, list(DECISIONS)),
                ).fetchone()
                order = conn.execute(
                    "SELECT o.*, p.id AS payment_id FROM orders.orders o LEFT JOIN payment.payments p "
                    "ON p.order_id = o.id WHERE o.id = %s",
                    (order_id,),
                ).fetchone()
                if first is None or order is None:
                    continue
                items = [
                    {"productId": str(r["product_id"]), "quantity": r["quantity"]}
                    for r in conn.execute(
                        "SELECT product_id, quantity FROM orders.order_items WHERE order_id = %s ORDER BY product_id",
                        (order_id,),
                    )
                ]
                payload: dict[str, Any] = {
                    "orderId": order_id,
                    "userId": str(order["user_id"]),
                    "items": items,
                    "totalPrice": order["total_amount"],
                    "strategy": order["strategy"],
                    "redriven": True,
                }
                event = first["event_type"]
                if event == "STOCK_FAILED":
                    payload["reason"] = "OUT_OF_STOCK"
                elif event == "PAYMENT_FAILED":
                    payload["reason"] = "DECLINED"
                elif event == "PAYMENT_PROCESSED":
                    payload["paymentId"] = str(order["payment_id"])
                outbox.append(conn, event, "ORDER", order_id, payload)
        log.info("chaos: announced the first decision of %d failed order(s) again", len(order_ids))

    @contextlib.contextmanager
    def _armed(self, name: str, *, action: str, wait_strike: bool = False, **params: Any) -> Iterator[dict[str, Any]]:
        """Arm one fault for the ``with`` block (every process sees it within half a second), then disarm."""
        url = self.settings.database_url
        armed = faults.arm(url, name, action=action, seed=self._phase_rng.randrange(1 << 30), **params)
        time.sleep(0.8)  # the registries refresh every 0.5 s
        try:
            if wait_strike:
                deadline = time.monotonic() + self.strike_wait_s
                while time.monotonic() < deadline and not faults.fired_counts(url, armed["armedAt"]).get(name):
                    time.sleep(0.2)
            yield armed
        finally:
            faults.disarm(url, name)
            time.sleep(0.8)

    def _settle(self, order_ids: Iterable[str | None], timeout_s: float = 20.0) -> None:
        """Wait until these orders are COMPLETED or FAILED with their compensation done (or the timeout)."""
        ids = [o for o in order_ids if o]
        deadline = time.monotonic() + timeout_s
        while ids and time.monotonic() < deadline:
            with db.connect(self.settings.database_url, autocommit=True) as conn:
                busy = one(
                    conn.execute(
                        "SELECT count(*) AS n FROM orders.orders WHERE id = ANY(%s::uuid[]) AND (status NOT IN "
                        "('COMPLETED', 'FAILED') OR (status = 'FAILED' AND (payment_status = 'SUCCESS' OR "
                        "inventory_status = 'RESERVED')))",
                        (ids,),
                    )
                )["n"]
            if not busy:
                return
            time.sleep(0.2)

    @staticmethod
    def _together(calls: list[Callable[[], T]]) -> list[T]:
        """Run the calls at the same moment (one thread each, released by a barrier); their results in order."""
        barrier = threading.Barrier(len(calls))

        def run(call: Callable[[], T]) -> T:
            barrier.wait()
            return call()

        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(run, calls))

    def _order_call(self, http: httpx.Client, user: str) -> Callable[[], str | None]:
        """For :meth:`_together`: submit ``user``'s order with a key of its own, when called."""
        return lambda: self._order(http, user, str(uuid.uuid4()))

    def _add_call(self, http: httpx.Client, product: str, user: str) -> Callable[[], int | None]:
        """For :meth:`_together`: add one unit of ``product`` to ``user``'s cart, when called."""
        return lambda: self._add(http, product, 1, user)

    def _add(self, http: httpx.Client, product: str, quantity: int, user: str | None = None) -> int | None:
        return Shopper(http, SHOPPER).add(user or str(uuid.uuid4()), product, quantity)

    def _order(self, http: httpx.Client, user: str, key: str) -> str | None:
        """Submit the order (retrying through 409 and 5xx like a shopper); its id, or None."""
        done = Shopper(http, SUBMITTER).order(user, key)
        self._placed(done)
        return done.order_id

    def _new_product(self, label: str, stock: int) -> str:
        pid = str(uuid.uuid4())
        with db.connect(self.settings.database_url) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, %s)",
                (pid, f"Chaos {label} ({pid[:8]})", Decimal(20)),
            )
            conn.execute(
                "INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, %s)", (pid, stock)
            )
        return pid

    def _create_products(self) -> list[str]:
        # The first product is scarce on purpose: it runs out about a third of the way through, so shoppers
        # find the shelf empty (and post-payment orders need a refund) while the stock is fought over. The
        # others have enough for every shopper: when all stock ran out early, the kinds whose turn came late
        # (consumer.before_ack, payment.*) met only rejected carts, no events, and missed their turn.
        demand = self.orders * 4 / 3 / self.n_products  # quantities 1, 1 or 2, products chosen evenly
        scarce = max(3, int(self.orders * 0.15)) if self.n_products > 1 else max(3, int(demand * 0.6))
        ids: list[str] = []
        with db.connect(self.settings.database_url) as conn, conn.transaction():
            for i in range(self.n_products):
                stock = scarce if i == 0 else int(demand * 2) + 10
                pid = str(uuid.uuid4())
                conn.execute(
                    "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, %s)",
                    (pid, f"Chaos item {i} ({pid[:8]})", Decimal(10 + 5 * i)),
                )
                conn.execute(
                    "INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, %s)",
                    (pid, stock),
                )
                ids.append(pid)
        return ids

    def _start_server(self) -> tuple[CommandSupervisor, threading.Thread]:
        from pulse.tools.launcher import free_port
        from pulse.tools.supervise import CommandSupervisor, serve_command

        port = free_port()
        self._server_url = f"http://127.0.0.1:{port}"
        env = {
            **self.env,
            "PULSE_STRATEGY": self.settings.strategy,
            "PULSE_OUTBOX_MODE": self.settings.outbox_mode,
            "PULSE_WATCHDOG_DEADLINE_S": self.env.get("PULSE_WATCHDOG_DEADLINE_S", "3"),
            "PULSE_WATCHDOG_INTERVAL_S": self.env.get("PULSE_WATCHDOG_INTERVAL_S", "1"),
            # Reconciliation meeting adds in flight, and a slow order creation outliving its idempotency
            # lock, are conditions the campaign makes (see _contend): it needs both short.
            "PULSE_RECONCILE_INTERVAL_S": str(RECONCILE_EVERY_S),
            "PULSE_IDEMPOTENCY_LOCK_TTL_S": str(LOCK_TTL_S),
            # Two consumers per queue, so reservations of one product can run at once (see _contend), and
            # a sweeper that passes every second over the carts _expire_carts leaves to expire.
            "PULSE_CONSUMER_THREADS": self.env.get("PULSE_CONSUMER_THREADS", str(CONSUMER_THREADS)),
            "PULSE_SWEEP_INTERVAL_S": str(SWEEP_EVERY_S),
            "PULSE_NAIVE": self.naive,
            "PULSE_LAB": "1",
        }
        # Restarting fast is the point here: crash faults strike every few seconds, and a server kept down by
        # a growing backoff would leave the remaining fault kinds nothing to strike.
        supervisor = CommandSupervisor(
            serve_command(["--port", str(port)]),
            env=env,
            backoff_s=0.2,
            max_backoff_s=1.0,
            log_path=str(self.log_dir / "serve.log"),
        )
        thread = threading.Thread(target=supervisor.run, name="chaos-supervisor", daemon=True)
        thread.start()
        return supervisor, thread

    # -- traffic --------------------------------------------------------------------------------------
    def _drive(self, server_url: str, products: list[str]) -> None:
        from tqdm import tqdm

        plans = [(self.rng.choice(products), self.rng.choice((1, 1, 2))) for _ in range(self.orders)]
        # Spread the checkouts so every fault kind gets its turn while traffic flows.
        wanted_s = len(self.fault_kinds) * (self.fault_every_s + 0.3) * 1.2
        self.pace_s = wanted_s * self.threads / max(self.orders, 1) / 2 if self.fault_kinds else 0.0
        bar = tqdm(total=self.orders, desc="chaos", unit="order", disable=not self.progress, leave=False)
        self._drive_deadline = time.monotonic() + self.max_drive_s if self.max_drive_s else None
        with httpx.Client(base_url=server_url, timeout=15) as http, ThreadPoolExecutor(self.threads) as pool:
            for outcome in pool.map(lambda i: self._checkout(http, i, *plans[i]), range(len(plans))):
                with self._lock:
                    self.outcomes[outcome] += 1
                bar.update(1)
        bar.close()

    def _checkout(self, http: httpx.Client, index: int, product: str, quantity: int) -> str:
        self._wait_turn(index)
        with self._turns:
            self._in_flight += 1
            self._started += 1
        try:
            return self._shop(http, product, quantity)
        finally:
            with self._turns:
                self._in_flight -= 1
                self._turns.notify_all()

    def _shop(self, http: httpx.Client, product: str, quantity: int) -> str:
        if self._drive_deadline is not None and time.monotonic() > self._drive_deadline:
            return CHAOS_WORDS[Outcome.NOT_STARTED]  # --max-drive-s spent: the campaign settles and checks what it did
        user = str(uuid.uuid4())
        if self.pace_s:
            time.sleep(self.rng_for(user).uniform(0, 2 * self.pace_s))
        done = Shopper(http, SHOPPER).checkout(product, quantity, user=user)
        self._placed(done)
        return CHAOS_WORDS[done.outcome]

    @staticmethod
    def rng_for(user: str) -> random.Random:
        return random.Random(user)

    def _placed(self, done: Checkout) -> None:
        if done.order_id is not None:
            with self._lock:
                self.order_ids.append(done.order_id)

    # -- faults ---------------------------------------------------------------------------------------
    def _inject(self) -> None:
        try:
            self._inject_rounds()
        finally:
            self._injector_done.set()
            self._round_over()

    def _round_over(self) -> None:
        with self._turns:
            self._first_round_done = True
            self._turns.notify_all()

    def _inject_rounds(self) -> None:
        url = self.settings.database_url
        kinds = list(self.fault_kinds)
        queue: list[str] = []
        retried: set[str] = set()
        while self._driving.is_set() and kinds:
            if not queue:
                if self.turns:
                    self._round_over()
                queue, retried = self.rng.sample(kinds, len(kinds)), set()  # every kind once per round, seeded
            name = queue.pop()
            action, probability, params = FAULT_PLANS[name]
            turn_started, started_before, struck = time.monotonic(), self._started, False
            try:
                armed = faults.arm(
                    url, name, action=action, probability=probability, seed=self.rng.randrange(1 << 30), **params
                )
                self._pause(self.fault_every_s)
                struck = self._hold_until_struck(name, armed)
                faults.disarm(url, name)
            except Exception as exc:  # db.restart may cut this very connection; the next round goes on
                log.info("chaos: arming %s failed: %s", name, exc)
            turn = {
                "kind": name,
                "struck": struck,
                "heldS": round(time.monotonic() - turn_started, 1),
                "checkoutsStarted": self._started - started_before,
            }
            self.turns.append(turn)
            log.info("chaos: turn %s", turn)
            if not struck and name not in retried:
                # One more turn at the end of the round: a kind can miss its own through no fault of its own
                # (e.g. the relay stalled by the db.restart before it, so no event reached a consumer).
                retried.add(name)
                queue.insert(0, name)
            with self._turns:
                self.kinds_done, self._tokens = self.kinds_done + 1, 0
                self._turns.notify_all()
            self._pause(0.3)

    def _hold_until_struck(self, name: str, armed: dict[str, Any]) -> bool:
        """Keep ``name`` armed until it struck once, for at most ``strike_wait_s``. A fixed window missed whole
        kinds: an environment fault strikes only from a live server's ticker, and after a crash fault the
        server is down for the seconds a restart takes, which used to be the whole window."""
        deadline = time.monotonic() + self.strike_wait_s
        while self._driving.is_set() and time.monotonic() < deadline:
            try:
                if faults.fired_counts(self.settings.database_url, armed["armedAt"]).get(name):
                    return True
            except Exception as exc:  # db.restart cuts this probe too; try again
                log.debug("chaos: strike probe failed: %s", exc)
            with self._turns:  # the kind's share of checkouts is (nearly) done: let one more in (see _wait_turn)
                if self._in_flight < 2:
                    self._tokens = 1  # one at a time, never a burst, so later kinds keep their own share
                    self._turns.notify_all()
            self._pause(0.3)
        return False

    def _wait_turn(self, index: int) -> None:
        """Spread the checkouts over the fault schedule: the first share of them runs while the first kind is
        armed, the next share once that kind's turn is over, and so on (a last share after the round). A kind
        still waiting to strike when its share is done lets one more checkout in every 0.3 s while fewer than
        two are in flight (a token), so it always meets live traffic. The last share takes a token only while a
        kind retries its missed turn: the drive must outlast the whole first round, or the kinds still to come
        would be armed with no traffic (and the drive over) to meet."""
        if not self.fault_kinds:
            return
        kinds = len(self.fault_kinds)
        need = int(index * (kinds + 1) / max(self.orders, 1))

        def turn_come() -> bool:
            if not self._driving.is_set() or self._injector_done.is_set():
                return True
            return self.kinds_done >= need if need < kinds else self._first_round_done

        def token() -> bool:
            return self._tokens > 0 and (need < kinds or self.kinds_done >= kinds)

        with self._turns:
            self._turns.wait_for(lambda: turn_come() or token())
            if not turn_come():
                self._tokens -= 1

    # -- the end --------------------------------------------------------------------------------------
    def _quiesce(self, since: dt.datetime, products: list[str]) -> bool:
        """Wait until the outbox is empty and every campaign order is settled; False once nothing moved for
        ``quiesce_timeout_s``. The clock restarts whenever fewer orders are left: a large campaign ends with
        thousands of orders queued behind the faults, and the saga working through them is not a hang."""
        from tqdm import tqdm

        deadline = time.monotonic() + self.quiesce_timeout_s
        scope = inv.Scope(since=since, products=products)
        fewest: int | None = None
        with tqdm(desc="settling", unit="order", disable=not self.progress, leave=False) as bar:
            while time.monotonic() < deadline:
                try:
                    with db.connect(self.settings.database_url, autocommit=True) as conn:
                        drained, settled = inv.outbox_drained(conn, scope), inv.orders_terminal(conn, scope)
                    if drained.passed and settled.passed:
                        return True
                    left = len(settled.offending)
                    if fewest is None:
                        bar.reset(total=left)
                    if fewest is None or left < fewest:
                        bar.update((fewest or left) - left)
                        fewest, deadline = left, time.monotonic() + self.quiesce_timeout_s
                except Exception as exc:  # the server restarting is not our failure
                    log.debug("quiescence probe failed: %s", exc)
                # The probe reads every campaign order: with thousands left, ask less often.
                time.sleep(SETTLED_CHECK_S if fewest is None or fewest < 1000 else 5 * SETTLED_CHECK_S)
        return False

    def _summary(
        self,
        since: dt.datetime,
        outcome: dict[str, Any],
        quiet: bool,
        supervisor: CommandSupervisor | None,
        duration_s: float,
    ) -> dict[str, Any]:
        results = outcome["results"]
        with db.connect(self.settings.database_url, autocommit=True) as conn:
            states = conn.execute(
                "SELECT o.status || COALESCE('/' || o.failure_reason, '') AS state, count(*) AS n "
                "FROM orders.orders o WHERE o.id = ANY(%s::uuid[]) GROUP BY 1 ORDER BY 1",
                (list(set(self.order_ids)),),
            ).fetchall()
            redrives = one(
                conn.execute(
                    "SELECT COALESCE(SUM(attempts), 0) AS n FROM infra.saga_redrives WHERE redriven_at >= %s", (since,)
                )
            )["n"]
        delivery = next(r for r in results if r.name == "delivery")
        injected = faults.fired_counts(self.settings.database_url, since)
        reconcile = outcome["reconcile"] or {}
        return {
            "strategy": self.settings.strategy,
            "outboxMode": self.settings.outbox_mode,
            "seed": self.seed,
            "naive": self.naive or None,
            "ordersRequested": self.orders,
            "checkouts": dict(self.outcomes),
            "ordersByState": {r["state"]: r["n"] for r in states},
            "faultsInjected": injected,
            "faultKindsNotStruck": [k for k in self.fault_kinds if not injected.get(k)],
            "faultTurns": self.turns,
            "fixes": {
                "sagaRedrives": int(redrives),
                "reconcile": {k: reconcile.get(k, 0) for k in ("stock", "reserved", "carts", "cleanupQueue")},
                "serverRestarts": supervisor.restarts if supervisor else None,
            },
            "delivery": delivery.data,
            "quiesced": quiet,
            "violations": [r.to_dict() for r in results if not r.passed],
            "invariants": {r.name: r.passed for r in results},
            "durationS": round(duration_s, 1),
            "serverLog": str(self.log_dir / "serve.log") if supervisor else None,
        }

    def _db_now(self) -> dt.datetime:
        with db.connect(self.settings.database_url) as conn:
            now: dt.datetime = one(conn.execute("SELECT now() AS t"))["t"]
            return now

    @staticmethod
    def _wait_healthy(url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"pulse serve did not answer on {url} within {timeout_s:.0f}s.")
