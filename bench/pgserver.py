"""A private PostgreSQL cluster for one benchmark run, with ``pg_stat_statements`` preloaded.

``shared_preload_libraries`` needs a server restart, and the shared server on 5432 serves other people's tests,
so the bench starts a cluster of its own (initdb in a temporary directory, a free port) with the shared server's
settings copied, runs every section on it and removes it at the end. Its postmaster's pid also lets bench/cpu.py
charge only this cluster's processes to "postgres", not the shared server's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pulse.tools.launcher import free_port

# Copied from the shared server so the two differ only where the bench needs them to.
COPIED = (
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "autovacuum",
    "max_connections",
    "max_wal_size",
    "min_wal_size",
    "max_slot_wal_keep_size",
    "work_mem",
    "wal_buffers",
    "checkpoint_timeout",
)
PROBE_ROLE = "pulse_bench_probe"


def bin_dir() -> Path | None:
    """The directory of initdb/pg_ctl of the newest installed PostgreSQL, or None."""
    for base in sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: -int(p.parent.name) if p.parent.name.isdigit() else 0
    ):
        if (base / "initdb").exists() and (base / "pg_ctl").exists():
            return base
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable() -> str | None:
    """None when a private cluster can be started here, else why not."""
    if bin_dir() is None:
        return "initdb/pg_ctl are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
    return None


def _value(setting: str, unit: str | None) -> str:
    """A pg_settings value as a configuration line takes it (pg_settings counts buffers in 8kB pages)."""
    if not unit or setting.startswith("-"):
        return setting
    if unit == "8kB":
        return f"{int(setting) * 8}kB"
    return f"{setting}{unit}"


class PrivatePostgres:
    """``with PrivatePostgres(shared_url) as pg:`` gives ``pg.url`` (superuser ``postgres``, database ``postgres``),
    ``pg.postmaster`` (pid) and ``pg.probe_url(dbname)`` for the load generator's own role."""

    def __init__(self, shared_url: str):
        self.shared_url = shared_url
        self.dir = None
        self.postmaster = None

    def _as_owner(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        cmd = (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []) + args
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

    def _settings(self) -> dict[str, str]:
        try:
            with psycopg.connect(self.shared_url, autocommit=True, connect_timeout=5) as conn:
                rows = conn.execute(
                    "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(COPIED),)
                ).fetchall()
        except psycopg.Error:
            return {}
        return {name: _value(setting, unit) for name, setting, unit in rows}

    def __enter__(self) -> PrivatePostgres:
        bins = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="pulse_bench_pg_"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        try:
            self._as_owner(
                [
                    str(bins / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ],
                timeout=120,
            )
            self.port = free_port()
            options = {
                **self._settings(),
                "port": str(self.port),
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(self.dir),
                "wal_level": "logical",
                "max_replication_slots": "20",
                "max_wal_senders": "20",
                "shared_preload_libraries": "pg_stat_statements",
                "pg_stat_statements.track": "top",
                "pg_stat_statements.max": "5000",
            }
            with open(data / "postgresql.auto.conf", "a") as f:
                f.writelines(f"{k} = '{v}'\n" for k, v in options.items())
            self._as_owner(
                [str(bins / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"), "-w", "-t", "60", "start"],
                timeout=90,
            )
            self.postmaster = int((data / "postmaster.pid").read_text().split()[0])
            shared = conninfo_to_dict(self.shared_url)
            self.url = make_conninfo(
                self.shared_url,
                host="127.0.0.1",
                port=str(self.port),
                user="postgres",
                password=shared.get("password") or "",
                dbname="postgres",
            )
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"CREATE ROLE {PROBE_ROLE} LOGIN SUPERUSER")
        except BaseException:
            self.close()
            raise
        return self

    def probe_url(self, url: str) -> str:
        """``url`` as the probe role: what the load generator uses, so its queries are not counted as the server's."""
        return make_conninfo(url, user=PROBE_ROLE)

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            try:
                self._as_owner(
                    [str(bin_dir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=60
                )
            except (subprocess.SubprocessError, OSError) as exc:
                print(f"bench: could not stop the private PostgreSQL in {self.dir}: {exc}")
                return  # leave the directory for whoever looks at it
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


class StatementCounter:
    """Statements and rows the server (every role but the probe's) ran in one database, and the xids assigned."""

    def __init__(self, url: str):
        self.url = url  # the probe role's URL of the measured database

    def snapshot(self) -> dict:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT s.queryid, s.query, s.calls, s.rows, s.total_exec_time FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid "
                "WHERE d.datname = current_database() AND r.rolname <> %s",
                (PROBE_ROLE,),
            ).fetchall()
            xmax = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()[0]
        return {"xmax": xmax, "statements": {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}}


def per_checkout(before: dict, after: dict, checkouts: int, top: int = 40) -> dict | None:
    """Statements, explicit commits, xids and outbox rows per checkout between two snapshots.

    Statements leave out BEGIN/COMMIT/ROLLBACK but count SAVEPOINT/RELEASE (each is a round trip). Xids are the
    whole cluster's (private to the run): one per writing transaction plus one per savepoint that wrote.
    """
    if not checkouts:
        return None
    deltas = []
    for qid, (query, calls, rows, ms) in after["statements"].items():
        _, c0, r0, ms0 = before["statements"].get(qid, (query, 0, 0, 0.0))
        if calls - c0 > 0:
            deltas.append((query, calls - c0, rows - r0, ms - ms0))

    def calls_where(pred):
        return sum(c for q, c, _, _ in deltas if pred(q.strip().upper()))

    control = {"BEGIN", "COMMIT", "ROLLBACK"}
    statements = calls_where(lambda q: q.split(" ")[0].rstrip(";") not in control)
    commits = calls_where(lambda q: q.startswith("COMMIT"))
    outbox_rows = sum(r for q, _, r, _ in deltas if "INTO SHARED.OUTBOX" in " ".join(q.upper().split()))
    deltas.sort(key=lambda d: -d[1])
    return {
        "checkouts": checkouts,
        "statements_per_checkout": round(statements / checkouts, 2),
        "explicit_commits_per_checkout": round(commits / checkouts, 2),
        "xids_per_checkout": round((after["xmax"] - before["xmax"]) / checkouts, 2),
        "outbox_messages_per_checkout": round(outbox_rows / checkouts, 2),
        "exec_ms_per_checkout": round(sum(d[3] for d in deltas) / checkouts, 3),
        "top_statements": [
            {
                "per_checkout": round(c / checkouts, 2),
                "rows_per_checkout": round(r / checkouts, 2),
                "exec_ms_per_checkout": round(ms / checkouts, 3),
                "query": " ".join(q.split())[:160],
            }
            for q, c, r, ms in deltas[:top]
        ],
    }
