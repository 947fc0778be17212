"""The cart: units reserved atomically in Redis (Lua), mirrored in the database (SPEC §4)."""

from __future__ import annotations

import logging
import time
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pulse.errors import Conflict, NotFound, Unavailable
from pulse.infra import db, keys, replies

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)

RESERVED, NOT_ENOUGH, CACHE_MISS = 1, 0, -1
CATALOGUE_TTL_S = 2.0

# One statement, so it runs in autocommit as one round trip instead of BEGIN, two INSERTs and COMMIT.
SAVE_ITEM = (
    "WITH cart AS (INSERT INTO inventory.carts (user_id) VALUES (%(user)s) ON CONFLICT (user_id) "
    "DO UPDATE SET updated_at = now() RETURNING id) "
    "INSERT INTO inventory.cart_items (cart_id, product_id, quantity) SELECT id, %(product)s, %(qty)s FROM cart "
    "ON CONFLICT (cart_id, product_id) DO UPDATE SET "
    "quantity = inventory.cart_items.quantity + EXCLUDED.quantity, updated_at = now()"
)


class Catalogue:
    """Product names and prices by id, cached in-process for a short while.

    Products never change after creation, so a cached row is right until the product is deleted (the
    lab's reset); the short TTL bounds that, and a miss always asks the database, so a new product is
    seen at once. It saves a cart add the two product queries it would otherwise make.
    """

    def __init__(self, pool: db.Pool, ttl_s: float = CATALOGUE_TTL_S) -> None:
        self.pool, self.ttl_s = pool, ttl_s
        self._rows: dict[str, tuple[float, dict[str, Any]]] = {}

    def get_many(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """``{id: {"name", "base_price"}}`` for the ids that exist."""
        now = time.monotonic()
        found: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for pid in ids:
            entry = self._rows.get(pid)
            if entry is not None and entry[0] > now:
                found[pid] = entry[1]
            else:
                missing.append(pid)
        if missing:
            with db.autocommit(self.pool) as conn:
                rows = conn.execute(
                    "SELECT id, name, base_price FROM inventory.products WHERE id = ANY(%s::uuid[])", (missing,)
                ).fetchall()
            for r in rows:
                row = {"name": r["name"], "base_price": r["base_price"]}
                self._rows[str(r["id"])] = (now + self.ttl_s, row)
                found[str(r["id"])] = row
        return found

    def forget(self, product_id: str) -> None:
        """Drop one product (its row turned out to be gone)."""
        self._rows.pop(product_id, None)


class CartService:
    """Adds items (Redis reservation, Redis cart, then the DB cart) and reads carts back."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self.catalogue = Catalogue(deps.pool)

    def add_item(self, user_id: uuid.UUID, product_id: uuid.UUID, quantity: int) -> dict[str, Any]:
        """Reserve ``quantity`` more units of a product for this user's cart; returns the cart.

        Redis is written first because the reservation must be atomic across all users; the hold and the
        cart hash are written by one Lua call, so no crash can leave units held by no cart. If the database
        write then fails, the Redis side is undone. A crash in between (fault ``cart.after_redis``) leaves
        Redis ahead of the database: that is the drift reconciliation repairs.
        """
        self._require_product(product_id)
        ttl_s = self._ttl_s(user_id)
        expires_ms = int((self.deps.clock() + ttl_s) * 1000)
        raw = self._reserve_into_cart(user_id, product_id, quantity, expires_ms)
        if self.deps.naive("cart-native-ttl"):
            # The original's flaw: Redis drops the cart hash by itself at expiry, and with it the only record of
            # which units to give back, so the sweeper's pass finds an empty cart and reserved: stays raised.
            self.deps.redis.pexpireat(keys.cart(user_id), expires_ms)
        try:
            self.deps.faults.point("cart.after_redis")
            self._save_db(user_id, product_id, quantity, ttl_s)
        except Exception as exc:
            self._undo(user_id, product_id, quantity)
            self.catalogue.forget(str(product_id))  # the failure may be the product's deletion
            log.error("cart add for %s failed after the Redis reservation; undone: %s", user_id, exc)
            raise Unavailable("The cart could not be saved; nothing was reserved, please retry.") from exc
        return self._describe(user_id, {pid: int(q) for pid, q in raw.items() if int(q) > 0})

    def _reserve_into_cart(
        self, user_id: uuid.UUID, product_id: uuid.UUID, quantity: int, expires_ms: int
    ) -> dict[str, str]:
        """Hold the units and record them in the cart hash in one Lua step; returns the cart hash after it."""
        r, cart_key = self.deps.redis, keys.cart(user_id)
        if self.deps.naive("reserve-get-set"):
            self._reserve_get_set(product_id, quantity)
            pipe = r.pipeline(transaction=True)
            pipe.hincrby(cart_key, str(product_id), quantity)
            pipe.zadd(keys.CLEANUP_QUEUE, {str(user_id): expires_ms})
            pipe.hgetall(cart_key)
            cart: dict[str, str] = pipe.execute()[-1]
            return cart
        script = self.deps.scripts.reserve_stock
        lua_keys = [keys.stock(product_id), keys.reserved(product_id), cart_key, keys.CLEANUP_QUEUE]
        lua_args: list[int | str] = [quantity, str(product_id), str(user_id), expires_ms]
        result = CACHE_MISS
        raw: dict[str, str] = {}
        for _ in range(2):
            # One round trip: the script, then the cart for the answer (nothing runs between them that matters:
            # a concurrent add to the same cart only makes the answer fresher).
            result, raw = script.run(lua_keys, lua_args, ("HGETALL", cart_key))
            if result != CACHE_MISS:
                break
            # SET NX: of several requests missing together, the first load wins and none overwrites a newer value.
            r.set(keys.stock(product_id), self._db_stock(product_id), nx=True)
        if result != RESERVED:
            raise Conflict(f"Not enough stock of product {product_id} for {quantity} more unit(s).")
        return raw

    def reserve(self, product_id: uuid.UUID, quantity: int) -> None:
        """Hold units in ``reserved:{productId}`` if ``stock - reserved`` allows it, atomically (no cart)."""
        stock_key, reserved_key = keys.stock(product_id), keys.reserved(product_id)
        if self.deps.naive("reserve-get-set"):
            return self._reserve_get_set(product_id, quantity)
        result = self.deps.scripts.reserve_stock([stock_key, reserved_key], [quantity])
        if result == CACHE_MISS:
            self.deps.redis.set(stock_key, self._db_stock(product_id), nx=True)
            result = self.deps.scripts.reserve_stock([stock_key, reserved_key], [quantity])
        if result != RESERVED:
            raise Conflict(f"Not enough stock of product {product_id} for {quantity} more unit(s).")

    def _reserve_get_set(self, product_id: uuid.UUID, quantity: int) -> None:
        """The naive race the Lua script prevents: read, decide, write, with a gap between."""
        r = self.deps.redis
        stock = replies.text(r.get(keys.stock(product_id)))
        if stock is None:
            r.set(keys.stock(product_id), self._db_stock(product_id), nx=True)
            stock = replies.text(r.get(keys.stock(product_id)))
            if stock is None:
                raise Unavailable("Redis lost the stock count while it was being loaded; please retry.")
        reserved = int(r.get(keys.reserved(product_id)) or 0)
        if int(stock) - reserved < quantity:
            raise Conflict(f"Not enough stock of product {product_id} for {quantity} more unit(s).")
        # Stands for the network hop or the bit of work naive code does between its read and its write. Wide
        # enough that the lab's rush shows the oversell on a loaded CI machine too (naive mode only).
        time.sleep(0.1)
        r.set(keys.reserved(product_id), reserved + quantity)

    def _ttl_s(self, user_id: uuid.UUID) -> float:
        """The cart's time to live: the setting, or a few seconds when the lab's ``cart.short_ttl`` strikes."""
        short = self.deps.faults.strike_params("cart.short_ttl", user=str(user_id))
        if short is None:
            return self.deps.settings.cart_ttl_s
        return min(float(short.get("s", 2)), self.deps.settings.cart_ttl_s)

    def _save_db(self, user_id: uuid.UUID, product_id: uuid.UUID, quantity: int, ttl_s: float | None = None) -> None:
        with db.autocommit(self.deps.pool) as conn:
            conn.execute(SAVE_ITEM, {"user": user_id, "product": product_id, "qty": quantity})
            if ttl_s is not None and ttl_s < self.deps.settings.cart_ttl_s:
                # Every reader computes a cart's expiry as updated_at + the TTL setting (the sweeper's database
                # pass, reconciliation, a cache reload), so a shorter TTL is an updated_at set back by the rest.
                conn.execute(
                    "UPDATE inventory.carts SET updated_at = now() - make_interval(secs => %s) WHERE user_id = %s",
                    (self.deps.settings.cart_ttl_s - ttl_s, user_id),
                )

    def _undo(self, user_id: uuid.UUID, product_id: uuid.UUID, quantity: int) -> None:
        r, cart_key = self.deps.redis, keys.cart(user_id)
        try:
            self.deps.scripts.release_reservation([keys.reserved(product_id)], [quantity])
            if r.hincrby(cart_key, str(product_id), -quantity) <= 0:
                r.hdel(cart_key, str(product_id))
            if not r.exists(cart_key):
                r.zrem(keys.CLEANUP_QUEUE, str(user_id))
        except Exception as exc:  # Redis itself failing: reconciliation will restore it from the DB
            log.error("undo of the Redis reservation for %s failed: %s", user_id, exc)

    def get(self, user_id: uuid.UUID) -> dict[str, Any]:
        """The cart with names, prices and totals; read from Redis, else from the DB (and cached again)."""
        raw = replies.text_map(self.deps.redis.hgetall(keys.cart(user_id)))
        quantities = {pid: int(q) for pid, q in raw.items() if int(q) > 0}
        if not quantities:
            quantities = self._load_and_cache(user_id)
        return self._describe(user_id, quantities)

    def _load_and_cache(self, user_id: uuid.UUID) -> dict[str, int]:
        with self.deps.pool.connection() as conn:
            rows = conn.execute(
                "SELECT ci.product_id, ci.quantity, c.updated_at FROM inventory.carts c "
                "JOIN inventory.cart_items ci ON ci.cart_id = c.id WHERE c.user_id = %s AND ci.quantity > 0",
                (user_id,),
            ).fetchall()
        if not rows:
            return {}
        quantities = {str(r["product_id"]): r["quantity"] for r in rows}
        expires_ms = int((rows[0]["updated_at"].timestamp() + self.deps.settings.cart_ttl_s) * 1000)
        if expires_ms <= self.deps.clock() * 1000:
            # Expired: the sweeper released its hold in Redis and clears the database next. Cached again, the
            # sweeper's next pass would release the same units a second time.
            return {}
        pipe = self.deps.redis.pipeline(transaction=True)
        pipe.hset(keys.cart(user_id), mapping=replies.fields(quantities))
        pipe.zadd(keys.CLEANUP_QUEUE, {str(user_id): expires_ms}, nx=True)
        pipe.execute()
        return quantities

    def _describe(self, user_id: uuid.UUID, quantities: dict[str, int]) -> dict[str, Any]:
        products = self._products(list(quantities))
        items: list[dict[str, Any]] = []
        total = Decimal("0.00")
        for pid, qty in sorted(quantities.items()):
            product = products.get(pid)
            if product is None:
                continue
            sub = product["base_price"] * qty
            total += sub
            items.append(
                {
                    "productId": pid,
                    "name": product["name"],
                    "quantity": qty,
                    "unitPrice": float(product["base_price"]),
                    "subTotal": float(sub),
                }
            )
        return {"userId": str(user_id), "items": items, "total": float(total)}

    def _products(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        return self.catalogue.get_many(ids) if ids else {}

    def _require_product(self, product_id: uuid.UUID) -> None:
        if not self.catalogue.get_many([str(product_id)]):
            raise NotFound(f"Product {product_id} does not exist.")

    def _db_stock(self, product_id: uuid.UUID) -> int:
        with db.autocommit(self.deps.pool) as conn:
            row = conn.execute(
                "SELECT available_quantity FROM inventory.inventory_items WHERE product_id = %s", (product_id,)
            ).fetchone()
        return 0 if row is None else row["available_quantity"]
