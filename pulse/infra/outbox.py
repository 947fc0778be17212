"""The transactional outbox: events are rows written in the same transaction as the change they announce."""

from __future__ import annotations

import uuid

from pulse.events import Envelope, dumps


def append(conn, event_type: str, aggregate_type: str, aggregate_id, payload: dict) -> uuid.UUID:
    """Add one event to ``shared.outbox`` inside the caller's transaction; returns its id (the dedup key)."""
    event_id = uuid.uuid4()
    conn.execute(
        "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) "
        "VALUES (%s, %s, %s, %s, %s::jsonb)",
        (event_id, aggregate_type, str(aggregate_id), str(event_type.value if hasattr(event_type, "value") else event_type),
         dumps(payload)))
    return event_id


def envelope_of(row: dict) -> Envelope:
    """The wire envelope of an outbox row (as read by the polling relay or decoded by the CDC relay)."""
    return Envelope(id=row["id"] if isinstance(row["id"], uuid.UUID) else uuid.UUID(str(row["id"])),
                    event_type=row["event_type"], aggregate_id=row["aggregate_id"], payload=row["payload"])
