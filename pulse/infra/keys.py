"""Redis key layout, identical to the Java original's (SPEC §4)."""

CLEANUP_QUEUE = "cart:cleanup:queue"


def stock(product_id: object) -> str:
    return f"stock:{product_id}"


def reserved(product_id: object) -> str:
    return f"reserved:{product_id}"


def cart(user_id: object) -> str:
    return f"cart:{user_id}"


def lock(idempotency_key: str) -> str:
    return f"lock:{idempotency_key}"


def applied(event_id: object) -> str:
    """Marks a Redis-side effect of one event as done, so a redelivery does not repeat it."""
    return f"pulse:applied:{event_id}"


def hold(order_id: object) -> str:
    """An order's hold on its units, from ORDER_CREATED until inventory decides: which steps were applied."""
    return f"pulse:hold:{order_id}"
