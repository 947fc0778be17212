"""Checkout Pulse: a checkout system (cart, orders, sagas, outbox, inbox, CQRS, reconciliation) built to be broken on purpose.

Nothing in this package connects to a service at import time; :func:`pulse.bootstrap.build` wires the system.
"""

__version__ = "0.1.0"
