"""Services the lab owns: a PostgreSQL cluster and a RabbitMQ node it starts itself, so it may restart them.

The services a lab normally uses (``PULSE_*`` URLs, a classroom's, a test session's private database and vhost)
run on servers that other people, tests and students share: restarting one of them ends everybody's sessions.
The lab therefore restarts only servers it started. ``Lab(services="own")`` starts them here: a throwaway
PostgreSQL cluster (``initdb`` in a temporary directory, its own port, ``wal_level=logical`` for the CDC relay)
and a RabbitMQ node of its own (own node name, port, data directory, no plugins, so nothing of the machine's
node is touched). Redis is never restarted, so it stays on the configured server, in a Redis DB leased
like a test session's (:func:`pulse.lab.private.lease_redis_db`). Everything goes at :meth:`OwnedServices.stop`.

This needs the server binaries (Debian's ``postgresql`` and ``rabbitmq-server`` packages), not running services;
run as root, the servers run as their system users (``postgres``, ``rabbitmq``), as PostgreSQL refuses root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from pulse.tools.launcher import free_port


class OwnedServicesError(RuntimeError):
    """The lab could not start (or restart) a service of its own; the message says what is missing."""


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise OwnedServicesError(
            f"PostgreSQL's {name} is not installed, so the lab cannot run a PostgreSQL of its own."
        )
    return found


def _rabbit_bin(name: str) -> str:
    # Debian's /usr/sbin wrappers switch to the rabbitmq user and force its node name; the real scripts do not.
    for candidate in (f"/usr/lib/rabbitmq/bin/{name}", shutil.which(name)):
        if candidate and os.path.exists(candidate):
            return candidate
    raise OwnedServicesError(f"RabbitMQ's {name} is not installed, so the lab cannot run a RabbitMQ node of its own.")


class OwnedServices:
    """``start()`` gives the ``PULSE_*`` URLs of a PostgreSQL and a RabbitMQ this object started;
    :meth:`restart_broker` and :meth:`restart_database` restart them (each returns when the server answers
    again, with the moments it went down and came back); :meth:`stop` removes them."""

    def __init__(self, redis_url: str, *, tag: str | None = None):
        self.tag = tag or f"pulse_lab_{uuid.uuid4().hex[:8]}"
        self.base_redis_url = redis_url
        self.root: Path | None = None
        self.pg_port = self.amqp_port = self.dist_port = 0
        self.node = f"{self.tag}@localhost"
        self._rabbit: subprocess.Popen | None = None
        self._pg_started = False
        self._lease = None
        self.redis_url: str | None = None

    # ----- urls ---------------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/pulse"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def env(self) -> dict:
        return {
            "PULSE_DATABASE_URL": self.database_url,
            "PULSE_AMQP_URL": self.amqp_url,
            "PULSE_REDIS_URL": self.redis_url,
        }

    # ----- life cycle ---------------------------------------------------------------------------------

    def start(self) -> OwnedServices:
        from pulse.lab.private import lease_redis_db

        try:
            self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
            os.chmod(self.root, 0o755)
            self._start_postgres_cluster()
            self._start_rabbit()
            index, self._lease = lease_redis_db(self.base_redis_url, self.tag)
            self.redis_url = self.base_redis_url.rsplit("/", 1)[0] + f"/{index}"
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers and remove their data; gives the Redis DB back. Safe to call twice."""
        if self._rabbit is not None:
            self._stop_rabbit()
        if self._pg_started:
            self._pg_ctl("stop", "-m", "immediate", check=False)
            self._pg_started = False
        if self._lease is not None:
            import redis

            client = redis.Redis.from_url(self.redis_url)
            try:
                client.flushdb()
            finally:
                client.close()
            self._lease.close()
            self._lease = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ----- restarts -----------------------------------------------------------------------------------

    def restart_broker(self, down_s: float = 0.0) -> dict:
        """Stop the RabbitMQ node (every connection drops), stay down ``down_s`` more seconds, start it again;
        durable queues and persistent messages survive, unacknowledged ones are delivered again."""
        began = time.time()
        self._stop_rabbit()
        down = time.time()
        time.sleep(down_s)
        self._start_rabbit()
        return {"service": "RabbitMQ", "began": began, "down": down, "up": time.time()}

    def restart_database(self, down_s: float = 0.0) -> dict:
        """Fast shutdown of PostgreSQL (sessions end, open transactions roll back), ``down_s`` more seconds down,
        then start it again; committed rows (the outbox's among them) and the CDC slot survive."""
        began = time.time()
        self._pg_ctl("stop", "-m", "fast")
        down = time.time()
        time.sleep(down_s)
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "pg" / "pg.log"), "-o", self._pg_options())
        return {"service": "PostgreSQL", "began": began, "down": down, "up": time.time()}

    # ----- PostgreSQL ---------------------------------------------------------------------------------

    def _as(self, user: str) -> list[str]:
        """Prefix that runs a command as the service's system user when we are root (PostgreSQL refuses root)."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise OwnedServicesError(f"Running as root, but there is no {user!r} user to run its server as.") from None
        return ["runuser", "-u", user, "--"]

    def _chown(self, path: Path, user: str) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            for dirpath, _, files in os.walk(path):
                os.chown(dirpath, entry.pw_uid, entry.pw_gid)
                for name in files:
                    os.chown(os.path.join(dirpath, name), entry.pw_uid, entry.pw_gid)

    def _pg_options(self) -> str:
        # fsync off: a throwaway cluster, and a fast shutdown still writes everything out.
        return (
            f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root / 'pg'} "
            "-c wal_level=logical -c max_wal_senders=4 -c max_replication_slots=4 -c fsync=off "
            "-c max_connections=100"
        )

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        done = subprocess.run(
            [*self._as("postgres"), _pg_bin("pg_ctl"), "-D", str(self.root / "pg" / "data"), *args],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if check and done.returncode != 0:
            raise OwnedServicesError(f"pg_ctl {args[0]} failed: {(done.stderr or done.stdout).strip()[-300:]}")

    def _start_postgres_cluster(self) -> None:
        pg = self.root / "pg"
        pg.mkdir()
        self._chown(pg, "postgres")
        done = subprocess.run(
            [
                *self._as("postgres"),
                _pg_bin("initdb"),
                "-D",
                str(pg / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise OwnedServicesError(f"initdb failed: {done.stderr.strip()[-300:]}")
        self.pg_port = free_port()
        self._pg_ctl("start", "-w", "-t", "60", "-l", str(pg / "pg.log"), "-o", self._pg_options())
        self._pg_started = True

    # ----- RabbitMQ -----------------------------------------------------------------------------------

    def _rabbit_env(self) -> dict:
        user = "rabbitmq" if os.geteuid() == 0 else None
        home = pwd.getpwnam(user).pw_dir if user else os.path.expanduser("~")  # where the Erlang cookie is
        rabbit = self.root / "rabbit"
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
            "HOME": home,
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            # Its own files only: the machine's rabbitmq-env.conf names the machine's node.
            "RABBITMQ_CONF_ENV_FILE": str(rabbit / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(rabbit / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(rabbit / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(rabbit / "mnesia"),
            "RABBITMQ_LOG_BASE": str(rabbit / "log"),
            "RABBITMQ_PID_FILE": str(rabbit / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _rabbitmqctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._as("rabbitmq"), _rabbit_bin("rabbitmqctl"), "-n", self.node, *args],
            env=self._rabbit_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _start_rabbit(self) -> None:
        rabbit = self.root / "rabbit"
        if not rabbit.exists():
            rabbit.mkdir()
            self.amqp_port, self.dist_port = free_port(), free_port()
            (rabbit / "rabbitmq-env.conf").write_text("")
            # guest may log in over the loopback only by default; it is all the lab uses, so say so plainly.
            (rabbit / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\nloopback_users.guest = true\n"
            )
            (rabbit / "enabled_plugins").write_text("[].\n")
            self._chown(rabbit, "rabbitmq")
        with open(rabbit / "server.log", "ab") as log:  # the node holds its own descriptor once started
            self._rabbit = subprocess.Popen(
                [*self._as("rabbitmq"), _rabbit_bin("rabbitmq-server")],
                env=self._rabbit_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(rabbit),
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self._rabbit.poll() is not None:
                tail = (rabbit / "server.log").read_text(errors="replace")[-400:]
                raise OwnedServicesError(f"the lab's RabbitMQ node exited at start: {tail}")
            if self._rabbitmqctl("-q", "await_startup", "--timeout", "5", timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise OwnedServicesError("the lab's RabbitMQ node did not start within 90 s")

    def _stop_rabbit(self) -> None:
        process, self._rabbit = self._rabbit, None
        if process is None:
            return
        self._rabbitmqctl("-q", "stop", timeout=60)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the node would not stop: end its whole process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
