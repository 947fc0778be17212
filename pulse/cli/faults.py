"""``pulse faults arm|disarm|list|log|catalogue``: break a running lab system on purpose, without restarting it."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from pulse import config, faults, faults_catalogue, faults_control

if TYPE_CHECKING:
    from pulse.cli import Subparsers


def _value(text: str) -> Any:
    """``--param`` values: JSON when they parse (numbers, true, lists), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _params(pairs: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise faults.UnknownFault(f"A parameter must look like key=value, got {pair!r}.")
        key, value = pair.split("=", 1)
        params[key.strip()] = _value(value.strip())
    return params


def cmd_arm(args: argparse.Namespace) -> int:
    settings = config.from_env()
    _migrate(settings)
    armed = faults_control.arm(
        settings.database_url,
        args.name,
        action=args.action,
        probability=args.probability,
        seed=args.seed,
        ttl_s=args.ttl,
        **_params(args.param),
    )
    print(json.dumps(armed))
    return 0


def cmd_disarm(args: argparse.Namespace) -> int:
    settings = config.from_env()
    if not args.all and not args.name:
        raise faults.UnknownFault("Name the fault to disarm, or pass --all.")
    _migrate(settings)
    print(json.dumps({"disarmed": faults_control.disarm(settings.database_url, None if args.all else args.name)}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    settings = config.from_env()
    _migrate(settings)
    print(json.dumps(faults_control.list_armed(settings.database_url), default=str))
    return 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    """Print the fault catalogue: every point and naive switch, what it breaks, which invariants report it."""
    print(json.dumps(faults_catalogue.as_json(), indent=2, ensure_ascii=False))
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    settings = config.from_env()
    _migrate(settings)
    print(json.dumps(faults_control.fired_counts(settings.database_url)))
    return 0


def _migrate(settings: config.Settings) -> None:
    from pulse.infra import migrate

    migrate.migrate(settings.database_url)


def register(subparsers: Subparsers) -> None:
    """Add ``pulse faults`` to the CLI."""
    p = subparsers.add_parser(
        "faults",
        help="arm, disarm and list run-time faults and naive switches",
        description="Faults live in the database (infra.faults); every process in lab mode "
        "(pulse serve --lab, PULSE_LAB=1) picks a change up within half a second, any other "
        "process ignores them. Each armed fault expires (default 15 min, --ttl). "
        "Points: "
        + ", ".join(faults.POINTS)
        + ". Naive switches (action naive): "
        + ", ".join(faults.NAIVE_SWITCHES)
        + ".",
    )
    sub = p.add_subparsers(dest="faults_command", required=True, metavar="ACTION")
    a = sub.add_parser("arm", help="arm a fault (or re-arm it with new settings)")
    a.add_argument("name", help="fault point or naive switch, e.g. cart.after_redis or no-inbox")
    a.add_argument(
        "--action",
        choices=faults.ACTIONS,
        help="crash, error, drop, delay, trigger or naive (default: the point's own)",
    )
    a.add_argument("--probability", "-p", type=float, default=1.0, help="chance per opportunity, 0..1 (default 1)")
    a.add_argument("--seed", type=int, default=0, help="seed of this fault's random draws (default 0)")
    a.add_argument(
        "--ttl",
        type=float,
        default=faults.DEFAULT_TTL_S,
        metavar="S",
        help=f"seconds until it expires by itself (default {faults.DEFAULT_TTL_S})",
    )
    a.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="ms=200 (delay), queue=payment.queue (consumer.lose), max=3 (stop after 3 strikes)",
    )
    a.set_defaults(func=cmd_arm)
    d = sub.add_parser("disarm", help="disarm one fault, or all of them")
    d.add_argument("name", nargs="?", help="the fault to disarm")
    d.add_argument("--all", action="store_true", help="disarm every fault and naive switch")
    d.set_defaults(func=cmd_disarm)
    ls = sub.add_parser(
        "list",
        help="print the armed faults as JSON, with how often each struck and the seconds each has left (ttlLeftS)",
    )
    ls.set_defaults(func=cmd_list)
    lg = sub.add_parser("log", help="print how often each fault struck (infra.fault_log) as JSON")
    lg.set_defaults(func=cmd_log)
    c = sub.add_parser(
        "catalogue",
        help="print every fault point and naive switch as JSON: name, kind, action, "
        "what it breaks, and the invariants that report it (caughtBy)",
    )
    c.set_defaults(func=cmd_catalogue)
