"""The order state machine: pure rules, no I/O, so they are unit-tested on their own."""

from __future__ import annotations

from typing import Any

from pulse.events import EventType as E
from pulse.status import TERMINAL
from pulse.status import FailureReason as R
from pulse.status import InventoryStatus as Inv
from pulse.status import OrderStatus as O
from pulse.status import PaymentStatus as Pay

# Where each sub-status may go next (directly or by skipping a step). A decision (SUCCESS, DECLINED, RESERVED,
# OUT_OF_STOCK) is taken once; only a compensation (REFUNDED, RELEASED) may follow it. NOT_STARTED may jump straight
# to a compensation because with several consumer threads order.queue can hand over a compensation before the
# decision it undoes; the decision then arrives late and must not move the sub-status back.
FORWARD: dict[str, dict[str, frozenset[str]]] = {
    "payment_status": {
        Pay.NOT_STARTED: frozenset({Pay.SUCCESS, Pay.DECLINED, Pay.REFUNDED}),
        Pay.SUCCESS: frozenset({Pay.REFUNDED}),
    },
    "inventory_status": {
        Inv.NOT_STARTED: frozenset({Inv.RESERVED, Inv.OUT_OF_STOCK, Inv.RELEASED}),
        Inv.RESERVED: frozenset({Inv.RELEASED}),
    },
}

# The sub-status each event sets.
SETS = {
    E.PAYMENT_PROCESSED: ("payment_status", Pay.SUCCESS),
    E.PAYMENT_FAILED: ("payment_status", Pay.DECLINED),
    E.PAYMENT_REFUNDED: ("payment_status", Pay.REFUNDED),
    E.STOCK_RESERVED: ("inventory_status", Inv.RESERVED),
    E.STOCK_FAILED: ("inventory_status", Inv.OUT_OF_STOCK),
    E.STOCK_RELEASED: ("inventory_status", Inv.RELEASED),
}


def moves_forward(field: str, current: str, new: str) -> bool:
    """Whether ``field`` may go from ``current`` to ``new`` (staying put counts: a redelivery is harmless)."""
    return current == new or new in FORWARD[field].get(current, ())


def apply_event(order: dict[str, Any], event_type: str, *, guarded: bool = True) -> dict[str, Any]:
    """The order's fields after ``event_type``; only changed keys are returned (empty: nothing to do).

    Completion needs both halves of the saga (payment SUCCESS and inventory RESERVED), whatever order
    they arrive in, so the same rules serve both strategies. A terminal status never changes again,
    and sub-statuses move forward only (see FORWARD): an event that would move one back is late or
    contradicts a decision already recorded, so it changes nothing at all. ``guarded=False`` is the
    lab's naive mode that lets a late event revive a FAILED order or undo a compensation.
    """
    status, pay, inv = order["status"], order["payment_status"], order["inventory_status"]
    try:
        field, value = SETS[E(event_type)]
    except (ValueError, KeyError):
        raise ValueError(f"orders do not react to {event_type}") from None
    if guarded and not moves_forward(field, order[field], value):
        return {}
    new: dict[str, Any] = {field: value}
    if event_type == E.PAYMENT_PROCESSED:
        new["status"] = O.COMPLETED if inv == Inv.RESERVED else O.PROCESSING
    elif event_type == E.STOCK_RESERVED:
        new["status"] = O.COMPLETED if pay == Pay.SUCCESS else O.PROCESSING
    elif event_type == E.PAYMENT_FAILED:
        new.update(status=O.FAILED, failure_reason=R.PAYMENT_FAILED)
    elif event_type == E.STOCK_FAILED:
        new.update(status=O.FAILED, failure_reason=R.OUT_OF_STOCK)
    if guarded and status in TERMINAL:
        new.pop("status", None)
        new.pop("failure_reason", None)
    return {k: v for k, v in new.items() if order.get(k) != v}
