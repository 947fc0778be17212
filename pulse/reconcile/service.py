"""Redis ↔ PostgreSQL reconciliation: PostgreSQL is the truth, Redis is repaired where it drifted (SPEC §4)."""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis

from pulse.infra import db, keys, replies
from pulse.infra.db import one
from pulse.redisstock.handlers import APPLIED_TTL_S, HELD_BY_PRODUCT

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)
# A hash: reconciler instance id → epoch of its last run. One field per instance, because several
# reconcilers share a Redis (each `pulse serve`, the lab's kernel, `pulse reconcile --once`): with one
# shared value, each run of one instance made every other one believe Redis had been flushed.
MARKER_KEY = "pulse:reconcile:marker"
MARKER_TTL_S = 7 * 24 * 3600  # fields of instances idle longer (long gone, mostly) are dropped


class Reconciler:
    """Repairs ``stock:``, ``reserved:``, ``cart:`` and the cleanup queue from the rows changed since the last run.

    Each run looks at the window (last upper bound, now − cooldown]. Rows younger than the cooldown
    belong to requests still in flight: their Redis write may already be done while their database
    commit is not, so "fixing" them from the database would undo a correct reservation. Products and
    carts touched inside the cooldown are deferred to a later run instead. The window's upper bound is
    remembered here and in this instance's field of a Redis marker: a Redis that lost its keys also
    lost the marker, and the next run then covers everything, as does the first run after start.
    """

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.upper: dt.datetime | None = None
        self.deferred_products: set[str] = set()
        self.deferred_users: set[str] = set()
        self._marker = uuid.uuid4().hex

    def run_once(self, cooldown_s: float | None = None, *, full: bool = False) -> dict[str, Any]:
        """One pass; returns counts of fixes per kind and the window it covered."""
        started = time.perf_counter()
        naive = self.deps.naive("reconcile-full-scan")
        cooldown = 0.0 if naive else (self.deps.settings.reconcile_cooldown_s if cooldown_s is None else cooldown_s)
        full = full or naive or self.upper is None or not self._marked()
        lower = None if full else self.upper
        # Autocommit: the pass only reads, each read has its own snapshot anyway (READ COMMITTED), and a
        # transaction held open across a 1M-product pass's Redis writes ran into the pool's
        # idle_in_transaction_session_timeout on a loaded machine.
        with db.autocommit(self.deps.pool) as conn:
            upper: dt.datetime = one(conn.execute("SELECT now() - make_interval(secs => %s) AS t", (cooldown,)))["t"]
            fixes = self._reconcile(conn, lower, upper, full)
        self.upper = upper
        self._mark()
        result = {
            **fixes,
            "full": full,
            "windowFrom": lower.isoformat() if lower else None,
            "windowTo": upper.isoformat(),
            "durationMs": round((time.perf_counter() - started) * 1000, 2),
        }
        if any(fixes[k] for k in ("stock", "reserved", "carts", "cleanupQueue")):
            log.warning("reconciliation fixed Redis: %s", result)
        return result

    def _marked(self) -> bool:
        try:
            return bool(self.deps.redis.hexists(MARKER_KEY, self._marker))
        except redis.ResponseError:  # a marker in an older format: unknown, so this run is a full one
            return False

    def _mark(self) -> None:
        r, now = self.deps.redis, int(self.deps.clock())
        if r.type(MARKER_KEY) not in ("hash", "none"):
            r.delete(MARKER_KEY)
        stale = [k for k, v in replies.text_map(r.hgetall(MARKER_KEY)).items() if now - int(v) > MARKER_TTL_S]
        pipe = r.pipeline(transaction=False)
        if stale:
            pipe.hdel(MARKER_KEY, *stale)
        pipe.hset(MARKER_KEY, self._marker, now)
        pipe.expire(MARKER_KEY, MARKER_TTL_S)
        pipe.execute()

    def _reconcile(self, conn: db.Conn, lower: dt.datetime | None, upper: dt.datetime, full: bool) -> dict[str, int]:
        ttl_ms = int(self.deps.settings.cart_ttl_s * 1000)

        def window(alias: str = "") -> str:
            column = f"{alias}updated_at"  # qualified where a join would make it ambiguous
            return f"{column} <= %(upper)s" + ("" if lower is None else f" AND {column} > %(lower)s")

        args = {"upper": upper, "lower": lower}
        stock_rows = conn.execute(
            f"SELECT product_id, available_quantity FROM inventory.inventory_items WHERE {window()}", args
        ).fetchall()
        if full or lower is None:  # lower is None only when full (run_once)
            products = {str(r["product_id"]) for r in stock_rows}
            users = {
                str(r["user_id"])
                for r in conn.execute(
                    "SELECT DISTINCT c.user_id FROM inventory.carts c JOIN inventory.cart_items ci ON ci.cart_id = c.id"
                ).fetchall()
            }
            users |= self._redis_cart_users()
        else:
            changed = conn.execute(
                f"SELECT c.user_id, ci.product_id FROM inventory.cart_items ci JOIN inventory.carts c "
                f"ON c.id = ci.cart_id WHERE {window('ci.')}",
                args,
            ).fetchall()
            products = {str(r["product_id"]) for r in changed} | self._hold_products(conn, window("h."), args)
            users = {str(r["user_id"]) for r in changed}
            lo_ms = int(lower.timestamp() * 1000) + ttl_ms
            users |= set(
                replies.texts(
                    self.deps.redis.zrangebyscore(
                        keys.CLEANUP_QUEUE, f"({lo_ms}", int(upper.timestamp() * 1000) + ttl_ms
                    )
                )
            )
        users |= self.deferred_users
        redis_carts = self._redis_carts(users)
        for items in redis_carts.values():
            products |= set(items)
        products |= self.deferred_products
        busy_products, busy_users = self._in_flight(conn, upper, ttl_ms)
        self.deferred_products = products & busy_products
        self.deferred_users = users & busy_users
        fixes = {
            "stock": self._fix_stock(stock_rows),
            "reserved": self._fix_reserved(conn, products - busy_products, full, busy_products),
            "holdMarkers": self._mark_settled_holds(conn, upper, busy_products),
            **self._fix_carts(conn, users - busy_users, redis_carts, ttl_ms),
            "deferred": len(self.deferred_products) + len(self.deferred_users),
        }
        return fixes

    def _in_flight(self, conn: db.Conn, upper: dt.datetime, ttl_ms: int) -> tuple[set[str], set[str]]:
        """Products and users with activity newer than the window: in the DB, or only in Redis so far."""
        rows = conn.execute(
            "SELECT c.user_id, ci.product_id FROM inventory.cart_items ci JOIN inventory.carts c "
            "ON c.id = ci.cart_id WHERE ci.updated_at > %s",
            (upper,),
        ).fetchall()
        users = {str(r["user_id"]) for r in rows}
        products = {str(r["product_id"]) for r in rows} | self._hold_products(
            conn, "h.updated_at > %(upper)s", {"upper": upper}
        )
        recent = set(
            replies.texts(
                self.deps.redis.zrangebyscore(keys.CLEANUP_QUEUE, f"({int(upper.timestamp() * 1000) + ttl_ms}", "+inf")
            )
        )
        users |= recent
        for items in self._redis_carts(recent).values():
            products |= set(items)
        return products, users

    @staticmethod
    def _hold_products(conn: db.Conn, condition: str, args: dict[str, Any]) -> set[str]:
        """Products of order holds moved or released where ``condition`` holds (on infra.order_holds)."""
        return {
            str(r["p"])
            for r in conn.execute(
                "SELECT DISTINCT (i->>'productId') AS p FROM infra.order_holds h, jsonb_array_elements(h.items) i "
                f"WHERE {condition}",
                args,
            )
        }

    def _fix_stock(self, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        r = self.deps.redis
        current = r.mget([keys.stock(row["product_id"]) for row in rows])
        wrong = {
            keys.stock(row["product_id"]): row["available_quantity"]
            for row, value in zip(rows, current, strict=True)
            if value != str(row["available_quantity"])
        }
        if wrong:
            r.mset(wrong)
        return len(wrong)

    def _fix_reserved(self, conn: db.Conn, products: set[str], full: bool, busy: set[str]) -> int:
        """``reserved:`` = units held by carts + units of orders whose hold inventory has not released yet."""
        if not full and not products:
            return 0
        if full:
            held = {str(r["id"]): 0 for r in conn.execute("SELECT id FROM inventory.products")}
            held.update({p: 0 for p in products})
        else:
            held = {p: 0 for p in products}
        for r in conn.execute(HELD_BY_PRODUCT, {"products": None if full else list(products)}):
            held[str(r["product_id"])] = int(r["held"])
        if full:
            held = {p: n for p, n in held.items() if p not in busy}
        ids = sorted(held)
        current = self.deps.redis.mget([keys.reserved(p) for p in ids])
        wrong = {keys.reserved(p): held[p] for p, value in zip(ids, current, strict=True) if int(value or 0) != held[p]}
        if wrong:
            self.deps.redis.mset(wrong)
        return len(wrong)

    def _mark_settled_holds(self, conn: db.Conn, upper: dt.datetime, busy: set[str]) -> int:
        """Record in each order's ``pulse:hold:`` marker the steps the database says are done (moved, released,
        decided, restocked), for holds settled before ``upper`` on products this pass may have repaired.

        ``reserved:`` and ``stock:`` were just set from the database, which already counts those steps. A Redis
        side still pending (redis-stock's after-commit Lua, redelivered after a crash) must then do nothing, or it
        releases the hold and lowers the stock a second time: a promise Redis then breaks.
        """
        rows = conn.execute(
            "SELECT h.order_id, h.moved_at IS NOT NULL AS moved, h.released_at IS NOT NULL AS released, "
            "r.status AS decision, ARRAY(SELECT i->>'productId' FROM jsonb_array_elements(h.items) i) AS products "
            "FROM infra.order_holds h LEFT JOIN inventory.reservations r ON r.order_id = h.order_id "
            "WHERE h.updated_at <= %s AND h.updated_at > %s - make_interval(secs => %s)",
            (upper, upper, APPLIED_TTL_S),
        ).fetchall()
        pipe, marked = self.deps.redis.pipeline(transaction=False), 0
        for row in rows:
            if busy & set(row["products"]):
                continue
            steps = {
                name: 1
                for name, done in (
                    ("moved", row["moved"]),
                    ("released", row["released"]),
                    ("decided", row["released"] and row["decision"] is not None),
                    ("restocked", row["decision"] == "RELEASED"),
                )
                if done
            }
            if steps:
                pipe.hset(keys.hold(row["order_id"]), mapping=replies.fields(steps))
                pipe.expire(keys.hold(row["order_id"]), APPLIED_TTL_S)
                marked += 1
        if marked:
            pipe.execute()
        return marked

    def _fix_carts(
        self, conn: db.Conn, users: set[str], redis_carts: dict[str, dict[str, int]], ttl_ms: int
    ) -> dict[str, int]:
        if not users:
            return {"carts": 0, "cleanupQueue": 0}
        rows = conn.execute(
            "SELECT c.user_id, c.updated_at, ci.product_id, ci.quantity FROM inventory.carts c "
            "JOIN inventory.cart_items ci ON ci.cart_id = c.id WHERE c.user_id = ANY(%s::uuid[]) AND ci.quantity > 0",
            (list(users),),
        ).fetchall()
        db_carts: dict[str, dict[str, int]] = {}
        touched: dict[str, float] = {}
        for row in rows:
            db_carts.setdefault(str(row["user_id"]), {})[str(row["product_id"])] = row["quantity"]
            touched[str(row["user_id"])] = row["updated_at"].timestamp()
        r = self.deps.redis
        queued = dict(zip(sorted(users), r.zmscore(keys.CLEANUP_QUEUE, sorted(users)), strict=True))
        carts = queue = 0
        pipe = r.pipeline(transaction=False)
        for user in users:
            want, have = db_carts.get(user, {}), redis_carts.get(user, {})
            if want != have:
                carts += 1
                pipe.delete(keys.cart(user))
                if want:
                    pipe.hset(keys.cart(user), mapping=replies.fields(want))
            if want and queued.get(user) is None:
                queue += 1
                pipe.zadd(keys.CLEANUP_QUEUE, {user: int(touched[user] * 1000) + ttl_ms})
            elif not want and queued.get(user) is not None:
                queue += 1
                pipe.zrem(keys.CLEANUP_QUEUE, user)
        pipe.execute()
        return {"carts": carts, "cleanupQueue": queue}

    def _redis_carts(self, users: set[str]) -> dict[str, dict[str, int]]:
        ordered = sorted(users)
        pipe = self.deps.redis.pipeline(transaction=False)
        for user in ordered:
            pipe.hgetall(keys.cart(user))
        return {
            u: {p: int(q) for p, q in h.items() if int(q) > 0}
            for u, h in zip(ordered, pipe.execute(), strict=True)
            if h
        }

    def _redis_cart_users(self) -> set[str]:
        users = {
            k.split(":", 1)[1]
            for k in self.deps.redis.scan_iter(match="cart:*", count=1000)
            if k != keys.CLEANUP_QUEUE and k.count(":") == 1
        }
        users |= set(replies.texts(self.deps.redis.zrange(keys.CLEANUP_QUEUE, 0, -1)))
        return {u for u in users if _is_uuid(u)}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False
