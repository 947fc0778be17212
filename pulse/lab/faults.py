"""The lab's side of the run-time fault registry of :mod:`pulse.faults` (arm, disarm, list while running),
called with the lab's settings, and the faults and switches the dashboard offers."""

from __future__ import annotations

from pulse import faults_catalogue, faults_control

# From the one catalogue (pulse.faults_catalogue): the points the dashboard offers a slider for, and the naive
# switches it offers a checkbox for.
KNOWN_FAULTS = tuple(e.name for e in faults_catalogue.entries("point") if e.lab)
NAIVE_SWITCHES = tuple(e.name for e in faults_catalogue.entries("naive"))
# Processes re-read the registry every 0.5 s (pulse.faults.FaultRegistry.refresh_s), plus a margin.
REFRESH_WAIT_S = 0.8


def arm(settings, name: str, probability: float = 1.0, **options) -> None:
    """Arm ``name`` with ``probability`` (and the registry's own options, such as ``action`` or ``ttl_s``).

    Only lab-mode processes obey it (the Lab starts its server and in-kernel systems with ``PULSE_LAB=1``), and it
    expires by itself after ``ttl_s`` (default 15 minutes)."""
    faults_control.arm(settings.database_url, name, probability=probability, **options)


def disarm(settings, name: str) -> None:
    faults_control.disarm(settings.database_url, name)


def disarm_all(settings) -> None:
    """Disarm every armed fault and naive switch."""
    faults_control.disarm(settings.database_url, None)


def list_armed(settings) -> list:
    return faults_control.list_armed(settings.database_url)
