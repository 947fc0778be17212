"""Consumer supervision: a consumer thread that dies is replaced by a fresh one, and the restart is counted.

A consumer survives handler errors and broker outages on its own (see Consumer.run); what kills it is an
exception outside those paths, e.g. an armed ``consumer.before_ack`` fault with action ``error``. Without a
supervisor its queue then silently stops being consumed until the process restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Slot:
    """One consumer position: how to build its thread, the thread running now, and what earlier ones did."""

    current: threading.Thread
    make: Callable[[], threading.Thread] | None = None  # None: the dead thread's fresh_copy()
    restarts: int = 0
    last_reason: str | None = None
    handled_before: int = 0  # by the dead predecessors, so the counts survive a restart
    dead_lettered_before: int = 0
    skipped_before: int = 0

    def status(self) -> dict[str, Any]:
        c = self.current
        return {
            "queue": getattr(c, "queue", None),
            "thread": c.name,
            "alive": c.is_alive(),
            "restarts": self.restarts,
            "handled": self.handled_before + getattr(c, "handled", 0),
            "deadLettered": self.dead_lettered_before + getattr(c, "dead_lettered", 0),
            # Deliveries dropped unhandled: re-drives meant for another queue, and the other strategy's events if a
            # binding from an older topology is still in place.
            "skipped": self.skipped_before + _skipped(c),
            "lastError": self.last_reason,
        }


def _fresh_copy(consumer: threading.Thread) -> threading.Thread:
    """A new consumer with the dead one's arguments (pulse.infra.consumer.Consumer.fresh_copy)."""
    fresh: threading.Thread = consumer.fresh_copy()  # type: ignore[attr-defined]  # a Consumer, typed as a Thread
    return fresh


def _skipped(consumer: threading.Thread) -> int:
    return getattr(getattr(consumer, "dispatch", None), "skipped", 0)


class ConsumerSupervisor:
    """Starts consumers and, from :meth:`run` (one thread), restarts every one that died, once a second.

    ``threads`` (optional) is a list the caller joins on shutdown: a restarted consumer takes its
    predecessor's place there, so shutdown joins the thread that is running now.
    """

    def __init__(
        self, stop: threading.Event, *, interval_s: float = 1.0, threads: list[threading.Thread] | None = None
    ) -> None:
        self.stop, self.interval_s = stop, interval_s
        self.threads = threads if threads is not None else []
        self.slots: list[Slot] = []
        self._lock = threading.Lock()

    def add(self, consumer: threading.Thread, make: Callable[[], threading.Thread] | None = None) -> threading.Thread:
        """Start ``consumer`` (unless started) and supervise it.

        A replacement is built with ``make()``, or else the dead consumer's ``fresh_copy()`` (same arguments).
        """
        if consumer.ident is None:
            consumer.start()
        with self._lock:
            self.slots.append(Slot(current=consumer, make=make))
            self.threads.append(consumer)
        return consumer

    def check_once(self) -> int:
        """Restart every consumer thread that is no longer alive; returns how many were restarted."""
        restarted = 0
        with self._lock:
            for slot in self.slots:
                dead = slot.current
                if dead.is_alive() or self.stop.is_set():
                    continue  # a consumer that ended because we stop is not a failure
                error = getattr(dead, "last_error", None)
                reason = f"{type(error).__name__}: {error}" if error is not None else "ended without an error"
                fresh = slot.make() if slot.make is not None else _fresh_copy(dead)
                fresh.start()
                slot.handled_before += getattr(dead, "handled", 0)
                slot.dead_lettered_before += getattr(dead, "dead_lettered", 0)
                slot.skipped_before += _skipped(dead)
                slot.current, slot.last_reason = fresh, reason
                slot.restarts += 1
                try:
                    self.threads[self.threads.index(dead)] = fresh
                except ValueError:
                    self.threads.append(fresh)
                restarted += 1
                log.warning(
                    "%s died (%s); restarted it (restart %d of this consumer, %d on %s)",
                    dead.name,
                    reason,
                    slot.restarts,
                    self.restarts().get(getattr(dead, "queue", None), 0),
                    getattr(dead, "queue", "its queue"),
                )
        return restarted

    def run(self) -> None:
        """Check every ``interval_s`` until ``stop`` is set (the body of the supervisor thread)."""
        while not self.stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:  # e.g. a restart that could not start a thread: try again on the next round
                log.exception("consumer supervision failed; it runs again in %.0fs", self.interval_s)

    def restarts(self) -> dict[str | None, int]:
        """Restarts per queue since this process started (None: threads that consume no queue)."""
        counts: dict[str | None, int] = {}
        for slot in self.slots:
            queue = getattr(slot.current, "queue", None)
            counts[queue] = counts.get(queue, 0) + slot.restarts
        return counts

    def status(self) -> list[dict[str, Any]]:
        """One entry per consumer: queue, thread name, alive, restarts, handled, dead-lettered, last error."""
        with self._lock:
            return [slot.status() for slot in self.slots]
