"""The wire envelope of SPEC §2: round trip, field names, and what counts as malformed."""

import dataclasses
import datetime as dt
import json
import uuid
from decimal import Decimal

import pytest

from pulse import events
from pulse.events import Envelope, EventType, MalformedEnvelope, dumps
from pulse.status import (
    DisplayStatus,
    FailureReason,
    InventoryStatus,
    OrderStatus,
    PaymentStatus,
    ReservationStatus,
    Strategy,
)


def sample(**changes):
    fields = dict(
        id=uuid.uuid4(),
        event_type="ORDER_CREATED",
        aggregate_id=str(uuid.uuid4()),
        payload={"orderId": "o", "items": [{"productId": "p", "quantity": 2}], "totalPrice": "19.98"},
    )
    fields.update(changes)
    return Envelope(**fields)


def test_event_types_are_the_spec_names():
    assert {e.value for e in EventType} == {
        "ORDER_CREATED",
        "ORDER_UPDATED",
        "STOCK_RESERVED",
        "STOCK_RELEASED",
        "STOCK_FAILED",
        "PAYMENT_PROCESSED",
        "PAYMENT_FAILED",
        "PAYMENT_REFUNDED",
    }
    assert EventType.STOCK_FAILED == "STOCK_FAILED"


def test_round_trip():
    env = sample()
    assert Envelope.from_json(env.to_json()) == env


def test_wire_field_names_are_camel_case():
    env = sample()
    raw = json.loads(env.to_json())
    assert set(raw) == {"id", "eventType", "aggregateId", "payload"}
    assert raw["id"] == str(env.id) and raw["eventType"] == "ORDER_CREATED"


def test_decimals_uuids_and_times_travel_as_strings():
    import datetime

    pid = uuid.uuid4()
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    env = sample(payload={"totalPrice": Decimal("1299.10"), "productId": pid, "updatedAt": when})
    back = Envelope.from_json(env.to_json()).payload
    assert back == {"totalPrice": "1299.10", "productId": str(pid), "updatedAt": when.isoformat()}
    assert json.loads(dumps({"x": Decimal("0.10")})) == {"x": "0.10"}


def test_unknown_types_are_not_silently_serialised():
    with pytest.raises(TypeError):
        dumps({"x": object()})


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"null",
        b"[]",
        b'"text"',
        b"42",
        b'{"eventType": "ORDER_CREATED", "aggregateId": "a", "payload": {}}',  # no id
        b'{"id": "not-a-uuid", "eventType": "ORDER_CREATED", "aggregateId": "a", "payload": {}}',
        b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "aggregateId": "a", "payload": {}}',  # no type
        b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a"}',  # no payload
        b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a", "payload": null}',
        b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a", "payload": 5}',
    ],
)
def test_malformed_bodies_raise_malformed_envelope(body):
    with pytest.raises(MalformedEnvelope, match="not an event envelope"):
        Envelope.from_json(body)


def test_malformed_envelope_is_a_value_error():
    assert issubclass(MalformedEnvelope, ValueError)


# ----- typed payloads: one dataclass per event type -----------------------------------------------------

ORDER, USER, PRODUCT, PAYMENT = (str(uuid.UUID(int=n)) for n in (1, 2, 3, 4))
ITEMS = [{"productId": PRODUCT, "quantity": 2}]
WHEN = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
ORDER_FIELDS = {"orderId": ORDER, "userId": USER, "items": ITEMS, "totalPrice": "1998.00", "strategy": "OPTIMISTIC"}

# Each type's payload exactly as the handlers wrote it as plain dicts before the typed events (the wire format).
WIRE = {
    "ORDER_CREATED": dict(ORDER_FIELDS),
    "STOCK_RESERVED": dict(ORDER_FIELDS),
    "STOCK_FAILED": {
        **ORDER_FIELDS,
        "reason": "OUT_OF_STOCK",
        "shortages": [{"productId": PRODUCT, "requested": 2, "available": 1}],
    },
    "PAYMENT_PROCESSED": {**ORDER_FIELDS, "paymentId": PAYMENT},
    "PAYMENT_FAILED": {**ORDER_FIELDS, "reason": "DECLINED"},
    "STOCK_RELEASED": {
        "orderId": ORDER,
        "userId": USER,
        "items": ITEMS,
        "strategy": "OPTIMISTIC",
        "reason": "PAYMENT_FAILED",
    },
    "PAYMENT_REFUNDED": {
        "orderId": ORDER,
        "userId": USER,
        "totalPrice": "1998.00",
        "strategy": "POST_PAYMENT",
        "reason": "OUT_OF_STOCK",
        "paymentId": PAYMENT,
    },
    "ORDER_UPDATED": {
        "orderId": ORDER,
        "userId": USER,
        "status": "FAILED",
        "paymentStatus": "DECLINED",
        "inventoryStatus": "RELEASED",
        "failureReason": "PAYMENT_FAILED",
        "strategy": "OPTIMISTIC",
        "totalAmount": "1998.00",
        "updatedAt": WHEN.isoformat(),
    },
}


