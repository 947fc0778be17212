"""Display status of the CQRS order view (SPEC §3): the first matching rule wins."""

from __future__ import annotations

from pulse.status import DisplayStatus as D
from pulse.status import InventoryStatus as Inv
from pulse.status import PaymentStatus as Pay
from pulse.status import Strategy


def display_status(strategy: str, payment: str, inventory: str) -> D:
    """What a customer is shown for an order in this state."""
    post_payment = strategy == Strategy.POST_PAYMENT
    if payment == Pay.REFUNDED:
        return D.REFUNDED
    if payment == Pay.DECLINED:
        return D.FAILED_PAYMENT
    if post_payment and inventory == Inv.OUT_OF_STOCK:
        return D.REFUND_IN_PROGRESS if payment == Pay.SUCCESS else D.FAILED_OUT_OF_STOCK
    if post_payment and payment == Pay.SUCCESS and inventory == Inv.NOT_STARTED:
        return D.AWAITING_INVENTORY
    if payment == Pay.SUCCESS and inventory == Inv.RESERVED:
        return D.COMPLETED
    if inventory == Inv.OUT_OF_STOCK:
        return D.FAILED_OUT_OF_STOCK
    if payment == Pay.NOT_STARTED and inventory == Inv.RESERVED:
        return D.AWAITING_PAYMENT
    return D.PROCESSING
