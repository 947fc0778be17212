"""The OS-level name of the calling thread, so /proc/PID/task/TID/comm (top -H, py-spy, bench/cpu.py) tells the
relay, each consumer and the API apart inside one ``pulse serve`` process. Python 3.11's threading names threads
for Python only."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15
_libc = None


def os_thread_name(name: str) -> str:
    """The name as the kernel keeps it: at most 15 bytes (the thread's comm)."""
    return name.encode()[:15].decode(errors="ignore")


def set_os_thread_name(name: str) -> None:
    """Best effort: a platform without prctl keeps the default name and loses nothing else."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(os_thread_name(name).encode()), 0, 0, 0)
    except (OSError, AttributeError):
        pass
