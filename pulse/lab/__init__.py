"""The lab's Python API: launch the system, drive checkouts, break things and watch them heal.

Start with ``Lab`` (``Lab?`` in a notebook): ``lab = Lab(strategy="optimistic").start()``.
Nothing here connects to a service at import time.
"""

from pulse.lab.client import PulseClient, PulseError
from pulse.lab.lab import Lab, LabError
from pulse.lab.record import record
from pulse.seed import AIRPODS, IPHONE, KEYBOARD, KINDLE, MACBOOK

__all__ = [
    "Lab",
    "LabError",
    "PulseClient",
    "PulseError",
    "record",
    "IPHONE",
    "AIRPODS",
    "MACBOOK",
    "KINDLE",
    "KEYBOARD",
]
