"""payment.queue: charge an order (at most once) and refund it after an out-of-stock."""

from __future__ import annotations

from pulse.events import EventType as E
from pulse.infra import db, inbox, outbox


def on_charge(deps, envelope) -> None:
    """STOCK_RESERVED (optimistic) or ORDER_CREATED (post-payment): charge the order's total.

    The provider is called before our transaction, with the order id as its idempotency key: if we
    crash before committing, the redelivered event charges again and the provider answers the same,
    so the one payments row (unique per order) records one charge.
    """
    p = envelope.payload
    order_id = p["orderId"]
    with db.autocommit(deps.pool) as conn:  # one read: no BEGIN/COMMIT round trips around it
        if conn.execute("SELECT 1 FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone():
            _claim_only(deps, envelope)
            return
    result = deps.provider.charge(order_id, p["totalPrice"])
    base = {k: p.get(k) for k in ("orderId", "userId", "items", "totalPrice", "strategy")}
    with deps.transaction() as conn:
        if not inbox.claim(conn, "payment.inbox", envelope.id, enabled=not deps.naive("no-inbox")):
            return
        status = "SUCCESS" if result.approved else "DECLINED"
        row = conn.execute(
            "INSERT INTO payment.payments (order_id, amount, status, provider, provider_payment_id, paid_at) "
            "VALUES (%s, %s, %s, %s, %s, CASE WHEN %s = 'SUCCESS' THEN now() END) "
            "ON CONFLICT (order_id) DO NOTHING RETURNING id",
            (order_id, p["totalPrice"], status, deps.provider.name, result.provider_payment_id, status)).fetchone()
        if row is None:
            return
        if result.approved:
            outbox.append(conn, E.PAYMENT_PROCESSED, "ORDER", order_id, {**base, "paymentId": str(row["id"])})
        else:
            outbox.append(conn, E.PAYMENT_FAILED, "ORDER", order_id, {**base, "reason": "DECLINED"})


def _claim_only(deps, envelope):
    with deps.transaction() as conn:
        inbox.claim(conn, "payment.inbox", envelope.id)


def on_refund(deps, conn, envelope) -> None:
    """STOCK_FAILED (post-payment): refund the successful charge of this order, once."""
    p = envelope.payload
    payment = conn.execute("SELECT id, provider_payment_id FROM payment.payments WHERE order_id = %s "
                           "AND status = 'SUCCESS' FOR UPDATE", (p["orderId"],)).fetchone()
    if payment is None:
        return  # never charged, nothing to give back
    if deps.naive("no-compensation"):
        return  # the lab's naive switch: the out-of-stock order keeps its charge
    deps.provider.refund(p["orderId"], payment["provider_payment_id"])
    conn.execute("UPDATE payment.payments SET status = 'REFUNDED', refunded_at = now() WHERE id = %s",
                 (payment["id"],))
    outbox.append(conn, E.PAYMENT_REFUNDED, "ORDER", p["orderId"],
                  {"orderId": p["orderId"], "userId": p.get("userId"), "totalPrice": p.get("totalPrice"),
                   "strategy": p.get("strategy"), "reason": "OUT_OF_STOCK", "paymentId": str(payment["id"])})
