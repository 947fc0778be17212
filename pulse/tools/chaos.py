"""The chaos campaign: checkouts over contended products while faults strike, then every invariant.

``pulse chaos --orders N --seed S`` starts ``pulse serve`` under a
:class:`~pulse.tools.supervise.CommandSupervisor` (so crash faults restart it), creates a few fresh products
(one with scarce stock), runs the contention phase on products of its own (:mod:`pulse.tools.contention`),
then drives N checkouts from a thread pool over HTTP while a second thread arms faults at random (each for a
moment, most with a cap on how often they strike). It then disarms everything, waits until every order of the
campaign is settled (the saga watchdog re-drives what ``consumer.lose`` dropped), reconciles Redis with
cooldown 0 and runs every invariant on the campaign's orders and products. The summary is one JSON document.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from pulse import config, faults, faults_catalogue, faults_control
from pulse.infra import db, migrate
from pulse.infra.db import one
from pulse.tools.check import invariants as inv
from pulse.tools.checkout import CHAOS_WORDS, Checkout, Outcome, Shopper, through_faults
from pulse.tools.contention import CONSUMER_THREADS, SERVER_ENV, Contention

if TYPE_CHECKING:
    from pulse.tools.supervise import CommandSupervisor


log = logging.getLogger(__name__)

# How each fault kind is armed during a campaign, (action, probability, params), from the one catalogue
# (pulse.faults_catalogue). Crashes strike once per arming.
FAULT_PLANS = {
    e.name: (e.action, e.chaos[0], dict(e.chaos[1])) for e in faults_catalogue.CATALOGUE if e.chaos is not None
}
DEFAULT_FAULTS = tuple(FAULT_PLANS)
SETTLED_CHECK_S = 0.5
SHOPPER = through_faults()  # the drive's checkouts: every request retried through crashes for up to a minute


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
        faults_control.disarm(url)
        since = self._db_now()
        products = self._create_products()
        supervisor, thread = self._start_server() if self.url is None else (None, None)
        server_url = self.url or self._server_url
        try:
            self._wait_healthy(server_url, 90)
            contention = Contention(
                self.settings, seed=self.seed, strike_wait_s=self.strike_wait_s, placed=self._placed
            )
            checked = products + contention.run(server_url)  # the drive shops only for its own products
            self._driving.set()
            injector = threading.Thread(target=self._inject, name="chaos-faults", daemon=True)
            injector.start()
            self._drive(server_url, products)
            self._end_drive()
            injector.join()
            faults_control.disarm(url)
            quiet = self._quiesce(since, checked)
            checked.append(contention.expire_carts(server_url))
            outcome = inv.check_all(self.settings, inv.Scope(since=since, products=checked))
        finally:
            self._end_drive()
            faults_control.disarm(url)
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
            # The conditions the contention phase makes need a server tuned for them (see pulse.tools.contention).
            **SERVER_ENV,
            "PULSE_CONSUMER_THREADS": self.env.get("PULSE_CONSUMER_THREADS", str(CONSUMER_THREADS)),
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
                armed = faults_control.arm(
                    url, name, action=action, probability=probability, seed=self.rng.randrange(1 << 30), **params
                )
                self._pause(self.fault_every_s)
                struck = self._hold_until_struck(name, armed)
                faults_control.disarm(url, name)
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
                if faults_control.fired_counts(self.settings.database_url, armed["armedAt"]).get(name):
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
        injected = faults_control.fired_counts(self.settings.database_url, since)
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
