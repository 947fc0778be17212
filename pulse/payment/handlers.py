"""payment.queue: charge an order (at most once) and refund it after an out-of-stock."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from pulse.events import OrderCreated, PaymentFailed, PaymentProcessed, PaymentRefunded, StockFailed, StockReserved
from pulse.infra import db, inbox, outbox
from pulse.status import FailureReason, PaymentStatus

if TYPE_CHECKING:
    from pulse.deps import Deps


def on_charge(deps: Deps, event_id: uuid.UUID, event: StockReserved | OrderCreated) -> None:
    """STOCK_RESERVED (optimistic) or ORDER_CREATED (post-payment): charge the order's total.

    The provider is called before our transaction, with the order id as its idempotency key: if we
    crash before committing, the redelivered event charges again and the provider answers the same,
    so the one payments row (unique per order) records one charge.
    """
    order_id = event.order_id
    with db.autocommit(deps.pool) as conn:  # one read: no BEGIN/COMMIT round trips around it
        if conn.execute("SELECT 1 FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone():
            _claim_only(deps, event_id)
            return
    result = deps.provider.charge(order_id, event.total_price)
    with deps.transaction() as conn:
        if not inbox.claim(conn, "payment.inbox", event_id, enabled=not deps.naive("no-inbox")):
            return
        status = PaymentStatus.SUCCESS if result.approved else PaymentStatus.DECLINED
        row = conn.execute(
            "INSERT INTO payment.payments (order_id, amount, status, provider, provider_payment_id, paid_at) "
            "VALUES (%s, %s, %s, %s, %s, CASE WHEN %s = 'SUCCESS' THEN now() END) "
            "ON CONFLICT (order_id) DO NOTHING RETURNING id",
            (order_id, event.total_price, status, deps.provider.name, result.provider_payment_id, status),
        ).fetchone()
        if row is None:
            return
        if result.approved:
            outbox.append_event(conn, event.follow(PaymentProcessed, payment_id=str(row["id"])))
        else:
            outbox.append_event(conn, event.follow(PaymentFailed, reason=PaymentStatus.DECLINED))


def _claim_only(deps: Deps, event_id: uuid.UUID) -> None:
    with deps.transaction() as conn:
        inbox.claim(conn, "payment.inbox", event_id)


def on_refund(deps: Deps, conn: db.Conn, event: StockFailed) -> None:
    """STOCK_FAILED (post-payment): refund the successful charge of this order, once."""
    payment = conn.execute(
        "SELECT id, provider_payment_id FROM payment.payments WHERE order_id = %s AND status = 'SUCCESS' FOR UPDATE",
        (event.order_id,),
    ).fetchone()
    if payment is None:
        return  # never charged, nothing to give back
    if deps.naive("no-compensation"):
        return  # the lab's naive switch: the out-of-stock order keeps its charge
    deps.provider.refund(event.order_id, payment["provider_payment_id"])
    conn.execute("UPDATE payment.payments SET status = 'REFUNDED', refunded_at = now() WHERE id = %s", (payment["id"],))
    outbox.append_event(
        conn,
        PaymentRefunded(
            order_id=event.order_id,
            user_id=event.user_id,
            total_price=event.total_price,
            strategy=event.strategy,
            reason=FailureReason.OUT_OF_STOCK,
            payment_id=str(payment["id"]),
        ),
    )
