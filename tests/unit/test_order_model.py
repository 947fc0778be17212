"""The order state machine (pulse/orders/model.py): every transition, the terminal guard, the naive switch."""

import pytest

from pulse.events import EventType as E
from pulse.orders.model import TERMINAL, apply_event


def order(status="CREATED", payment="NOT_STARTED", inventory="NOT_STARTED", reason=None):
    return {
        "id": "o-1",
        "status": status,
        "payment_status": payment,
        "inventory_status": inventory,
        "failure_reason": reason,
    }


def run(events, start=None, guarded=True):
    """Fold events over an order the way the orders handler does (apply the returned changes)."""
    state = dict(start or order())
    for event in events:
        state.update(apply_event(state, event, guarded=guarded))
    return state


@pytest.mark.parametrize(
    "start, event, changes",
    [
        # first half of the saga arrives: the order is in progress
        (order(), E.PAYMENT_PROCESSED, {"payment_status": "SUCCESS", "status": "PROCESSING"}),
        (order(), E.STOCK_RESERVED, {"inventory_status": "RESERVED", "status": "PROCESSING"}),
        # second half arrives, in either order: completed
        (
            order("PROCESSING", inventory="RESERVED"),
            E.PAYMENT_PROCESSED,
            {"payment_status": "SUCCESS", "status": "COMPLETED"},
        ),
        (
            order("PROCESSING", payment="SUCCESS"),
            E.STOCK_RESERVED,
            {"inventory_status": "RESERVED", "status": "COMPLETED"},
        ),
        # failures
        (
            order(),
            E.PAYMENT_FAILED,
            {"payment_status": "DECLINED", "status": "FAILED", "failure_reason": "PAYMENT_FAILED"},
        ),
        (
            order("PROCESSING", inventory="RESERVED"),
            E.PAYMENT_FAILED,
            {"payment_status": "DECLINED", "status": "FAILED", "failure_reason": "PAYMENT_FAILED"},
        ),
        (
            order(),
            E.STOCK_FAILED,
            {"inventory_status": "OUT_OF_STOCK", "status": "FAILED", "failure_reason": "OUT_OF_STOCK"},
        ),
        (
            order("PROCESSING", payment="SUCCESS"),
            E.STOCK_FAILED,
            {"inventory_status": "OUT_OF_STOCK", "status": "FAILED", "failure_reason": "OUT_OF_STOCK"},
        ),
        # compensations only touch their half; the failed status stays
        (
            order("FAILED", payment="DECLINED", inventory="RESERVED", reason="PAYMENT_FAILED"),
            E.STOCK_RELEASED,
            {"inventory_status": "RELEASED"},
        ),
        (
            order("FAILED", payment="SUCCESS", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK"),
            E.PAYMENT_REFUNDED,
            {"payment_status": "REFUNDED"},
        ),
    ],
)
def test_every_transition(start, event, changes):
    assert apply_event(start, event) == changes


def test_event_types_as_plain_strings_work_like_the_enum():
    assert apply_event(order(), "STOCK_RESERVED") == apply_event(order(), E.STOCK_RESERVED)


def test_only_changed_fields_are_returned_so_a_redelivery_is_a_no_op():
    once = run([E.STOCK_RESERVED])
    assert apply_event(once, E.STOCK_RESERVED) == {}
    done = run([E.STOCK_RESERVED, E.PAYMENT_PROCESSED])
    assert apply_event(done, E.PAYMENT_PROCESSED) == {}


def test_the_input_order_is_not_modified():
    start = order()
    copy = dict(start)
    apply_event(start, E.PAYMENT_FAILED)
    assert start == copy


def test_events_the_orders_module_does_not_handle_are_rejected():
    with pytest.raises(ValueError, match="ORDER_CREATED"):
        apply_event(order(), E.ORDER_CREATED)
    with pytest.raises(ValueError):
        apply_event(order(), "SOMETHING_ELSE")


@pytest.mark.parametrize(
    "events, final",
    [
        ([E.STOCK_RESERVED, E.PAYMENT_PROCESSED], ("COMPLETED", "SUCCESS", "RESERVED", None)),  # optimistic happy
        ([E.STOCK_RESERVED, E.PAYMENT_FAILED, E.STOCK_RELEASED], ("FAILED", "DECLINED", "RELEASED", "PAYMENT_FAILED")),
        ([E.STOCK_FAILED], ("FAILED", "NOT_STARTED", "OUT_OF_STOCK", "OUT_OF_STOCK")),  # optimistic out of stock
        ([E.PAYMENT_PROCESSED, E.STOCK_RESERVED], ("COMPLETED", "SUCCESS", "RESERVED", None)),  # post-payment happy
        (
            [E.PAYMENT_PROCESSED, E.STOCK_FAILED, E.PAYMENT_REFUNDED],
            ("FAILED", "REFUNDED", "OUT_OF_STOCK", "OUT_OF_STOCK"),
        ),
        ([E.PAYMENT_FAILED], ("FAILED", "DECLINED", "NOT_STARTED", "PAYMENT_FAILED")),  # post-payment decline
    ],
)
def test_every_saga_path_ends_in_its_outcome(events, final):
    s = run(events)
    assert (s["status"], s["payment_status"], s["inventory_status"], s["failure_reason"]) == final


def test_a_failed_order_is_never_turned_back_into_processing_by_a_late_event():
    failed = run([E.PAYMENT_FAILED])
    for late in (E.STOCK_RESERVED, E.PAYMENT_PROCESSED, E.STOCK_FAILED, E.STOCK_RELEASED, E.PAYMENT_REFUNDED):
        changes = apply_event(failed, late)
        assert "status" not in changes and "failure_reason" not in changes, late
    assert run([E.STOCK_RESERVED, E.PAYMENT_PROCESSED], start=failed)["status"] == "FAILED"


def test_the_first_failure_reason_is_kept():
    out_of_stock = run([E.STOCK_FAILED])
    assert run([E.PAYMENT_FAILED], start=out_of_stock)["failure_reason"] == "OUT_OF_STOCK"


def test_a_completed_order_stays_completed():
    completed = run([E.STOCK_RESERVED, E.PAYMENT_PROCESSED])
    for late in (E.PAYMENT_FAILED, E.STOCK_FAILED, E.STOCK_RESERVED):
        s = run([late], start=completed)
        assert s["status"] == "COMPLETED" and s["failure_reason"] is None, late


def test_terminal_statuses():
    assert {"COMPLETED", "FAILED"} == TERMINAL


def test_unguarded_naive_mode_lets_a_late_event_revive_a_failed_order():
    failed = run([E.PAYMENT_FAILED])
    assert apply_event(failed, E.STOCK_RESERVED, guarded=False)["status"] == "PROCESSING"
    out_of_stock = run([E.STOCK_FAILED])
    assert run([E.PAYMENT_FAILED], start=out_of_stock, guarded=False)["failure_reason"] == "PAYMENT_FAILED"


def test_the_guard_changes_nothing_for_orders_in_progress_moving_forward():
    # the half that has not decided yet may decide either way; the decided half only repeats itself
    for events, forward in (
        ([], (E.PAYMENT_PROCESSED, E.STOCK_RESERVED, E.PAYMENT_FAILED, E.STOCK_FAILED)),
        ([E.STOCK_RESERVED], (E.PAYMENT_PROCESSED, E.PAYMENT_FAILED, E.STOCK_RESERVED)),
        ([E.PAYMENT_PROCESSED], (E.STOCK_RESERVED, E.STOCK_FAILED, E.PAYMENT_PROCESSED)),
    ):
        start = run(events)
        for event in forward:
            assert apply_event(start, event) == apply_event(start, event, guarded=False), (events, event)


# Sub-statuses move forward only: payment NOT_STARTED → SUCCESS | DECLINED, SUCCESS → REFUNDED; inventory
# NOT_STARTED → RESERVED | OUT_OF_STOCK, RESERVED → RELEASED. A step back is a late or contradictory event and
# changes nothing at all (neither the sub-status nor the status it would have implied).
FAILED_AFTER_DECLINE = order("FAILED", payment="DECLINED", inventory="RELEASED", reason="PAYMENT_FAILED")
FAILED_AFTER_OUT_OF_STOCK = order("FAILED", payment="REFUNDED", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK")


@pytest.mark.parametrize(
    "start, event, changes",
    [
        # late decisions after their compensation: the compensation stays
        (FAILED_AFTER_DECLINE, E.STOCK_RESERVED, {}),
        (FAILED_AFTER_OUT_OF_STOCK, E.PAYMENT_PROCESSED, {}),
        # a compensation that overtook its decision on order.queue: the late decision cannot undo it
        (order("PROCESSING", inventory="RELEASED"), E.STOCK_RESERVED, {}),
        (order("PROCESSING", payment="REFUNDED"), E.PAYMENT_PROCESSED, {}),
        # ...and the compensation itself is accepted before its decision (the decision is implied)
        (order(), E.STOCK_RELEASED, {"inventory_status": "RELEASED"}),
        (order(), E.PAYMENT_REFUNDED, {"payment_status": "REFUNDED"}),
        # contradictory decisions: the first one stands
        (order("COMPLETED", payment="SUCCESS", inventory="RESERVED"), E.PAYMENT_FAILED, {}),
        (order("COMPLETED", payment="SUCCESS", inventory="RESERVED"), E.STOCK_FAILED, {}),
        (order("PROCESSING", payment="SUCCESS"), E.PAYMENT_FAILED, {}),
        (order("PROCESSING", inventory="RESERVED"), E.STOCK_FAILED, {}),
        (order("FAILED", payment="DECLINED", reason="PAYMENT_FAILED"), E.PAYMENT_PROCESSED, {}),
        (order("FAILED", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK"), E.STOCK_RESERVED, {}),
        # terminal sub-statuses: nothing follows them
        (FAILED_AFTER_OUT_OF_STOCK, E.PAYMENT_FAILED, {}),
        (FAILED_AFTER_DECLINE, E.STOCK_FAILED, {}),
        (order("FAILED", payment="DECLINED", reason="PAYMENT_FAILED"), E.PAYMENT_REFUNDED, {}),
        (order("FAILED", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK"), E.STOCK_RELEASED, {}),
        # duplicates change nothing
        (FAILED_AFTER_DECLINE, E.STOCK_RELEASED, {}),
        (FAILED_AFTER_OUT_OF_STOCK, E.PAYMENT_REFUNDED, {}),
        (order("FAILED", payment="DECLINED", reason="PAYMENT_FAILED"), E.PAYMENT_FAILED, {}),
        (order("COMPLETED", payment="SUCCESS", inventory="RESERVED"), E.STOCK_RESERVED, {}),
        (order("PROCESSING", payment="SUCCESS"), E.PAYMENT_PROCESSED, {}),
        # a FAILED order still absorbs the compensations, from the decision or (reordered) before it
        (
            order("FAILED", payment="DECLINED", inventory="RESERVED", reason="PAYMENT_FAILED"),
            E.STOCK_RELEASED,
            {"inventory_status": "RELEASED"},
        ),
        (
            order("FAILED", payment="DECLINED", reason="PAYMENT_FAILED"),
            E.STOCK_RELEASED,
            {"inventory_status": "RELEASED"},
        ),
        (
            order("FAILED", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK"),
            E.PAYMENT_REFUNDED,
            {"payment_status": "REFUNDED"},
        ),
        # a late decision the failed order had not yet seen is still recorded (then compensated), status stays
        (
            order("FAILED", payment="DECLINED", reason="PAYMENT_FAILED"),
            E.STOCK_RESERVED,
            {"inventory_status": "RESERVED"},
        ),
        (
            order("FAILED", inventory="OUT_OF_STOCK", reason="OUT_OF_STOCK"),
            E.PAYMENT_PROCESSED,
            {"payment_status": "SUCCESS"},
        ),
    ],
)
def test_sub_statuses_move_forward_only(start, event, changes):
    assert apply_event(start, event) == changes


@pytest.mark.parametrize(
    "events, final",
    [
        # optimistic decline with order.queue reordering every way: always FAILED / DECLINED / RELEASED
        ([E.STOCK_RESERVED, E.PAYMENT_FAILED, E.STOCK_RELEASED], ("FAILED", "DECLINED", "RELEASED")),
        ([E.PAYMENT_FAILED, E.STOCK_RESERVED, E.STOCK_RELEASED], ("FAILED", "DECLINED", "RELEASED")),
        ([E.PAYMENT_FAILED, E.STOCK_RELEASED, E.STOCK_RESERVED], ("FAILED", "DECLINED", "RELEASED")),
        ([E.STOCK_RELEASED, E.STOCK_RESERVED, E.PAYMENT_FAILED], ("FAILED", "DECLINED", "RELEASED")),
        # post-payment out of stock, likewise: FAILED / REFUNDED / OUT_OF_STOCK
        ([E.PAYMENT_PROCESSED, E.STOCK_FAILED, E.PAYMENT_REFUNDED], ("FAILED", "REFUNDED", "OUT_OF_STOCK")),
        ([E.STOCK_FAILED, E.PAYMENT_REFUNDED, E.PAYMENT_PROCESSED], ("FAILED", "REFUNDED", "OUT_OF_STOCK")),
        ([E.PAYMENT_REFUNDED, E.PAYMENT_PROCESSED, E.STOCK_FAILED], ("FAILED", "REFUNDED", "OUT_OF_STOCK")),
        # completion in either arrival order, with redeliveries
        (
            [E.STOCK_RESERVED, E.STOCK_RESERVED, E.PAYMENT_PROCESSED, E.STOCK_RESERVED],
            ("COMPLETED", "SUCCESS", "RESERVED"),
        ),
        ([E.PAYMENT_PROCESSED, E.STOCK_RESERVED, E.PAYMENT_PROCESSED], ("COMPLETED", "SUCCESS", "RESERVED")),
    ],
)
def test_every_arrival_order_ends_in_the_same_state(events, final):
    s = run(events)
    assert (s["status"], s["payment_status"], s["inventory_status"]) == final


def test_unguarded_naive_mode_lets_late_events_move_sub_statuses_back():
    assert apply_event(FAILED_AFTER_DECLINE, E.STOCK_RESERVED, guarded=False)["inventory_status"] == "RESERVED"
    assert apply_event(FAILED_AFTER_OUT_OF_STOCK, E.PAYMENT_PROCESSED, guarded=False)["payment_status"] == "SUCCESS"
    s = run([E.PAYMENT_FAILED, E.STOCK_RELEASED, E.STOCK_RESERVED], guarded=False)
    assert (s["status"], s["inventory_status"]) == ("PROCESSING", "RESERVED")
