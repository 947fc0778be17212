"""Order creation from the cart, idempotent per key (SPEC §5), and order reads."""

from __future__ import annotations

import decimal
import logging
import uuid
from typing import TYPE_CHECKING, Any

import psycopg

from pulse.errors import Conflict, KeyTaken, NotFound
from pulse.events import Item, OrderCreated, dumps
from pulse.infra import db, keys, outbox
from pulse.orders.handlers import snapshot
from pulse.status import OrderStatus, Strategy

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)

# orders.total_amount is numeric(12,2): a larger total would fail the INSERT after the lock was taken.
MAX_TOTAL = decimal.Decimal("9999999999.99")


class OrderService:
    """Creates orders and reads them back with their CQRS display status."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def create(self, user_id: uuid.UUID, idempotency_key: str) -> dict[str, Any]:
        """Turn the user's cart into an order; a repeated key returns the first response and creates nothing.

        The Redis lock only keeps concurrent duplicates apart (409); the truth is the idempotency
        record, committed in the same transaction as the order. The lock expires after its TTL, and
        nothing is ever stored "in progress" in the database, so a request that died half way
        cannot block its key forever (the original's TODO).
        """
        stored = self._stored_response(idempotency_key, user_id)
        if stored is not None:
            return stored
        lock_key, token = keys.lock(idempotency_key), uuid.uuid4().hex
        lock = ("SET", lock_key, token, "NX", "EX", self.deps.settings.idempotency_lock_ttl_s)
        if self.deps.scripts.trip(lock)[0] is None:
            raise Conflict("An order with this idempotency key is already being created; retry in a moment.")
        try:
            # The request that held the lock before us may have finished in between: its idempotency record then
            # fails our insert (UniqueViolation), or, if its order already emptied the cart, is found before the
            # 404. Either way _create_locked answers with its response; a second read here cost every checkout.
            # Lab fault: a slow (failing) creation that outlives its lock; the TTL is logged for the checker.
            self.deps.faults.point("orders.create", key=idempotency_key, ttl=self.deps.settings.idempotency_lock_ttl_s)
            return self._create_locked(user_id, idempotency_key)
        finally:
            if self.deps.naive("lock-no-owner"):
                self.deps.redis.delete(lock_key)
            else:
                self.deps.scripts.release_lock([lock_key], [token])

    def _create_locked(self, user_id: uuid.UUID, idempotency_key: str) -> dict[str, Any]:
        try:
            with db.pipelined(self.deps.pool) as conn:
                items = conn.execute(
                    "SELECT ci.product_id, ci.quantity, p.base_price FROM inventory.carts c "
                    "JOIN inventory.cart_items ci ON ci.cart_id = c.id "
                    "JOIN inventory.products p ON p.id = ci.product_id "
                    "WHERE c.user_id = %s AND ci.quantity > 0 ORDER BY ci.product_id",
                    (user_id,),
                ).fetchall()
                if not items:
                    stored = self._stored_response(idempotency_key, user_id, conn)
                    if stored is not None:
                        return stored
                    raise NotFound(f"User {user_id} has no cart to order from; add items first.")
                return self._insert_order(conn, user_id, idempotency_key, items)
        except psycopg.errors.UniqueViolation:
            # A concurrent request with the same key committed first (its lock had expired).
            stored = self._stored_response(idempotency_key, user_id)
            if stored is None:
                raise
            return stored

    def _insert_order(
        self, conn: db.Conn, user_id: uuid.UUID, idempotency_key: str, items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        order_id = uuid.uuid4()
        strategy = Strategy(self.deps.settings.strategy_name)
        total = sum((i["base_price"] * i["quantity"] for i in items), decimal.Decimal("0.00"))
        if total > MAX_TOTAL:
            # Checked before any write, so the transaction rolls back empty and create() releases the lock.
            raise Conflict(
                f"The cart's total of {total} is more than an order can hold ({MAX_TOTAL}); "
                "remove some items and order again."
            )
        order = db.one(
            conn.execute(
                "INSERT INTO orders.orders (id, user_id, status, strategy, total_amount) "
                "VALUES (%s, %s, 'CREATED', %s, %s) RETURNING *",
                (order_id, user_id, strategy, total),
            )
        )
        response = {"orderId": str(order_id), "status": OrderStatus.CREATED, "totalAmount": float(total)}
        created = OrderCreated(
            order_id=str(order_id),
            user_id=str(user_id),
            strategy=strategy,
            total_price=total,
            items=tuple(Item(product_id=str(i["product_id"]), quantity=i["quantity"]) for i in items),
        )
        # These writes need no answer: they travel with the COMMIT (db.pipelined), one round trip instead of four.
        # A failure (the idempotency key's UniqueViolation) raises as the transaction ends, and nothing commits.
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO orders.order_items (order_id, product_id, quantity, unit_price) VALUES (%s, %s, %s, %s)",
                [(order_id, i["product_id"], i["quantity"], i["base_price"]) for i in items],
            )
            cur.execute(
                "INSERT INTO orders.idempotency_records (key, status, response_body, user_id) "
                "VALUES (%s, 'COMPLETED', %s::jsonb, %s)",
                (idempotency_key, dumps(response), user_id),
            )
            outbox.append_events(cur, [created, snapshot(order)])
        return response

    def _stored_response(
        self, idempotency_key: str, user_id: uuid.UUID, conn: db.Conn | None = None
    ) -> dict[str, Any] | None:
        query = "SELECT response_body, user_id FROM orders.idempotency_records WHERE key = %s"
        if conn is not None:
            row = conn.execute(query, (idempotency_key,)).fetchone()
        else:
            with db.autocommit(self.deps.pool) as own:  # one statement: no BEGIN/COMMIT round trips around it
                row = own.execute(query, (idempotency_key,)).fetchone()
        if row is None:
            return None
        if row["user_id"] is not None and str(row["user_id"]) != str(user_id):
            raise KeyTaken("This idempotency key was already used by another user; choose a new key.")
        response: dict[str, Any] = row["response_body"]  # jsonb, decoded by psycopg
        return response

    def get(self, order_id: uuid.UUID) -> dict[str, Any]:
        """The order with its display status from the CQRS view (null until the view has caught up)."""
        with db.autocommit(self.deps.pool) as conn:
            row = conn.execute(
                "SELECT o.*, v.display_status FROM orders.orders o "
                "LEFT JOIN orders.order_views v ON v.order_id = o.id WHERE o.id = %s",
                (order_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"Order {order_id} does not exist.")
        return {
            "orderId": str(row["id"]),
            "status": row["status"],
            "displayStatus": row["display_status"],
            "paymentStatus": row["payment_status"],
            "inventoryStatus": row["inventory_status"],
            "failureReason": row["failure_reason"],
            "strategy": row["strategy"],
            "totalAmount": float(row["total_amount"]),
        }
