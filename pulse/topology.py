"""The saga topology, declared once: per queue, its inbox, batching, pre-lock, and which handler takes which
event for orders of which strategy.

Everything else is read off this table: the broker's bindings, each consumer's dispatch, the inbox tables,
the batch pre-locks, the checker's queue↔inbox map and its expected deliveries, and the watchdog's targets.
A new saga step is one :class:`Route` here, its handler and its SQL (and a watchdog rule); a new event type
also needs its dataclass in pulse/events.py.

Strategy belongs to the order, not to the process: the dispatcher picks the route by the strategy the event
carries, and the broker delivers an event only to the queues that have a route for it under that strategy
(:func:`bindings`; routing keys stay the bare event types of SPEC §2, so the strategy is matched on a header,
see :class:`pulse.infra.broker.Bindings`). A process started under another ``PULSE_STRATEGY`` therefore
finishes the orders already in flight the way they began, and no queue hears the other strategy's events
(``bench/run`` counts the deliveries dropped unhandled per checkout: re-drives for another queue only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pulse.events import Envelope
from pulse.events import EventType as E
from pulse.infra import broker, db, inbox
from pulse.inventory import handlers as inventory
from pulse.orders import handlers as orders
from pulse.payment import handlers as payment
from pulse.redisstock import handlers as redisstock
from pulse.status import Strategy
from pulse.views import handlers as views

if TYPE_CHECKING:
    from pulse.deps import Deps

OPTIMISTIC, POST_PAYMENT = Strategy.OPTIMISTIC, Strategy.POST_PAYMENT
STRATEGIES = frozenset(Strategy)
OPT, POST = frozenset({OPTIMISTIC}), frozenset({POST_PAYMENT})


@dataclasses.dataclass(frozen=True)
class Route:
    """One event on one queue: ``handler(deps, conn, event)`` runs inside the transaction in which the
    dispatcher claimed the inbox; with ``claims_inbox=False`` it is ``handler(deps, event_id, event)`` and claims
    the inbox itself (payment calls its provider outside any transaction; redis-stock repeats its Redis side
    on duplicates). ``event`` is the typed payload (pulse.events), parsed once by the dispatcher."""

    event: E
    handler: Callable[..., Any]
    strategies: frozenset[str] = STRATEGIES
    claims_inbox: bool = True
    # A ``claims_inbox=False`` handler that always claims the inbox in its consumer's transaction (redis-stock;
    # payment's charge, whose provider call a batch makes beforehand) lets a batch claim for it up front too; one
    # that may skip its claim or take its own transaction must not.
    claims_always: bool = False
    # ``prepare(deps, events) -> {key: value}``: work a consumer batch does for this route's events before its
    # transaction opens (payment's provider calls: never inside an open transaction). Handlers find the values
    # with :func:`pulse.infra.db.prepared`; a message handled alone skips this and does the work itself.
    prepare: Callable[[Deps, list[Any]], dict[tuple[str, str], Any]] | None = None

    @property
    def claimed_up_front(self) -> bool:
        """Whether a consumer batch claims this event's inbox row for the whole batch (Dispatcher.claim_batch)."""
        return self.claims_inbox or self.claims_always


@dataclasses.dataclass(frozen=True)
class Queue:
    """A durable queue, the module behind it and that module's inbox table."""

    name: str
    module: str
    inbox: str
    routes: tuple[Route, ...]
    # Takes, in one order, the row locks the batch's handlers will take (see Consumer.prelock).
    prelock: Callable[..., None] | None = None

    @property
    def events(self) -> frozenset[str]:
        return frozenset(r.event.value for r in self.routes)

    def route(self, event_type: str, strategy: str | None) -> Route | None:
        return self._by_key.get((event_type, strategy))

    @functools.cached_property
    def _by_key(self) -> dict[tuple[str, str | None], Route]:
        """(event type, strategy) → the first route that takes it: every delivery looks its route up twice."""
        table: dict[tuple[str, str | None], Route] = {}
        for r in self.routes:
            for strategy in r.strategies:
                table.setdefault((r.event.value, str(strategy)), r)
        return table


CHARGE: dict[str, Any] = {"claims_inbox": False, "claims_always": True, "prepare": payment.prepare_charges}

TOPOLOGY: tuple[Queue, ...] = (
    Queue(
        "order.queue",
        "orders",
        "orders.inbox",
        prelock=orders.lock_batch,
        routes=tuple(Route(e, orders.on_saga_event) for e in orders.HANDLED),
    ),
    Queue(
        "inventory.queue",
        "inventory",
        "inventory.inbox",
        prelock=inventory.lock_batch,
        routes=(
            Route(E.ORDER_CREATED, inventory.on_reserve, OPT),
            Route(E.PAYMENT_PROCESSED, inventory.on_reserve, POST),
            Route(E.PAYMENT_FAILED, inventory.on_restock, OPT),
        ),
    ),
    Queue(
        "payment.queue",
        "payment",
        "payment.inbox",
        routes=(
            # Claimed in the batch's transaction always, after the batch's provider calls (prepare).
            Route(E.STOCK_RESERVED, payment.on_charge, OPT, **CHARGE),
            Route(E.ORDER_CREATED, payment.on_charge, POST, **CHARGE),
            Route(E.STOCK_FAILED, payment.on_refund, POST),
        ),
    ),
    Queue(
        "order-view.queue",
        "order-view",
        "orders.order_view_inbox",
        routes=(Route(E.ORDER_UPDATED, views.on_order_updated),),
    ),
    Queue(
        "redis-stock.queue",
        "redis-stock",
        "infra.redis_stock_inbox",
        routes=(
            Route(E.ORDER_CREATED, redisstock.on_order_created, claims_inbox=False, claims_always=True),
            Route(E.STOCK_RESERVED, redisstock.on_stock_decided, claims_inbox=False, claims_always=True),
            Route(E.STOCK_FAILED, redisstock.on_stock_decided, claims_inbox=False, claims_always=True),
            # Post-payment only: an optimistic decline comes after the reservation, whose hold is gone already.
            Route(E.PAYMENT_FAILED, redisstock.on_stock_decided, POST, claims_inbox=False, claims_always=True),
            Route(E.STOCK_RELEASED, redisstock.on_stock_released, claims_inbox=False, claims_always=True),
        ),
    ),
)
QUEUES: tuple[str, ...] = tuple(q.name for q in TOPOLOGY)
BY_NAME: dict[str, Queue] = {q.name: q for q in TOPOLOGY}
QUEUE_INBOX: dict[str, str] = {q.name: q.inbox for q in TOPOLOGY}
INBOX_TABLES: dict[str, str] = {q.module: q.inbox for q in TOPOLOGY}
BATCH_PRELOCKS = {q.name: q.prelock for q in TOPOLOGY if q.prelock is not None}