def typed(event_type: str) -> events.Event:
    """The event of WIRE[event_type] built in code, the way the handlers build them."""
    order = {
        "order_id": ORDER,
        "user_id": uuid.UUID(USER),
        "items": [events.Item(product_id=PRODUCT, quantity=2)],
        "total_price": Decimal("1998.00"),
        "strategy": Strategy.OPTIMISTIC,
    }
    return {
        "ORDER_CREATED": lambda: events.OrderCreated(**order),
        "STOCK_RESERVED": lambda: events.StockReserved(**order),
        "STOCK_FAILED": lambda: events.StockFailed(
            **order, shortages=[events.Shortage(product_id=PRODUCT, requested=2, available=1)]
        ),
        "PAYMENT_PROCESSED": lambda: events.PaymentProcessed(**order, payment_id=PAYMENT),
        "PAYMENT_FAILED": lambda: events.PaymentFailed(**order),
        "STOCK_RELEASED": lambda: events.StockReleased(
            order_id=ORDER, user_id=USER, strategy="OPTIMISTIC", items=[{"productId": PRODUCT, "quantity": 2}]
        ),
        "PAYMENT_REFUNDED": lambda: events.PaymentRefunded(
            order_id=ORDER, user_id=USER, total_price="1998.00", strategy="POST_PAYMENT", payment_id=PAYMENT
        ),
        "ORDER_UPDATED": lambda: events.OrderUpdated(
            order_id=ORDER,
            user_id=USER,
            status=OrderStatus.FAILED,
            payment_status="DECLINED",
            inventory_status=InventoryStatus.RELEASED,
            failure_reason="PAYMENT_FAILED",
            strategy="OPTIMISTIC",
            total_amount=Decimal("1998.00"),
            updated_at=WHEN,
        ),
    }[event_type]()


def test_every_event_type_has_one_dataclass():
    assert set(events.EVENTS) == {e.value for e in EventType} == set(WIRE)
    for name, cls in events.EVENTS.items():
        assert cls.TYPE.value == name and dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen


@pytest.mark.parametrize("event_type", sorted(WIRE))
def test_each_event_writes_the_payload_the_handlers_wrote_as_dicts(event_type):
    assert typed(event_type).to_payload() == WIRE[event_type]


@pytest.mark.parametrize("event_type", sorted(WIRE))
def test_each_event_round_trips_through_the_wire_envelope(event_type):
    event = typed(event_type)
    body = Envelope.of(event).to_json()
    raw = json.loads(body)
    assert set(raw) == {"id", "eventType", "aggregateId", "payload"}  # SPEC §2's envelope
    assert (raw["eventType"], raw["aggregateId"]) == (event_type, ORDER)
    assert raw["payload"] == WIRE[event_type]
    back = Envelope.from_json(body)
    assert back.event == event and type(back.event) is type(event)
    assert events.parse(event_type, raw["payload"]) == event


@pytest.mark.parametrize("event_type", sorted(set(WIRE) - {"ORDER_UPDATED", "PAYMENT_REFUNDED"}))
def test_the_spec_fields_travel_with_their_spec_names_and_formats(event_type):
    payload = json.loads(Envelope.of(typed(event_type)).to_json())["payload"]
    assert {"orderId", "userId", "items", "strategy"} <= set(payload)
    assert all(
        set(item) == {"productId", "quantity"} and isinstance(item["quantity"], int) for item in payload["items"]
    )
    if "totalPrice" in payload:
        assert payload["totalPrice"] == "1998.00"  # a decimal string, never a binary float


def test_re_drive_marks_travel_only_when_set():
    event = dataclasses.replace(typed("STOCK_RESERVED"), redriven=True, redrive_for="payment.queue")
    payload = event.to_payload()
    assert payload == {**WIRE["STOCK_RESERVED"], "redriven": True, "redriveFor": "payment.queue"}
    assert events.parse("STOCK_RESERVED", payload) == event
    assert Envelope.of(event).redrive_for == "payment.queue" and Envelope.of(event).strategy == "OPTIMISTIC"


def test_a_following_step_carries_the_order_but_not_the_re_drive_marks():
    trigger = dataclasses.replace(typed("ORDER_CREATED"), redriven=True, redrive_for="inventory.queue")
    assert trigger.follow(events.StockReserved).to_payload() == WIRE["STOCK_RESERVED"]


