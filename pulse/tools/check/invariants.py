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
  on every queue whose module acts on its type for the order's strategy (pulse.topology).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import logging
from collections.abc import Collection
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import psycopg

from pulse import topology
from pulse.infra import broker, keys
from pulse.orders.watchdog import next_event
from pulse.redisstock.handlers import HELD_BY_PRODUCT
from pulse.rows import one
from pulse.status import TERMINAL

if TYPE_CHECKING:
    from redis import Redis

    from pulse.config import Settings
    from pulse.infra import db

QUEUE_INBOX = topology.QUEUE_INBOX
MAX_IDS = 20
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    name: str
    passed: bool
    details: str
    offending: list[Any] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "details": self.details,
            "offending": [str(i) for i in self.offending[:MAX_IDS]],
            "offendingCount": len(self.offending),
            **({"data": self.data} if self.data else {}),
        }


@dataclasses.dataclass
class Scope:
    """What to check: orders/events since ``since`` (None: all) and these ``products`` (None: all)."""

    since: dt.datetime | None = None
    products: list[str] | None = None

    def sql(self) -> dict[str, Any]:
        return {
            "since": self.since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            "products": None if self.products is None else [str(p) for p in self.products],
        }


PRODUCT_FILTER = "(%(products)s::uuid[] IS NULL OR {col} = ANY(%(products)s::uuid[]))"


def _result(name: str, offending: Collection[Any], ok_text: str, bad_text: str, **data: Any) -> Result:
    return Result(
        name, not offending, ok_text if not offending else bad_text.format(n=len(offending)), list(offending), data
    )


# -- stock --------------------------------------------------------------------------------------------
def no_oversell(conn: db.Conn, scope: Scope) -> Result:
    """available_quantity >= 0, and carts never hold more units than the database has available."""
    args = scope.sql()
    negative = [
        r["product_id"]
        for r in conn.execute(
            "SELECT product_id FROM inventory.inventory_items WHERE available_quantity < 0 AND "
            + PRODUCT_FILTER.format(col="product_id"),
            args,
        )
    ]
    over = conn.execute(
        "SELECT i.product_id, i.available_quantity, SUM(ci.quantity) AS held FROM inventory.inventory_items i "
        "JOIN inventory.cart_items ci ON ci.product_id = i.product_id AND ci.quantity > 0 WHERE "
        + PRODUCT_FILTER.format(col="i.product_id")
        + " GROUP BY i.product_id, i.available_quantity "
        "HAVING SUM(ci.quantity) > i.available_quantity",
        args,
    ).fetchall()
    offending = negative + [r["product_id"] for r in over]
    return _result(
        "no-oversell",
        offending,
        "no negative stock; carts hold no more than is available",
        "{n} product(s) oversold (negative stock, or carts holding more units than available)",
        overPromised={
            str(r["product_id"]): {"available": r["available_quantity"], "heldInCarts": int(r["held"])}
            for r in over[:MAX_IDS]
        },
    )


def stock_conservation(conn: db.Conn, scope: Scope) -> Result:
    """initial stock = available + units held by RESERVED reservations, per product."""
    rows = conn.execute(
        "WITH held AS (SELECT (item->>'productId')::uuid AS product_id, SUM((item->>'quantity')::int) AS units "
        "FROM inventory.reservations r, jsonb_array_elements(r.items) item WHERE r.status = 'RESERVED' GROUP BY 1) "
        "SELECT i.product_id, b.initial, i.available_quantity, COALESCE(h.units, 0) AS held "
        "FROM inventory.inventory_items i JOIN infra.stock_baseline b ON b.product_id = i.product_id "
        "LEFT JOIN held h ON h.product_id = i.product_id WHERE b.initial <> i.available_quantity + COALESCE(h.units, 0) "
        "AND " + PRODUCT_FILTER.format(col="i.product_id"),
        scope.sql(),
    ).fetchall()
    return _result(
        "stock-conservation",
        [r["product_id"] for r in rows],
        "initial = available + reserved for every product",
        "{n} product(s) where initial stock != available + units held by RESERVED orders",
        mismatches={
            str(r["product_id"]): {
                "initial": r["initial"],
                "available": r["available_quantity"],
                "reserved": int(r["held"]),
            }
            for r in rows[:MAX_IDS]
        },
    )


