"""Small experiments the guided notebooks run, each returning plain numbers a notebook can chart and record.

The notebooks' ``sc`` namespace (``from pulse.lab import scenarios as sc``), gathered from the modules that
hold them by theme: :mod:`pulse.lab.experiments` (small experiments and the ``show*`` helpers),
:mod:`pulse.lab.breakit` (the break-it scenarios ``lab.demonstrate`` runs), :mod:`pulse.lab.safeguards`
(the safeguards of issue 11 §1) and :mod:`pulse.lab.restarts` (restarts mid-saga).
"""

from __future__ import annotations

from pulse.lab.breakit import (
    late_event,
    promise_window,
    reconcile_in_flight,
    redelivery,
    relay_crash,
    rush,
    triple_click,
)
from pulse.lab.experiments import (
    checkout_all,
    concurrent_adds,
    duplicate_submits,
    inbox_duplicates,
    publish_latency,
    show,
    show_bars,
    show_drift,
    show_sequence,
)
from pulse.lab.restarts import (
    restarts_mid_saga,
    show_restarts,
)
from pulse.lab.safeguards import (
    crowd,
    declined_order,
    expiring_carts,
    lab_refresh_s,
    lost_event,
    poison_message,
)

__all__ = [
    "checkout_all",
    "concurrent_adds",
    "crowd",
    "declined_order",
    "duplicate_submits",
    "expiring_carts",
    "inbox_duplicates",
    "lab_refresh_s",
    "late_event",
    "lost_event",
    "poison_message",
    "promise_window",
    "publish_latency",
    "reconcile_in_flight",
    "redelivery",
    "relay_crash",
    "restarts_mid_saga",
    "rush",
    "show",
    "show_bars",
    "show_drift",
    "show_restarts",
    "show_sequence",
    "triple_click",
]
