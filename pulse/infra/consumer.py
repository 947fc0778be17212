"""Queue consumers: manual acks, prefetch, bounded retries, then a dead-letter queue that keeps the reason."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import pika
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError, NackError, UnroutableError

from pulse.events import Envelope, MalformedEnvelope
from pulse.faults import NO_FAULTS, NoFaults
from pulse.infra import broker, db
from pulse.infra.threadname import set_os_thread_name

log = logging.getLogger(__name__)

# One delivery as a BlockingChannel yields it (pika has no type information: these are Any to mypy).
Message = tuple[pika.spec.Basic.Deliver, pika.spec.BasicProperties, bytes]


class Prelock(Protocol):
    """Takes the row locks a batch's handlers will take, in one fixed order (see ``Consumer.prelock``)."""

    def __call__(self, conn: db.Conn, envelopes: list[Envelope], *, naive: Callable[[str], bool]) -> object: ...


class _HandlerFailed(Exception):
    """A handler raised inside a batch: its partial statements are in the shared transaction, which must not
    commit; the batch rolls back and its messages are handled one by one."""


class Consumer(threading.Thread):
    """Consumes one queue and hands each envelope to ``dispatch(envelope)``.

    The handler runs its effect and its inbox insert in one transaction, so acking after it
    returns gives exactly-once effects on top of the broker's at-least-once delivery.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        dispatch: Callable[[Envelope], object],
        *,
        stop: threading.Event,
        prefetch: int = 50,
        retries: int = 5,
        faults: NoFaults | None = None,
        name: str | None = None,
        pool: db.Pool | None = None,
        batch: int = 50,
        prelock: Prelock | None = None,
    ) -> None:
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
        # Delivered to this consumer and not acked yet (prefetched, in hand, or retrying): the saga watchdog
        # counts them as "still on their way", since the broker's ready count does not include them.
        self.unsettled = 0
        self.handled = 0
        self.dead_lettered = 0
        self.last_error: BaseException | None = None  # what last interrupted run (read by pulse.infra.workers)
        # Confirm-mode channel for dead letters, see _confirming_channel.
        self._dlq_channel: BlockingChannel | None = None

    def run(self) -> None:
        """Consume until ``stop``, reconnecting after broker trouble; anything else ends the thread.

        The error that ended it is kept in ``last_error`` (and logged) for the supervisor that restarts
        it (pulse.infra.workers); messages it held unacked go back to the queue with its connection.
        """
        # "c:<queue>:<n>" in /proc: bench/cpu.py charges this thread's CPU to the consumers, not the API.
        set_os_thread_name("c:" + self.name.removeprefix("consumer:").replace(".queue", ""))
        backoff = 0.5
        while not self.stop.is_set():
            try:
                self._consume()
                backoff = 0.5
            except (broker.BrokerUnavailable, AMQPError, OSError) as exc:
                self.last_error = exc
                log.warning("%s: broker connection lost (%s); reconnecting in %.1fs", self.name, exc, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except BaseException as exc:  # noqa: BLE001 -- recorded for the restart log, then the thread ends
                self.last_error = exc
                log.error(
                    "%s: consumer thread stopped by %s: %s\n%s",
                    self.name,
                    type(exc).__name__,
                    exc,
                    "".join(traceback.format_exception(exc)),
                )
                return
        # How well batching worked (messages per transaction) is the first thing to know about a slow queue.
        log.info(
            "%s: handled %d messages in %d batches, %d dead-lettered",
            self.name,
            self.handled,
            self.batches,
            self.dead_lettered,
        )

    def fresh_copy(self) -> Consumer:
        """A new, unstarted consumer with this one's arguments (a thread cannot be started twice)."""
        return Consumer(
            self.url,
            self.queue,
            self.dispatch,
            stop=self.stop,
            prefetch=self.prefetch,
            retries=self.retries,
            faults=self.faults,
            name=self.name,
            pool=self.pool,
            batch=self.batch,
            prelock=self.prelock,
        )

    def _consume(self) -> None:
        conn = broker.connect(self.url)
        try:
            channel = conn.channel()
            channel.basic_qos(prefetch_count=self.prefetch)
            deliveries = channel.consume(self.queue, inactivity_timeout=0.5)
            for method, props, body in deliveries:
                if self.stop.is_set():
                    break
                if method is None:
                    self.unsettled = channel.get_waiting_message_count()
                    continue
                if self.pool is None or self.batch == 1:
                    self.unsettled = 1 + channel.get_waiting_message_count()
                    self._process(channel, method, props, body)
                    continue
                taken: list[Message] = [(method, props, body)]
                # Only what has already arrived: a batch never waits for messages, so latency stays put.
                conn.process_data_events(time_limit=0)
                while len(taken) < self.batch and channel.get_waiting_message_count() > 0:
                    taken.append(next(deliveries))
                self.unsettled = len(taken) + channel.get_waiting_message_count()
                self._process_batch(channel, taken)
            channel.cancel()
        finally:
            self.unsettled = 0  # what was not acked goes back to the broker's ready count
            if conn.is_open:
                conn.close()

    def _lost(self, envelope: Envelope, props: pika.spec.BasicProperties) -> bool:
        """The lab's "lost event" fault, for events this queue's module would act on (a queue also hears
        re-drives meant for other queues and drops them unhandled; losing one of those would lose nothing)."""
        wants = getattr(self.dispatch, "wants", None)
        if wants is not None and not wants(envelope):
            return False
        return self.faults.lose_message(self.queue, event_id=props.message_id)

    def _process(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        props: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        try:
            envelope = Envelope.from_json(body)
        except MalformedEnvelope as exc:
            self._dead_letter(channel, method, props, body, str(exc))
            return
        if self._lost(envelope, props):
            channel.basic_ack(method.delivery_tag)  # acked, never handled
            return
        error: Exception | None = None
        for attempt in range(1, self.retries + 1):
            try:
                self.dispatch(envelope)
                error = None
                break
            except MalformedEnvelope as exc:  # a payload that does not parse never will: no retries
                error = exc
                break
            except Exception as exc:  # a handler failure must never kill the consumer thread
                error = exc
                log.warning(
                    "%s: %s %s failed (attempt %d/%d): %s",
                    self.name,
                    envelope.event_type,
                    envelope.id,
                    attempt,
                    self.retries,
                    exc,
                )
                if attempt < self.retries:
                    self.stop.wait(min(0.05 * 2**attempt, 2.0))
        if error is not None:
            reason = f"{type(error).__name__}: {error}"
            log.error(
                "%s: dead-lettering %s after %d attempt(s)\n%s",
                self.name,
                envelope.id,
                attempt,
                "".join(traceback.format_exception(error)),
            )
            self._dead_letter(channel, method, props, body, reason)
            return
        self.faults.point("consumer.before_ack", queue=self.queue)
        channel.basic_ack(method.delivery_tag)
        self.handled += 1

    def _process_batch(self, channel: BlockingChannel, taken: list[Message]) -> None:
        """Handle several deliveries in one database transaction.

        Exactly-once holds as for one message: inbox rows commit with the effects, acks follow the commit.
        A handler that fails leaves its statements in the shared transaction (handlers take no savepoint in a
        batch, see pulse.infra.db.unit), so the whole batch is rolled back and every message takes the
        one-message path (retries, DLQ), as when the batch itself fails (e.g. the connection dropped).
        """
        if len(taken) == 1:
            self._process(channel, *taken[0])
            return
        done, failed, settled = [], [], set()  # settled: acked inside the batch (lost or dead-lettered)
        parsed = []
        for method, props, body in taken:
            try:
                envelope = Envelope.from_json(body)
            except MalformedEnvelope as exc:
                self._dead_letter(channel, method, props, body, str(exc))
                settled.add(method.delivery_tag)
                continue
            if self._lost(envelope, props):
                channel.basic_ack(method.delivery_tag)  # acked, never handled
                settled.add(method.delivery_tag)
                continue
            parsed.append((method, props, body, envelope))
        if not parsed:
            return
        assert self.pool is not None, "_consume batches only with a pool"
        try:
            envelopes = [envelope for *_, envelope in parsed]
            # Before the transaction opens: work no handler may do inside one (payment's provider calls).
            prepare = getattr(self.dispatch, "prepare_batch", None)
            prepared = prepare(envelopes) if prepare is not None else {}
            with db.batch(self.pool) as current:
                current.prepared.update(prepared)
                if self.prelock is not None:
                    self.prelock(current.conn, envelopes, naive=self._naive)
                # After the pre-lock, as the handlers' own claims came after it: every batch takes rows, then ids.
                claim_batch = getattr(self.dispatch, "claim_batch", None)
                if claim_batch is not None:
                    claim_batch(current, envelopes)
                for method, props, body, envelope in parsed:
                    current.callbacks = []
                    try:
                        self.dispatch(envelope)
                    except Exception as exc:
                        raise _HandlerFailed(f"{envelope.event_type} {envelope.id}: {exc}") from exc
                    done.append((method, props, body, current.callbacks))
                # A claim taken up front that no handler read would commit "handled" for an event whose effect
                # never ran, and its redelivery would be dropped as a duplicate: never commit that.
                unused = [event_id for (_, event_id), new in current.claims.items() if new]
                if unused:
                    raise _HandlerFailed(f"inbox claimed up front but never read by a handler for {unused}")
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

    def _dead_letter(
        self,
        channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        props: pika.spec.BasicProperties,
        body: bytes,
        reason: str,
    ) -> bool:
        """Copy the message to ``<queue>.dlq`` with its reason; ack the original only once the broker confirmed it.

        Returns whether it was dead-lettered. If the copy is refused (nacked, or returned because the DLQ does
        not exist) the original is requeued instead, so the message is never lost; it comes back, fails again
        and is dead-lettered once the DLQ is there. A broker that never answers is caught by the connection's
        heartbeat and blocked-connection timeouts: the connection closes and the unacked original is requeued.
        """
        if self._naive("dlq-drop"):
            # The lab's naive switch: the poison message is acked with no copy anywhere. Dropped rather than
            # requeued forever, because a requeue loop is loud (a busy consumer, a queue that never drains)
            # while a drop is the silent failure the dead-letter queue exists to prevent.
            log.error("%s: dropping %s after it failed (%s); no dead-letter copy", self.name, props.message_id, reason)
            channel.basic_ack(method.delivery_tag)
            return False
        headers = dict(props.headers or {})
        headers.update(
            {
                "x-pulse-reason": reason[:1000],
                "x-pulse-queue": self.queue,
                # AMQP tables have no float type (pika refuses to encode one): whole epoch ms.
                "x-pulse-failed-at": int(time.time() * 1000),
            }
        )
        dlq_props = pika.BasicProperties(
            content_type=props.content_type,
            delivery_mode=2,
            message_id=props.message_id,
            type=props.type,
            headers=headers,
        )
        dlq = broker.dead_letter_queue(self.queue)
        try:
            # Confirmed and mandatory: a plain publish to a missing DLQ is dropped without a word, and the ack
            # that followed it lost the message. A crash between confirm and ack leaves a duplicate, not a loss.
            self._confirming_channel(channel).basic_publish("", dlq, body, dlq_props, mandatory=True)
        except (UnroutableError, NackError) as exc:
            log.error(
                "%s: %s could not be dead-lettered to %s (%s); it stays in %s",
                self.name,
                props.message_id,
                dlq,
                type(exc).__name__,
                self.queue,
            )
            self.stop.wait(1.0)  # requeued at once it would come straight back: no busy loop on a missing DLQ
            channel.basic_nack(method.delivery_tag, requeue=True)
            return False
        channel.basic_ack(method.delivery_tag)
        self.dead_lettered += 1
        return True

    def _naive(self, name: str) -> bool:
        """Whether the lab switched pattern ``name`` off, as the dispatcher's module dependencies say."""
        deps = getattr(self.dispatch, "deps", None)
        return deps is not None and deps.naive(name)

    def _confirming_channel(self, channel: BlockingChannel) -> BlockingChannel:
        """A confirm-mode channel on the consuming channel's connection, for dead letters (opened on first use).

        Kept apart from the consuming channel: confirm mode there would turn every ack into a wait.
        """
        current = self._dlq_channel
        if current is None or not current.is_open or current.connection is not channel.connection:
            current = channel.connection.channel()
            current.confirm_delivery()
            self._dlq_channel = current
        return current