# -- money --------------------------------------------------------------------------------------------
ORDERS_IN_SCOPE = (
    "SELECT o.* FROM orders.orders o WHERE o.created_at >= %(since)s AND (%(products)s::uuid[] IS NULL "
    "OR EXISTS (SELECT 1 FROM orders.order_items oi WHERE oi.order_id = o.id "
    "AND oi.product_id = ANY(%(products)s::uuid[])))"
)


def one_charge_per_order(conn: db.Conn, scope: Scope) -> Result:
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT p.order_id FROM payment.payments p JOIN o "
        "ON o.id = p.order_id WHERE p.status IN ('SUCCESS', 'REFUNDED') GROUP BY p.order_id "
        "HAVING count(*) > 1",
        scope.sql(),
    ).fetchall()
    return _result(
        "one-charge-per-order",
        [r["order_id"] for r in rows],
        "no order was charged twice",
        "{n} order(s) charged more than once",
    )


def failed_orders_refunded(conn: db.Conn, scope: Scope) -> Result:
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.id FROM o JOIN payment.payments p ON p.order_id = o.id "
        "WHERE o.status = 'FAILED' AND p.status = 'SUCCESS'",
        scope.sql(),
    ).fetchall()
    return _result(
        "failed-orders-refunded",
        [r["id"] for r in rows],
        "every charged FAILED order was refunded",
        "{n} FAILED order(s) charged and not refunded",
    )


def money_balance(conn: db.Conn, scope: Scope) -> Result:
    """Σ charged − Σ refunded = Σ totals of COMPLETED orders."""
    args = scope.sql()
    totals = one(
        conn.execute(
            f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT "
            "COALESCE((SELECT SUM(p.amount) FROM payment.payments p JOIN o ON o.id = p.order_id "
            "          WHERE p.status IN ('SUCCESS', 'REFUNDED')), 0) AS charged, "
            "COALESCE((SELECT SUM(p.amount) FROM payment.payments p JOIN o ON o.id = p.order_id "
            "          WHERE p.status = 'REFUNDED'), 0) AS refunded, "
            "COALESCE((SELECT SUM(total_amount) FROM o WHERE status = 'COMPLETED'), 0) AS completed",
            args,
        )
    )
    offending = [
        r["id"]
        for r in conn.execute(
            f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.id FROM o LEFT JOIN payment.payments p ON p.order_id = o.id "
            "WHERE (o.status = 'COMPLETED') <> (p.status IS NOT DISTINCT FROM 'SUCCESS')",
            args,
        )
    ]
    net = Decimal(totals["charged"]) - Decimal(totals["refunded"])
    balanced = net == Decimal(totals["completed"]) and not offending
    data = {
        "charged": str(totals["charged"]),
        "refunded": str(totals["refunded"]),
        "completedTotal": str(totals["completed"]),
    }
    text = (
        f"charged {totals['charged']} - refunded {totals['refunded']} = completed {totals['completed']}"
        if balanced
        else f"charged {totals['charged']} - refunded {totals['refunded']} = {net}, but COMPLETED "
        f"orders total {totals['completed']}; {len(offending)} order(s) whose payment and status disagree"
    )
    return Result("money-balance", balanced, text, offending, data)


