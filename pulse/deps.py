"""What handlers and services are given: built once by :mod:`pulse.bootstrap`, never at import time."""

from __future__ import annotations

import dataclasses
from typing import Any

from pulse.faults import naive_on
from pulse.infra import db


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
        return naive_on(name, self.settings.naive, self.faults)

    def transaction(self):
        """A handler's transaction: a savepoint inside its consumer's batch, else a transaction of its own."""
        return db.unit(self.pool)

    def after_commit(self, fn) -> None:
        """Run a side effect outside the database (Redis) only once the handler's effects are committed."""
        db.after_commit(fn)
