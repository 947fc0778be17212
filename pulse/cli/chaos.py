"""``pulse check`` (every invariant, pass/fail) and ``pulse chaos`` (a fault-injection campaign)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import TYPE_CHECKING

from pulse import config

if TYPE_CHECKING:
    from pulse.cli import Subparsers


def cmd_check(args: argparse.Namespace) -> int:
    from pulse.tools.check.invariants import Scope, check_all

    settings = config.from_env()
    since = dt.datetime.fromisoformat(args.since) if args.since else None
    if since is not None and since.tzinfo is None:
        since = since.astimezone()
    outcome = check_all(
        settings,
        Scope(since=since, products=args.product or None),
        reconcile=not args.no_reconcile,
        older_than_s=args.older_than,
    )
    results = outcome["results"]
    if args.json:
        print(
            json.dumps(
                {
                    "passed": all(r.passed for r in results),
                    "reconcile": outcome["reconcile"],
                    "results": [r.to_dict() for r in results],
                },
                default=str,
            )
        )
    else:
        for r in results:
            print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<24} {r.details}")
            if r.offending:
                shown = ", ".join(str(i) for i in r.offending[:10])
                print(f"      offending ({len(r.offending)}): {shown}{' ...' if len(r.offending) > 10 else ''}")
    return 0 if all(r.passed for r in results) else 1


def cmd_chaos(args: argparse.Namespace) -> int:
    from pulse.tools.chaos import Campaign

    summary = Campaign.from_args(args).run()
    print(json.dumps(summary, default=str))
    return 0 if not summary["violations"] else 1


def register(subparsers: Subparsers) -> None:
    """Add ``pulse check`` and ``pulse chaos`` to the CLI."""
    c = subparsers.add_parser(
        "check",
        help="check every invariant (stock, money, sagas, delivery, Redis)",
        description="Run once the system is quiet. Reconciles Redis first (cooldown 0) "
        "unless --no-reconcile. Exit status 1 when any invariant fails.",
    )
    c.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    c.add_argument("--since", help="only orders and events from this ISO time on (default: all)")
    c.add_argument("--product", action="append", help="only this product (repeatable; default: all)")
    c.add_argument(
        "--older-than",
        type=float,
        default=0.0,
        help="count an order as stuck only when it has been quiet this many seconds (default 0)",
    )
    c.add_argument("--no-reconcile", action="store_true", help="compare Redis with the database as it is")
    c.set_defaults(func=cmd_check)

    k = subparsers.add_parser(
        "chaos",
        help="run checkouts while injecting faults, then check every invariant",
        description="Starts pulse serve under a supervisor (or targets --url), drives "
        "checkouts over a few contended products while arming faults at random, then "
        "disarms, waits for quiescence, reconciles and checks. Prints one JSON summary; "
        "exit status 1 on any violation.",
    )
    k.add_argument("--orders", type=int, default=200, help="checkouts to attempt (default 200)")
    k.add_argument("--seed", type=int, default=1, help="seed of the campaign's random choices (default 1)")
    k.add_argument(
        "--faults",
        default=None,
        help="comma-separated fault kinds to inject (default: every kind of the chaos plan); 'none' for "
        "a run without them (the contention phase still runs)",
    )
    k.add_argument("--strategy", choices=sorted(config.STRATEGIES), help="saga strategy (default: PULSE_STRATEGY)")
    k.add_argument("--outbox-mode", choices=config.OUTBOX_MODES, help="outbox relay (default: PULSE_OUTBOX_MODE)")
    k.add_argument(
        "--url",
        help="drive this running server instead of starting one (crash faults then need that server to be supervised)",
    )
    k.add_argument("--products", type=int, default=3, help="contended products (default 3)")
    k.add_argument("--threads", type=int, default=8, help="concurrent shoppers (default 8)")
    k.add_argument("--quiesce-timeout", type=float, default=120.0, help="seconds to wait for quiescence")
    k.add_argument("--naive", default="", help="comma-separated naive switches to turn on (shows the checker's teeth)")
    k.add_argument(
        "--max-drive-s",
        type=float,
        default=None,
        help="stop starting checkouts after this many seconds (a time box for large campaigns)",
    )
    k.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    k.set_defaults(func=cmd_chaos)
