"""RabbitMQ: declaring the topology that pulse.topology describes, a publisher with batched confirms, connections."""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

import pika
import pika.channel
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError

from pulse.events import Envelope
from pulse.events import EventType as E
from pulse.status import Strategy

log = logging.getLogger(__name__)

EXCHANGE = "outbox-exchange"
STRATEGY_EXCHANGE = f"{EXCHANGE}.by-strategy"  # see Bindings

T = TypeVar("T")


class BrokerUnavailable(RuntimeError):
    """RabbitMQ did not answer at the configured URL."""


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def connect(url: str, *, heartbeat: int = 30) -> BlockingConnection:
    """A blocking connection; raises :class:`BrokerUnavailable` with one readable sentence."""
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    try:
        return pika.BlockingConnection(params)
    except AMQPError as exc:
        raise BrokerUnavailable(
            f"RabbitMQ is not reachable at {params.host}:{params.port} ({type(exc).__name__})."
        ) from exc


@dataclasses.dataclass(frozen=True)
class Bindings:
    """What each queue takes from the exchange (built by :func:`pulse.topology.bindings`).

    ``keys``: the event types a queue takes whatever the order's strategy, bound by routing key on the topic
    exchange. ``by_strategy``: the (event type, strategy) pairs it takes for one strategy only. Routing keys
    stay the bare event types (SPEC §2), so those go through a headers exchange that the topic exchange
    forwards their event types to, matching the ``eventType`` and ``strategy`` headers every saga event is
    published with: a queue does not hear the other strategy's events (SPEC §3, "bindings differ per strategy").
    """

    keys: dict[str, list[str]]
    by_strategy: dict[str, list[tuple[str, str]]]

    def queues_for(self, event_type: str, strategy: object) -> list[str]:
        """The queues the broker delivers such an event to (in-process stand-ins for the broker route by this)."""
        return sorted(
            q
            for q in {**self.keys, **self.by_strategy}
            if event_type in self.keys.get(q, ()) or (event_type, strategy) in self.by_strategy.get(q, ())
        )

    def described(self) -> dict[str, list[str]]:
        """Queue → what it is bound to, readable: ``EVENT`` for every strategy, ``EVENT (STRATEGY)`` for one."""
        return {
            q: sorted(self.keys.get(q, [])) + sorted(f"{e} ({s})" for e, s in self.by_strategy.get(q, []))
            for q in {**self.keys, **self.by_strategy}
        }


def routing_headers(envelope: Envelope) -> dict[str, str] | None:
    """The headers :data:`STRATEGY_EXCHANGE` routes by; an event without a strategy has none and reaches only
    the queues bound to its type for every strategy (where an unknown strategy is dead-lettered)."""
    strategy = envelope.strategy
    if not isinstance(strategy, str):
        return None
    return {"eventType": envelope.event_type, "strategy": strategy}


def _header_binding(event_type: str, strategy: str) -> dict[str, str]:
    return {"x-match": "all", "eventType": event_type, "strategy": strategy}


def declare_topology(channel: BlockingChannel, bindings: Bindings) -> dict[str, list[str]]:
    """Declare the exchanges, each queue with its dead-letter queue, and bind each queue as ``bindings`` says.

    A binding made by an older version of the topology and no longer wanted is removed, because bindings
    outlive the process in the broker. Returns :meth:`Bindings.described`.
    """
    channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    channel.exchange_declare(STRATEGY_EXCHANGE, exchange_type="headers", durable=True)
    forwarded = {e for pairs in bindings.by_strategy.values() for e, _ in pairs}
    for event_type in sorted(forwarded | {e.value for e in E}):
        if event_type in forwarded:
            channel.exchange_bind(STRATEGY_EXCHANGE, EXCHANGE, routing_key=event_type)
        else:
            channel.exchange_unbind(STRATEGY_EXCHANGE, EXCHANGE, routing_key=event_type)
    known = {key for keys in bindings.keys.values() for key in keys} | {e.value for e in E}
    pairs = {(e, s) for e in known for s in Strategy} | {p for ps in bindings.by_strategy.values() for p in ps}
    for queue in sorted({**bindings.keys, **bindings.by_strategy}):
        keys, wanted = set(bindings.keys.get(queue, [])), set(bindings.by_strategy.get(queue, []))
        channel.queue_declare(queue, durable=True)
        channel.queue_declare(dead_letter_queue(queue), durable=True)
        for key in sorted(known):
            if key in keys:
                channel.queue_bind(queue, EXCHANGE, routing_key=key)
            else:
                channel.queue_unbind(queue, EXCHANGE, routing_key=key)
        for event_type, strategy in sorted(pairs):
            args = _header_binding(event_type, strategy)
            if (event_type, strategy) in wanted:
                channel.queue_bind(queue, STRATEGY_EXCHANGE, arguments=args)
            else:
                channel.queue_unbind(queue, STRATEGY_EXCHANGE, arguments=args)
    return bindings.described()


