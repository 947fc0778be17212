"""The composition root: the only place that connects to services and wires modules together."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading

from pulse import config
from pulse.cart.service import CartService
from pulse.cart.sweeper import sweep_once
from pulse.deps import Deps
from pulse.events import EventType as E
from pulse import faults as fault_registry
from pulse.infra import broker, db, redis_scripts
from pulse.infra.consumer import Consumer, make_dispatch
from pulse.inventory import handlers as inventory
from pulse.inventory.products import ProductService
from pulse.orders import handlers as orders
from pulse.orders.service import OrderService
from pulse.payment import handlers as payment
from pulse.payment.provider import SimulatedProvider
from pulse.reconcile.service import Reconciler
from pulse.redisstock import handlers as redisstock
from pulse.views import handlers as views

log = logging.getLogger(__name__)


def queue_handlers(strategy: str) -> dict[str, dict[str, object]]:
    """Which function handles which event on which queue; mirrors broker.BINDINGS for the strategy."""
    saga = {E.PAYMENT_PROCESSED: orders.on_saga_event, E.PAYMENT_FAILED: orders.on_saga_event,
            E.STOCK_RESERVED: orders.on_saga_event, E.STOCK_FAILED: orders.on_saga_event,
            E.STOCK_RELEASED: orders.on_saga_event, E.PAYMENT_REFUNDED: orders.on_saga_event}
    per_strategy = {
        "optimistic": {"inventory.queue": {E.ORDER_CREATED: inventory.on_reserve, E.PAYMENT_FAILED: inventory.on_restock},
                       "payment.queue": {E.STOCK_RESERVED: payment.on_charge}},
        "post-payment": {"inventory.queue": {E.PAYMENT_PROCESSED: inventory.on_reserve},
                         "payment.queue": {E.ORDER_CREATED: payment.on_charge, E.STOCK_FAILED: payment.on_refund}},
    }[strategy]
    table = {"order.queue": saga, **per_strategy,
             "order-view.queue": {E.ORDER_UPDATED: views.on_order_updated},
             "redis-stock.queue": {E.ORDER_CREATED: redisstock.on_order_created,
                                   E.STOCK_RESERVED: redisstock.on_stock_changed,
                                   E.STOCK_RELEASED: redisstock.on_stock_changed}}
    bound = broker.BINDINGS[strategy]
    return {q: {str(e.value): h for e, h in hs.items() if e in bound[q]} for q, hs in table.items()}


# Queues whose batches touch shared rows: the consumer takes those rows' locks up front, in one order.
BATCH_PRELOCKS = {"inventory.queue": inventory.lock_batch}


@dataclasses.dataclass
class System:
    """Everything one process runs: services for the API, and the background workers."""

    deps: Deps
    carts: CartService
    orders: OrderService
    products: ProductService
    reconciler: Reconciler
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    threads: list = dataclasses.field(default_factory=list)
    relay: object = None

    @property
    def settings(self) -> config.Settings:
        return self.deps.settings

    def handlers(self) -> dict[str, dict[str, object]]:
        """Queue → event type → handler bound to this system's dependencies."""
        return {q: {e: functools.partial(h, self.deps) for e, h in hs.items()}
                for q, hs in queue_handlers(self.settings.strategy).items()}

    def start_workers(self, *, relay: bool = True, consumers: bool = True, schedulers: bool = True) -> None:
        """Declare the broker topology, then start relay, consumers, sweeper and reconciler threads."""
        s = self.settings
        broker.setup(s.amqp_url, s.strategy)
        if relay:
            self.relay = make_relay(s, self.deps.faults)
            self._spawn("relay", self.relay.run, self.stop)
        if consumers:
            for queue, hs in self.handlers().items():
                for n in range(s.consumer_threads):
                    # Batched (one transaction per batch) except payment: its provider call must stay outside
                    # any open transaction, so it keeps one transaction per message.
                    pool = None if queue == "payment.queue" else self.deps.pool
                    c = Consumer(s.amqp_url, queue, make_dispatch(hs), stop=self.stop, prefetch=s.consumer_prefetch,
                                 retries=s.handler_retries, faults=self.deps.faults, name=f"consumer:{queue}:{n}",
                                 pool=pool, prelock=BATCH_PRELOCKS.get(queue))
                    c.start()
                    self.threads.append(c)
        if schedulers:
            self._spawn("sweeper", every, s.sweep_interval_s, lambda: sweep_once(self.deps), self.stop)
            self._spawn("reconciler", every, s.reconcile_interval_s, self.reconciler.run_once, self.stop)
            from pulse.orders.watchdog import Watchdog  # issue 4: re-drives sagas whose events were lost
            watchdog = Watchdog(self.deps, depth=broker.QueueDepth(s.amqp_url))

            def watch(stop):
                try:
                    every(watchdog.interval_s, watchdog.run_once, stop)
                finally:
                    watchdog.close()

            self._spawn("saga-watchdog", watch, self.stop)
            self._spawn("fault-ticker", every, 0.5, self.deps.faults.tick, self.stop)

    def _spawn(self, name, target, *args):
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (each finishes the message in hand) and close every connection."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        self.deps.pool.close()
        self.deps.redis.close()
        self.deps.faults.close()


def every(interval_s: float, job, stop: threading.Event) -> None:
    """Run ``job`` now and then every ``interval_s`` until ``stop``; a failing run is logged, not fatal."""
    while not stop.is_set():
        try:
            job()
        except Exception:
            log.exception("scheduled job failed; it runs again in %.0fs", interval_s)
        stop.wait(interval_s)


def make_relay(settings: config.Settings, faults):
    """The outbox relay of the configured mode (``cdc`` reads the WAL, ``polling`` reads the table)."""
    publisher = broker.ConfirmingPublisher(settings.amqp_url)
    if settings.outbox_mode == "cdc":
        from pulse.infra.relay_cdc import CdcRelay  # imported lazily: only this mode needs it
        return CdcRelay(settings, publisher, faults=faults)
    from pulse.infra.relay_polling import PollingRelay
    return PollingRelay(settings.database_url, publisher, batch=settings.relay_batch, poll_s=settings.relay_poll_s,
                        faults=faults, naive=settings.naive)


def build(settings: config.Settings | None = None, *, faults=None, migrate: bool = True, pool_size: int = 20) -> System:
    """Connect to PostgreSQL, Redis and RabbitMQ as configured and wire the whole system."""
    from pulse.infra import migrate as migrations

    settings = settings or config.from_env()
    if migrate:
        migrations.migrate(settings.database_url)
    # Outside lab mode armed faults and PULSE_NAIVE are ignored (issue 10): a plain server obeys none of them.
    settings, faults = fault_registry.for_process(settings, faults)
    pool = db.make_pool(settings.database_url, max_size=pool_size)
    client = redis_scripts.make_client(settings.redis_url)
    deps = Deps(settings=settings, pool=pool, redis=client, scripts=redis_scripts.Scripts(client), faults=faults,
                provider=SimulatedProvider(decline_rate=settings.payment_decline_rate,
                                           latency_ms=settings.payment_latency_ms,
                                           error_rate=settings.payment_error_rate, seed=settings.payment_seed,
                                           faults=faults))
    return System(deps=deps, carts=CartService(deps), orders=OrderService(deps), products=ProductService(deps),
                  reconciler=Reconciler(deps))
