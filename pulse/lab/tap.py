"""A wire tap on the broker: sees every event the relay publishes, without taking it from any module.

The outbox row is deleted once the relay has published it, and the inbox tables keep only
``(event_id, processed_at)``, so nothing in the database says which events belonged to which order.
The tap binds its own exclusive, auto-deleted queue to ``outbox-exchange`` with ``#``: a topic exchange
copies each message to every bound queue, so the modules' queues get theirs as before.
"""

from __future__ import annotations

import logging
import threading
import time

from pulse.events import Envelope, MalformedEnvelope
from pulse.infra import broker

log = logging.getLogger(__name__)


class EventTap:
    """Records ``{eventId, eventType, orderId, brokerAt}`` for every published event (``brokerAt``: epoch s)."""

    def __init__(self, amqp_url: str, *, keep: int = 200_000):
        self.amqp_url, self.keep = amqp_url, keep
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> EventTap:
        """Start listening; returns once the tap's queue is bound, so no later event is missed."""
        self._thread = threading.Thread(target=self._run, name="pulse-lab-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            log.warning("event tap is not bound yet; timelines may miss early events")
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # broker gone: the tap is an observer, it just tries again
                log.warning("event tap lost the broker (%s); retrying", type(exc).__name__)
                self._stop.wait(1.0)

    def _consume(self):
        conn = broker.connect(self.amqp_url)
        try:
            channel = conn.channel()
            channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, broker.EXCHANGE, routing_key="#")
            self._ready.set()
            for method, _props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=0.3):
                if self._stop.is_set():
                    break
                if method is not None:
                    self._record(body)
        finally:
            if conn.is_open:
                conn.close()

    def _record(self, body: bytes):
        try:
            env = Envelope.from_json(body)
        except MalformedEnvelope:
            return
        row = {"eventId": str(env.id), "eventType": env.event_type, "orderId": env.order_id, "brokerAt": time.time()}
        with self._lock:
            self.events.append(row)
            if len(self.events) > self.keep:
                del self.events[: len(self.events) - self.keep]

    def events_for(self, order_id: str) -> list[dict]:
        """Every recorded event of one order, in arrival order."""
        with self._lock:
            return [e for e in self.events if e["orderId"] == str(order_id)]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
