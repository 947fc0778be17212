"""The chaos campaign's contention phase: the conditions each safeguard exists for, made on purpose.

Before its fault rounds, every campaign (:mod:`pulse.tools.chaos`) runs :meth:`Contention.run` on products of
its own: a rush on a scarce product, cart adds in flight while the server reconciles, orders that fail after a
module said yes (then announced again, late), a triple click on one idempotency key while order creation is
slow, shoppers adding what in-flight orders hold, a crowd ordering one product at once, a poison payment and a
lost event. Once the campaign is quiet, :meth:`Contention.expire_carts` leaves a few carts to expire. Random
traffic meets these conditions rarely; the naive switches (``PULSE_NAIVE``) are judged by whether the
invariants catch what they break here.

The campaign's server must be configured for them: :data:`SERVER_ENV` says how.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, TypeVar

import httpx

from pulse import config, faults_control
from pulse.infra import db, outbox
from pulse.infra.db import one
from pulse.tools.checkout import Checkout, Shopper, through_faults

T = TypeVar("T")

log = logging.getLogger(__name__)

# Each scenario's size, on products of its own.
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

# The server settings these conditions need (the campaign passes them to its ``pulse serve``, with
# CONSUMER_THREADS unless told otherwise): reconciliation meeting adds in flight, and a slow order creation
# outliving its idempotency lock, need both short; a sweeper that passes every second over the carts
# expire_carts leaves to expire.
SERVER_ENV = {
    "PULSE_RECONCILE_INTERVAL_S": str(RECONCILE_EVERY_S),
    "PULSE_IDEMPOTENCY_LOCK_TTL_S": str(LOCK_TTL_S),
    "PULSE_SWEEP_INTERVAL_S": str(SWEEP_EVERY_S),
}
SHOPPER = through_faults()  # cart adds retried through crashes, like the drive's shoppers
# Order submits: a slow creation that outlives its lock answers 409 for longer, and an order whose retries
# through faults ran out is given up at once.
SUBMITTER = dataclasses.replace(SHOPPER, order_retry_on=frozenset({409}), order_attempts=100)


class Contention:
    """The phase for one campaign: ``placed`` hears of every checkout that created an order, so the campaign
    counts these orders among its own."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        seed: int,
        strike_wait_s: float,
        placed: Callable[[Checkout], None],
    ) -> None:
        self.settings, self.strike_wait_s, self.placed = settings, strike_wait_s, placed
        self.rng = random.Random(f"{seed}:contention")  # the drive's own draws stay as they were

    def run(self, server_url: str) -> list[str]:
        """Make, on products of its own, the conditions each safeguard exists for; returns those products.

        Every campaign runs it, with or without naive switches, before the fault rounds (so no other fault is
        armed meanwhile): a rush on a scarce product; cart adds in flight while the server reconciles; orders
        that fail after a module said yes, whose decision is then announced again (late); duplicate submits
        of one key while order creation is slow and fails; shoppers adding a product whose last units orders
        hold while inventory has not decided yet (the cart promise); orders of one product placed at the same
        moment (two inventory consumers reserve the row at once); an order whose payment event fails every retry
        (a poison message); an order one of whose events is lost. Its shoppers keep the carts they did not order
        from, so ``no-oversell`` sees every unit Redis promised; the invariants judge the rest. Carts that
        expire are made last, once the campaign is quiet (:meth:`expire_carts`).
        """
        phase: list[str] = []
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
                and faults_control.fired_counts(self.settings.database_url, armed["armedAt"]).get("payment.timeout", 0)
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
                while time.monotonic() < deadline and not faults_control.fired_counts(
                    self.settings.database_url, armed["armedAt"]
                ).get("consumer.lose"):
                    time.sleep(0.2)
        return product

    def expire_carts(self, server_url: str) -> str:
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
        armed = faults_control.arm(url, name, action=action, seed=self.rng.randrange(1 << 30), **params)
        time.sleep(0.8)  # the registries refresh every 0.5 s
        try:
            if wait_strike:
                deadline = time.monotonic() + self.strike_wait_s
                while time.monotonic() < deadline and not faults_control.fired_counts(url, armed["armedAt"]).get(name):
                    time.sleep(0.2)
            yield armed
        finally:
            faults_control.disarm(url, name)
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
        self.placed(done)
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
