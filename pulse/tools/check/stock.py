"""The invariants of stock, carts and Redis: no unit sold twice, every unit accounted for, and what Redis
promised at the cart kept (or its drift explained by a fault).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from pulse.infra import keys
from pulse.redisstock.handlers import HELD_BY_PRODUCT
from pulse.tools.check.base import MAX_IDS, ORDERS_IN_SCOPE, PRODUCT_FILTER, Result, Scope, result

if TYPE_CHECKING:
    from redis import Redis

    from pulse.infra import db


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
    return result(
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
    return result(
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
    return result(
        "cart-promise-kept",
        broken,
        "no cart add Redis accepted ended out of stock"
        + (f" ({forgiven} after a fault that made Redis forget holds)" if forgiven else ""),
        "{n} order(s) failed out of stock although Redis had granted their cart holds",
        forgiven=forgiven,
    )


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
    return result(
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
    return result(
        "reserved-before-repair",
        offending,
        f"reserved: equals the database's holds for all {len(ids)} product(s) before any repair"
        + (f" ({forgiven} drifted after a flush or crash)" if forgiven else ""),
        "{n} product(s) whose reserved: differed from the units held in the database before the "
        "checker's reconciliation, with no fault to explain it",
        drift={p: {"redis": d[0], "database": d[1]} for p, d in list(drift.items())[:MAX_IDS] if not d[2]},
        forgiven=forgiven,
    )
