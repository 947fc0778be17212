"""What handlers and services are given: built once by :mod:`pulse.bootstrap`, never at import time."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Deps:
    settings: Any
    pool: Any
    redis: Any
    scripts: Any
    faults: Any
    provider: Any = None

    def naive(self, name: str) -> bool:
        """True when the lab switched this pattern off (``PULSE_NAIVE`` or a fault-registry switch)."""
        return name in self.settings.naive or self.faults.naive(name)
