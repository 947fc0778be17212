"""payment.queue: charge an order (at most once) and refund it after an out-of-stock."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from pulse.events import OrderCreated, PaymentFailed, PaymentProcessed, PaymentRefunded, StockFailed, StockReserved
from pulse.infra import db, inbox, outbox
from pulse.payment.provider import ChargeResult
from pulse.status import FailureReason, PaymentStatus

if TYPE_CHECKING:
    from pulse.deps import Deps


INBOX = "payment.inbox"
# A consumer batch's note that an order was charged before the batch began (see prepare_charges).
CHARGED_BEFORE = "charged before"


def _key(order_id: object) -> tuple[str, str]:
    return "payment.payments", str(order_id)


def prepare_charges(deps: Deps, events: list[StockReserved | OrderCreated]) -> dict[tuple[str, str], object]:
    """A consumer batch's charges, before its transaction opens: which orders are charged already (one read), and
    the provider's answer for each of the others. Each :func:`on_charge` of the batch then only writes."""
    ids = sorted({str(e.order_id) for e in events})
    with db.autocommit(deps.pool) as conn:
        rows = conn.execute("SELECT order_id FROM payment.payments WHERE order_id = ANY(%s::uuid[])", (ids,))
        charged = {str(r["order_id"]) for r in rows}
    answers: dict[tuple[str, str], object] = {}
    for event in events:
        key = _key(event.order_id)
        if key not in answers:  # an order twice in a batch (a redelivery, a re-drive) is charged once
            answers[key] = CHARGED_BEFORE if key[1] in charged else deps.provider.charge(key[1], event.total_price)
    return answers


def on_charge(deps: Deps, event_id: uuid.UUID, event: StockReserved | OrderCreated) -> None:
    """STOCK_RESERVED (optimistic) or ORDER_CREATED (post-payment): charge the order's total.

    The provider is called before our transaction, with the order id as its idempotency key: if we
    crash before committing, the redelivered event charges again and the provider answers the same,
    so the one payments row (unique per order) records one charge. In a consumer batch that call was
    made for the whole batch before it began (:func:`prepare_charges`).
    """
    order_id = event.order_id
    answer = db.prepared(_key(order_id))
    if answer is None:  # handled alone
        with db.autocommit(deps.pool) as conn:  # one read: no BEGIN/COMMIT round trips around it
            if conn.execute("SELECT 1 FROM payment.payments WHERE order_id = %s", (order_id,)).fetchone():
                answer = CHARGED_BEFORE
        if answer is None:
            answer = deps.provider.charge(order_id, event.total_price)
    with deps.transaction() as conn:
        if answer == CHARGED_BEFORE:
            inbox.claim(conn, INBOX, event_id)  # handled: its redelivery must not charge again
            return
        if not inbox.claim(conn, INBOX, event_id, enabled=not deps.naive("no-inbox")):
            return
        result: ChargeResult = answer
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
