"""Arming and reading faults from outside the processes that obey them: the ``pulse faults`` command, the lab
and the chaos campaign.

:func:`arm` writes a row of ``infra.faults`` (every lab process's :class:`~pulse.faults.FaultRegistry` reads
it within half a second), :func:`disarm` deletes it, :func:`list_armed` and :func:`fired_counts` read the
armed faults and the strike log (``infra.fault_log``).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pulse.faults import ACTIONS, DEFAULT_TTL_S, NAIVE_SWITCHES, POINTS, UNEXPIRED, UnknownFault, connect
from pulse.infra.db import one


def arm(
    database_url: str,
    name: str,
    action: str | None = None,
    probability: float = 1.0,
    seed: int = 0,
    ttl_s: float = DEFAULT_TTL_S,
    **params: Any,
) -> dict[str, Any]:
    """Arm (or re-arm) fault ``name`` for ``ttl_s`` seconds; lab processes pick it up within half a second.

    ``action`` defaults to the point's natural one (see ``POINTS``); a naive switch's action is ``naive``.
    ``params``: ``ms`` for delay, ``queue`` for consumer.lose, ``max`` to stop after that many strikes.
    """
    action = action or (POINTS.get(name) if name in POINTS else "naive" if name in NAIVE_SWITCHES else None)
    if action not in ACTIONS:
        raise UnknownFault(
            f"Unknown fault {name!r}: name one of {', '.join(list(POINTS) + list(NAIVE_SWITCHES))}, "
            f"or give an action ({', '.join(ACTIONS)})."
        )
    if not 0.0 <= float(probability) <= 1.0:
        raise UnknownFault(f"The probability of {name} must be between 0 and 1, got {probability}.")
    if not float(ttl_s) > 0:
        raise UnknownFault(f"The time to live of {name} must be more than 0 seconds, got {ttl_s}.")
    with connect(database_url) as conn:
        # Expired rows are dead weight (every reader ignores them); arming is a good moment to drop them.
        conn.execute("DELETE FROM infra.faults WHERE NOT " + UNEXPIRED)
        armed_at, expires_at = one(  # an upsert without a WHERE: it returns its row
            conn.execute(
                "INSERT INTO infra.faults (name, action, probability, params, seed, expires_at) "
                "VALUES (%s, %s, %s, %s::jsonb, %s, clock_timestamp() + make_interval(secs => %s)) "
                "ON CONFLICT (name) DO UPDATE SET action = EXCLUDED.action, probability = EXCLUDED.probability, "
                "params = EXCLUDED.params, seed = EXCLUDED.seed, armed_at = clock_timestamp(), "
                "expires_at = EXCLUDED.expires_at RETURNING armed_at, expires_at",
                (name, action, float(probability), json.dumps(params), int(seed), float(ttl_s)),
            )
        )
    return {
        "name": name,
        "action": action,
        "probability": float(probability),
        "params": params,
        "seed": int(seed),
        "armedAt": armed_at.isoformat(),
        "expiresAt": expires_at.isoformat(),
    }


def disarm(database_url: str, name: str | None = None) -> int:
    """Disarm fault ``name`` (every fault when ``name`` is None); returns how many were disarmed."""
    with connect(database_url) as conn:
        if name is None:
            return conn.execute("DELETE FROM infra.faults").rowcount
        return conn.execute("DELETE FROM infra.faults WHERE name = %s", (name,)).rowcount


def list_armed(database_url: str) -> list[dict[str, Any]]:
    """The armed faults that have not expired, each with how often it struck since it was armed and the
    seconds it has left (``ttlLeftS``)."""
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT f.name, f.action, f.probability, f.params, f.seed, f.armed_at, "
            "(SELECT count(*) FROM infra.fault_log l WHERE l.name = f.name AND l.fired_at >= f.armed_at) AS fired, "
            "f.expires_at, extract(epoch FROM f.expires_at - clock_timestamp()) AS left_s "
            f"FROM infra.faults f WHERE f.{UNEXPIRED} ORDER BY f.name"
        ).fetchall()
    return [
        {
            "name": r[0],
            "action": r[1],
            "probability": r[2],
            "params": r[3],
            "seed": r[4],
            "armedAt": r[5].isoformat(),
            "fired": r[6],
            "expiresAt": r[7].isoformat(),
            "ttlLeftS": round(float(r[8]), 1),
        }
        for r in rows
    ]


def fired_counts(database_url: str, since: dt.datetime | None = None) -> dict[str, int]:
    """How many times each fault struck (since ``since``, a datetime, when given), from ``infra.fault_log``."""
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT name, count(*) FROM infra.fault_log WHERE fired_at >= COALESCE(%s::timestamptz, '-infinity') "
            "GROUP BY name ORDER BY name",
            (since,),
        ).fetchall()
    return {name: n for name, n in rows}
