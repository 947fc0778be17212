"""Private services for one benchmark run: a database, a RabbitMQ vhost and a Redis DB index, all removed at the end.

Other people's tests and servers use the same PostgreSQL, Redis and RabbitMQ; nothing here touches the default
database, vhost ``/`` or Redis DB 0. The Redis index is leased with the same key the test suite uses.
"""

from __future__ import annotations

import shutil
import uuid
from urllib.parse import quote

import psycopg
import redis

from bench.cpu import Postgres
from pulse import config
from pulse.infra import migrate
from pulse.lab.private import LEASE_KEY, lease_redis_db, vhost


class Private:
    """``with Private() as p:`` gives ``p.settings`` and ``p.env`` (for a ``pulse serve`` child) on private services."""

    def __init__(self, base: config.Settings | None = None):
        self.base = base or config.from_env()
        self.tag = f"pulse_bench_{uuid.uuid4().hex[:8]}"
        self.databases: list[str] = []
        self.vhost = None
        self._lease_lock = None
        self.redis_db = None
        # Set by bench/suite.py when the run has a private cluster (bench/pgserver.py): which PostgreSQL processes
        # are this run's, the load generator's own role, and the statement counter.
        self.pg_cpu = Postgres()
        self.statements = None
        self.statements_reason = "no private PostgreSQL, so no pg_stat_statements (bench/run --shared-pg)"
        self._probe_url = None

    @property
    def probe_database_url(self) -> str:
        """The measured database as the load generator's role (its queries are not the server's work)."""
        return self._probe_url(self.settings.database_url) if self._probe_url else self.settings.database_url

    def __enter__(self) -> Private:
        try:
            self.redis_db = self._lease_redis()
            self.vhost = self._add_vhost(self.tag)
            amqp = self.base.amqp_url.rsplit("/", 1)[0] + "/" + quote(self.vhost, safe="")
            redis_url = self._redis_url(self.redis_db)
            self.settings = self.base.replace(
                database_url=self.database_url(self.tag),
                amqp_url=amqp,
                redis_url=redis_url,
                cdc_slot=self.tag,
                cdc_publication=f"{self.tag}_pub",
                sweep_interval_s=3600,
                reconcile_interval_s=3600,
            )
            self.databases.append(self.tag)
            migrate.migrate(self.settings.database_url)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def env(self) -> dict:
        """Environment for a ``pulse serve`` child on these services (schedulers effectively off)."""
        s = self.settings
        return {
            "PULSE_DATABASE_URL": s.database_url,
            "PULSE_REDIS_URL": s.redis_url,
            "PULSE_AMQP_URL": s.amqp_url,
            "PULSE_CDC_SLOT": s.cdc_slot,
            "PULSE_CDC_PUBLICATION": s.cdc_publication,
            "PULSE_SWEEP_INTERVAL_S": "3600",
            "PULSE_RECONCILE_INTERVAL_S": "3600",
        }

    def database_url(self, name: str) -> str:
        return psycopg.conninfo.make_conninfo(self.base.database_url, dbname=name)

    def extra_database(self, suffix: str) -> tuple[str, str]:
        """Create another empty private database (dropped at close); returns (name, url)."""
        name = f"{self.tag}_{suffix}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return name, self.database_url(name)

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def flush_redis(self) -> None:
        """Empty the private Redis DB but keep the lease on it."""
        r = redis.Redis.from_url(self._redis_url(self.redis_db))
        try:
            r.flushdb()
            r.set(LEASE_KEY, self.tag, ex=4 * 3600)
        finally:
            r.close()

    def purge_queues(self) -> None:
        """Delete the project's queues in the private vhost (leftovers of a previous run); servers re-declare them."""
        from pulse import topology
        from pulse.infra import broker

        conn = broker.connect(self.settings.amqp_url)
        try:
            channel = conn.channel()
            for queue in topology.QUEUES:
                channel.queue_delete(queue)  # idempotent in RabbitMQ: a missing queue is not an error
                channel.queue_delete(broker.dead_letter_queue(queue))
        finally:
            conn.close()

    def drop_slot(self) -> None:
        """Drop the run's replication slot, so the next cdc server creates it at the present.

        A slot left by an earlier configuration stays where that server stopped. Before the relay learnt to start
        at the present, the next cdc relay replayed all WAL written since and charged the duplicates to this
        configuration's checkouts (13.6 against 10.6 ms per checkout in one run). The relay now skips that WAL
        itself, but its slot advance still decodes it in the walsender; a fresh slot keeps even that out of the
        measurement."""
        from pulse.infra import cdc_slot

        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            if cdc_slot.slot_info(conn, self.settings.cdc_slot) is not None:
                cdc_slot.wait_released(conn, self.settings.cdc_slot)
                cdc_slot.drop(conn, self.settings.cdc_slot)

    def close(self) -> None:
        """Drop everything this run created; safe to call twice."""
        for name in list(self.databases):
            try:
                with self._admin() as conn:
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                        "WHERE slot_name LIKE %s AND NOT active",
                        (self.tag + "%",),
                    )
                self.drop_database(name)
            except psycopg.Error as exc:
                print(f"bench: could not drop database {name}: {exc}")
        if self.vhost and self.vhost != "/":
            vhost(self.vhost, create=False)
            self.vhost = None
        if self.redis_db is not None:
            r = redis.Redis.from_url(self._redis_url(self.redis_db))
            try:
                r.flushdb()
            finally:
                r.close()
            self._lease_lock.close()  # gives the DB back
            self.redis_db = None

    def _redis_url(self, index: int) -> str:
        # The URL's own /N wins over a db= argument in redis-py, so the index goes into the URL.
        return self.base.redis_url.rsplit("/", 1)[0] + f"/{index}"

    def _admin(self):
        return psycopg.connect(self.database_url("postgres"), autocommit=True, connect_timeout=5)

    def _lease_redis(self) -> int:
        index, self._lease_lock = lease_redis_db(self.base.redis_url, self.tag)
        return index

    @staticmethod
    def _add_vhost(name: str) -> str:
        if not shutil.which("rabbitmqctl"):
            raise RuntimeError("rabbitmqctl is not installed, so a private RabbitMQ vhost cannot be created.")
        vhost(name, create=True)
        return name
