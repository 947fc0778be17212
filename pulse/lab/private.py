"""Private services for a lab campaign: its own PostgreSQL database, RabbitMQ vhost, Redis DB and CDC slot.

The regression matrix empties tables, purges queues and flushes Redis between runs; on a machine where
other people (or test sessions) use the default database ``pulse``, vhost ``/`` and Redis DB 0, that would
wipe their work, and their consumers would eat the matrix's messages. :func:`private_services` gives one
campaign everything of its own and removes it afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid
from urllib.parse import quote

# Shared by the test fixtures, the benchmarks and the lab, so no two of them ever share a Redis DB.
LEASE_KEY = "pulse:test:lease"


class PrivateServicesError(RuntimeError):
    """The private services could not be set up; the message says what is missing."""


def vhost(name: str, create: bool) -> None:
    """Create (with guest permissions) or delete a RabbitMQ vhost through rabbitmqctl."""
    if create:
        for args in (["add_vhost", name], ["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]):
            done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60)
            if done.returncode != 0:
                raise PrivateServicesError(f"rabbitmqctl {args[0]} failed: {done.stderr.decode().strip()}")
    else:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


def lease_redis_db(base_url: str, token: str):
    """Lease a free Redis DB 1..15 for one test session, bench or campaign; returns ``(index, lock file)``.

    The lease is a file lock held as long as the returned file stays open, not only a key: a run that
    flushes its Redis DB (the redis.flush fault) also deletes the key, and another run would then lease,
    and flush, a DB still in use. The OS drops the lock when the process ends, however it ends. The key
    is still set for runs that only know the key. Closing the file gives the DB back.
    """
    import redis

    root = base_url.rsplit("/", 1)[0]
    for index in range(1, 16):
        # Not a with block: the open file is the lease, returned to the caller.
        lock = open(os.path.join(tempfile.gettempdir(), f"pulse-test-redis-{index}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        # The URL's own /N would win over a db= argument, so the index goes into the URL.
        client = redis.Redis.from_url(f"{root}/{index}")
        try:
            if client.set(LEASE_KEY, token, nx=True, ex=4 * 3600):
                client.flushdb()
                client.set(LEASE_KEY, token, ex=4 * 3600)
                return index, lock
        finally:
            client.close()
        lock.close()
    raise PrivateServicesError(
        "Every Redis DB 1..15 is leased by a test session or another campaign; wait for one to finish."
    )


@contextlib.contextmanager
def private_services(settings, prefix: str = "pulse_matrix"):
    """Yield the ``PULSE_*`` variables of a fresh database, vhost, Redis DB and slot; drop them all on exit."""
    import psycopg
    import redis

    if not shutil.which("rabbitmqctl"):
        raise PrivateServicesError(
            "rabbitmqctl is not on PATH, so no private vhost can be made; run with --shared on a machine of your own."
        )
    tag = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = psycopg.conninfo.make_conninfo(settings.database_url, dbname="postgres")
    redis_url, lock, made_vhost = None, None, False
    try:
        vhost(tag, create=True)
        made_vhost = True
        index, lock = lease_redis_db(settings.redis_url, tag)
        redis_url = settings.redis_url.rsplit("/", 1)[0] + f"/{index}"
        yield {
            "PULSE_DATABASE_URL": psycopg.conninfo.make_conninfo(settings.database_url, dbname=tag),
            "PULSE_AMQP_URL": settings.amqp_url.rsplit("/", 1)[0] + "/" + quote(tag, safe=""),
            "PULSE_REDIS_URL": redis_url,
            "PULSE_CDC_SLOT": tag,
            "PULSE_CDC_PUBLICATION": f"{tag}_pub",
        }
    finally:
        if made_vhost:
            vhost(tag, create=False)
        if redis_url:
            client = redis.Redis.from_url(redis_url)
            client.flushdb()
            client.close()
        if lock is not None:
            lock.close()
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active",
                (tag,),
            )
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(tag)))
