"""The ``pulse`` command (also ``python -m pulse``): serve, db, reconcile, sweep, demo and lab here; the other
commands in this package's modules (relay, supervise, faults, check and chaos, load)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from pulse import config
from pulse.cli import chaos, faults, load, relay, serve_split, supervise
from pulse.errors import PulseError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pulse.bootstrap import System

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("pulse")

# Each module adds its subcommands with register(subparsers); each parser sets func(args) -> exit status.
COMMAND_MODULES = (relay, supervise, faults, chaos, load)

EPILOG = """Settings come from PULSE_* environment variables (see README): PULSE_DATABASE_URL, PULSE_REDIS_URL,
PULSE_AMQP_URL, PULSE_STRATEGY (optimistic | post-payment), PULSE_OUTBOX_MODE (cdc | polling),
PULSE_PAYMENT_DECLINE_RATE (0..1). Options given here override them."""


def _settings(args: argparse.Namespace) -> config.Settings:
    s = config.from_env()
    changes = {
        k: v
        for k, v in (("strategy", getattr(args, "strategy", None)), ("outbox_mode", getattr(args, "outbox_mode", None)))
        if v
    }
    return s.replace(**changes) if changes else s


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pulse import bootstrap
    from pulse.api.app import create_app
    from pulse.api.http import OneWriteHttpToolsProtocol

    if args.lab:
        # Through the environment, so --processes' API children and anything else this server starts are in
        # lab mode too.
        os.environ["PULSE_LAB"] = "1"
    settings = _settings(args)
    roles = set(args.role.split(","))
    if args.child_of:
        serve_split.die_with_parent(args.child_of)
    count = serve_split.api_process_count(args.processes, roles)
    if count and "api" in roles:

        def build(rest: set[str]) -> System:
            system = bootstrap.build(settings)
            _start_workers(system, rest)
            return system

        return serve_split.serve_split(args, roles, count, build)
    # An API child's parent has migrated and said what it ignores, before starting it.
    system = bootstrap.build(settings, migrate=not args.child_of, say_ignored=not args.child_of)
    _start_workers(system, roles)
    log.info(
        "pulse serve: strategy=%s outbox=%s roles=%s%s",
        settings.strategy,
        settings.outbox_mode,
        args.role,
        " lab mode (faults and naive switches obeyed)" if settings.lab else "",
    )
    try:
        if "api" in roles:
            server = uvicorn.Server(
                uvicorn.Config(
                    create_app(
                        system,
                        workers=serve_split.read_status(args.worker_status) if args.worker_status else None,
                    ),
                    host=args.host,
                    port=args.port,
                    http=OneWriteHttpToolsProtocol,
                    log_level="warning",
                    access_log=False,
                )
            )
            sockets = None
            if args.reuse_port:  # one of --processes' children: its own socket on the shared port
                import socket

                # Handed over as a socket object, not uvicorn's fd=, which takes any descriptor for a Unix
                # socket: accepted TCP connections then lose TCP_NODELAY and every answer waits ~40 ms for
                # the client's delayed ACK (measured: cart adds p50 60 ms instead of 24 ms).
                sockets = [socket.create_server((args.host, args.port), reuse_port=True, backlog=2048)]
            # uvicorn restores the previous SIGTERM handler after its graceful shutdown and raises the signal
            # again; with the default action that would kill us before the workers are closed.
            signal.signal(signal.SIGTERM, lambda *_: system.stop.set())
            server.run(sockets=sockets)  # returns after SIGINT/SIGTERM, which uvicorn turns into a graceful shutdown
        else:
            signal.signal(signal.SIGTERM, lambda *_: system.stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                system.stop.wait()
    finally:
        system.close()
    return 0


def _start_workers(system: System, roles: set[str]) -> None:
    """Start the background workers the roles ask for (``workers`` means relay, consumers and schedulers)."""
    if roles & {"workers", "relay", "consumers", "schedulers"}:
        every = "workers" in roles
        system.start_workers(
            relay=every or "relay" in roles,
            consumers=every or "consumers" in roles,
            schedulers=every or "schedulers" in roles,
        )


def cmd_db(args: argparse.Namespace) -> int:
    from pulse.infra import migrate

    settings = config.from_env()
    if args.action == "migrate":
        applied = migrate.migrate(settings.database_url, settings=settings)
        print(json.dumps({"applied": applied}))
    else:
        migrate.migrate(settings.database_url)
        print(json.dumps({"products": migrate.seed(settings.database_url, reset=args.reset), "reset": args.reset}))
    return 0


def _build_light(settings: config.Settings) -> System:
    from pulse import bootstrap

    return bootstrap.build(settings, pool_size=4)


def cmd_reconcile(args: argparse.Namespace) -> int:
    system = _build_light(config.from_env())
    try:
        print(json.dumps(system.reconciler.run_once(args.cooldown)))
    finally:
        system.close()
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pulse.cart.sweeper import sweep_once

    system = _build_light(config.from_env())
    try:
        print(json.dumps(sweep_once(system.deps)))
    finally:
        system.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pulse.lab.demo import run_demo

    return run_demo(outbox_mode=args.outbox_mode)


def cmd_lab(args: argparse.Namespace) -> int:
    """``pulse lab provision|cleanup``: a class's namespaces on shared services (pulse.lab.classroom)."""
    from pulse.lab import classroom

    admin = config.from_env()
    try:
        if args.action == "provision":
            students = [s for s in (args.students or "").replace("\n", ",").split(",") if s.strip()]
            if args.roster:
                with open(args.roster) as roster:
                    students += [line.strip() for line in roster if line.strip() and not line.startswith("#")]
            if not students:
                print("pulse: name the students with --students a,b,c or --roster FILE.", file=sys.stderr)
                return 2
            made = classroom.provision(
                admin, args.klass, students, credentials=args.credentials, replication=args.replication
            )
            for m in made:
                print(
                    json.dumps(
                        {
                            "student": m["student"],
                            "namespace": m["namespace"],
                            "redis": m["env"]["PULSE_REDIS_URL"],
                            "credentials": m["credentials"],
                        }
                    )
                )
            return 0
        found = classroom.namespaces(admin, args.klass)
        total = sum(len(v) for v in found.values())
        print(json.dumps({"class": classroom.class_name(args.klass), "dryRun": args.dry_run, **found}))
        if args.dry_run or total == 0:
            return 0
        if not args.yes:
            answer = input(f"Remove these {total} namespaces of class {classroom.class_name(args.klass)}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("pulse: nothing removed.", file=sys.stderr)
                return 1
        classroom.cleanup(admin, args.klass)
        print(json.dumps({"removed": total}))
        return 0
    except classroom.ClassroomError as exc:
        print(f"pulse: {exc}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pulse",
        description="Checkout Pulse: a checkout system built to be broken on purpose, and the lab around it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the HTTP API and every worker (the modular monolith)",
        description="Run the API (docs at /docs) with the outbox relay, the queue consumers, the "
        "cart sweeper, the reconciler and the saga watchdog. By default the API runs in a child process "
        "and the workers in this one, so they do not share one Python GIL; if either dies, the whole "
        "server stops (run it under `pulse supervise` to have it restarted). SIGTERM or Ctrl-C shuts "
        "down cleanly.",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    s.add_argument("--strategy", choices=sorted(config.STRATEGIES), help="saga strategy (default: PULSE_STRATEGY)")
    s.add_argument("--outbox-mode", choices=config.OUTBOX_MODES, help="outbox relay (default: PULSE_OUTBOX_MODE)")
    s.add_argument(
        "--role",
        default="api,workers",
        help="comma-separated parts to run: api, workers (= relay, consumers, schedulers) (default api,workers)",
    )
    s.add_argument(
        "--processes",
        type=int,
        default=None,
        metavar="N",
        help="run the API in N child processes sharing the port; the other roles stay in this process "
        "(default: 1 when this server also runs workers, else 0; 0 runs everything in this one process)",
    )
    s.add_argument(
        "--lab",
        action="store_true",
        help="lab mode: obey armed faults and naive switches (same as PULSE_LAB=1); without it they are ignored",
    )
    # Set by serve_split for its API children only.
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--child-of", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-status", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("db", help="create the database and schema, or load the seed catalogue")
    d.add_argument("action", choices=("migrate", "seed"), help="migrate: apply sql/ (idempotent); seed: the 5 products")
    d.add_argument("--reset", action="store_true", help="with seed: put the seed products' stock back to its start")
    d.set_defaults(func=cmd_db)

    r = sub.add_parser(
        "reconcile",
        help="repair Redis from PostgreSQL once and print the fixes as JSON",
        description="One reconciliation pass. A fresh process has no previous run, so the pass "
        "covers everything older than the cooldown.",
    )
    r.add_argument("--once", action="store_true", required=True, help="run one pass (the server runs it periodically)")
    r.add_argument(
        "--cooldown",
        type=float,
        default=None,
        help="seconds of recent changes to leave alone as in flight (default 10)",
    )
    r.set_defaults(func=cmd_reconcile)

    w = sub.add_parser("sweep", help="release expired carts once and print the counts as JSON")
    w.add_argument("--once", action="store_true", required=True, help="run one pass (the server runs it every 60 s)")
    w.set_defaults(func=cmd_sweep)

    m = sub.add_parser("demo", help="start the system and take checkouts through every saga path, printing outcomes")
    m.add_argument(
        "--outbox-mode",
        choices=config.OUTBOX_MODES,
        default=None,
        help="outbox relay to demonstrate (default: PULSE_OUTBOX_MODE)",
    )
    m.set_defaults(func=cmd_demo)

    lab = sub.add_parser(
        "lab",
        help="classroom mode: make or remove a class's per-student namespaces",
        description="Many students on one PostgreSQL, Redis and RabbitMQ (see README, Classroom "
        "mode). Run with an admin connection (the PULSE_* variables).",
    )
    lab_sub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    pv = lab_sub.add_parser(
        "provision",
        help="create each student's database, role, vhost, RabbitMQ user and "
        "Redis DB, and write their credentials file",
    )
    pv.add_argument("--class", dest="klass", required=True, help="the class's name (letters and digits)")
    pv.add_argument("--students", help="comma-separated user names (as JUPYTERHUB_USER or USER spell them)")
    pv.add_argument("--roster", help="a file of user names, one a line")
    pv.add_argument(
        "--credentials",
        default=None,
        help="where each student's credentials go, with {class} and {student} "
        "(default ~/.pulse/classroom/{class}/{student}.json; on a hub e.g. "
        "/home/{student}/.pulse/classroom/{class}/{student}.json)",
    )
    pv.add_argument(
        "--replication",
        action="store_true",
        help="let students' roles create replication slots (the cdc outbox mode); such a role can "
        "also stream every database's WAL, so students are no longer kept apart",
    )
    pv.set_defaults(func=cmd_lab)
    cl = lab_sub.add_parser("cleanup", help="remove a class's databases, roles, vhosts, users, slots and Redis DBs")
    cl.add_argument("--class", dest="klass", required=True, help="the class's name")
    cl.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cl.add_argument("--yes", action="store_true", help="remove without asking (for scripts)")
    cl.set_defaults(func=cmd_lab)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        status: int = args.func(args)
        return status
    except (PulseError, config.ConfigError) as exc:
        print(f"pulse: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # service unavailable and the like: one sentence, the log has the rest
        log.debug("failed", exc_info=True)
        print(f"pulse: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
