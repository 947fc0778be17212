"""``pulse serve`` split across processes: the API in child processes, the workers (relay, consumers,
schedulers) in the parent, which supervises the children.

Why by default: with everything in one process, the API's request handling and the consumers' and relay's
work share one GIL. Under half load that made the create→COMPLETED p99 up to twice what it is with the API
in its own process (lower in 9 of 9 paired runs, bench/NOTES.md and bench/split_pairs.py), at no extra CPU per
checkout.

With ``--processes N`` each child binds its own socket with SO_REUSEPORT, so the kernel spreads new connections
across them; with one inherited socket instead, the first child to wake accepted nearly all of a load
generator's keep-alive connections (measured: 0.26 against 0.06 cores) and the second sat idle.

Three things the split must not lose, and how it keeps them:
- a crash is still a crash: a child that dies stops the whole server with the child's status, and the
  children die with the parent (``PR_SET_PDEATHSIG``), so a SIGKILL of the server leaves no orphan holding
  the port;
- ``/health`` still lists the consumers and what every part obeys: the parent writes its consumers' status
  and the faults its registry sees to a file a few times a second, and the children answer from it (the Lab
  waits on /health until every process has seen a fault it arms);
- "answers /health" still means "ready": the children start after the parent's workers have.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pulse.bootstrap import System

log = logging.getLogger("pulse")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
STATUS_EVERY_S = 0.25


def api_process_count(requested: int | None, roles: set[str]) -> int:
    """How many API child processes to run: as asked, or by default one when this server also runs workers
    (so they do not share a GIL with the API) and none when it runs only the API."""
    if requested is not None:
        return requested
    return 1 if "api" in roles and roles - {"api"} else 0


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies, as a crash of the whole server would."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's stop path still ends us
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect; then we were re-parented already.
    if os.getppid() != parent_pid:
        os._exit(1)


def read_status(path: str) -> Callable[[], dict[str, Any]]:
    """What the parent last wrote to ``path``: ``{"pid", "consumers", "faultsArmed"}`` (for a child's /health)."""

    def status() -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # not written yet, or the parent is gone
            return {"pid": None, "consumers": [], "faultsArmed": []}
        return found

    return status


def _write_status(system: System, path: Path) -> None:
    status = {
        "pid": os.getpid(),
        "consumers": system.consumer_status(),
        "faultsArmed": system.deps.faults.armed_names(),
    }
    spare = path.with_name(path.name + ".new")
    try:
        spare.write_text(json.dumps(status))
        os.replace(spare, path)  # atomic: a child never reads half a file
    except OSError as exc:  # a full /tmp must not stop the server; /health is only out of date meanwhile
        log.warning("could not write the workers' status for /health: %s", exc)


def status_file(directory: Path) -> Path:
    """This server's status file in ``directory``, after removing those of servers that are gone.

    A server killed outright (SIGKILL, a crash fault) cannot remove its own file; named by pid, the next server
    to start finds it and does.
    """
    for stale in directory.glob("pulse-workers-*.json*"):
        pid = stale.name.removeprefix("pulse-workers-").split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    return directory / f"pulse-workers-{os.getpid()}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exit_status(code: int) -> int:
    """A child's exit as this process's: its own status, or 128+N for signal N, as a shell would report it."""
    return code if code > 0 else 128 - code if code < 0 else 1


def serve_split(
    args: argparse.Namespace,
    roles: set[str],
    count: int,
    build: Callable[[set[str]], System | None],
) -> int:
    """Run ``count`` API children on ``args.port`` and the other roles here (``build`` starts them)."""
    rest = roles - {"api"}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children: list[subprocess.Popen[bytes]] = []
    system = None
    status = 0
    status_path = status_file(Path(tempfile.gettempdir()))
    try:
        # Workers first: a child answering /health means the whole server is ready.
        system = build(rest) if rest else None
        if system is not None:
            _write_status(system, status_path)
        command = [
            sys.executable,
            "-m",
            "pulse",
            *(["-v"] if args.verbose else []),
            "serve",
            "--role",
            "api",
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--processes",
            "0",
            "--reuse-port",
            "--child-of",
            str(os.getpid()),
            # No workers here (--role api): the children's /health speaks for themselves alone.
            *(["--worker-status", str(status_path)] if system is not None else []),
            *(["--strategy", args.strategy] if args.strategy else []),
            *(["--outbox-mode", args.outbox_mode] if args.outbox_mode else []),
        ]
        children = [subprocess.Popen(command) for _ in range(count)]
        log.info(
            "pulse serve: API in %d process%s (pid %s), roles here (pid %d): %s",
            len(children),
            "es" if len(children) > 1 else "",
            ", ".join(str(c.pid) for c in children),
            os.getpid(),
            ",".join(sorted(rest)) or "none",
        )
        while not stop.is_set():
            dead = [c for c in children if c.poll() is not None]
            if dead:  # no half-served port: a supervisor (pulse supervise, the lab) restarts the whole server
                log.error("API process %d exited with status %s; stopping", dead[0].pid, dead[0].returncode)
                status = _exit_status(dead[0].returncode)
                break
            if system is not None:
                _write_status(system, status_path)
            stop.wait(STATUS_EVERY_S)
    except KeyboardInterrupt:
        pass
    finally:
        # The API first, so requests in flight finish while the workers still run.
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if system is not None:
            system.close()
        for leftover in (status_path, status_path.with_name(status_path.name + ".new")):
            leftover.unlink(missing_ok=True)
    return status
