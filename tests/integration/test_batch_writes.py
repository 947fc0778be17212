"""A consumer batch writes its outbox rows in one INSERT at its end: in order, and only if the batch commits."""

from __future__ import annotations

import uuid

import pytest

from pulse.infra import db as pulse_db
from pulse.infra import outbox

pytestmark = pytest.mark.integration


def rows_of(conn, aggregate_id) -> list[str]:
    return [
        r["event_type"]
        for r in conn.execute(
            "SELECT event_type FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq", (aggregate_id,)
        ).fetchall()
    ]


def test_a_batch_writes_its_outbox_rows_once_at_its_end_in_order(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.batch(system.deps.pool) as current:
        for kind in ("FIRST", "SECOND", "THIRD"):
            outbox.append(current.conn, kind, "ORDER", aggregate, {"orderId": aggregate})
        # Buffered: not even the batch's own transaction sees them before the end.
        assert rows_of(current.conn, aggregate) == []
    assert rows_of(db, aggregate) == ["FIRST", "SECOND", "THIRD"]


def test_a_batch_that_fails_writes_no_outbox_row(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pytest.raises(RuntimeError), pulse_db.batch(system.deps.pool) as current:
        outbox.append(current.conn, "FIRST", "ORDER", aggregate, {"orderId": aggregate})
        raise RuntimeError("a handler failed")
    assert rows_of(db, aggregate) == []
    with pulse_db.batch(system.deps.pool) as current:  # and the next batch on this thread starts empty
        outbox.append(current.conn, "SECOND", "ORDER", aggregate, {"orderId": aggregate})
    assert rows_of(db, aggregate) == ["SECOND"]


def test_outside_a_batch_the_row_is_written_at_once(system, db, tidy_outbox):
    aggregate = str(uuid.uuid4())
    tidy_outbox.append(aggregate)
    with pulse_db.transaction(system.deps.pool) as conn:
        outbox.append(conn, "ALONE", "ORDER", aggregate, {"orderId": aggregate})
        assert rows_of(conn, aggregate) == ["ALONE"]
