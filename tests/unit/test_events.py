"""The wire envelope of SPEC §2: round trip, field names, and what counts as malformed."""

import json
import uuid
from decimal import Decimal

import pytest

from pulse.events import Envelope, EventType, MalformedEnvelope, dumps


def sample(**changes):
    fields = dict(id=uuid.uuid4(), event_type="ORDER_CREATED", aggregate_id=str(uuid.uuid4()),
                  payload={"orderId": "o", "items": [{"productId": "p", "quantity": 2}], "totalPrice": "19.98"})
    fields.update(changes)
    return Envelope(**fields)


def test_event_types_are_the_spec_names():
    assert {e.value for e in EventType} == {"ORDER_CREATED", "ORDER_UPDATED", "STOCK_RESERVED", "STOCK_RELEASED",
                                            "STOCK_FAILED", "PAYMENT_PROCESSED", "PAYMENT_FAILED", "PAYMENT_REFUNDED"}
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
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    env = sample(payload={"totalPrice": Decimal("1299.10"), "productId": pid, "updatedAt": when})
    back = Envelope.from_json(env.to_json()).payload
    assert back == {"totalPrice": "1299.10", "productId": str(pid), "updatedAt": when.isoformat()}
    assert json.loads(dumps({"x": Decimal("0.10")})) == {"x": "0.10"}


def test_unknown_types_are_not_silently_serialised():
    with pytest.raises(TypeError):
        dumps({"x": object()})


@pytest.mark.parametrize("body", [
    b"", b"not json", b"\xff\xfe", b"null", b"[]", b'"text"', b"42",
    b'{"eventType": "ORDER_CREATED", "aggregateId": "a", "payload": {}}',  # no id
    b'{"id": "not-a-uuid", "eventType": "ORDER_CREATED", "aggregateId": "a", "payload": {}}',
    b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "aggregateId": "a", "payload": {}}',  # no type
    b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a"}',  # no payload
    b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a", "payload": null}',
    b'{"id": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "eventType": "X", "aggregateId": "a", "payload": 5}',
])
def test_malformed_bodies_raise_malformed_envelope(body):
    with pytest.raises(MalformedEnvelope, match="not an event envelope"):
        Envelope.from_json(body)


def test_malformed_envelope_is_a_value_error():
    assert issubclass(MalformedEnvelope, ValueError)