def test_unknown_payload_keys_are_ignored():
    assert events.parse("PAYMENT_FAILED", {**WIRE["PAYMENT_FAILED"], "note": "x"}) == typed("PAYMENT_FAILED")


def test_a_missing_optional_field_takes_its_default():
    without = {k: v for k, v in WIRE["STOCK_RELEASED"].items() if k not in ("userId", "reason")}
    event = events.parse("STOCK_RELEASED", without)
    assert (event.user_id, event.reason) == (None, "PAYMENT_FAILED")


@pytest.mark.parametrize("event_type", sorted(WIRE))
def test_a_payload_missing_a_required_field_is_malformed_and_names_it(event_type):
    required = [f.key for f in events.EVENTS[event_type]._fields() if f.required]
    assert "orderId" in required and "strategy" in required
    for key in required:
        payload = {k: v for k, v in WIRE[event_type].items() if k != key}
        with pytest.raises(MalformedEnvelope, match=f"malformed {event_type} payload: missing '{key}'"):
            events.parse(event_type, payload)


@pytest.mark.parametrize(
    "event_type, change",
    [
        ("ORDER_CREATED", {"totalPrice": "lots"}),
        ("ORDER_CREATED", {"totalPrice": None}),
        ("ORDER_CREATED", {"items": [{"productId": PRODUCT, "quantity": "2"}]}),
        ("ORDER_CREATED", {"items": [{"productId": PRODUCT}]}),
        ("ORDER_CREATED", {"items": "none"}),
        ("ORDER_CREATED", {"strategy": "PESSIMISTIC"}),
        ("ORDER_CREATED", {"userId": 42}),
        ("ORDER_UPDATED", {"paymentStatus": "MAYBE"}),
        ("ORDER_UPDATED", {"updatedAt": "yesterday"}),
        ("STOCK_RESERVED", {"redriven": "yes"}),
    ],
)
def test_a_payload_with_an_ill_typed_field_is_malformed(event_type, change):
    with pytest.raises(MalformedEnvelope, match=f"malformed {event_type} payload"):
        events.parse(event_type, {**WIRE[event_type], **change})


@pytest.mark.parametrize("payload", [None, [], "text"])
def test_a_payload_that_is_not_an_object_is_malformed(payload):
    with pytest.raises(MalformedEnvelope):
        events.parse("ORDER_CREATED", payload)


def test_an_unknown_event_type_does_not_parse():
    with pytest.raises(MalformedEnvelope, match="unknown event type"):
        _ = Envelope(id=uuid.uuid4(), event_type="ORDER_SHIPPED", aggregate_id="a", payload={}).event


def test_a_failure_reason_may_be_null_but_must_be_present():
    payload = {**WIRE["ORDER_UPDATED"], "failureReason": None}
    assert events.parse("ORDER_UPDATED", payload).to_payload() == payload
    with pytest.raises(MalformedEnvelope, match="missing 'failureReason'"):
        events.parse("ORDER_UPDATED", {k: v for k, v in payload.items() if k != "failureReason"})


# ----- status vocabularies (SPEC §3) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "enum_type, words",
    [
        (Strategy, {"OPTIMISTIC", "POST_PAYMENT"}),
        (OrderStatus, {"CREATED", "PROCESSING", "COMPLETED", "FAILED"}),
        (PaymentStatus, {"NOT_STARTED", "SUCCESS", "DECLINED", "REFUNDED"}),
        (InventoryStatus, {"NOT_STARTED", "RESERVED", "RELEASED", "OUT_OF_STOCK"}),
        (ReservationStatus, {"RESERVED", "RELEASED", "FAILED"}),
        (FailureReason, {"PAYMENT_FAILED", "OUT_OF_STOCK"}),
        (
            DisplayStatus,
            {
                "REFUNDED",
                "FAILED_PAYMENT",
                "REFUND_IN_PROGRESS",
                "FAILED_OUT_OF_STOCK",
                "AWAITING_INVENTORY",
                "COMPLETED",
                "AWAITING_PAYMENT",
                "PROCESSING",
            },
        ),
    ],
)
def test_status_enums_are_the_spec_words_and_behave_as_plain_strings(enum_type, words):
    assert {m.value for m in enum_type} == words
    for member in enum_type:
        # name == value keeps hash(member) == hash(value): a database string finds a member in a set or dict key
        assert member.name == member.value and member == member.value and hash(member) == hash(member.value)
        assert json.dumps(member) == json.dumps(member.value) and f"{member}" == member.value
