"""Classroom mode: many students, one PostgreSQL, Redis and RabbitMQ, each student's lab in its own namespace.

A class is a name (``PULSE_CLASSROOM``, letters and digits). Each student, named after ``JUPYTERHUB_USER`` or
``USER``, gets the namespace ``pulseclass_<class>_<student>``: a database, a RabbitMQ vhost and a replication
slot of that name, and one Redis DB. The student's :class:`~pulse.lab.Lab` finds them by itself.

Two ways to run a class:

* **Provisioned** (isolated): the instructor runs ``pulse lab provision --class C --students a,b,...`` with an
  admin connection. It creates, per student, a PostgreSQL role owning only their database (``CONNECT`` revoked
  from everyone else) and a RabbitMQ user with permissions on their vhost only, and writes the student's
  credentials file. The student's Lab connects with those credentials, so one student's notebook cannot read
  or wipe another's database or queues.
* **Self-made** (no instructor step): with no credentials file, the Lab makes its namespace itself with the
  shared ``PULSE_*`` connection. Students are then kept apart by names only, not by permissions.

Redis: one **DB per student**, not a key prefix. The SPEC fixes the system's key names (``stock:{id}``,
``reserved:{id}``, ``cart:{user}``...) and every module, Lua script, reconciler scan and invariant uses them
as they are; a prefix would change that contract everywhere. Redis has 16 DBs by default (15 usable next to
DB 0): for 30 students start Redis with ``--databases 64``. A DB is claimed by the same lease key the test
sessions and campaigns honour (:data:`pulse.lab.private.LEASE_KEY`), without expiry, so nothing else takes it.
Redis has no per-DB permissions: a student who deliberately SELECTs another DB reaches it; the Lab never does.

``pulse lab cleanup --class C`` removes every namespace of a class (``--dry-run`` lists them first).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

from pulse.lab.private import LEASE_KEY

CLASS_ENV = "PULSE_CLASSROOM"
# Where a student's Lab looks for the credentials the instructor's provision wrote ({class}, {student} filled in).
CREDENTIALS_ENV = "PULSE_CLASSROOM_CREDENTIALS"
DEFAULT_CREDENTIALS = "~/.pulse/classroom/{class}/{student}.json"
PREFIX = "pulseclass"


class ClassroomError(RuntimeError):
    """Classroom mode cannot do what was asked; the message says what and what to do."""


# ----- names -----------------------------------------------------------------------------------------------


def class_name(raw: str) -> str:
    """A class name as namespaces spell it: lower-case letters and digits only (no ``_``, so one class's
    prefix never matches another's)."""
    name = re.sub(r"[^a-z0-9]", "", (raw or "").lower())
    if not name:
        raise ClassroomError(f"The class name {raw!r} has no letters or digits; use e.g. 'ws2024'.")
    return name[:16]


def student_name(env=None) -> str:
    """The student this process works for: ``JUPYTERHUB_USER``, else ``USER``, spelt for identifiers."""
    env = os.environ if env is None else env
    raw = env.get("JUPYTERHUB_USER") or env.get("USER") or ""
    name = re.sub(r"[^a-z0-9]+", "_", raw.lower()).strip("_")
    if not name:
        raise ClassroomError("Classroom mode needs the student's name: set JUPYTERHUB_USER or USER.")
    return name[:32]


def namespace(klass: str, student: str) -> str:
    """The one name of a student's database, role, vhost, RabbitMQ user and slot (at most 63 characters)."""
    return f"{PREFIX}_{class_name(klass)}_{student}"[:63]


def class_prefix(klass: str) -> str:
    return f"{PREFIX}_{class_name(klass)}_"


def credentials_path(klass: str, student: str, template: str | None = None) -> Path:
    """Where the credentials of one student are written and looked for."""
    template = template or os.environ.get(CREDENTIALS_ENV) or DEFAULT_CREDENTIALS
    return Path(os.path.expanduser(template.replace("{class}", class_name(klass)).replace("{student}", student)))


def _url_with(url: str, *, user: str | None = None, password: str | None = None, path: str | None = None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = (
        f"{quote(user, safe='')}:{quote(password or '', safe='')}@"
        if user
        else (parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else "")
    ) + host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, path if path is not None else parts.path, parts.query, ""))


