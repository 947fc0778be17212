"""Named fault points. This module is the hook every component calls; with nothing armed each call is free."""

from __future__ import annotations


class NoFaults:
    """The production registry: no fault is ever armed, no naive switch is on."""

    def point(self, name: str, **context) -> None:
        """Where a named fault may strike (crash, error, delay) when armed."""

    def fires(self, name: str) -> bool:
        """True when an armed fault of this name strikes now (for faults that change a decision)."""
        return False

    def lose_message(self, queue: str) -> bool:
        """True when the consumer should ack this message without handling it (a lost event)."""
        return False

    def naive(self, name: str) -> bool:
        return False
