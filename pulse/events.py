"""Event types and the wire envelope shared by every module (SPEC §2)."""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from decimal import Decimal


class EventType(str, enum.Enum):
    ORDER_CREATED = "ORDER_CREATED"
    ORDER_UPDATED = "ORDER_UPDATED"
    STOCK_RESERVED = "STOCK_RESERVED"
    STOCK_RELEASED = "STOCK_RELEASED"
    STOCK_FAILED = "STOCK_FAILED"
    PAYMENT_PROCESSED = "PAYMENT_PROCESSED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    PAYMENT_REFUNDED = "PAYMENT_REFUNDED"


class MalformedEnvelope(ValueError):
    """A message body that is not a SPEC envelope; it goes to the dead-letter queue, not back to the queue."""


@dataclasses.dataclass(frozen=True)
class Envelope:
    """What travels on the broker: ``id`` is the outbox row id and the inboxes' dedup key."""

    id: uuid.UUID
    event_type: str
    aggregate_id: str
    payload: dict

    def to_json(self) -> bytes:
        return json.dumps({"id": str(self.id), "eventType": self.event_type,
                           "aggregateId": self.aggregate_id, "payload": self.payload},
                          default=_json_default).encode()

    @classmethod
    def from_json(cls, body: bytes) -> "Envelope":
        try:
            raw = json.loads(body)
            return cls(id=uuid.UUID(raw["id"]), event_type=str(raw["eventType"]),
                       aggregate_id=str(raw["aggregateId"]), payload=dict(raw["payload"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedEnvelope(f"not an event envelope: {exc}") from exc


def _json_default(value):
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def dumps(payload: dict) -> str:
    """JSON for payloads: Decimals as strings so money never turns into binary floats."""
    return json.dumps(payload, default=_json_default)
