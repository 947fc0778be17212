"""Tools built on the system and driving it from outside: the chaos campaign, the load generator, the invariant
checker, and the launcher and supervisor of ``pulse serve`` children they share with the lab.

They import the core (everything in ``pulse`` outside ``pulse.tools``, ``pulse.lab`` and ``pulse.cli``); the core
never imports them. ``tests/unit/test_layout.py`` enforces the direction.
"""
