"""Is everything the lab needs answering? One ping per service, each with a short timeout."""

from __future__ import annotations


def check(settings) -> dict[str, str]:
    """``{'PostgreSQL': 'ok' | error, 'Redis': ..., 'RabbitMQ': ...}`` for the configured URLs."""
    import psycopg
    import redis

    from pulse.infra import broker

    status = {}
    try:
        admin = psycopg.conninfo.make_conninfo(settings.database_url, dbname="postgres")
        psycopg.connect(admin, connect_timeout=3).close()
        status["PostgreSQL"] = "ok"
    except psycopg.Error as exc:
        status["PostgreSQL"] = type(exc).__name__
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3)
    try:
        client.ping()
        status["Redis"] = "ok"
    except redis.RedisError as exc:
        status["Redis"] = type(exc).__name__
    finally:
        client.close()
    try:
        broker.connect(settings.amqp_url).close()
        status["RabbitMQ"] = "ok"
    except Exception as exc:  # pika raises many unrelated types; any of them means "not reachable"
        status["RabbitMQ"] = type(exc).__name__
    return status
