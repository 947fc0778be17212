"""The one table of faults and naive switches: what each breaks, which invariant reports it, how chaos arms it.

Everything else is derived from :data:`CATALOGUE`: the registry's points and default actions, the environment
faults, the naive switches (``pulse.faults``), the lab's sliders and checkboxes (``pulse.lab.faults``), the chaos
campaign's plans (``pulse.tools.chaos``) and ``pulse faults catalogue``. A new fault is one entry here plus its hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Entry:
    """One fault point or naive switch.

    ``breaks``: one sentence, what goes wrong when the fault strikes (or the safeguard is off).
    ``caught_by``: the ``pulse check`` invariants that should report it when the system fails to absorb it.
    ``chaos``: how a chaos campaign arms it, ``(probability, params)``, or None when campaigns do not use it.
    """

    name: str
    kind: str  # "point" | "naive"
    action: str
    breaks: str
    caught_by: tuple[str, ...]
    environment: bool = False  # an event of the environment, fired from the registry's tick, not a place in code
    chaos: tuple[float, dict[str, Any]] | None = None
    # Offered by the lab's dashboard. Not the two restarts: each takes seconds (rabbitmqctl boots an Erlang VM)
    # and broker.restart refuses the shared default vhost without a parameter; notebooks arm them by name.
    lab: bool = True

    def to_json(self) -> dict[str, Any]:
        """The entry as ``pulse faults catalogue`` prints it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "action": self.action,
            "breaks": self.breaks,
            "caughtBy": list(self.caught_by),
        }


def _point(
    name: str,
    action: str,
    breaks: str,
    caught_by: Iterable[str],
    *,
    environment: bool = False,
    chaos: tuple[float, dict[str, Any]] | None = None,
    lab: bool = True,
) -> Entry:
    return Entry(name, "point", action, breaks, tuple(caught_by), environment, chaos, lab)


def _naive(name: str, breaks: str, caught_by: Iterable[str]) -> Entry:
    return Entry(name, "naive", "naive", breaks, tuple(caught_by))


