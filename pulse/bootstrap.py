"""The composition root: the only place that connects to services and wires modules together."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from pulse import config, topology
from pulse import faults as fault_registry
from pulse.cart.service import CartService
from pulse.cart.sweeper import sweep_once
from pulse.deps import Clock, Deps, TransactionFactory
from pulse.events import EventType
from pulse.infra import broker, db, redis_scripts
from pulse.infra.consumer import Consumer
from pulse.infra.threadname import set_os_thread_name
from pulse.infra.workers import ConsumerSupervisor
from pulse.inventory.products import ProductService
from pulse.orders.service import OrderService
from pulse.payment.provider import SimulatedProvider
from pulse.reconcile.service import Reconciler

log = logging.getLogger(__name__)


class Relay(Protocol):
    """An outbox relay of either mode (pulse.infra.relay_polling, pulse.infra.relay_cdc)."""

    def run(self, stop: threading.Event) -> None: ...


@dataclasses.dataclass
class System:
    """Everything one process runs: services for the API, and the background workers."""

    deps: Deps
    carts: CartService
    orders: OrderService
    products: ProductService
    reconciler: Reconciler
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)
    relay: Relay | None = None
    queues: dict[str, topology.Queue] = dataclasses.field(default_factory=lambda: dict(topology.BY_NAME))

    @property
    def settings(self) -> config.Settings:
        return self.deps.settings

    def dispatcher(self, queue: str) -> topology.Dispatcher:
        """What a consumer of ``queue`` hands each envelope to, bound to this system's dependencies."""
        return topology.Dispatcher(self.queues[queue], self.deps)

    def replace_route(
        self, queue: str, event: EventType, handler: Callable[..., Any], *, claims_inbox: bool = True
    ) -> None:
        """Let another handler take ``event`` on ``queue`` in this system (a workshop plugs the learner's in)."""
        spec = self.queues[queue]
        routes = tuple(
            dataclasses.replace(r, handler=handler, claims_inbox=claims_inbox, claims_always=False)
            if r.event == event
            else r
            for r in spec.routes
        )
        self.queues[queue] = dataclasses.replace(spec, routes=routes)

    def unsettled(self) -> int:
        """Messages this process's consumers hold and have not acked yet (prefetched, in hand or retrying)."""
        return sum(getattr(t, "unsettled", 0) for t in self.threads)

    def start_workers(self, *, relay: bool = True, consumers: bool = True, schedulers: bool = True) -> None:
        """Declare the broker topology, then start relay, consumers, sweeper and reconciler threads."""
        s = self.settings
        broker.setup(s.amqp_url, topology.bindings())
        if relay:
            relay_ = self.relay = make_relay(s, self.deps.faults)
            self._spawn("relay", relay_.run, self.stop)
        if consumers:
            for queue in self.queues.values():
                for n in range(s.consumer_threads):
                    c = Consumer(
                        s.amqp_url,
                        queue.name,
                        self.dispatcher(queue.name),
                        stop=self.stop,
                        prefetch=s.consumer_prefetch,
                        retries=s.handler_retries,
                        faults=self.deps.faults,
                        name=f"consumer:{queue.name}:{n}",
                        pool=self.deps.pool,
                        prelock=queue.prelock,
                    )
                    self.supervisor.add(c)  # started now, and restarted with the same arguments if it dies
            self._spawn("consumer-supervisor", self.supervisor.run)
        if schedulers:
            self._spawn("sweeper", every, s.sweep_interval_s, lambda: sweep_once(self.deps), self.stop)
            self._spawn("reconciler", every, s.reconcile_interval_s, self.reconciler.run_once, self.stop)
            from pulse.orders.watchdog import Watchdog  # issue 4: re-drives sagas whose events were lost

            watchdog = Watchdog(self.deps, depth=broker.QueueDepth(s.amqp_url), unsettled=self.unsettled)

            def watch(stop: threading.Event) -> None:
                try:
                    every(watchdog.interval_s, watchdog.run_once, stop)
                finally:
                    watchdog.close()

            self._spawn("saga-watchdog", watch, self.stop)
            self._spawn("fault-ticker", every, 0.5, self.deps.faults.tick, self.stop)

    @functools.cached_property
    def supervisor(self) -> ConsumerSupervisor:
        """Starts this system's consumers and restarts any that dies (pulse.infra.workers)."""
        return ConsumerSupervisor(self.stop, threads=self.threads)

    def consumer_status(self) -> list[dict[str, Any]]:
        """Each consumer thread of this process: queue, thread, alive, restarts, handled, dead-lettered."""
        return self.supervisor.status()

    def _spawn(self, name: str, target: Callable[..., object], *args: object) -> None:
        t = threading.Thread(target=_named(name, target), args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (each finishes the message in hand) and close every connection."""
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
        self.deps.pool.close()
        self.deps.redis.close()
        self.deps.scripts.close()
        self.deps.faults.close()


def _named(name: str, target: Callable[..., object]) -> Callable[..., object]:
    """``target`` run under the OS thread name ``name`` (15 bytes), so /proc tells the relay from the API."""

    def run(*args: object) -> object:
        set_os_thread_name(name)
        return target(*args)

    return run


def every(interval_s: float, job: Callable[[], object], stop: threading.Event) -> None:
    """Run ``job`` now and then every ``interval_s`` until ``stop``; a failing run is logged, not fatal."""
    while not stop.is_set():
        try:
            job()
        except Exception:
            log.exception("scheduled job failed; it runs again in %.0fs", interval_s)
        stop.wait(interval_s)


def make_relay(settings: config.Settings, faults: fault_registry.NoFaults | None) -> Relay:
    """The outbox relay of the configured mode (``cdc`` reads the WAL, ``polling`` reads the table)."""
    publisher = broker.ConfirmingPublisher(settings.amqp_url)
    if settings.outbox_mode == "cdc":
        from pulse.infra.relay_cdc import CdcRelay  # imported lazily: only this mode needs it

        return CdcRelay(settings, publisher, faults=faults)
    from pulse.infra.relay_polling import PollingRelay

    return PollingRelay(
        settings.database_url,
        publisher,
        batch=settings.relay_batch,
        poll_s=settings.relay_poll_s,
        faults=faults,
        naive=settings.naive,
    )


def build(
    settings: config.Settings | None = None,
    *,
    faults: fault_registry.NoFaults | None = None,
    migrate: bool = True,
    say_ignored: bool = True,
    pool_size: int = 20,
    clock: Clock | None = None,
    transaction_factory: TransactionFactory = db.unit,
) -> System:
    """Connect to PostgreSQL, Redis and RabbitMQ as configured and wire the whole system.

    ``clock`` and ``transaction_factory`` are what a test substitutes for the wall clock and for the handlers'
    transactions (:class:`pulse.deps.Deps`); the defaults are the real ones. ``say_ignored``: see
    :func:`pulse.faults.for_process`.
    """
    from pulse.infra import migrate as migrations

    settings = settings or config.from_env()
    if migrate:
        migrations.migrate(settings.database_url)
    # Outside lab mode armed faults and PULSE_NAIVE are ignored (issue 10): a plain server obeys none of them.
    settings, faults = fault_registry.for_process(settings, faults, say_ignored=say_ignored)
    pool = db.make_pool(settings.database_url, max_size=pool_size)
    client = redis_scripts.make_client(settings.redis_url)
    deps = Deps(
        settings=settings,
        pool=pool,
        redis=client,
        scripts=redis_scripts.Scripts(client),
        faults=faults,
        provider=SimulatedProvider(
            decline_rate=settings.payment_decline_rate,
            latency_ms=settings.payment_latency_ms,
            error_rate=settings.payment_error_rate,
            seed=settings.payment_seed,
            faults=faults,
        ),
        clock=clock or time.time,
        transaction_factory=transaction_factory,
    )
    return System(
        deps=deps,
        carts=CartService(deps),
        orders=OrderService(deps),
        products=ProductService(deps),
        reconciler=Reconciler(deps),
    )
