"""The CDC relay's start-up sweep: publish the outbox rows its slot will never deliver.

A relay that takes the lock moves its slot to the present (``cdc_slot.advance``), so every event committed
before that is in the table only: rows left by polling mode, by a relay that stopped or crashed before deleting
them, or by a slot dropped and created again after a loss. Rows already deleted were confirmed by the broker, so
skipping their WAL loses nothing. A stream restarted while the lock is held resumes from the slot instead. The
stream is read up to the WAL position of the start (:class:`CatchUp`), so a row the slot delivered is gone by
then, and then the table is swept once: a row committed meanwhile may go out twice, never zero times.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pulse.events import Envelope
from pulse.faults import NoFaults
from pulse.infra import broker, outbox
from pulse.infra.pgoutput_stream import WalStream
from pulse.infra.relay_publish import publish_unconfirmed, report_unroutable


class CatchUp:
    """When the stream has read far enough for the sweep: past the WAL position of the start-up, or stalled for
    ``limit_s`` (the walsender may decode other databases' WAL for seconds without sending anything; late is
    fine, the sweep may then repeat some events, never lose any)."""

    def __init__(self, target_lsn: int, start_lsn: int, limit_s: float) -> None:
        self.target, self.progress, self.limit_s = target_lsn, start_lsn, limit_s
        self.deadline = time.monotonic() + limit_s

    def reached(self, stream: WalStream) -> bool:
        """True once ``stream`` (its ``wal_end`` and ``in_transaction``) has caught up or stopped progressing."""
        now = time.monotonic()
        if stream.wal_end >= self.target and not stream.in_transaction:
            return True
        if stream.wal_end > self.progress:
            self.progress, self.deadline = stream.wal_end, now + self.limit_s
            return False
        return now > self.deadline


def sweep(
    conn: outbox.AnyConn,
    publisher: broker.ConfirmingPublisher,
    *,
    batch: int,
    naive: bool,
    faults: NoFaults,
    retry_s: float,
    count: Callable[[int], object],
    logger: logging.Logger,
) -> int:
    """Publish every row up to the current highest ``seq``, marked unroutable or not, and delete the confirmed
    ones; returns how many were published. Bounded by that ``seq``, so a busy outbox cannot keep it going.

    ``naive`` is the lab's ``publish-no-confirm``: the rows go before the broker has anything. ``count(n)`` is
    called after every batch, so the relay's counters hold even when a later batch fails."""
    top = outbox.max_seq(conn)
    published = kept = after = 0  # after: unroutable rows stay in the table, so the sweep moves on by seq
    while top is not None:
        flush: Callable[[], object] | None = None
        unroutable: list[Envelope] = []
        with conn.transaction():
            rows = outbox.claim_sweep(conn, top, after, batch)
            if not rows:
                break
            after = rows[-1]["seq"]
            envs = [outbox.envelope_of(r) for r in rows]
            if naive:
                flush, ids = publish_unconfirmed(publisher, envs), [e.id for e in envs]
            else:
                confirmed, unroutable, _ = broker.sort_out(envs, publisher.publish_batch(envs))
                ids = [e.id for e in confirmed]
                faults.point("relay.after_publish", events=len(envs))
                outbox.mark_unroutable(conn, [e.id for e in unroutable])
                kept += len(unroutable)
                report_unroutable([e.event_type for e in unroutable], retry_s, logger)
            outbox.delete(conn, ids)
        if flush is not None:
            faults.point("relay.after_publish", events=len(envs))
            flush()
        count(len(ids))
        published += len(ids)
        if len(ids) + len(unroutable) < len(envs):
            raise broker.BrokerUnavailable("RabbitMQ refused events of the start-up sweep; they stay in the outbox.")
    if published or kept:
        logger.info(
            "cdc relay published %d outbox rows the slot does not cover (left by polling mode, a crash or "
            "no queue bound before); %d are still unroutable",
            published,
            kept,
        )
    return published
