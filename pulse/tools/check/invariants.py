"""The invariants of issue 4, each a function returning a :class:`Result` (name, passed, details, offending ids).

Run them once the system is quiet (faults disarmed, queues drained). They read PostgreSQL, Redis and
the broker's dead-letter queues directly, so they judge the system from outside rather than trusting
its own counters. A :class:`Scope` limits them to one campaign (orders created since a moment, a set
of products), so a database that also holds older, deliberately broken runs can still be checked.

What is checkable, and how:
- Stock conservation needs each product's initial stock: ``infra.stock_baseline`` records it when the
  inventory row is created (a trigger). Conservation is then initial = available + units held by
  RESERVED reservations. Stock changed by hand in the database (``pulse db seed --reset``, the demo's
  damaged unit) is not a movement the system knows of and shows up as a violation for that product.
- Delivery (Jepsen's total queue): ``infra.event_log`` (an AFTER INSERT trigger on the outbox) is the
  set of published events; the inbox tables are the set each module consumed. An event is expected on
  every queue whose module acts on its type for the order's strategy (pulse.topology).

The checks live by what they read: :mod:`~pulse.tools.check.stock` (stock, carts, Redis),
:mod:`~pulse.tools.check.orders` (money, sagas, the idempotency lock), :mod:`~pulse.tools.check.pipeline`
(outbox, deliveries, the CDC slot, dead letters); :mod:`~pulse.tools.check.base` has :class:`Scope` and
:class:`Result`. This module is their table: :func:`check_all` runs them in the order a report lists them,
and every check is importable from here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import psycopg

from pulse import topology
from pulse.tools.check.base import Result, Scope
from pulse.tools.check.orders import (
    effects_once,
    failed_orders_refunded,
    idempotency_lock_exclusive,
    money_balance,
    one_charge_per_order,
    orders_terminal,
)
from pulse.tools.check.pipeline import (
    delivery,
    dlq_explained,
    events_routed,
    outbox_drained,
    peek_dead_letters,
    replication_slot,
)
from pulse.tools.check.stock import (
    cart_promise_kept,
    no_oversell,
    redis_matches_db,
    reserved_before_repair,
    stock_conservation,
)

if TYPE_CHECKING:
    from pulse.config import Settings
    from pulse.infra import db

__all__ = [
    "Result",
    "Scope",
    "cart_promise_kept",
    "check_all",
    "delivery",
    "dlq_explained",
    "effects_once",
    "events_routed",
    "failed_orders_refunded",
    "idempotency_lock_exclusive",
    "money_balance",
    "no_oversell",
    "one_charge_per_order",
    "orders_terminal",
    "outbox_drained",
    "peek_dead_letters",
    "redis_matches_db",
    "replication_slot",
    "reserved_before_repair",
    "stock_conservation",
]

log = logging.getLogger(__name__)


# The tables the checks join. Right after a campaign they have grown faster than autovacuum analyses them,
# and with a few dozen rows in its statistics the planner nested-loops event_log against orders: 35 s per
# delivery query at 8k orders, minutes for the whole check.
CHECKED_TABLES = (
    "orders.orders",
    "orders.order_items",
    "infra.event_log",
    "payment.payments",
    "inventory.reservations",
    "orders.order_views",
    *topology.QUEUE_INBOX.values(),
)


def _fresh_statistics(conn: db.Conn) -> None:
    conn.execute("SET jit = off")  # these are one-off queries; compiling them cost 0.3 s each
    try:
        conn.execute("ANALYZE " + ", ".join(CHECKED_TABLES))
    except psycopg.errors.InsufficientPrivilege:
        log.info("pulse check: not allowed to ANALYZE; the checks may run slowly on stale statistics")


def check_all(
    settings: Settings, scope: Scope | None = None, *, reconcile: bool = True, older_than_s: float = 0.0
) -> dict[str, Any]:
    """Run every invariant; returns ``{"results": [Result...], "reconcile": fixes or None}``.

    With ``reconcile`` a full reconciliation pass with cooldown 0 runs first (the checker's own, with
    every naive switch off), so ``redis-matches-db`` judges the repaired state, and its fixes are reported;
    ``reserved-before-repair`` is judged before that pass.
    """
    import redis as redis_lib

    from pulse import bootstrap
    from pulse.faults import NoFaults
    from pulse.infra import db

    scope = scope or Scope()
    fixes: dict[str, Any] | None = None
    r = redis_lib.Redis.from_url(settings.redis_url, decode_responses=True, socket_connect_timeout=3)
    try:
        with db.connect(settings.database_url, autocommit=True) as conn:
            before = reserved_before_repair(conn, r, scope)  # before the repair below hides what drifted
        if reconcile:
            system = bootstrap.build(settings.replace(naive=frozenset()), faults=NoFaults(), migrate=False, pool_size=2)
            try:
                fixes = system.reconciler.run_once(0.0, full=True)
            finally:
                system.close()
        since_epoch = scope.since.timestamp() if scope.since else None
        dead = peek_dead_letters(settings.amqp_url, since_epoch=since_epoch)
        dead_ids = {q: {m["id"] for m in ms} for q, ms in dead.items()}
        with db.connect(settings.database_url, autocommit=True) as conn:
            _fresh_statistics(conn)
            results = [
                no_oversell(conn, scope),
                stock_conservation(conn, scope),
                one_charge_per_order(conn, scope),
                failed_orders_refunded(conn, scope),
                money_balance(conn, scope),
                orders_terminal(conn, scope, older_than_s),
                cart_promise_kept(conn, scope),
                effects_once(conn, scope),
                outbox_drained(conn, scope),
                dlq_explained(dead),
                delivery(conn, scope, dead_ids),
                events_routed(conn, scope),
                before,
                redis_matches_db(conn, r, scope),
                replication_slot(conn, scope, settings.cdc_slot),
            ]
            results.append(idempotency_lock_exclusive(conn, scope))
    finally:
        r.close()
    return {"results": results, "reconcile": fixes}