def _student_env(admin, ns: str, redis_db: int, *, user=None, password=None, replication=False) -> dict:
    return {
        "PULSE_DATABASE_URL": _url_with(admin.database_url, user=user, password=password, path=f"/{ns}"),
        "PULSE_AMQP_URL": _url_with(admin.amqp_url, user=user, password=password, path="/" + quote(ns, safe="")),
        "PULSE_REDIS_URL": admin.redis_url.rsplit("/", 1)[0] + f"/{redis_db}",
        "PULSE_CDC_SLOT": ns,
        "PULSE_CDC_PUBLICATION": f"{ns}_pub",
        # Logical replication needs the REPLICATION attribute, which would also let a role stream every
        # database's WAL: provisioned students poll the outbox unless the instructor chose otherwise.
        **({} if replication or user is None else {"PULSE_OUTBOX_MODE": "polling"}),
    }


# ----- the student's side: what the Lab calls ---------------------------------------------------------------


def lab_env(env) -> dict:
    """The ``PULSE_*`` variables of this student's namespace, or ``{}`` outside classroom mode.

    With the instructor's credentials file: its connections (the student's own role and RabbitMQ user).
    Without: the namespace is made here with the shared ``PULSE_*`` connection (needs rights to create a
    database, and rabbitmqctl for the vhost); students are then apart by name only.
    """
    if not env.get(CLASS_ENV):
        return {}
    from pulse import config

    klass, student = class_name(env[CLASS_ENV]), student_name(env)
    path = credentials_path(klass, student, env.get(CREDENTIALS_ENV))
    if path.exists():
        return {**json.loads(path.read_text())["env"], CLASS_ENV: klass}
    admin = config.from_env(env)
    made = make_namespace(admin, klass, student, roles=False)
    return {**made["env"], CLASS_ENV: klass}


def store_record(database_url: str, doc: dict, student: str | None = None) -> None:
    """Keep a recorded result in the student's own database, where the class board reads it."""
    from pulse.infra import db

    with db.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS classroom")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS classroom.records (id bigserial PRIMARY KEY, notebook text, "
            "student text, recorded_at timestamptz NOT NULL DEFAULT now(), results jsonb NOT NULL)"
        )
        conn.execute(
            "INSERT INTO classroom.records (notebook, student, results) VALUES (%s, %s, %s)",
            (
                doc.get("notebook"),
                student or os.environ.get("JUPYTERHUB_USER") or os.environ.get("USER"),
                json.dumps(doc.get("results"), default=str),
            ),
        )


# ----- the instructor's side ----------------------------------------------------------------------------------


