"""What handlers and services are given: built once by :mod:`pulse.bootstrap`, never at import time."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol

import redis

from pulse.config import Settings
from pulse.faults import NoFaults, naive_on
from pulse.infra import db
from pulse.infra.redis_scripts import Scripts
from pulse.payment.provider import ChargeResult


class Clock(Protocol):
    """Now, in seconds since the epoch. Domain time (cart expiry, reconciliation markers) is read through it, so a
    test can set the time instead of waiting for it; the default is the wall clock, because those instants are
    shared with other processes through Redis scores."""

    def __call__(self) -> float: ...


class TransactionFactory(Protocol):
    """Opens a handler's unit of work on ``pool`` and yields its connection (default :func:`pulse.infra.db.unit`)."""

    def __call__(self, pool: db.Pool, /) -> contextlib.AbstractContextManager[db.Conn]: ...


class PaymentProvider(Protocol):
    """What the payment module needs from a provider (:class:`pulse.payment.provider.SimulatedProvider`)."""

    name: str

    def charge(self, order_id: str, amount: Decimal | str) -> ChargeResult: ...

    def refund(self, order_id: str, provider_payment_id: str) -> str: ...


@dataclasses.dataclass
class Deps:
    settings: Settings
    pool: db.Pool
    redis: redis.Redis
    scripts: Scripts
    faults: NoFaults
    provider: PaymentProvider
    clock: Clock = time.time
    transaction_factory: TransactionFactory = db.unit

    def naive(self, name: str) -> bool:
        """True when the lab switched this pattern off (``PULSE_NAIVE`` or a fault-registry switch)."""
        return naive_on(name, self.settings.naive, self.faults)

    def transaction(self) -> contextlib.AbstractContextManager[db.Conn]:
        """A handler's transaction: a savepoint inside its consumer's batch, else a transaction of its own."""
        return self.transaction_factory(self.pool)

    def after_commit(self, fn: Callable[[], object]) -> None:
        """Run a side effect outside the database (Redis) only once the handler's effects are committed."""
        db.after_commit(fn)
