"""The lab's side of the run-time fault registry of :mod:`pulse.faults` (arm, disarm, list while running).

The registry belongs to the faults module; this adapter only finds it and says plainly when the
checkout does not have it, so a notebook cell fails with a sentence instead of an AttributeError.
"""

from __future__ import annotations

import importlib
import inspect

from pulse import faults_catalogue

# From the one catalogue (pulse.faults_catalogue): the points the dashboard offers a slider for, and the naive
# switches it offers a checkbox for.
KNOWN_FAULTS = tuple(e.name for e in faults_catalogue.entries("point") if e.lab)
NAIVE_SWITCHES = tuple(e.name for e in faults_catalogue.entries("naive"))
# Processes re-read the registry every 0.5 s (pulse.faults.FaultRegistry.refresh_s), plus a margin.
REFRESH_WAIT_S = 0.8


class FaultsUnavailable(RuntimeError):
    """This checkout has no run-time fault registry."""


def registry():
    """The ``pulse.faults`` module if it offers ``arm``/``disarm``/``list_armed``, else None."""
    module = importlib.import_module("pulse.faults")
    if all(hasattr(module, name) for name in ("arm", "disarm", "list_armed")):
        return module
    return None


def _require():
    module = registry()
    if module is None:
        raise FaultsUnavailable("This checkout has no run-time fault registry (pulse.faults.arm); "
                                "faults cannot be armed yet.")
    return module


def _call(function, settings, *args, **kwargs):
    """Call a registry function with the database URL, whether it wants a URL, settings, or neither."""
    params = list(inspect.signature(function).parameters)
    first = params[0] if params else ""
    if first in ("url", "database_url", "dsn"):
        return function(settings.database_url, *args, **kwargs)
    if first == "settings":
        return function(settings, *args, **kwargs)
    return function(*args, **kwargs)


def arm(settings, name: str, probability: float = 1.0, **options) -> None:
    """Arm ``name`` with ``probability`` (and the registry's own options, such as ``action`` or ``ttl_s``).

    Only lab-mode processes obey it (the Lab starts its server and in-kernel systems with ``PULSE_LAB=1``), and it
    expires by itself after ``ttl_s`` (default 15 minutes)."""
    _call(_require().arm, settings, name, probability=probability, **options)


def disarm(settings, name: str) -> None:
    _call(_require().disarm, settings, name)


def disarm_all(settings) -> None:
    """Disarm every armed fault (nothing to do without a registry)."""
    if registry() is None:
        return
    for fault in list_armed(settings):
        disarm(settings, fault["name"] if isinstance(fault, dict) else getattr(fault, "name", fault))


def list_armed(settings) -> list:
    module = registry()
    return [] if module is None else list(_call(module.list_armed, settings))