def _rabbitmqctl(*args: str, check: bool = True) -> str:
    if not shutil.which("rabbitmqctl"):
        raise ClassroomError("rabbitmqctl is not on PATH; run this where the RabbitMQ server runs.")
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, timeout=60, text=True)
    if check and done.returncode != 0:
        raise ClassroomError(f"rabbitmqctl {args[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def _admin_conn(admin):
    import psycopg

    conninfo = psycopg.conninfo.make_conninfo(admin.database_url, dbname="postgres")
    return psycopg.connect(conninfo, autocommit=True, connect_timeout=5)


def _redis_root(admin) -> str:
    return admin.redis_url.rsplit("/", 1)[0]


def _redis_databases(admin) -> int:
    import redis

    client = redis.Redis.from_url(_redis_root(admin) + "/0")
    try:
        return int(client.config_get("databases").get("databases", 16))
    except redis.RedisError:  # CONFIG may be disabled on a managed Redis: assume the default
        return 16
    finally:
        client.close()


def claim_redis_db(admin, ns: str, allowed: list[int] | None = None) -> int:
    """The Redis DB of namespace ``ns``: the one already leased to it, else a free one, leased for good."""
    import redis

    candidates = allowed or list(range(1, _redis_databases(admin)))
    free = []
    for index in candidates:
        client = redis.Redis.from_url(f"{_redis_root(admin)}/{index}", decode_responses=True)
        try:
            holder = client.get(LEASE_KEY)
            if holder == ns:
                return index
            if holder is None:
                free.append(index)
        finally:
            client.close()
    for index in free:
        client = redis.Redis.from_url(f"{_redis_root(admin)}/{index}")
        try:
            if client.set(LEASE_KEY, ns, nx=True):  # no expiry: the class keeps it until cleanup
                return index
        finally:
            client.close()
    raise ClassroomError(
        f"No free Redis DB for {ns}: Redis has {_redis_databases(admin)} databases and the others "
        "are leased; start Redis with --databases 64 (one DB per student)."
    )


def make_namespace(
    admin,
    klass: str,
    student: str,
    *,
    roles: bool = True,
    replication: bool = False,
    redis_dbs: list[int] | None = None,
) -> dict:
    """Create one student's database, vhost, Redis DB (and with ``roles``, their PostgreSQL role and RabbitMQ
    user, each reaching only their own database and vhost). Idempotent; a new password each time with roles.
    Returns ``{"student", "namespace", "env"}``: ``env`` holds the ``PULSE_*`` variables of the student's Lab."""
    from psycopg import sql

    ns = namespace(klass, student)
    user = password = None
    with _admin_conn(admin) as conn:
        if roles:
            user, password = ns, secrets.token_urlsafe(18)
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ns,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(
                sql.SQL(
                    verb
                    + " ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEDB NOCREATEROLE "
                    + ("REPLICATION" if replication else "NOREPLICATION")
                ).format(sql.Identifier(ns), sql.Literal(password))
            )
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (ns,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(ns)))
        if roles:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(ns), sql.Identifier(ns)))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(ns)))
            conn.execute(sql.SQL("GRANT ALL ON DATABASE {} TO {}").format(sql.Identifier(ns), sql.Identifier(ns)))
    if roles:
        import psycopg

        # The role owns its database, but the public schema was made by the bootstrap superuser.
        with psycopg.connect(psycopg.conninfo.make_conninfo(admin.database_url, dbname=ns), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(ns)))
    vhosts = _rabbitmqctl("list_vhosts", "name", "--no-table-headers").split()
    if ns not in vhosts:
        _rabbitmqctl("add_vhost", ns)
    admin_user = _amqp_user(admin.amqp_url)
    _rabbitmqctl("set_permissions", "-p", ns, admin_user, ".*", ".*", ".*")  # the instructor's tools still work
    if roles:
        users = [line.split("\t")[0] for line in _rabbitmqctl("list_users", "--no-table-headers").splitlines()]
        if ns in users:
            _rabbitmqctl("change_password", ns, password)
        else:
            _rabbitmqctl("add_user", ns, password)
        _rabbitmqctl("set_permissions", "-p", ns, ns, ".*", ".*", ".*")
    redis_db = claim_redis_db(admin, ns, redis_dbs)
    return {
        "student": student,
        "namespace": ns,
        "env": _student_env(admin, ns, redis_db, user=user, password=password, replication=replication),
    }


def _amqp_user(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).username or "guest")


def provision(
    admin,
    klass: str,
    students: list[str],
    *,
    credentials: str | None = None,
    replication: bool = False,
    redis_dbs: list[int] | None = None,
) -> list[dict]:
    """The instructor's command: every student's namespace with their own role and RabbitMQ user, and their
    credentials file (mode 0600) at ``credentials`` (a template with ``{class}`` and ``{student}``)."""
    made = []
    for raw in students:
        student = student_name({"USER": raw})
        done = make_namespace(admin, klass, student, roles=True, replication=replication, redis_dbs=redis_dbs)
        path = credentials_path(klass, student, credentials)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(json.dumps({"class": class_name(klass), **done}, indent=2))
        made.append({**done, "credentials": str(path)})
    return made


def namespaces(admin, klass: str) -> dict[str, list]:
    """Everything of a class that exists now: databases, roles, vhosts, RabbitMQ users, slots, Redis DBs."""
    import redis

    prefix = class_prefix(klass)
    like = prefix.replace("_", r"\_") + "%"
    with _admin_conn(admin) as conn:
        found = {
            "databases": [
                r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (like,))
            ],
            "roles": [
                r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY 1", (like,))
            ],
            "slots": [
                r[0]
                for r in conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s ORDER BY 1", (like,)
                )
            ],
        }
    found["vhosts"] = sorted(
        v for v in _rabbitmqctl("list_vhosts", "name", "--no-table-headers").split() if v.startswith(prefix)
    )
    found["users"] = sorted(
        u
        for u in (line.split("\t")[0] for line in _rabbitmqctl("list_users", "--no-table-headers").splitlines())
        if u.startswith(prefix)
    )
    found["redis_dbs"] = []
    for index in range(1, _redis_databases(admin)):
        client = redis.Redis.from_url(f"{_redis_root(admin)}/{index}", decode_responses=True)
        try:
            if (client.get(LEASE_KEY) or "").startswith(prefix):
                found["redis_dbs"].append(index)
        finally:
            client.close()
    return found


