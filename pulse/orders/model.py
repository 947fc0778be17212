"""The order state machine: pure rules, no I/O, so they are unit-tested on their own."""

from __future__ import annotations

from pulse.events import EventType as E

TERMINAL = frozenset({"COMPLETED", "FAILED"})


def apply_event(order: dict, event_type: str, *, guarded: bool = True) -> dict:
    """The order's fields after ``event_type``; only changed keys are returned (empty: nothing to do).

    Completion needs both halves of the saga (payment SUCCESS and inventory RESERVED), whatever order
    they arrive in, so the same rules serve both strategies. A terminal status never changes again:
    a late STOCK_RESERVED must not turn a FAILED order back into PROCESSING (``guarded=False`` is the
    lab's naive mode that lets it).
    """
    status, pay, inv = order["status"], order["payment_status"], order["inventory_status"]
    new: dict = {}
    if event_type == E.PAYMENT_PROCESSED:
        new["payment_status"] = pay = "SUCCESS"
        new["status"] = "COMPLETED" if inv == "RESERVED" else "PROCESSING"
    elif event_type == E.STOCK_RESERVED:
        new["inventory_status"] = inv = "RESERVED"
        new["status"] = "COMPLETED" if pay == "SUCCESS" else "PROCESSING"
    elif event_type == E.PAYMENT_FAILED:
        new.update(payment_status="DECLINED", status="FAILED", failure_reason="PAYMENT_FAILED")
    elif event_type == E.STOCK_FAILED:
        new.update(inventory_status="OUT_OF_STOCK", status="FAILED", failure_reason="OUT_OF_STOCK")
    elif event_type == E.STOCK_RELEASED:
        new["inventory_status"] = "RELEASED"
    elif event_type == E.PAYMENT_REFUNDED:
        new["payment_status"] = "REFUNDED"
    else:
        raise ValueError(f"orders do not react to {event_type}")
    if guarded and status in TERMINAL:
        new.pop("status", None)
        new.pop("failure_reason", None)
    return {k: v for k, v in new.items() if order.get(k) != v}