# -- sagas --------------------------------------------------------------------------------------------
def orders_terminal(conn: db.Conn, scope: Scope, older_than_s: float = 0.0) -> Result:
    """Every order COMPLETED or FAILED with compensation done, its view and its user's cart caught up."""
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.*, r.status AS inv_decision, pay.status AS pay_decision, "
        "v.display_status AS view_status, h.moved_at AS hold_moved, h.released_at AS hold_released "
        "FROM o LEFT JOIN inventory.reservations r ON r.order_id = o.id LEFT JOIN infra.order_holds h "
        "ON h.order_id = o.id "
        "LEFT JOIN payment.payments pay ON pay.order_id = o.id LEFT JOIN orders.order_views v ON v.order_id = o.id "
        "WHERE o.updated_at < now() - make_interval(secs => %(older)s)",
        {**scope.sql(), "older": older_than_s},
    ).fetchall()
    stuck = {}
    for row in rows:
        step = next_event(row)
        if row["status"] not in TERMINAL or step is not None:
            stuck[row["id"]] = (
                f"{row['status']}/{row['payment_status']}/{row['inventory_status']} next={step and step.value}"
            )
    return _result(
        "orders-terminal",
        list(stuck),
        f"all {len(rows)} order(s) settled",
        "{n} order(s) not settled (non-terminal, compensation pending, stale view, or a cart hold "
        "not moved or not released)",
        examples={str(k): v for k, v in list(stuck.items())[:MAX_IDS]},
    )


# Faults after which Redis may have forgotten holds (a flush drops reserved:; a crash between the Redis and the
# database write leaves holds reconciliation takes back): a cart add accepted then may later fail out of stock.
# (name, action): a cart.after_redis that only delays forgets nothing.
FORGETTING_FAULTS = (("redis.flush", "trigger"), ("cart.after_redis", "crash"))
FORGETTING_WINDOW_S = 60  # how long before its order a campaign's shopper took the hold, at most


def cart_promise_kept(conn: db.Conn, scope: Scope) -> Result:
    """No order whose cart hold Redis granted failed out of stock, unless a fault made Redis forget holds.

    Every order comes from a cart whose every unit Redis accepted (the Lua reservation), so an order that
    fails OUT_OF_STOCK is a promise broken: "yes" at the cart, "sold out" after paying or waiting.
    """
    # Forgiven: a forgetting fault struck after the hold could have been granted and before inventory decided
    # (the reservation row's creation), not before the order's last update: a refund comes later.
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT o.id, EXISTS (SELECT 1 FROM infra.fault_log f "
        "WHERE (f.name || ':' || f.action) = ANY(%(forgetting)s) "
        "AND f.fired_at BETWEEN o.created_at - make_interval(secs => %(window)s) "
        "AND COALESCE(r.created_at, o.updated_at)) AS forgiven "
        "FROM o LEFT JOIN inventory.reservations r ON r.order_id = o.id WHERE o.failure_reason = 'OUT_OF_STOCK'",
        {**scope.sql(), "forgetting": [f"{n}:{a}" for n, a in FORGETTING_FAULTS], "window": FORGETTING_WINDOW_S},
    ).fetchall()
    broken = [r["id"] for r in rows if not r["forgiven"]]
    forgiven = len(rows) - len(broken)
    return _result(
        "cart-promise-kept",
        broken,
        "no cart add Redis accepted ended out of stock"
        + (f" ({forgiven} after a fault that made Redis forget holds)" if forgiven else ""),
        "{n} order(s) failed out of stock although Redis had granted their cart holds",
        forgiven=forgiven,
    )


EFFECT_TYPES = (
    "ORDER_CREATED",
    "STOCK_RESERVED",
    "STOCK_FAILED",
    "STOCK_RELEASED",
    "PAYMENT_PROCESSED",
    "PAYMENT_FAILED",
    "PAYMENT_REFUNDED",
)


def effects_once(conn: db.Conn, scope: Scope) -> Result:
    """Each module's effect on an order happened at most once (a second effect = a duplicate processed twice)."""
    rows = conn.execute(
        f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT e.aggregate_id, e.event_type, count(*) AS n FROM infra.event_log e "
        "JOIN o ON o.id::text = e.aggregate_id WHERE NOT e.redriven AND e.event_type = ANY(%(types)s) "
        "GROUP BY 1, 2 HAVING count(*) > 1",
        {**scope.sql(), "types": list(EFFECT_TYPES)},
    ).fetchall()
    return _result(
        "effects-once",
        sorted({r["aggregate_id"] for r in rows}),
        "every module acted at most once per order",
        "{n} order(s) with an effect applied more than once",
        examples=[f"{r['aggregate_id']} {r['event_type']} x{r['n']}" for r in rows[:MAX_IDS]],
    )