def cleanup(admin, klass: str, *, dry_run: bool = False) -> dict[str, list]:
    """Remove every namespace of a class (see :func:`namespaces`); with ``dry_run`` only say what would go."""
    import redis
    from psycopg import sql

    found = namespaces(admin, klass)
    if dry_run:
        return found
    with _admin_conn(admin) as conn:
        for slot in found["slots"]:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s AND active",
                (slot,),
            )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        for name in found["databases"]:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        for name in found["roles"]:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    for name in found["vhosts"]:
        _rabbitmqctl("delete_vhost", name, check=False)
    for name in found["users"]:
        _rabbitmqctl("delete_user", name, check=False)
    for index in found["redis_dbs"]:
        client = redis.Redis.from_url(f"{_redis_root(admin)}/{index}")
        try:
            client.flushdb()  # also drops the lease: the DB is free again
        finally:
            client.close()
    return found


def results(admin, klass: str):
    """Every student's recorded results (``classroom.records`` of each database of the class), read with the
    admin connection, as a DataFrame: student, notebook, exercise, reference, recorded_at, results."""
    import pandas as pd
    import psycopg
    from psycopg.rows import dict_row

    rows = []
    for name in namespaces_databases(admin, klass):
        url = psycopg.conninfo.make_conninfo(admin.database_url, dbname=name)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=5) as conn:
            if conn.execute("SELECT to_regclass('classroom.records') AS t").fetchone()["t"] is None:
                rows.append({"student": name[len(class_prefix(klass)) :], "notebook": None})
                continue
            for r in conn.execute("SELECT notebook, student, recorded_at, results FROM classroom.records ORDER BY id"):
                res = r["results"] or {}
                rows.append(
                    {
                        "student": name[len(class_prefix(klass)) :],
                        "notebook": r["notebook"],
                        "exercise": res.get("exercise"),
                        "reference": bool(res.get("reference")),
                        "recorded_at": r["recorded_at"],
                        "results": res,
                    }
                )
    return pd.DataFrame(rows, columns=["student", "notebook", "exercise", "reference", "recorded_at", "results"])


def namespaces_databases(admin, klass: str) -> list[str]:
    """The class's student databases."""
    like = class_prefix(klass).replace("_", r"\_") + "%"
    with _admin_conn(admin) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (like,))]


EXERCISES = ("reserve_stock", "inbox", "compensation", "delta_query")


def board_table(records):
    """One row per student, one column per exercise: ``passed`` (own code), ``reference`` (the instructor's
    solution was used), or empty. Only passes are recorded: a failing check stops before the record cell."""
    import pandas as pd

    students = sorted(set(records["student"]))
    table = pd.DataFrame("", index=pd.Index(students, name="student"), columns=list(EXERCISES))
    for r in records.dropna(subset=["exercise"]).itertuples():
        if r.exercise in table.columns and table.at[r.student, r.exercise] != "passed":
            table.at[r.student, r.exercise] = "reference" if r.reference else "passed"
    table["passed"] = (table[list(EXERCISES)] == "passed").sum(axis=1)
    return table


def board_chart(table, ax=None):
    """Bar chart: how many students passed each exercise with their own code (and with the reference)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    own = [(table[e] == "passed").sum() for e in EXERCISES]
    ref = [(table[e] == "reference").sum() for e in EXERCISES]
    ax.bar(EXERCISES, own, color="#2a9d8f", label="own code")
    ax.bar(EXERCISES, ref, bottom=own, color="#cccccc", label="reference solution")
    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(0, max(1, len(table)))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"students (of {len(table)})")
    ax.set_title("Workshop checks passed")
    ax.legend(loc="upper right", fontsize=8)
    return ax