# Crashes strike once per arming in a campaign ({"max": 1}): the supervisor restarts the server each time.
CATALOGUE: tuple[Entry, ...] = (
    _point(
        "cart.after_redis",
        "crash",
        "The server dies after Redis reserved a cart's units and before the database recorded them, so "
        "reserved: holds units that no cart row explains until reconciliation repairs it.",
        ["redis-matches-db"],
        chaos=(0.2, {"max": 1}),
    ),
    _point(
        "relay.after_publish",
        "crash",
        "The relay dies after the broker confirmed a batch and before its outbox rows were deleted, so the "
        "restarted relay publishes those events again and every consumer must absorb the duplicates.",
        ["effects-once", "delivery", "outbox-drained"],
        chaos=(0.5, {"max": 1}),
    ),
    _point(
        "consumer.before_ack",
        "crash",
        "A consumer's process dies after its handler committed and before the ack, so the broker redelivers "
        "an event whose effects are already in the database.",
        ["effects-once", "one-charge-per-order", "stock-conservation"],
        chaos=(0.1, {"max": 1}),
    ),
    _point(
        "consumer.lose",
        "drop",
        "A consumer acks an event without handling it, so its saga stalls until the watchdog re-drives it.",
        ["orders-terminal", "delivery"],
        chaos=(0.1, {"max": 4}),
    ),
    _point(
        "redis.flush",
        "trigger",
        "Redis loses every key (stock:, reserved:, cart:), so carts and stock counters are gone until "
        "reconciliation rebuilds them from the database.",
        ["redis-matches-db", "no-oversell"],
        environment=True,
        chaos=(1.0, {"max": 1}),
    ),
    _point(
        "broker.restart",
        "trigger",
        "RabbitMQ closes every connection of the vhost, so publishers and consumers reconnect and every "
        "unconfirmed or unacknowledged message is sent again.",
        ["delivery", "effects-once", "orders-terminal"],
        environment=True,
        chaos=(1.0, {"max": 1}),
        lab=False,
    ),
    _point(
        "db.restart",
        "trigger",
        "PostgreSQL ends every session of the database (the CDC relay's replication connection too), so "
        "transactions in flight roll back and every pool and relay must reconnect.",
        ["delivery", "orders-terminal", "outbox-drained", "replication-slot"],
        environment=True,
        chaos=(1.0, {"max": 1}),
        lab=False,
    ),
    _point(
        "payment.decline",
        "drop",
        "The payment provider declines the card, so the order must fail and the stock reserved for it come back.",
        ["failed-orders-refunded", "money-balance", "stock-conservation"],
        chaos=(0.3, {}),
    ),
    _point(
        "payment.timeout",
        "error",
        "The provider call fails with a transient error, so the charge is retried and must not be made twice.",
        ["one-charge-per-order", "money-balance", "orders-terminal"],
        chaos=(0.3, {}),
    ),
    _point(
        "payment.latency",
        "delay",
        "The provider answers slowly, so payment messages pile up and saga events arrive late.",
        ["orders-terminal"],
        chaos=(0.5, {"ms": 150}),
    ),
    # Not a campaign fault kind: a campaign arms it itself to hold order creation (and its idempotency lock) for
    # a while, which lock-no-owner needs to show.
    _point(
        "orders.create",
        "delay",
        "Order creation is slow, so a second submit of the same key arrives while the first still holds the lock.",
        ["idempotency-lock-exclusive"],
        lab=False,
    ),
    # Not a campaign fault kind either: a campaign slows inventory's decision so orders stay in flight while other
    # shoppers add the same product (what release-on-order-created needs to show).
    _point(
        "inventory.reserve",
        "delay",
        "Inventory decides slowly, so orders wait longer between ORDER_CREATED and STOCK_RESERVED; nothing breaks "
        "as long as the cart's hold lasts until the decision.",
        ["cart-promise-kept"],
        lab=False,
    ),
    # Not a campaign fault kind either: a campaign arms it for a few cart adds so their carts expire within
    # seconds (params s), which the cart-expiry safeguard (the sweeper) and cart-native-ttl need to show.
    _point(
        "cart.short_ttl",
        "trigger",
        "Carts filled while it is armed expire after a few seconds, so the sweeper must give their held units back.",
        ["reserved-before-repair", "redis-matches-db"],
        lab=False,
    ),
    _naive(
        "reserve-get-set",
        "Cart adds read stock and reserved: and write them back in separate steps, so two concurrent adds both "
        "see the last free unit and Redis promises more units than exist.",
        ["no-oversell"],
    ),
    _naive(
        "release-on-order-created",
        "The cart's hold is released when the order is created, so for a moment stock − reserved counts units "
        "the order is about to take as free and a later cart add is accepted, then fails out of stock.",
        ["cart-promise-kept"],
    ),
    _naive(
        "publish-no-confirm",
        "The relay deletes outbox rows before the broker confirmed them, so events the broker never took are "
        "lost and their sagas never finish.",
        ["delivery", "outbox-drained"],
    ),
    _naive(
        "no-inbox",
        "Handlers skip the inbox, so a redelivered event is applied twice (stock reserved or a card charged again).",
        ["effects-once", "stock-conservation", "delivery"],
    ),
    _naive(
        "reconcile-full-scan",
        "Reconciliation rewrites every key from a database snapshot without a cooldown, overwriting "
        "reservations that cart adds made after the snapshot, so Redis no longer matches the carts.",
        ["no-oversell"],
    ),
    _naive(
        "unguarded-state",
        "Orders accept any event in any state, so a late or duplicate saga event moves a finished order back "
        "and its status no longer matches its payment.",
        ["orders-terminal"],
    ),
    _naive(
        "lock-no-owner",
        "The idempotency lock is released without checking its owner, so a slow request frees a newer "
        "request's lock and two submits of one key run order creation at once.",
        ["idempotency-lock-exclusive"],
    ),
    _naive(
        "cart-native-ttl",
        "Carts expire by a native Redis EXPIRE on cart:{userId}, so an expired cart vanishes with its hold "
        "still counted in reserved: and the sweeper finds nothing to release.",
        ["reserved-before-repair"],
    ),
    _naive(
        "no-version-check",
        "Inventory writes the stock it read without a version check, row lock or batch pre-lock, so two "
        "concurrent reservations of one product both subtract from the same old value and one update is lost.",
        ["stock-conservation"],
    ),
    _naive(
        "dlq-drop",
        "A message that failed every retry is acked without a copy in the dead-letter queue, so the poison "
        "event vanishes and nobody can see or replay it.",
        ["delivery"],
    ),
    _naive(
        "no-watchdog",
        "The saga watchdog does nothing, so an order whose event was lost waits for it forever.",
        ["orders-terminal"],
    ),
    _naive(
        "no-compensation",
        "Compensations forget their effect: a declined payment marks the reservation released without "
        "restocking (optimistic) and an out-of-stock order keeps its charge (post-payment).",
        ["stock-conservation", "failed-orders-refunded", "money-balance"],
    ),
)

BY_NAME: dict[str, Entry] = {e.name: e for e in CATALOGUE}


def entries(kind: str | None = None) -> tuple[Entry, ...]:
    """The catalogue's entries, all of them or those of one kind (``point`` or ``naive``)."""
    return tuple(e for e in CATALOGUE if kind is None or e.kind == kind)


def as_json() -> list[dict[str, Any]]:
    """The table as ``pulse faults catalogue`` prints it."""
    return [e.to_json() for e in CATALOGUE]
