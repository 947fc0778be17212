"""Display status of the CQRS order view (SPEC §3): the first matching rule wins."""

from __future__ import annotations


def display_status(strategy: str, payment: str, inventory: str) -> str:
    """What a customer is shown for an order in this state."""
    post_payment = strategy == "POST_PAYMENT"
    if payment == "REFUNDED":
        return "REFUNDED"
    if payment == "DECLINED":
        return "FAILED_PAYMENT"
    if post_payment and inventory == "OUT_OF_STOCK":
        return "REFUND_IN_PROGRESS" if payment == "SUCCESS" else "FAILED_OUT_OF_STOCK"
    if post_payment and payment == "SUCCESS" and inventory == "NOT_STARTED":
        return "AWAITING_INVENTORY"
    if payment == "SUCCESS" and inventory == "RESERVED":
        return "COMPLETED"
    if inventory == "OUT_OF_STOCK":
        return "FAILED_OUT_OF_STOCK"
    if payment == "NOT_STARTED" and inventory == "RESERVED":
        return "AWAITING_PAYMENT"
    return "PROCESSING"
