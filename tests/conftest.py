"""Shared fixtures: every test session gets its own PostgreSQL database, RabbitMQ vhost and Redis DB.

Concurrent test sessions on one machine (or a developer's `pulse serve` next to CI) therefore never
consume each other's messages or reconcile each other's keys. Services are the real ones (SPEC: no
mocks of PostgreSQL, Redis or RabbitMQ in the integration tier).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from decimal import Decimal
from urllib.parse import quote

import psycopg
import pytest
import redis

from pulse import config
from pulse.lab import private


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.05, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test with ``message`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {message}")
        time.sleep(interval_s)


_LEASE_LOCKS: list = []  # open lock files, one per leased Redis DB, held until the session ends


def _lease_redis_db(base_url: str, token: str) -> int:
    try:
        index, lock = private.lease_redis_db(base_url, token)
    except private.PrivateServicesError as exc:
        pytest.exit(str(exc), returncode=3)
    _LEASE_LOCKS.append(lock)
    return index


def _vhost(name: str, create: bool) -> str:
    """Create (or delete) a private RabbitMQ vhost; without rabbitmqctl, fall back to the default vhost."""
    if not shutil.which("rabbitmqctl") or os.environ.get("PULSE_TEST_SHARED_VHOST"):
        return "/"
    private.vhost(name, create)
    return name


def _check_services(s: config.Settings):
    problems = []
    try:
        psycopg.connect(psycopg.conninfo.make_conninfo(s.database_url, dbname="postgres"), connect_timeout=3).close()
    except psycopg.Error as exc:
        problems.append(f"PostgreSQL ({exc.__class__.__name__})")
    try:
        redis.Redis.from_url(s.redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        problems.append(f"Redis ({exc.__class__.__name__})")
    try:
        from pulse.infra import broker

        broker.connect(s.amqp_url).close()
    except Exception as exc:
        problems.append(f"RabbitMQ ({exc.__class__.__name__})")
    if problems:
        pytest.exit(
            "not reachable: " + ", ".join(problems) + ". Start the services first: scripts/services.sh up", returncode=3
        )


@pytest.fixture(scope="session")
def base_settings() -> config.Settings:
    return config.from_env()


@pytest.fixture(scope="session")
def settings(base_settings):
    """Settings of this test session: private database, vhost, Redis DB and replication slot names."""
    _check_services(base_settings)
    tag = f"pulse_test_{uuid.uuid4().hex[:10]}"
    db_url = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=tag)
    vhost = _vhost(tag, create=True)
    amqp = base_settings.amqp_url.rsplit("/", 1)[0] + "/" + quote(vhost, safe="")
    redis_db = _lease_redis_db(base_settings.redis_url, tag)
    redis_url = base_settings.redis_url.rsplit("/", 1)[0] + f"/{redis_db}"
    s = base_settings.replace(
        database_url=db_url,
        amqp_url=amqp,
        redis_url=redis_url,
        cdc_slot=tag,
        cdc_publication=f"{tag}_pub",
        outbox_mode="polling",
        sweep_interval_s=3600,
        reconcile_interval_s=3600,
        relay_poll_s=0.02,
        lab=True,
    )  # the suite arms faults and naive switches: lab mode, as the SPEC says
    from pulse.infra import migrate

    migrate.migrate(s.database_url)
    migrate.seed(s.database_url)
    yield s
    _vhost(vhost, create=False) if vhost != "/" else None
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.close()
    with psycopg.connect(
        psycopg.conninfo.make_conninfo(base_settings.database_url, dbname="postgres"), autocommit=True
    ) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name LIKE %s AND NOT active",
            (tag + "%",),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')


@pytest.fixture
def make_system(settings):
    """Build systems (optionally with changed settings); all are closed after the test."""
    from pulse import bootstrap

    built = []

    def make(workers: bool = False, faults=None, **changes):
        system = bootstrap.build(
            settings.replace(**changes) if changes else settings, faults=faults, migrate=False, pool_size=10
        )
        built.append(system)
        if workers:
            system.start_workers(schedulers=False)
        return system

    yield make
    for system in built:
        system.close()


@pytest.fixture
def system(make_system):
    """A wired system without background workers: call services and handlers directly."""
    return make_system()


@pytest.fixture
def db(settings):
    """A dict-row autocommit connection to this session's database, for assertions."""
    from pulse.infra import db as pulse_db

    conn = pulse_db.connect(settings.database_url, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def rds(settings):
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def new_product(settings):
    """Create a product with a random id: ``new_product(stock=10, price='10.00')`` returns its id (str)."""
    from pulse.infra import db as pulse_db

    def make(stock: int = 10, price: str = "10.00", name: str | None = None) -> str:
        pid = str(uuid.uuid4())
        with pulse_db.connect(settings.database_url) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, %s)",
                (pid, name or f"Test product {pid[:8]}", Decimal(price)),
            )
            conn.execute(
                "INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, %s)", (pid, stock)
            )
        return pid

    return make


def serve_environment(settings) -> dict[str, str]:
    """Environment variables that point a `pulse serve` child at this session's private services (schedulers
    slowed to once an hour, so a test decides when to sweep and reconcile)."""
    return {
        "PULSE_DATABASE_URL": settings.database_url,
        "PULSE_REDIS_URL": settings.redis_url,
        "PULSE_AMQP_URL": settings.amqp_url,
        "PULSE_CDC_SLOT": settings.cdc_slot,
        "PULSE_CDC_PUBLICATION": settings.cdc_publication,
        "PULSE_OUTBOX_MODE": settings.outbox_mode,
        "PULSE_SWEEP_INTERVAL_S": "3600",
        "PULSE_RECONCILE_INTERVAL_S": "3600",
        "PULSE_RELAY_POLL_S": "0.02",
    }


@pytest.fixture
def serve_env(settings):
    """:func:`serve_environment` in lab mode: these tests arm faults."""
    return {**serve_environment(settings), "PULSE_LAB": "1"}