def outbox_drained(conn: db.Conn, scope: Scope) -> Result:
    n = one(conn.execute("SELECT count(*) AS n FROM shared.outbox"))["n"]
    return Result("outbox-drained", n == 0, "the outbox is empty" if n == 0 else f"{n} event(s) still in the outbox")


def events_routed(conn: db.Conn, scope: Scope) -> Result:
    """No outbox event that RabbitMQ returned as unroutable (no queue bound to its type) waits in the outbox."""
    rows = conn.execute(
        "SELECT id, event_type FROM shared.outbox WHERE unroutable_at IS NOT NULL ORDER BY seq"
    ).fetchall()
    types = collections.Counter(r["event_type"] for r in rows)
    named = ", ".join(f"{t} ({n})" for t, n in sorted(types.items()))
    return Result(
        "events-routed",
        not rows,
        "no event is waiting for a queue to be bound to its type"
        if not rows
        else f"{len(rows)} unroutable event(s) in the outbox, no queue is bound to: {named}",
        [r["id"] for r in rows],
        {"byType": dict(types)} if rows else {},
    )


# -- delivery -----------------------------------------------------------------------------------------
def delivery(conn: db.Conn, scope: Scope, dead_lettered: dict[str, set[str]] | None = None) -> Result:
    """Every published event consumed by each module bound to it: lost = 0, unexpected = 0, duplicates counted."""
    args = scope.sql()
    explained = collections.defaultdict(set)
    for r in conn.execute(
        "SELECT context->>'queue' AS q, context->>'event_id' AS e FROM infra.fault_log "
        "WHERE name = 'consumer.lose' AND fired_at >= %(since)s",
        args,
    ):
        explained[r["q"]].add(r["e"])
    lost, injected, dlq, expected = [], 0, 0, 0
    for strategy in topology.STRATEGIES:
        for queue, types in topology.handled_events(strategy).items():
            # A re-driven event is meant for one queue only (its redrive_for); the others drop it unhandled.
            rows = conn.execute(
                f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT e.event_id::text AS id, "
                f"EXISTS (SELECT 1 FROM {QUEUE_INBOX[queue]} i WHERE i.event_id = e.event_id) AS consumed "
                "FROM infra.event_log e JOIN o ON o.id::text = e.aggregate_id "
                "WHERE o.strategy = %(strategy)s AND e.event_type = ANY(%(types)s) AND e.created_at >= %(since)s "
                "AND (e.redrive_for IS NULL OR e.redrive_for = %(queue)s)",
                {**args, "strategy": strategy, "types": types, "queue": queue},
            ).fetchall()
            expected += len(rows)
            for r in rows:
                if r["consumed"]:
                    continue
                if r["id"] in explained[queue]:
                    injected += 1
                elif r["id"] in (dead_lettered or {}).get(queue, ()):
                    dlq += 1
                else:
                    lost.append(f"{queue}:{r['id']}")
    unexpected, duplicates = [], 0
    for queue, table in QUEUE_INBOX.items():
        unexpected += [
            f"{queue}:{r['event_id']}"
            for r in conn.execute(
                f"SELECT i.event_id FROM {table} i WHERE i.processed_at >= %(since)s AND NOT EXISTS "
                "(SELECT 1 FROM infra.event_log e WHERE e.event_id = i.event_id)",
                args,
            )
        ]
        duplicates += one(
            conn.execute(f"SELECT COALESCE(SUM(duplicates), 0) AS n FROM {table} WHERE processed_at >= %(since)s", args)
        )["n"]
    data = {
        "expected": expected,
        "lost": len(lost),
        "unexpected": len(unexpected),
        "duplicates": int(duplicates),
        "lostByInjection": injected,
        "deadLettered": dlq,
    }
    passed = not lost and not unexpected
    text = (
        f"{expected} deliveries expected, lost 0, unexpected 0, duplicates {duplicates} absorbed by inboxes"
        f" ({injected} lost on purpose by consumer.lose and re-driven)"
        if passed
        else f"lost {len(lost)}, unexpected {len(unexpected)} of {expected} expected deliveries"
    )
    return Result("delivery", passed, text, lost + unexpected, data)


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
    *QUEUE_INBOX.values(),
)