def setup(url: str, bindings: Bindings) -> dict[str, list[str]]:
    """Open a connection, declare the topology and close it again."""
    conn = connect(url)
    try:
        return declare_topology(conn.channel(), bindings)
    finally:
        conn.close()


class Delivery(enum.Enum):
    """What the broker said about one published envelope."""

    CONFIRMED = "confirmed"  # routed to at least one queue and acked
    UNROUTABLE = "unroutable"  # acked, but returned first: no queue is bound to its routing key
    UNCONFIRMED = "unconfirmed"  # nacked, or no answer in time: publish it again


@dataclasses.dataclass(frozen=True)
class Pending:
    """A batch :meth:`ConfirmingPublisher.publish` sent whose answers :meth:`ConfirmingPublisher.confirm` collects."""

    envelopes: list[Envelope]
    tags: list[int]
    channel: BlockingChannel | None  # the channel it went out on: no answer comes once the publisher has replaced it


class ConfirmingPublisher:
    """Publishes envelopes, mandatory and with publisher confirms, waiting once per batch rather than once per message.

    pika's BlockingChannel.confirm_delivery() makes every basic_publish wait for its own confirm,
    which caps a relay near 300 messages/s here. We enable confirm mode on the underlying channel
    with our own ack/nack callback instead, publish a whole batch, then pump I/O until the broker
    has answered for every delivery tag. Private pika attributes are used on purpose; the
    behaviour is covered by the relay integration tests.

    Without ``mandatory`` RabbitMQ acks a message that no queue takes and drops it, so a relay would
    delete its outbox row: the event is lost without a trace (SPEC §2). With it, the broker sends
    basic.return before the ack of that message on the same channel, so by the time the batch's acks
    are in, every return of the batch has been seen; returns carry no delivery tag, hence the message id.
    """

    def __init__(self, url: str, *, confirm_timeout_s: float = 5.0):
        self.url = url
        self.confirm_timeout_s = confirm_timeout_s
        # Set by _ensure_open, cleared together by close. pika has no type information, so mypy sees Any in
        # them; the channel's implementation (_impl) and _flush_output, used below, are private anyway.
        self._conn: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._next_tag = 1
        self._acked: set[int] = set()
        self._nacked: set[int] = set()
        self._returned: set[str] = (
            set()
        )  # message ids the broker returned as unroutable, until their batch is confirmed
        self._ack_floor = 0

    def _ensure_open(self) -> tuple[BlockingConnection, BlockingChannel]:
        """The open connection and channel, opened (in confirm mode) if they are not."""
        if self._conn is not None and self._channel is not None and self._conn.is_open and self._channel.is_open:
            return self._conn, self._channel
        self.close()
        conn = self._conn = connect(self.url)
        channel = self._channel = conn.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        channel._impl.add_on_return_callback(self._on_return)
        ready: list[bool] = []
        channel._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: ready.append(True))
        channel._flush_output(lambda: bool(ready))
        self._next_tag, self._acked, self._nacked, self._ack_floor = 1, set(), set(), 0
        self._returned = set()
        return conn, channel

    def _on_return(
        self,
        _channel: pika.channel.Channel,
        _method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        self._returned.add(properties.message_id)

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        target = self._acked if isinstance(method, pika.spec.Basic.Ack) else self._nacked
        if method.multiple:
            target.update(
                t
                for t in range(self._ack_floor + 1, method.delivery_tag + 1)
                if t not in self._acked and t not in self._nacked
            )
        else:
            target.add(method.delivery_tag)
        while self._ack_floor + 1 in self._acked or self._ack_floor + 1 in self._nacked:
            self._ack_floor += 1

    def publish_batch(
        self,
        envelopes: list[Envelope],
        *,
        exchange: str = EXCHANGE,
        routing_key: str | None = None,
    ) -> list[Delivery]:
        """Publish all (mandatory), wait for the broker's answers; element i is what became of envelope i.

        Raises BrokerUnavailable if the connection is lost: nothing in the batch counts as confirmed.
        """
        return self.confirm(self.publish(envelopes, exchange=exchange, routing_key=routing_key))

    def publish(
        self,
        envelopes: list[Envelope],
        *,
        exchange: str = EXCHANGE,
        routing_key: str | None = None,
    ) -> Pending:
        """Publish all (mandatory) and return without waiting; :meth:`confirm` collects the broker's answers.

        Several batches may be out at once (their answers are told apart by delivery tag and message id), so a
        relay can send its next batch while the broker is still confirming the last one.
        """
        if not envelopes:
            return Pending([], [], None)
        try:
            _, channel = self._ensure_open()
            tags = []
            for env in envelopes:
                props = pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=str(env.id),
                    type=env.event_type,
                    headers=routing_headers(env),
                )
                channel._impl.basic_publish(
                    exchange, routing_key or env.event_type, env.to_json(), props, mandatory=True
                )
                tags.append(self._next_tag)
                self._next_tag += 1
            channel._flush_output()  # on the socket now; answers that already arrived are recorded on the way
            return Pending(envelopes, tags, channel)
        except (AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while publishing ({type(exc).__name__}).") from exc

    def confirm(self, pending: Pending) -> list[Delivery]:
        """Wait (up to ``confirm_timeout_s``) for the broker's answers to a published batch; element i is what
        became of its envelope i. A batch whose channel has been replaced since is unconfirmed as a whole: its
        answers will never come."""
        envelopes, tags = pending.envelopes, pending.tags
        if not tags:
            return []
        conn, channel = self._conn, pending.channel
        replaced = channel is not self._channel
        if conn is None or channel is None or replaced:
            return [Delivery.UNCONFIRMED] * len(tags)
        try:
            last = tags[-1]
            deadline = time.monotonic() + self.confirm_timeout_s
            channel._flush_output(lambda: self._ack_floor >= last or time.monotonic() > deadline)
            while self._ack_floor < last and time.monotonic() < deadline:
                conn.process_data_events(time_limit=0.05)
            returned = self._returned
            ids = [str(env.id) for env in envelopes]
            result = [
                Delivery.UNCONFIRMED
                if t not in self._acked
                else Delivery.UNROUTABLE
                if message_id in returned
                else Delivery.CONFIRMED
                for t, message_id in zip(tags, ids, strict=True)
            ]
            self._acked.difference_update(tags)
            self._nacked.difference_update(tags)
            returned.difference_update(ids)
            if self._ack_floor < last:
                # No answer in time (a connection the broker no longer serves, e.g. after a fault): start the
                # next batch on a fresh channel whose delivery tags we know, rather than wait on this one.
                log.warning(
                    "broker did not confirm %d of %d events within %.0fs; reconnecting",
                    result.count(Delivery.UNCONFIRMED),
                    len(result),
                    self.confirm_timeout_s,
                )
                self.close()
            return result
        except (AMQPError, OSError) as exc:
            self.close()
            raise BrokerUnavailable(f"lost RabbitMQ while publishing ({type(exc).__name__}).") from exc

    def forget(self, pending: Pending) -> None:
        """Drop what was recorded for a batch whose answers nobody will collect (its relay gave it up): a return
        kept for one of its message ids would otherwise mark that event unroutable when it is published again."""
        self._acked.difference_update(pending.tags)
        self._nacked.difference_update(pending.tags)
        self._returned.difference_update(str(env.id) for env in pending.envelopes)

    def close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        close_quietly(conn)


def sort_out(items: Sequence[T], outcomes: list[Delivery]) -> tuple[list[T], list[T], list[T]]:
    """``items`` (rows, envelopes, ids: one per published envelope) split by outcome: (confirmed, unroutable,
    unconfirmed)."""
    out: dict[Delivery, list[T]] = {d: [] for d in Delivery}
    for item, outcome in zip(items, outcomes, strict=True):
        out[outcome].append(item)
    return out[Delivery.CONFIRMED], out[Delivery.UNROUTABLE], out[Delivery.UNCONFIRMED]


class QueueDepth:
    """Messages waiting (ready, not yet handed to a consumer) in some queues, over one lazily opened connection.

    The saga watchdog asks before it re-drives: a backlog means events are still on their way, and re-emitting
    them would only lengthen the queue it is waiting on.
    """

    def __init__(self, url: str):
        self.url = url
        self._conn: BlockingConnection | None = None  # opened once asked

    def ready(self, queues: Iterable[str]) -> int | None:
        """The sum of ready messages, or None when the broker cannot be asked (then nobody should wait on it)."""
        for attempt in (1, 2):  # the connection may have died between two calls (heartbeat, broker restart)
            try:
                if self._conn is None or not self._conn.is_open:
                    self._conn = connect(self.url)
                channel = self._conn.channel()
                try:
                    # pika has no type information: the frames' counts are Any to mypy.
                    depth: int = sum(channel.queue_declare(q, passive=True).method.message_count for q in queues)
                    return depth
                finally:
                    if channel.is_open:
                        channel.close()
            except (AMQPError, OSError, BrokerUnavailable) as exc:
                self.close()
                if attempt == 2:
                    log.debug("queue depth unknown: %s", exc)
        return None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)


def close_quietly(conn: BlockingConnection | None) -> None:
    if conn is not None:
        try:
            if conn.is_open:
                conn.close()
        except Exception:  # closing a broken connection must not hide the original error
            pass
