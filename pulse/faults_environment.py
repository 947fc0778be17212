"""The environment faults: events around the processes rather than places in their code.

A lab process's :class:`~pulse.faults.FaultRegistry` strikes them from its tick (``redis.flush``,
``broker.restart``, ``db.restart``), each on a thread of its own, and logs the strike before it acts. The
services are shared with other users of the machine, so none is ever restarted: each fault does to our own
clients what a restart would (Redis: FLUSHDB of our database; RabbitMQ: close our vhost's connections;
PostgreSQL: end our database's sessions), and refuses when the target may not be ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pulse.faults import FaultRegistry


def flush_redis(registry: FaultRegistry, params: dict[str, Any]) -> dict[str, Any]:
    """FLUSHDB on the configured Redis database only (never FLUSHALL: other databases are not ours)."""
    import redis

    if registry.redis_url is None:  # environment faults strike only in a registry given one (see tick)
        raise ValueError("this registry has no Redis URL")
    client = redis.Redis.from_url(registry.redis_url, socket_connect_timeout=3)
    try:
        keys = client.dbsize()
        client.flushdb()
    finally:
        client.close()
    return {"keysLost": keys}


def restart_broker_connections(registry: FaultRegistry, params: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a broker restart: RabbitMQ closes every connection of our virtual host.

    The broker itself is shared with other users of this machine, so it is never restarted; the
    connections of our vhost are force-closed with ``rabbitmqctl close_connection`` instead. On the
    default vhost ``/`` other programs may be connected too, so that is refused unless the fault was
    armed with ``{"allow_default_vhost": true}`` (the lab's own broker).
    """
    import subprocess
    from urllib.parse import unquote, urlparse

    vhost = unquote(urlparse(registry.amqp_url).path[1:] or "/") or "/"
    if vhost == "/" and not params.get("allow_default_vhost"):
        return {"refused": "the default vhost may be shared; arm with allow_default_vhost=true to allow"}
    # One command for the whole vhost: closing connections one rabbitmqctl call at a time took ~0.5 s each.
    # rabbitmqctl boots an Erlang VM: seconds on a quiet machine, over 30 s at a load average of 10.
    out = subprocess.run(
        ["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "pulse fault broker.restart"],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    numbers = [int(w) for w in out.split() if w.isdigit()]
    return {"vhost": vhost, "connectionsClosed": numbers[0] if numbers else out.strip()[:100]}


def restart_database_connections(registry: FaultRegistry, params: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a PostgreSQL restart: every session on our database is terminated.

    The server is shared, so it is not restarted; ``pg_terminate_backend`` ends the sessions of this
    database only (including a CDC relay's replication connection). Refused for ``postgres``.
    """
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(registry.database_url).get("dbname", "postgres")
    if name in ("postgres", "template0", "template1"):
        return {"refused": f"database {name} is not the lab's own"}
    with psycopg.connect(registry.database_url, autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    # The registry's own session was among those ended: it opens a new one when next needed.
    registry.close()
    return {"database": name, "sessionsTerminated": len(rows)}


# What each environment fault does; returns what the fault log records of it.
ENVIRONMENT_ACTIONS: dict[str, Callable[[FaultRegistry, dict[str, Any]], dict[str, Any]]] = {
    "redis.flush": flush_redis,
    "broker.restart": restart_broker_connections,
    "db.restart": restart_database_connections,
}
