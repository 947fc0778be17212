"""A simulated payment provider: seeded, reproducible, and controllable (decline rate, latency, errors)."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from decimal import Decimal

from pulse.faults import NO_FAULTS, NoFaults


class ProviderError(Exception):
    """The provider failed transiently (timeout, 5xx); the consumer retries the message."""


@dataclasses.dataclass(frozen=True)
class ChargeResult:
    approved: bool
    provider_payment_id: str


class SimulatedProvider:
    """Decides per order id, so a retried charge of the same order gets the same answer (the provider's
    own idempotency key), and a given seed replays the same declines run after run."""

    name = "simulated"

    def __init__(
        self,
        *,
        decline_rate: float = 0.0,
        latency_ms: float = 0.0,
        error_rate: float = 0.0,
        seed: int = 42,
        faults: NoFaults | None = None,
    ) -> None:
        self.decline_rate, self.latency_ms, self.error_rate = decline_rate, latency_ms, error_rate
        self.seed = seed
        self.faults = faults or NO_FAULTS
        self._errors = random.Random(seed)

    def _draw(self, order_id: str, salt: str) -> float:
        digest = hashlib.sha256(f"{self.seed}:{salt}:{order_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def charge(self, order_id: str, amount: Decimal | str) -> ChargeResult:
        """Charge ``amount`` for ``order_id``; raises ProviderError on a simulated transient failure."""
        if self.latency_ms:
            time.sleep(self.latency_ms * (0.5 + self._draw(order_id, "latency")) / 1000)
        self.faults.point("payment.latency")
        self.faults.point("payment.timeout")
        if self.error_rate and self._errors.random() < self.error_rate:
            raise ProviderError("simulated provider error")
        declined = self._draw(order_id, "decline") < self.decline_rate
        if self.faults.fires("payment.decline"):
            declined = True
        return ChargeResult(approved=not declined, provider_payment_id=f"sim_{order_id}")

    def refund(self, order_id: str, provider_payment_id: str) -> str:
        """Refund a charge; refunds of the simulator always succeed."""
        return f"re_{provider_payment_id}"
