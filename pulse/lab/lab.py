"""The :class:`Lab`: one object a notebook holds to run, break, switch and inspect the checkout system."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import httpx

from pulse import config, topology
from pulse.lab import faults as lab_faults
from pulse.lab.client import PulseClient
from pulse.lab.supervisor import ServeSupervisor
from pulse.seed import SEED_PRODUCTS
from pulse.tools.launcher import ServeProcess

log = logging.getLogger(__name__)

# Rows of a previous run; the catalogue's seed products stay (their stock is reset by the seed).
WIPED_TABLES = (
    "inventory.cart_items",
    "inventory.carts",
    "inventory.reservations",
    "inventory.inbox",
    "orders.order_items",
    "orders.orders",
    "orders.idempotency_records",
    "orders.inbox",
    "orders.order_views",
    "orders.order_view_inbox",
    "payment.payments",
    "payment.inbox",
    "shared.outbox",
    "infra.redis_stock_inbox",
)
# Bookkeeping of the fault/invariant machinery (issue 4), wiped too where the schema has it.
OPTIONAL_WIPED_TABLES = ("infra.event_log", "infra.fault_log", "infra.saga_redrives", "infra.order_holds")
# The system's Redis keys; anything else in the database (a test session's lease, say) is left alone.
SYSTEM_KEY_PATTERNS = (
    "stock:*",
    "reserved:*",
    "cart:*",
    "lock:*",
    "pulse:applied:*",
    "pulse:reconcile:*",
    "pulse:hold:*",
)


class LabError(RuntimeError):
    """Something the lab cannot do right now; the message says what and what to try."""


class Lab:
    """Runs the real checkout system for a notebook: services checked, schema migrated, catalogue seeded,
    ``pulse serve`` started in a supervised child process (a crash fault restarts it, the kernel survives).

    >>> lab = Lab(strategy="optimistic").start()
    >>> order = lab.checkout({IPHONE: 1})          # one checkout, waited until the saga settled
    >>> lab.switch(strategy="post-payment")        # restart the child under the other saga
    >>> lab.stop()                                 # also done at interpreter exit

    Service URLs default to ``PULSE_*`` environment variables; pass ``database_url``, ``redis_url``,
    ``amqp_url`` (or ``env``) to point the lab at other services, e.g. a test session's private ones.
    Every change of strategy, outbox mode, decline rate or naive switches restarts the child with
    the new environment; faults (see :meth:`arm`) apply at run time without a restart.

    ``services="own"`` runs the lab on a PostgreSQL cluster and a RabbitMQ node it starts itself (Redis stays
    on the configured server, in a leased DB of its own), removed at :meth:`stop`; only then may it
    :meth:`restart_broker` and :meth:`restart_database`. The rule: the lab restarts no server it did not start,
    whatever the URLs say (local or not, classroom or not), because a server it did not start may serve others.
    """

    def __init__(
        self,
        strategy: str = "optimistic",
        outbox_mode: str | None = None,
        *,
        decline_rate: float = 0.0,
        naive: tuple | list | set = (),
        database_url: str | None = None,
        redis_url: str | None = None,
        amqp_url: str | None = None,
        env: dict | None = None,
        reconcile_interval_s: float = 3600.0,
        sweep_interval_s: float = 3600.0,
        log_dir: str | Path | None = None,
        services: str = "given",
    ):
        if services not in ("given", "own"):
            raise LabError(f"services={services!r}: say 'given' (the PULSE_* URLs) or 'own' (servers the lab starts).")
        self.services = services
        self._owned = None
        self.service_restarts: list[dict] = []  # what restart_broker/restart_database did, with their moments
        base = {**os.environ, **(env or {})}
        base.update(self._classroom_env(base))
        urls = {"PULSE_DATABASE_URL": database_url, "PULSE_REDIS_URL": redis_url, "PULSE_AMQP_URL": amqp_url}
        self.env = {k: v for k, v in base.items() if k.startswith("PULSE_")}
        self.env.update({k: v for k, v in urls.items() if v})
        self.env.update(
            {"PULSE_RECONCILE_INTERVAL_S": str(reconcile_interval_s), "PULSE_SWEEP_INTERVAL_S": str(sweep_interval_s)}
        )
        self.env.setdefault("PULSE_RELAY_POLL_S", "0.02")
        self.env["PULSE_LAB"] = "1"  # the lab's server and in-kernel systems obey faults; nothing else does
        mode = outbox_mode or self.env.get("PULSE_OUTBOX_MODE") or config.Settings.outbox_mode
        self.settings = config.from_env(
            {
                **self.env,
                "PULSE_STRATEGY": strategy,
                "PULSE_OUTBOX_MODE": mode,
                "PULSE_PAYMENT_DECLINE_RATE": str(decline_rate),
                "PULSE_NAIVE": ",".join(sorted(naive)),
            }
        )
        log_dir = log_dir or self.env.get("PULSE_LAB_LOG_DIR")  # set by the regression matrix, for instance
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="pulse-lab-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor: ServeSupervisor | None = None
        self.client: PulseClient | None = None
        self.reconcile_runs: list[dict] = []
        self.sweep_runs: list[dict] = []
        self.tap = None
        self._system = None
        self._queries = None
        self._dashboards: list = []
        self._past_restarts = 0
        self._atexit = False
        self._serve_args: tuple = ()  # ("--role", "api") while deliveries are held (see hold)
        self._stepper = None
        self.demonstrations: list[dict] = []  # what demonstrate() showed, for the notebook's record

    @staticmethod
    def _classroom_env(base: dict) -> dict:
        """Classroom mode (``PULSE_CLASSROOM`` set): this student's own database, vhost, Redis DB and slot, and
        their own credentials when the instructor provisioned them (:mod:`pulse.lab.classroom`); else ``{}``.
        Everything the lab then touches, the queues ``reset`` purges included, is the student's own."""
        if not base.get("PULSE_CLASSROOM"):
            return {}
        from pulse.lab import classroom

        return classroom.lab_env(base)

    # ----- life cycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the running API (OpenAPI docs at ``url + '/docs'``)."""
        self._require_running()
        return self.supervisor.url

    @property
    def running(self) -> bool:
        return self.supervisor is not None

    @property
    def held(self) -> bool:
        """True while deliveries are held: the server runs only its API, :meth:`step` delivers the events."""
        return bool(self._serve_args)

    @property
    def restarts(self) -> int:
        """How many times the supervisor restarted a crashed ``pulse serve``."""
        return self._past_restarts + (self.supervisor.restarts if self.supervisor else 0)

    def check_services(self) -> dict[str, str]:
        """Ping PostgreSQL, Redis and RabbitMQ; returns ``{service: 'ok' | error}``, raises LabError if any is down."""
        from pulse.lab import services

        status = services.check(self.settings)
        down = [f"{name} ({state})" for name, state in status.items() if state != "ok"]
        if down:
            raise LabError("Not reachable: " + ", ".join(down) + ". Start the services first (scripts/services.sh up).")
        return status

    def start(self, *, fresh: bool = True, tap: bool = True, serve: bool = True) -> Lab:
        """Check services, migrate, seed and start ``pulse serve`` under supervision.

        ``fresh=True`` empties the previous run's carts, orders, payments, inboxes, outbox, queues and
        Redis keys, and puts the seed catalogue's stock back, so charts start from zero.
        ``tap=True`` also records every event the broker carries (for :meth:`timeline`).
        ``serve=False`` only prepares the services (workshops run their own in-kernel system).
        """
        from pulse.infra import migrate

        if self.running:
            return self
        if self.services == "own" and self._owned is None:
            self._start_owned()
        self.check_services()
        migrate.migrate(self.settings.database_url)
        if fresh:
            self.reset()
        else:
            migrate.seed(self.settings.database_url)
        if not serve:
            return self
        self._start_child()
        if tap:
            self.start_tap()
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        return self

    def _child_env(self) -> dict:
        s = self.settings
        return {
            **self.env,
            "PULSE_DATABASE_URL": s.database_url,
            "PULSE_REDIS_URL": s.redis_url,
            "PULSE_AMQP_URL": s.amqp_url,
            "PULSE_PAYMENT_DECLINE_RATE": str(s.payment_decline_rate),
            "PULSE_NAIVE": ",".join(sorted(s.naive)),
            "PULSE_CONSUMER_THREADS": str(s.consumer_threads),
            "PULSE_RECONCILE_COOLDOWN_S": str(s.reconcile_cooldown_s),
        }

    def _start_child(self, port: int | None = None) -> None:
        env, s = self._child_env(), self.settings
        name = f"serve-{s.strategy}-{s.outbox_mode}.log"

        def make(port):
            return ServeProcess(
                strategy=s.strategy,
                outbox_mode=s.outbox_mode,
                port=port,
                env=env,
                log_path=self.log_dir / name,
                args=self._serve_args,
            )

        self.supervisor = ServeSupervisor(make).start(port)
        self.client = PulseClient(self.supervisor.url)

    def restart(self, **changes) -> Lab:
        """Stop the child and start it again, optionally with changed settings (see :meth:`switch`)."""
        self._require_running()
        port = self.supervisor.process.port
        self.supervisor.stop()
        self._past_restarts += self.supervisor.restarts
        self.client.close()
        if changes:
            self.settings = self.settings.replace(**changes)
            if self._system is not None:  # the in-kernel system must follow the new settings too
                self._close_stepper()
                self._system.close()
                self._system = None
        self._start_child(port)
        return self

    def switch(
        self,
        *,
        strategy: str | None = None,
        outbox_mode: str | None = None,
        decline_rate: float | None = None,
        naive: tuple | list | set | None = None,
        consumer_threads: int | None = None,
    ) -> Lab:
        """Restart under another saga strategy, outbox mode, payment decline rate, set of naive switches
        or number of consumer threads per queue (competing consumers).

        Messages already in the queues stay there and are handled by the new child: switching in
        the middle of a load run is allowed and is itself an experiment.
        """
        changes = {
            k: v
            for k, v in (
                ("strategy", strategy),
                ("outbox_mode", outbox_mode),
                ("payment_decline_rate", decline_rate),
                ("consumer_threads", consumer_threads),
            )
            if v is not None
        }
        if naive is not None:
            changes["naive"] = frozenset(naive)
        return self.restart(**changes)

    def crash(self) -> None:
        """SIGKILL the child, as a crash would; the supervisor restarts it (see :meth:`wait_up`)."""
        self._require_running()
        self.supervisor.process.kill()

    def wait_up(self, timeout_s: float = 60.0) -> None:
        """Wait until the (restarted) child answers again."""
        self._require_running()
        self.supervisor.wait_up(timeout_s)

    def stop(self) -> None:
        """Stop dashboards, the tap, the child and every connection the lab opened; safe to call again."""
        for dashboard in self._dashboards:
            dashboard.stop()
        self._close_stepper()
        self._serve_args = ()
        if self.tap is not None:
            self.tap.stop()
            self.tap = None
        if self.supervisor is not None:
            self.supervisor.stop()
            self._past_restarts += self.supervisor.restarts
            self.supervisor = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._system is not None:
            self._system.close()
            self._system = None
        if self._queries is not None:
            self._queries.close()
            self._queries = None
        if self._owned is not None:
            self._owned.stop()
            self._owned = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _require_running(self):
        if not self.running:
            raise LabError("The lab is not running; call lab.start() first.")

    # ----- services of its own, and their restarts ---------------------------------------------------

    def _start_owned(self) -> None:
        from pulse.lab.owned import OwnedServices, OwnedServicesError

        try:
            self._owned = OwnedServices(self.settings.redis_url).start()
        except OwnedServicesError as exc:
            raise LabError(f"The lab could not start services of its own: {exc}") from exc
        if not self._atexit:  # a kernel that exits without stop() must not leave servers behind
            atexit.register(self.stop)
            self._atexit = True
        owned = self._owned.env
        self.env.update(owned)
        self.settings = self.settings.replace(
            database_url=owned["PULSE_DATABASE_URL"],
            amqp_url=owned["PULSE_AMQP_URL"],
            redis_url=owned["PULSE_REDIS_URL"],
        )

    def _require_owned(self, what: str, url: str):
        from urllib.parse import urlparse

        if self._owned is None:
            where = urlparse(url)
            raise LabError(
                f"The lab restarts only a {what} it started itself, and the one at {where.hostname}:"
                f"{where.port} may serve others: create the lab with Lab(services='own') to restart it."
            )
        if self.held:
            raise LabError("Deliveries are held: call lab.release() before restarting a service.")
        return self._owned

    def restart_broker(self, down_s: float = 0.0) -> dict:
        """Restart the lab's own RabbitMQ node (kept down ``down_s`` more seconds); returns when it answers again,
        with the moments (epoch s) it ``began`` stopping, was ``down`` and ``up``. The server's relay and consumers
        are not told: they find out as any client would, and reconnect. Refused unless ``services="own"``."""
        mark = self._require_owned("RabbitMQ", self.settings.amqp_url).restart_broker(down_s)
        self.service_restarts.append(mark)
        return mark

    def restart_database(self, down_s: float = 0.0) -> dict:
        """Restart the lab's own PostgreSQL (a fast shutdown: sessions end, open transactions roll back), kept down
        ``down_s`` more seconds; returns its moments like :meth:`restart_broker`. Refused unless ``services="own"``."""
        mark = self._require_owned("PostgreSQL", self.settings.database_url).restart_database(down_s)
        self.service_restarts.append(mark)
        if self._system is not None:  # its pool holds sessions the restart ended
            self._system.close()
            self._system = None
        return mark

    # ----- state ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the previous run's rows, queues and Redis keys, and reset the seed catalogue's stock."""
        from pulse.infra import broker, db, migrate

        with db.connect(self.settings.database_url) as conn, conn.transaction():
            present = [
                t
                for t in OPTIONAL_WIPED_TABLES
                if conn.execute("SELECT to_regclass(%s) AS t", (t,)).fetchone()["t"] is not None
            ]
            conn.execute("TRUNCATE " + ", ".join(WIPED_TABLES + tuple(present)))
            seed_ids = [p[0] for p in SEED_PRODUCTS]
            conn.execute("DELETE FROM inventory.inventory_items WHERE NOT (product_id = ANY(%s::uuid[]))", (seed_ids,))
            conn.execute("DELETE FROM inventory.products WHERE NOT (id = ANY(%s::uuid[]))", (seed_ids,))
            if conn.execute("SELECT to_regclass('infra.stock_baseline') AS t").fetchone()["t"] is not None:
                conn.execute("DELETE FROM infra.stock_baseline WHERE NOT (product_id = ANY(%s::uuid[]))", (seed_ids,))
        migrate.seed(self.settings.database_url, reset=True)
        self._drop_idle_slot()
        lab_faults.disarm_all(self.settings)
        self.flush_redis()
        broker.setup(self.settings.amqp_url, topology.bindings())
        self._purge_queues()
        self.reconcile_runs.clear()
        self.sweep_runs.clear()
        if self._system is not None:  # its reconciler remembers a window of the old run
            self._system.close()
            self._system = None

    def _drop_idle_slot(self) -> None:
        """Drop this database's CDC slot when no relay streams it. The slot still holds every outbox insert
        since a cdc relay last read it (a polling run, a previous run): a cdc relay started after the wipe
        would replay them all, events of orders that no longer exist, which the order consumer retries and
        dead-letters one by one while the new run's events queue behind them (the matrix's cdc runs stalled
        for minutes). The relay creates the slot again at start, at the present, and sweeps the outbox."""
        import psycopg

        from pulse.infra import db

        # ObjectInUse: a relay started streaming it meanwhile; it reads on from there.
        with (
            db.connect(self.settings.database_url, autocommit=True) as conn,
            contextlib.suppress(psycopg.errors.ObjectInUse),
        ):
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND database = current_database() AND NOT active",
                (self.settings.cdc_slot,),
            )

    def _purge_queues(self) -> None:
        from pulse.infra import broker

        conn = broker.connect(self.settings.amqp_url)
        try:
            channel = conn.channel()
            for queue in topology.QUEUES:
                channel.queue_purge(queue)
                channel.queue_purge(broker.dead_letter_queue(queue))
        finally:
            conn.close()

    def execute(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        """Run one SQL statement on the lab's database and commit it (e.g. the warehouse writing off stock)."""
        from pulse.infra import db

        with db.connect(self.settings.database_url, autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def redis(self):
        """A Redis client (strings decoded) on the lab's Redis database."""
        import redis

        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def flush_redis(self) -> int:
        """Delete every key the system keeps in Redis, as a Redis restart without persistence would;
        returns how many keys went. Reconciliation rebuilds them from PostgreSQL."""
        r, deleted = self.redis(), 0
        try:
            for pattern in SYSTEM_KEY_PATTERNS:
                found = list(r.scan_iter(match=pattern, count=1000))
                for start in range(0, len(found), 500):
                    deleted += r.delete(*found[start : start + 500])
        finally:
            r.close()
        return deleted

    @property
    def system(self):
        """An in-kernel system without workers (pool, Redis, reconciler) for one-off passes and checks."""
        if self._system is None:
            from pulse import bootstrap

            self._system = bootstrap.build(self.settings, migrate=False, pool_size=3)
        return self._system

    @property
    def q(self):
        """The chart queries (:class:`pulse.lab.queries.Queries`) on this lab's database and Redis."""
        if self._queries is None:
            from pulse.lab.queries import Queries

            self._queries = Queries(self.settings.database_url, self.settings.redis_url)
        return self._queries

    # ----- actions ----------------------------------------------------------------------------------

    def reconcile_now(self, cooldown_s: float | None = None, *, full: bool = False) -> dict:
        """One reconciliation pass (PostgreSQL → Redis) from the kernel; returns and remembers its fix counts.

        The reconciler keeps its window between calls, so a second call only looks at rows changed
        since the first one, minus the cooldown (rows younger than ``cooldown_s`` are in flight).
        """
        result = {"at": time.time(), **self.system.reconciler.run_once(cooldown_s, full=full)}
        self.reconcile_runs.append(result)
        return result

    def sweep_now(self) -> dict:
        """One pass of the expired-cart sweeper; returns its counts."""
        from pulse.cart.sweeper import sweep_once

        result = {"at": time.time(), **sweep_once(self.system.deps)}
        self.sweep_runs.append(result)
        return result

    def new_product(self, stock: int, price: float = 10.0, name: str | None = None) -> str:
        """Create a product through the API; returns its id."""
        self._require_running()
        return self.client.create_product(name or f"Lab product {time.strftime('%H%M%S')}", price, stock)["id"]

    def checkout(
        self,
        items: dict[str, int],
        *,
        wait: bool = True,
        idempotency_key: str | None = None,
        user_id: str | None = None,
    ) -> dict:
        """Add ``{productId: quantity}`` to a new user's cart and order it; waits for the saga unless ``wait=False``."""
        self._require_running()
        user = user_id or self.client.new_user()
        for product, quantity in items.items():
            self.client.add_item(user, product, quantity)
        created = self.client.checkout(user, idempotency_key)
        return self.client.wait_settled(created["orderId"]) if wait else created

    def run_orders(
        self, count: int, products: list[str], *, quantity: int = 1, concurrency: int = 4, seed: int = 1
    ) -> dict:
        """Place ``count`` checkouts over ``products`` with ``concurrency`` clients; returns counts by outcome."""
        from pulse.lab.load import run_orders

        self._require_running()
        return run_orders(
            self.url,
            count,
            products,
            quantity=quantity,
            concurrency=concurrency,
            seed=seed,
            wait_up=self.supervisor.wait_up,
        )

    def wait_quiet(self, timeout_s: float = 60.0) -> dict:
        """Wait until every order settled (compensations and view included) and the outbox is empty."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = {"unsettled": self.q.unsettled_count(), "outbox": self.q.relay_lag()["rows"]}
            if state["unsettled"] == 0 and state["outbox"] == 0:
                return state
            if time.monotonic() > deadline:
                stuck = self.q.unsettled_orders().to_dict("records")
                raise TimeoutError(
                    f"the system did not settle within {timeout_s:.0f}s: {state}; unsettled orders: {stuck}"
                )
            time.sleep(0.2)

    # ----- faults (run time, no restart) ------------------------------------------------------------

    def arm(self, name: str, probability: float = 1.0, **options) -> None:
        """Arm a named fault (``cart.after_redis``, ``consumer.lose``, ``payment.decline``, ...) at run time.

        ``options`` go to the registry: ``action``, ``seed``, ``max`` (strikes before it stops), ``queue``,
        ``ms``, ``ttl_s`` (it expires by itself, after 15 minutes by default). The lab's processes (lab mode)
        re-read the registry every half second; this waits that long, so the next cell already meets the fault.
        """
        lab_faults.arm(self.settings, name, probability, **options)
        self._await_faults_seen(lambda armed: name in armed)

    def disarm(self, name: str | None = None) -> None:
        """Disarm one fault, or every fault when no name is given."""
        if name is None:
            lab_faults.disarm_all(self.settings)
        else:
            lab_faults.disarm(self.settings, name)
        self._await_faults_seen(lambda armed: not armed if name is None else name not in armed)

    def _await_faults_seen(self, seen, timeout_s: float = 15.0) -> None:
        """Wait until the server's registry shows the change (its /health lists what it obeys).

        A fixed wait of one refresh period is not enough on a loaded machine: a demonstration's safeguard-on run
        then started while the server still obeyed the switch, and reported the off run's violation.
        """
        time.sleep(lab_faults.REFRESH_WAIT_S)
        if not self.running:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{self.url}/health", timeout=5).json()
                # Every process of the server (the API and the workers run apart by default) must have seen it.
                views = [set(p["faultsArmed"]) for p in health.get("processes") or [health]]
            except (httpx.HTTPError, ValueError, KeyError, TypeError):  # restarting after a crash fault: ask again
                views = None
            if views is not None and all(seen(armed) for armed in views):
                return
            time.sleep(0.2)
        log.warning("the lab's server did not show the fault change within %.0fs", timeout_s)

    def armed(self) -> list:
        """The faults armed right now."""
        return lab_faults.list_armed(self.settings)

    # ----- observation ------------------------------------------------------------------------------

    def start_tap(self) -> None:
        """Record every event crossing the broker (a private queue bound to every routing key)."""
        from pulse.lab.tap import EventTap

        if self.tap is None:
            self.tap = EventTap(self.settings.amqp_url).start()

    def timeline(self, order_id: str):
        """One order's events as a DataFrame: outbox write, broker, and each module's inbox (see queries)."""
        taps = self.tap.events_for(order_id) if self.tap else []
        return self.q.order_timeline(order_id, taps)

    def sampler(self, products: list[str] | None = None, interval_ms: int = 250):
        """A started :class:`pulse.lab.sampler.Sampler` (drift and relay lag over time); stop it when done."""
        from pulse.lab.sampler import Sampler

        return Sampler(self, products, interval_ms=interval_ms).start()

    def dashboard(self, **options):
        """Live charts and controls for this lab (:class:`pulse.lab.dashboard.Dashboard`)."""
        from pulse.lab.dashboard import Dashboard

        dashboard = Dashboard(self, **options)
        self._dashboards.append(dashboard)
        return dashboard

    def check(
        self, initial_stock: dict[str, int] | None = None, *, since=None, products: list[str] | None = None, scope=None
    ) -> list[dict]:
        """Run the invariants; returns one dict per invariant: ``{"name", "ok", "detail", "offenders"}``.

        With ``since`` (a moment, e.g. :meth:`now` before a scenario), ``products`` or a
        :class:`pulse.tools.check.invariants.Scope`, only the project checker's invariants
        (:mod:`pulse.tools.check.invariants`) run, limited to those orders and products, under their own names
        (``no-oversell``, ``cart-promise-kept``, ``delivery``...): the report of one scenario, even in a database
        that holds deliberately broken ones. Without a scope, the lab's whole-database checks run too (see
        :mod:`pulse.lab.checks`).
        """
        from pulse.lab import checks

        if scope is None and since is None and products is None:
            return checks.run(self, initial_stock)
        return checks.scoped(self, scope, since=since, products=products)

    def now(self):
        """The database's clock now (a scenario's start, for ``check(since=...)``)."""
        return self.execute("SELECT clock_timestamp() AS t")[0]["t"]

    def demonstrate(self, pattern: str, switch: str, scenario, **options) -> dict:
        """Run ``scenario`` with the ``switch`` safeguard off, then on, and assert what it teaches
        (see :func:`pulse.lab.teach.demonstrate`)."""
        from pulse.lab import teach

        return teach.demonstrate(self, pattern, switch, scenario, **options)

    # ----- the saga stepper -------------------------------------------------------------------------

    def hold(self):
        """Hold every delivery: the server restarts with its API only (no relay, no consumers, no schedulers),
        and the returned :class:`pulse.lab.stepper.Stepper` relays and delivers events one at a time."""
        from pulse.lab.stepper import Stepper

        self._require_running()
        if not self.held:
            self._serve_args = ("--role", "api")
            self.restart()
        if self._stepper is None:
            self._stepper = Stepper(self)
        return self._stepper

    def step(self, queue: str | None = None, event: str | None = None, *, show: bool = True) -> dict | None:
        """Deliver the next held event (or the next one for ``queue``/``event``) and show what changed;
        holds deliveries first if they are not held yet. Returns the step (None when nothing waits)."""
        return self.hold().step(queue, event, show=show)

    def release(self) -> Lab:
        """Deliver whatever the stepper still holds, then restart the full server (relay and consumers back)."""
        if self._stepper is not None:
            self._stepper.run(show=False)
        self._close_stepper()
        if self.held:
            self._serve_args = ()
            if self.settings.outbox_mode == "cdc":
                self._drop_idle_slot()  # the stepper relayed those rows; a cdc relay must not replay them
            self.restart()
        return self

    def _close_stepper(self) -> None:
        if self._stepper is not None:
            self._stepper.close()
            self._stepper = None
