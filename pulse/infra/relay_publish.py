"""What both relays do with the broker beyond one publish: unroutable events, their retry, and the lab's naive mode.

The polling and the CDC relay differ in where they find events (the table, the WAL) but not in what an answer of
the broker means for a row, so that lives here once, on top of :class:`pulse.infra.broker.ConfirmingPublisher`.

An event no queue is bound to is returned by the broker (mandatory publish): its row is marked ``unroutable_at``
and kept, because deleting it would lose the event for good while a missing binding is usually a deploy or
topology slip that gets fixed. Marked rows leave the claim, so they neither block nor spin a relay, and a slow
retry pass (``unroutable_retry_s``) publishes them again, so an event goes out once a queue is bound to its type.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable

import pika

from pulse.events import Envelope
from pulse.infra import broker, outbox

log = logging.getLogger(__name__)

UNROUTABLE_RETRY_S = 30.0


def report_unroutable(event_types: Iterable[str], retry_s: float, logger: logging.Logger = log) -> None:
    """One WARNING line for a batch's unroutable events: their types and counts."""
    if not event_types:
        return
    counts = collections.Counter(event_types)
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    logger.warning(
        "unroutable: %s event(s) returned by RabbitMQ, no queue is bound to it; they stay in the outbox "
        "(unroutable_at) and are retried every %gs",
        kinds,
        retry_s,
    )


def retry_unroutable(
    conn: outbox.AnyConn,
    publisher: broker.ConfirmingPublisher,
    batch: int,
    retry_s: float = UNROUTABLE_RETRY_S,
    logger: logging.Logger = log,
) -> int:
    """Publish the rows marked unroutable again, oldest first, and delete those the broker now routed and confirmed.

    Rows still unroutable keep their first mark (how long the event has waited); rows the broker did not confirm
    stay as they are. Returns how many were delivered."""
    delivered, after = 0, 0
    while True:
        with conn.transaction():
            rows = outbox.claim_unroutable(conn, after, batch)
            if not rows:
                break
            outcomes = publisher.publish_batch([outbox.envelope_of(r) for r in rows])
            confirmed, unroutable, _ = broker.sort_out(rows, outcomes)
            outbox.delete(conn, [r["id"] for r in confirmed])
            after = rows[-1]["seq"]
        delivered += len(confirmed)
        if confirmed:
            logger.info(
                "delivered %d event(s) that were unroutable before: a queue is bound to them now", len(confirmed)
            )
        if unroutable:
            report_unroutable([r["event_type"] for r in unroutable], retry_s, logger)
        if len(rows) < batch:
            break
    return delivered


def publish_unconfirmed(publisher: broker.ConfirmingPublisher, envelopes: Iterable[Envelope]) -> Callable[[], object]:
    """The lab's naive publish (issue 4, ``publish-no-confirm``): hand the messages to the client library
    and return at once; the returned ``flush()`` writes them to the socket. Whoever deletes the outbox
    rows before that (as the original did, trusting "publish returned") loses the batch in a crash.
    Delivery tags are still counted so the confirming path stays in step when the switch goes off."""
    _, channel = publisher._ensure_open()
    for env in envelopes:
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=str(env.id),
            type=env.event_type,
            headers=broker.routing_headers(env),
        )
        channel._impl.basic_publish(broker.EXCHANGE, env.event_type, env.to_json(), props)
        publisher._next_tag += 1
    return lambda: channel._flush_output(lambda: True)
