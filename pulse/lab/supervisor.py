"""Keep one ``pulse serve`` child alive: a crash fault kills the child, never the notebook kernel."""

from __future__ import annotations

import logging
import threading
import time

from pulse.tools.launcher import ServeProcess

log = logging.getLogger(__name__)


class ServeSupervisor:
    """Starts a :class:`ServeProcess` and restarts it (same port, same settings) whenever it dies.

    A background thread polls the child every ``poll_s``; each restart is counted and appended to
    ``events`` as ``(epoch seconds, exit status)`` so a notebook can show when the crashes happened.
    ``stop()`` ends supervision first, so a clean shutdown is never mistaken for a crash.
    """

    def __init__(self, make_process, *, poll_s: float = 0.3):
        self.make_process = make_process
        self.poll_s = poll_s
        self.process: ServeProcess | None = None
        self.restarts = 0
        self.events: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str | None:
        return self.process.url if self.process else None

    def start(self, port: int | None = None) -> ServeSupervisor:
        """Start the child, wait until it answers, then watch it."""
        with self._lock:
            self._stop.clear()
            self.process = self.make_process(port).start()
        self._thread = threading.Thread(target=self._watch, name="pulse-lab-supervisor", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                if self._stop.is_set() or self.process is None or self.process.alive():
                    continue
                status = self.process.proc.returncode if self.process.proc else None
                log.warning("pulse serve exited with status %s; restarting it", status)
                self.events.append((time.time(), status))
                self.restarts += 1
                try:
                    self.process = self.make_process(self.process.port).start()
                except RuntimeError as exc:  # the next poll tries again
                    log.error("restart failed: %s", exc)

    def wait_up(self, timeout_s: float = 60.0) -> None:
        """Block until the child is running again (after a crash, the supervisor needs a moment)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.process is not None and self.process.alive() and self.process.healthy():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"pulse serve did not come back within {timeout_s:.0f}s")

    def stop(self) -> None:
        """Stop supervising, then stop the child cleanly (SIGTERM, then SIGKILL); safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            if self.process is not None:
                self.process.stop()
