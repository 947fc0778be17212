"""Queue consumers: manual acks, prefetch, bounded retries, then a dead-letter queue that keeps the reason."""

from __future__ import annotations

import logging
import threading
import time
import traceback

import pika
import psycopg
from pika.exceptions import AMQPError

from pulse.events import Envelope, MalformedEnvelope
from pulse.faults import NO_FAULTS
from pulse.infra import broker, db

log = logging.getLogger(__name__)


class Consumer(threading.Thread):
    """Consumes one queue and hands each envelope to ``dispatch(envelope)``.

    The handler runs its effect and its inbox insert in one transaction, so acking after it
    returns gives exactly-once effects on top of the broker's at-least-once delivery.
    """

    def __init__(self, url: str, queue: str, dispatch, *, stop: threading.Event, prefetch: int = 50,
                 retries: int = 5, faults=None, name: str | None = None, pool=None, batch: int = 50,
                 prelock=None):
        super().__init__(name=name or f"consumer:{queue}", daemon=True)
        self.url, self.queue, self.dispatch = url, queue, dispatch
        self.stop, self.prefetch, self.retries = stop, prefetch, retries
        self.faults = faults or NO_FAULTS
        # With a pool, messages already prefetched are handled together in one transaction (see _process_batch).
        self.pool, self.batch = pool, max(1, min(batch, prefetch or batch))
        # prelock(conn, envelopes): takes, in one fixed order, the row locks the batch's handlers will take in
        # message order. Without it two batches (two processes, or two threads) that touch the same rows in
        # different orders deadlock, and PostgreSQL only notices after deadlock_timeout (1 s): the scaling
        # bench fell from 0.92x to 0.13x on that with 20 hot products.
        self.prelock = prelock
        self.batches = 0
        self.handled = 0
        self.dead_lettered = 0

    def run(self):
        backoff = 0.5
        while not self.stop.is_set():
            try:
                self._consume()
                backoff = 0.5
            except (broker.BrokerUnavailable, AMQPError, OSError) as exc:
                log.warning("%s: broker connection lost (%s); reconnecting in %.1fs", self.name, exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        # How well batching worked (messages per transaction) is the first thing to know about a slow queue.
        log.info("%s: handled %d messages in %d batches, %d dead-lettered", self.name, self.handled, self.batches,
                 self.dead_lettered)

    def _consume(self):
        conn = broker.connect(self.url)
        try:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            deliveries = channel.consume(self.queue, inactivity_timeout=0.5)
            for method, props, body in deliveries:
                if self.stop.is_set():
                    break
                if method is None:
                    continue
                if self.pool is None or self.batch == 1:
                    self._process(channel, method, props, body)
                    continue
                taken = [(method, props, body)]
                # Only what has already arrived: a batch never waits for messages, so latency stays put.
                conn.process_data_events(time_limit=0)
                while len(taken) < self.batch and channel.get_waiting_message_count() > 0:
                    taken.append(next(deliveries))
                self._process_batch(channel, taken)
            channel.cancel()
        finally:
            if conn.is_open:
                conn.close()

    def _process(self, channel, method, props, body):
        if self.faults.lose_message(self.queue, event_id=props.message_id):
            channel.basic_ack(method.delivery_tag)  # the lab's "lost event": acked, never handled
            return
        try:
            envelope = Envelope.from_json(body)
        except MalformedEnvelope as exc:
            self._dead_letter(channel, method, props, body, str(exc))
            return
        error = None
        for attempt in range(1, self.retries + 1):
            try:
                self.dispatch(envelope)
                error = None
                break
            except Exception as exc:  # a handler failure must never kill the consumer thread
                error = exc
                log.warning("%s: %s %s failed (attempt %d/%d): %s", self.name, envelope.event_type,
                            envelope.id, attempt, self.retries, exc)
                if attempt < self.retries:
                    self.stop.wait(min(0.05 * 2 ** attempt, 2.0))
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
            log.error("%s: dead-lettering %s after %d attempts\n%s", self.name, envelope.id, self.retries,
                      "".join(traceback.format_exception(error)))
            self._dead_letter(channel, method, props, body, reason)
            return
        self.faults.point("consumer.before_ack", queue=self.queue)
        channel.basic_ack(method.delivery_tag)
        self.handled += 1

    def _process_batch(self, channel, taken: list) -> None:
        """Handle several deliveries in one database transaction, each handler inside its own savepoint.

        Exactly-once holds as for one message: inbox rows commit with the effects, acks follow the commit.
        A handler that fails is undone to its savepoint and then takes the one-message path (retries, DLQ);
        if the batch itself fails (e.g. the connection dropped), every message takes that path.
        """
        if len(taken) == 1:
            self._process(channel, *taken[0])
            return
        done, failed, settled = [], [], set()  # settled: acked inside the batch (lost or dead-lettered)
        parsed = []
        for method, props, body in taken:
            if self.faults.lose_message(self.queue, event_id=props.message_id):
                channel.basic_ack(method.delivery_tag)  # the lab's "lost event": acked, never handled
                settled.add(method.delivery_tag)
                continue
            try:
                parsed.append((method, props, body, Envelope.from_json(body)))
            except MalformedEnvelope as exc:
                self._dead_letter(channel, method, props, body, str(exc))
                settled.add(method.delivery_tag)
        if not parsed:
            return
        try:
            with db.batch(self.pool) as current:
                if self.prelock is not None:
                    self.prelock(current.conn, [envelope for *_, envelope in parsed])
                for method, props, body, envelope in parsed:
                    current.callbacks = []
                    try:
                        self.dispatch(envelope)
                    except Exception as exc:  # the handler's savepoint already undid its statements
                        if current.conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
                            raise  # the shared transaction itself is broken: the whole batch starts over
                        log.info("%s: %s %s failed in a batch (%s); retrying it alone", self.name,
                                 envelope.event_type, envelope.id, exc)
                        failed.append((method, props, body))
                        continue
                    done.append((method, props, body, current.callbacks))
        except Exception as exc:
            log.warning("%s: batch of %d failed (%s); handling its messages one by one", self.name, len(taken), exc)
            for method, props, body in taken:
                if method.delivery_tag not in settled:
                    self._process(channel, method, props, body)
            return
        self.batches += 1
        acked = []
        for method, props, body, callbacks in done:
            try:
                for fn in callbacks:
                    fn()
            except Exception as exc:  # e.g. Redis down: the one-message path retries the handler, inbox dedupes
                log.warning("%s: after-commit work of %s failed (%s)", self.name, props.message_id, exc)
                failed.append((method, props, body))
                continue
            self.faults.point("consumer.before_ack", queue=self.queue)
            acked.append(method.delivery_tag)
        # Failed ones first: the multiple ack below must not cover a message that is still unhandled.
        for method, props, body in sorted(failed, key=lambda d: d[0].delivery_tag):
            self._process(channel, method, props, body)
        if acked:
            channel.basic_ack(max(acked), multiple=True)
            self.handled += len(acked)

    def _dead_letter(self, channel, method, props, body, reason: str):
        headers = dict(props.headers or {})
        headers.update({"x-pulse-reason": reason[:1000], "x-pulse-queue": self.queue,
                        # AMQP tables have no float type (pika refuses to encode one): whole epoch ms.
                        "x-pulse-failed-at": int(time.time() * 1000)})
        dlq_props = pika.BasicProperties(content_type=props.content_type, delivery_mode=2,
                                         message_id=props.message_id, type=props.type, headers=headers)
        # Published before the ack: a crash in between leaves a duplicate in the DLQ, never a loss.
        channel.basic_publish("", broker.dead_letter_queue(self.queue), body, dlq_props)
        channel.basic_ack(method.delivery_tag)
        self.dead_lettered += 1


def make_dispatch(handlers: dict):
    """A dispatcher over ``{event_type: handler(envelope)}``; an unexpected type is an error (dead-lettered)."""

    def dispatch(envelope: Envelope):
        handler = handlers.get(envelope.event_type)
        if handler is None:
            raise LookupError(f"no handler for {envelope.event_type} on this queue")
        handler(envelope)

    return dispatch
