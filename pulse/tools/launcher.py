"""Run ``pulse serve`` as a child process, so a crash fault never takes the caller (a kernel, a test) with it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

# Ports below this are left to well-known services.
_LOWEST_PORT = 10000


def _ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, chosen outside the kernel's ephemeral range.

    A port from that range (what binding port 0 gives) can be handed to any outgoing connection between the
    moment it is chosen and the moment a server binds it; the server's own connections to PostgreSQL, made
    while it migrates, are enough, and its bind then fails with "address already in use".
    """
    span = _ephemeral_range()
    if span and span[0] - _LOWEST_PORT >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LOWEST_PORT, span[0])
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # no range to stay out of (not Linux), or no room below it
        s.bind(("127.0.0.1", 0))
        found: int = s.getsockname()[1]
        return found


class ServeProcess:
    """One ``pulse serve`` child with its own settings; ``url`` is its API base address.

    It runs in lab mode (``PULSE_LAB=1``: it obeys faults and naive switches) unless ``lab=False`` or ``env``
    says otherwise.

    >>> with ServeProcess(strategy="post-payment") as server:
    ...     httpx.get(server.url + "/health").json()
    """

    def __init__(
        self,
        *,
        strategy: str = "optimistic",
        outbox_mode: str | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        args: tuple[str, ...] = (),
        lab: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PULSE_STRATEGY": strategy,
            "PULSE_LAB": "1" if lab else "0",
            **({"PULSE_OUTBOX_MODE": outbox_mode} if outbox_mode else {}),
            **(env or {}),
        }
        self.log_path = Path(log_path) if log_path else None
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ServeProcess:
        """Start the child and wait until its /health answers; raises RuntimeError with its log tail if not."""
        # The log is closed here once the child has started: it holds its own descriptor.
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pulse", "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pulse serve exited with status {self.proc.returncode} while starting{self._tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"pulse serve did not answer on {self.url} within {timeout_s:.0f}s{self._tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def children(self) -> list[int]:
        """The pids of the server's running child processes (its API processes, pulse.cli.serve_split)."""
        if self.proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:  # it ended between the listing and the read
                    continue
                state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
                if int(ppid) == self.proc.pid and state != "Z":
                    found.append(int(entry.name))
        return found

    def healthy(self) -> bool:
        """True when the child answers on /health right now."""
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not exited in time; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
            return ":\n" + "\n".join(lines)
        return ""

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