def bindings() -> broker.Bindings:
    """What the broker delivers to each queue: an event type by its routing key where the queue's module acts on
    it for every strategy, by (event type, strategy) where it acts for one strategy only."""
    keys: dict[str, list[str]] = {}
    by_strategy: dict[str, list[tuple[str, str]]] = {}
    for q in TOPOLOGY:
        keys[q.name], by_strategy[q.name] = [], []
        for event_type in sorted(q.events):
            strategies = {s for r in q.routes if r.event.value == event_type for s in r.strategies}
            if strategies == STRATEGIES:
                keys[q.name].append(event_type)
            else:
                by_strategy[q.name] += [(event_type, str(s)) for s in sorted(strategies)]
    return broker.Bindings(keys, by_strategy)


def consumers_of(event_type: str, strategy: str) -> list[str]:
    """The queues whose module acts on this event for an order of this strategy (the expected deliveries)."""
    return [q.name for q in TOPOLOGY if q.route(event_type, strategy) is not None]


def handled_events(strategy: str) -> dict[str, list[str]]:
    """Queue → the event types its module acts on for orders of ``strategy`` (for the lab's tables)."""
    return {q.name: sorted(r.event.value for r in q.routes if strategy in r.strategies) for q in TOPOLOGY}


class UnroutableEvent(LookupError):
    """An event a queue has no route for (wrong type, or no strategy it knows): it goes to the dead-letter queue."""


class Dispatcher:
    """Hands an envelope from one queue to the route its order's strategy selects; claims the inbox where the
    route allows it. An event meant for the other strategy's module, or re-driven for another queue, is
    dropped here unhandled, unparsed, and leaves no inbox row. An event for this module whose payload is not
    its type's raises MalformedEnvelope before anything is claimed: the consumer dead-letters it at once."""

    def __init__(self, queue: Queue, deps: Deps) -> None:
        self.queue, self.deps = queue, deps
        self.skipped = 0

    def wants(self, envelope: Envelope) -> bool:
        """Whether this queue's module acts on the envelope (the lab's lost-event fault loses only those)."""
        return self._route(envelope) is not None

    def claim_batch(self, batch: db.Batch, envelopes: list[Envelope]) -> None:
        """Claim the inbox rows of a consumer batch's envelopes in one statement, in the batch's transaction;
        each handler's :func:`inbox.claim` then reads its answer instead of running its own INSERT."""
        if self.deps.naive("no-inbox"):
            return
        ids = [e.id for e in envelopes if (r := self._route(e)) is not None and r.claimed_up_front]
        claims = inbox.claim_batch(batch.conn, self.queue.inbox, ids)
        batch.claims.update({(self.queue.inbox, event_id): new for event_id, new in claims.items()})

    def prepare_batch(self, envelopes: list[Envelope]) -> dict[tuple[str, str], Any]:
        """Run the prepare steps of a consumer batch's routes, before its transaction opens (see Route.prepare)."""
        steps: dict[Callable[..., dict[tuple[str, str], Any]], list[Any]] = {}
        for envelope in envelopes:
            route = self._route(envelope)
            if route is not None and route.prepare is not None:
                steps.setdefault(route.prepare, []).append(envelope.event)
        prepared: dict[tuple[str, str], Any] = {}
        for prepare, events in steps.items():
            prepared.update(prepare(self.deps, events))
        return prepared

    def _route(self, envelope: Envelope) -> Route | None:
        """The route this queue's module takes the envelope by, if it acts on it at all."""
        target = envelope.redrive_for
        if target is not None and target != self.queue.name:
            return None
        return self.queue.route(envelope.event_type, envelope.strategy)

    def __call__(self, envelope: Envelope) -> None:
        strategy = envelope.strategy
        route = self.queue.route(envelope.event_type, strategy)
        if route is None:
            if envelope.event_type in self.queue.events and strategy in STRATEGIES:
                self.skipped += 1
                return
            raise UnroutableEvent(
                f"{self.queue.name} has no route for {envelope.event_type} of an order with strategy {strategy!r}"
            )
        target = envelope.redrive_for
        if target is not None and target != self.queue.name:
            self.skipped += 1  # a watchdog re-drive meant for one module only
            return
        event = envelope.event
        if not route.claims_inbox:
            route.handler(self.deps, envelope.id, event)
            return
        with self.deps.transaction() as conn:
            if inbox.claim(conn, self.queue.inbox, envelope.id, enabled=not self.deps.naive("no-inbox")):
                route.handler(self.deps, conn, event)
