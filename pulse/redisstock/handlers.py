"""redis-stock.queue: keep Redis in step with the database, and keep a cart's promise until inventory decides.

A cart add that Redis accepted holds its units in ``reserved:``. At ORDER_CREATED that hold moves from the
cart to the order; it ends only when inventory decides (STOCK_RESERVED lowers ``stock:`` in the same Lua
step, STOCK_FAILED just releases) or the order fails before any reservation. Releasing at ORDER_CREATED, as
the Java original does, lets ``stock − reserved`` count the order's units as free until STOCK_RESERVED
lowers the stock, and a shopper's add accepted in that window later fails out of stock (the lab's naive
``release-on-order-created``).

Each handler commits its database side with its inbox row first, then runs its Redis side on every
delivery, even a duplicate, because a crash may have come between the two; the Lua scripts remember each
step per order (``pulse:hold:{orderId}``), so a redelivery or a watchdog re-drive is applied once. Doing
Redis first would open a window where a cart read finds Redis empty and caches the old database cart again.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from pulse.events import EventType as E
from pulse.events import OrderCreated, PaymentFailed, StockFailed, StockReleased, StockReserved, dumps
from pulse.infra import inbox, keys

if TYPE_CHECKING:
    from pulse.deps import Deps

INBOX = "infra.redis_stock_inbox"
APPLIED_TTL_S = 7 * 24 * 3600

# Hold units per product: live cart quantities plus the items of orders whose hold moved and is not released.
HELD_BY_PRODUCT = """
SELECT product_id, SUM(quantity)::int AS held FROM (
    SELECT ci.product_id, ci.quantity FROM inventory.cart_items ci WHERE ci.quantity > 0
    UNION ALL
    SELECT (i->>'productId')::uuid, (i->>'quantity')::int FROM infra.order_holds h, jsonb_array_elements(h.items) i
    WHERE h.moved_at IS NOT NULL AND h.released_at IS NULL
) held WHERE %(products)s::uuid[] IS NULL OR product_id = ANY(%(products)s::uuid[]) GROUP BY product_id
"""

# The ordered units leave the cart (items added since stay), once per order.
MOVE_FROM_CART = """
WITH hold AS (
    INSERT INTO infra.order_holds AS h (order_id, user_id, items, moved_at, released_at)
    VALUES (%(order)s, %(user)s, %(items)s::jsonb, clock_timestamp(), CASE WHEN %(release)s THEN clock_timestamp() END)
    ON CONFLICT (order_id) DO UPDATE SET moved_at = clock_timestamp(), updated_at = clock_timestamp()
    WHERE h.moved_at IS NULL RETURNING h.order_id
), cart AS (
    UPDATE inventory.carts c SET updated_at = now() FROM hold WHERE c.user_id = %(user)s RETURNING c.id
)
UPDATE inventory.cart_items ci SET quantity = GREATEST(ci.quantity - x.quantity, 0), updated_at = now()
FROM cart, jsonb_to_recordset(%(items)s::jsonb) AS x("productId" uuid, quantity int)
WHERE ci.cart_id = cart.id AND ci.product_id = x."productId" AND ci.quantity > 0
"""

RELEASE = """
INSERT INTO infra.order_holds AS h (order_id, user_id, items, released_at)
VALUES (%(order)s, %(user)s, %(items)s::jsonb, clock_timestamp())
ON CONFLICT (order_id) DO UPDATE SET released_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE h.released_at IS NULL
"""

# The events that decide an order's stock (the hold ends), see topology.
Decision = StockReserved | StockFailed | PaymentFailed

# What each deciding event does to the order's hold and to stock: (step, release the hold, stock direction).
SETTLE = {
    E.STOCK_RESERVED.value: ("decided", True, -1),
    E.STOCK_FAILED.value: ("decided", True, 0),
    E.PAYMENT_FAILED.value: ("decided", True, 0),
    E.STOCK_RELEASED.value: ("restocked", False, 1),
}


def _items(event: OrderCreated | Decision | StockReleased) -> list[dict[str, Any]]:
    """The event's items as the hold rows and the Lua scripts take them (every event here carries items)."""
    return [i.to_payload() for i in event.items]


def _claimed(deps: Deps, event_id: uuid.UUID, statement: str | None, args: dict[str, Any]) -> None:
    with deps.transaction() as conn:
        if inbox.claim(conn, INBOX, event_id, enabled=not deps.naive("no-inbox")) and statement:
            conn.execute(statement, args)


def on_order_created(deps: Deps, event_id: uuid.UUID, event: OrderCreated) -> None:
    """ORDER_CREATED: the ordered units leave the user's cart (DB and Redis); their hold moves to the order."""
    items, user_id, order_id = _items(event), event.user_id, event.order_id
    naive = deps.naive("release-on-order-created")
    _claimed(
        deps,
        event_id,
        MOVE_FROM_CART,
        {"order": order_id, "user": user_id, "items": dumps(items), "release": naive},
    )
    held = [keys.reserved(i["productId"]) for i in items]
    # after_commit: inside a consumer batch the database side commits only with the whole batch.
    deps.after_commit(
        lambda: deps.scripts.move_hold(
            [keys.cart(user_id), keys.CLEANUP_QUEUE, keys.hold(order_id), *held],
            [user_id, APPLIED_TTL_S, "1" if naive else "0", *[i["quantity"] for i in items]],
        )
    )


def on_stock_decided(deps: Deps, event_id: uuid.UUID, event: Decision) -> None:
    """STOCK_RESERVED, STOCK_FAILED, or PAYMENT_FAILED before any reservation: the order's hold ends."""
    _settle(deps, event_id, event, RELEASE)


def on_stock_released(deps: Deps, event_id: uuid.UUID, event: StockReleased) -> None:
    """STOCK_RELEASED (restock after a declined payment): the units are back in ``stock:``."""
    _settle(deps, event_id, event, None)


def _settle(deps: Deps, event_id: uuid.UUID, event: Decision | StockReleased, statement: str | None) -> None:
    items, order_id = _items(event), event.order_id
    step, release, direction = SETTLE[event.TYPE.value]
    _claimed(deps, event_id, statement, {"order": order_id, "user": event.user_id, "items": dumps(items)})
    reserved = [keys.reserved(i["productId"]) for i in items]
    stock = [keys.stock(i["productId"]) for i in items]
    deps.after_commit(
        lambda: deps.scripts.settle_hold(
            [keys.hold(order_id), *reserved, *stock],
            [step, "1" if release else "0", direction, APPLIED_TTL_S, *[i["quantity"] for i in items]],
        )
    )
