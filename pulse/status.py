"""The status vocabularies of SPEC §3, one enum each.

They are ``StrEnum``s so a member equals, hashes and serialises as its plain string: database columns, JSON
payloads and API bodies keep the SPEC's words, and a row read back as ``str`` compares equal to the member.
Every member's name is its value (a unit test holds that), which is what makes hashing agree with the plain
string, so a ``dict`` or ``set`` of members can be looked up with a string from the database.
"""

from __future__ import annotations

import enum


class Strategy(enum.StrEnum):
    """Which saga an order runs (``orders.orders.strategy``, the ``strategy`` of every saga event)."""

    OPTIMISTIC = "OPTIMISTIC"
    POST_PAYMENT = "POST_PAYMENT"


class OrderStatus(enum.StrEnum):
    """``orders.orders.status``."""

    CREATED = "CREATED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class PaymentStatus(enum.StrEnum):
    """``orders.orders.payment_status``; payment's own decision (``payment.payments.status``) is one of the last three."""

    NOT_STARTED = "NOT_STARTED"
    SUCCESS = "SUCCESS"
    DECLINED = "DECLINED"
    REFUNDED = "REFUNDED"


class InventoryStatus(enum.StrEnum):
    """``orders.orders.inventory_status``: what the order has heard of inventory's decision."""

    NOT_STARTED = "NOT_STARTED"
    RESERVED = "RESERVED"
    RELEASED = "RELEASED"
    OUT_OF_STOCK = "OUT_OF_STOCK"


class ReservationStatus(enum.StrEnum):
    """``inventory.reservations.status``: inventory's own decision, which says FAILED where the order says
    OUT_OF_STOCK."""

    RESERVED = "RESERVED"
    RELEASED = "RELEASED"
    FAILED = "FAILED"


class FailureReason(enum.StrEnum):
    """``orders.orders.failure_reason`` of a FAILED order."""

    PAYMENT_FAILED = "PAYMENT_FAILED"
    OUT_OF_STOCK = "OUT_OF_STOCK"


class DisplayStatus(enum.StrEnum):
    """``orders.order_views.display_status``, the CQRS view's word for the customer."""

    PROCESSING = "PROCESSING"
    AWAITING_PAYMENT = "AWAITING_PAYMENT"
    AWAITING_INVENTORY = "AWAITING_INVENTORY"
    COMPLETED = "COMPLETED"
    FAILED_PAYMENT = "FAILED_PAYMENT"
    FAILED_OUT_OF_STOCK = "FAILED_OUT_OF_STOCK"
    REFUND_IN_PROGRESS = "REFUND_IN_PROGRESS"
    REFUNDED = "REFUNDED"


TERMINAL = frozenset({OrderStatus.COMPLETED, OrderStatus.FAILED})