def _fresh_statistics(conn: db.Conn) -> None:
    conn.execute("SET jit = off")  # these are one-off queries; compiling them cost 0.3 s each
    try:
        conn.execute("ANALYZE " + ", ".join(CHECKED_TABLES))
    except psycopg.errors.InsufficientPrivilege:
        log.info("pulse check: not allowed to ANALYZE; the checks may run slowly on stale statistics")


def replication_slot(conn: db.Conn, scope: Scope, slot: str) -> Result:
    """The CDC slot can still stream. A slot lost now fails; one the relay recreated after a loss (within the
    scope) passes, since the outbox rows it missed were published again, but says so and when."""
    row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    recreated = []
    if one(conn.execute("SELECT to_regclass('infra.relay_slot_losses') IS NOT NULL AS ok"))["ok"]:
        recreated = [
            r["recreated_at"].isoformat()
            for r in conn.execute(
                "SELECT recreated_at FROM infra.relay_slot_losses WHERE slot = %s AND recreated_at >= %s "
                "ORDER BY recreated_at",
                (slot, scope.sql()["since"]),
            )
        ]
    data = {"recreatedAfterLoss": recreated} if recreated else {}
    if row is None:
        return Result("replication-slot", True, f"no slot {slot} (polling relay)", [], data)
    if row["wal_status"] == "lost":
        return Result(
            "replication-slot",
            False,
            f"slot {slot} is lost (the server removed WAL it needed, past "
            "max_slot_wal_keep_size); a cdc relay recreates it when it starts",
            [slot],
            data,
        )
    details = f"slot {slot} wal_status = {row['wal_status']}"
    if recreated:
        details += (
            f"; it was lost and recreated by the relay {len(recreated)} time(s), last at {recreated[-1]} "
            "(the outbox rows still there were published again: duplicates possible, no loss)"
        )
    return Result("replication-slot", True, details, [], data)


# -- idempotency lock ---------------------------------------------------------------------------------
LOCK_MARGIN = 0.25  # share of the lock's hold left for the moments between taking the lock and the log entry


def idempotency_lock_exclusive(conn: db.Conn, scope: Scope) -> Result:
    """An idempotency key's lock has one holder at a time (a late owner never frees a newer owner's lock).

    The trace is the lab fault ``orders.create``: each strike is a request inside order creation, logged with
    its key, the lock's TTL and how long the request stays (``ms``). After such a request took the lock, the
    next one on its key may enter only when the lock expired or that request let go, so no sooner than the
    smaller of the two. A later entry means the lock was freed under its holder's feet.
    """
    rows = conn.execute(
        "SELECT context->>'key' AS key, (context->>'ttl')::float AS ttl, (context->>'ms')::float / 1000 AS held, "
        "fired_at FROM infra.fault_log WHERE name = 'orders.create' AND fired_at >= %(since)s "
        "AND context ? 'key' AND context ? 'ttl' ORDER BY 1, fired_at",
        scope.sql(),
    ).fetchall()
    offending, examples = [], []
    for before, after in itertools.pairwise(rows):
        if before["key"] != after["key"] or not before["held"]:
            continue
        hold = min(before["ttl"], before["held"])
        gap = (after["fired_at"] - before["fired_at"]).total_seconds()
        if gap < hold * (1 - LOCK_MARGIN):
            if before["key"] not in offending:
                offending.append(before["key"])
            examples.append(f"{before['key']}: entered {gap:.2f}s after a holder that kept the lock {hold:.1f}s")
    return _result(
        "idempotency-lock-exclusive",
        offending,
        f"every idempotency lock had one holder at a time ({len(rows)} slow creation(s) traced)",
        "{n} idempotency key(s) whose lock let a second request in while its holder still worked",
        examples=examples[:MAX_IDS],
    )


