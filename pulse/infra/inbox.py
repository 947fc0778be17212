"""Per-module inbox tables (named in pulse.topology): the event id is inserted in the same transaction as the effect."""

from __future__ import annotations

from typing import Any

import psycopg


def claim(conn: psycopg.Connection[Any], table: str, event_id: object, *, enabled: bool = True) -> bool:
    """True if this event is new for the module; False if its effect was already committed.

    ON CONFLICT waits for a concurrent transaction holding the same id: if that one
    commits we see a duplicate, if it rolls back our insert goes through, so two deliveries of
    one event never both take effect. ``enabled=False`` is the lab's naive mode without an inbox.
    """
    if not enabled:
        return True
    # A duplicate bumps the row's counter (the delivery check reports it); xmax = 0 only on a fresh insert.
    row = conn.execute(
        f"INSERT INTO {table} AS t (event_id) VALUES (%s) ON CONFLICT (event_id) "
        "DO UPDATE SET duplicates = t.duplicates + 1 RETURNING (xmax = 0) AS inserted",
        (event_id,),
    ).fetchone()
    assert row is not None  # INSERT ... ON CONFLICT DO UPDATE ... RETURNING returns its row either way
    return bool(row[0] if isinstance(row, tuple) else row["inserted"])
