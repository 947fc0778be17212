"""Keep a ``pulse serve`` running through crash faults (``pulse supervise``, the chaos campaign).

A crash fault ends the process at once (exit status 137, as after SIGKILL). Whatever launched the
server restarts it: in the lab that is the notebook's supervisor, on a terminal or in the chaos
campaign it is this wrapper. It restarts with exponential backoff (reset once a child has stayed up
for a while), forwards SIGTERM/SIGINT to the child for a clean shutdown, and counts restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import subprocess
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Exit:
    """One exit of the child: when, with which status, after how many seconds up."""

    at: float
    status: int
    uptime_s: float


class CommandSupervisor:
    """Runs ``command`` and restarts it whenever it exits on its own, until :meth:`stop`.

    ``stable_s``: a child that ran that long resets the backoff to ``backoff_s``.
    ``max_restarts``: give up after that many restarts (None: never).
    """

    def __init__(
        self,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        stable_s: float = 10.0,
        max_restarts: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self.command, self.env = command, env
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.max_restarts, self.log_path = max_restarts, log_path
        self.restarts = 0
        self.exits: list[Exit] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The log is closed here once the child has started: it holds its own descriptor.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext() as out:
            return subprocess.Popen(
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
            )

    def run(self) -> int:
        """Supervise until stopped (returns 0) or until the restart budget is spent (the last status)."""
        delay = self.backoff_s
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    break
                self.proc = self._spawn()
            started = time.monotonic()
            status = self.proc.wait()
            uptime = time.monotonic() - started
            if self._stopping.is_set():
                break
            self.exits.append(Exit(time.time(), status, round(uptime, 2)))
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                log.error("pulse serve exited with status %s; restart budget of %d spent", status, self.max_restarts)
                return status or 1
            delay = self.backoff_s if uptime >= self.stable_s else min(delay * 2, self.max_backoff_s)
            log.warning("pulse serve exited with status %s after %.1fs; restarting in %.1fs", status, uptime, delay)
            self._stopping.wait(delay)
            self.restarts += 1
        return 0

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop supervising and shut the child down cleanly (SIGTERM, then SIGKILL after ``timeout_s``)."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def summary(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "exits": [dataclasses.asdict(e) for e in self.exits]}


def serve_command(serve_args: list[str]) -> list[str]:
    """The command line of ``pulse serve`` with these arguments (a leading ``serve`` is accepted)."""
    args = list(serve_args)
    if args and args[0] == "--":
        args = args[1:]
    if args and args[0] == "serve":
        args = args[1:]
    return [sys.executable, "-m", "pulse", "serve", *args]