# -- dead letters -------------------------------------------------------------------------------------
def peek_dead_letters(
    amqp_url: str, limit: int = 1000, since_epoch: float | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Read (without removing) the dead-lettered messages of every queue: id and reason."""
    conn = broker.connect(amqp_url)
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        for queue in topology.QUEUES:
            channel = conn.channel()
            messages: list[dict[str, Any]] = []
            try:
                while len(messages) < limit:
                    method, props, _body = channel.basic_get(broker.dead_letter_queue(queue), auto_ack=False)
                    if method is None:
                        break
                    headers = props.headers or {}
                    # The consumer stamps whole epoch milliseconds (AMQP tables have no float type).
                    if since_epoch is not None and float(headers.get("x-pulse-failed-at", 0)) / 1000 < since_epoch:
                        continue
                    messages.append({"id": props.message_id, "reason": str(headers.get("x-pulse-reason", ""))})
            except Exception:  # the DLQ may not exist yet (topology never declared): nothing dead-lettered
                pass
            finally:
                if channel.is_open:
                    channel.close()  # unacked messages go back to the queue untouched
            found[queue] = messages
    finally:
        conn.close()
    return found


def dlq_explained(dead: dict[str, list[dict[str, Any]]]) -> Result:
    unexplained = [f"{q}:{m['id']}" for q, ms in dead.items() for m in ms if "FaultInjected" not in m["reason"]]
    total = sum(len(ms) for ms in dead.values())
    reasons = collections.Counter(m["reason"][:120] for ms in dead.values() for m in ms)
    return _result(
        "dlq-explained",
        unexplained,
        f"{total} dead-lettered message(s), all caused by injected faults" if total else "dead-letter queues empty",
        "{n} dead-lettered message(s) not caused by an injected fault",
        reasons=dict(reasons.most_common(5)),
    )


# -- Redis --------------------------------------------------------------------------------------------
def redis_matches_db(conn: db.Conn, redis: Redis, scope: Scope) -> Result:
    """``stock:``, ``reserved:`` and ``cart:`` equal the database (run after a reconcile with cooldown 0).

    ``reserved:`` is held by carts and by orders whose hold inventory has not released yet (infra.order_holds).
    """
    args = scope.sql()
    stock = conn.execute(
        "SELECT product_id::text AS p, available_quantity AS q FROM inventory.inventory_items WHERE "
        + PRODUCT_FILTER.format(col="product_id"),
        args,
    ).fetchall()
    held = {str(r["product_id"]): int(r["held"]) for r in conn.execute(HELD_BY_PRODUCT, args)}
    ids = [r["p"] for r in stock]
    offending = []
    if ids:
        cached = redis.mget([keys.stock(p) for p in ids])
        offending += [
            keys.stock(r["p"]) for r, v in zip(stock, cached, strict=True) if v is not None and int(v) != r["q"]
        ]
        reserved = redis.mget([keys.reserved(p) for p in ids])
        offending += [keys.reserved(p) for p, v in zip(ids, reserved, strict=True) if int(v or 0) != held.get(p, 0)]
    carts: collections.defaultdict[str, dict[str, int]] = collections.defaultdict(dict)
    for r in conn.execute(
        "SELECT c.user_id::text AS u, ci.product_id::text AS p, ci.quantity AS q FROM inventory.carts c "
        "JOIN inventory.cart_items ci ON ci.cart_id = c.id WHERE ci.quantity > 0 AND "
        + PRODUCT_FILTER.format(col="ci.product_id"),
        args,
    ):
        carts[r["u"]][r["p"]] = r["q"]
    users = set(carts)
    for key in redis.scan_iter(match="cart:*", count=1000):
        if key != keys.CLEANUP_QUEUE and key.count(":") == 1:
            users.add(key.split(":", 1)[1])
    wanted = set(ids) if scope.products is not None else None
    for user in users:
        have = {p: int(q) for p, q in redis.hgetall(keys.cart(user)).items() if int(q) > 0}
        if wanted is not None:
            have = {p: q for p, q in have.items() if p in wanted}
        if have != carts.get(user, {}):
            offending.append(keys.cart(user))
    return _result(
        "redis-matches-db",
        offending,
        f"stock:, reserved: and cart: equal the database ({len(ids)} products, {len(users)} carts)",
        "{n} Redis key(s) differ from the database",
    )


# Faults after which reserved: may differ from the database until reconciliation repairs it: a flush forgets
# holds, and a crash (any: it kills the whole process) may come between a cart add's Redis and database writes.
DRIFTING_FAULTS = ("redis.flush",)


def reserved_before_repair(conn: db.Conn, redis: Redis, scope: Scope) -> Result:
    """``reserved:`` equals the units carts and unreleased order holds keep in the database, judged BEFORE the
    checker's own reconciliation repairs Redis; drift that a fault explains is forgiven.

    Why judge before repairing, rather than count what the pre-check reconciliation fixed: a fix count is per
    kind of key, not per product, so it cannot be set against the faults that explain it, and after the repair
    the evidence is gone (``redis-matches-db`` then judges the repaired state). Reconciliation is the safety
    net that hides a hold nobody gave back (a cart dropped by a native Redis EXPIRE, the lab's
    ``cart-native-ttl``); this judges the system without it. A product's drift is explained when
    ``redis.flush`` or any crash struck after the product was created. Run it at quiescence: a cart add in
    flight has its Redis write done before its database write. A server reconciling often (a chaos campaign's
    does every second, with a cooldown) repairs drift some seconds after it appears, so drift is seen only
    when it is that recent.
    """
    args = scope.sql()
    rows = conn.execute(
        "SELECT i.product_id::text AS p, EXISTS (SELECT 1 FROM infra.fault_log f WHERE (f.name = ANY(%(drifting)s) "
        "OR f.action = 'crash') AND f.fired_at >= COALESCE(b.recorded_at, '-infinity')) AS explained "
        "FROM inventory.inventory_items i LEFT JOIN infra.stock_baseline b ON b.product_id = i.product_id WHERE "
        + PRODUCT_FILTER.format(col="i.product_id"),
        {**args, "drifting": list(DRIFTING_FAULTS)},
    ).fetchall()
    held = {str(r["product_id"]): int(r["held"]) for r in conn.execute(HELD_BY_PRODUCT, args)}
    ids = [r["p"] for r in rows]
    current = redis.mget([keys.reserved(p) for p in ids]) if ids else []
    drift = {
        r["p"]: (int(v or 0), held.get(r["p"], 0), r["explained"])
        for r, v in zip(rows, current, strict=True)
        if int(v or 0) != held.get(r["p"], 0)
    }
    offending = [p for p, (_, _, explained) in drift.items() if not explained]
    forgiven = len(drift) - len(offending)
    return _result(
        "reserved-before-repair",
        offending,
        f"reserved: equals the database's holds for all {len(ids)} product(s) before any repair"
        + (f" ({forgiven} drifted after a flush or crash)" if forgiven else ""),
        "{n} product(s) whose reserved: differed from the units held in the database before the "
        "checker's reconciliation, with no fault to explain it",
        drift={p: {"redis": d[0], "database": d[1]} for p, d in list(drift.items())[:MAX_IDS] if not d[2]},
        forgiven=forgiven,
    )


# -- all of them --------------------------------------------------------------------------------------
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
