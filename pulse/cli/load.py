"""``pulse load``: drive a running (or a freshly started) ``pulse serve`` and print the measurements as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pulse import config

if TYPE_CHECKING:
    from pulse.cli import Subparsers


def cmd_load(args: argparse.Namespace) -> int:
    """Run the load, print the JSON result; exit 1 when the server answered 5xx or connections failed."""
    from pulse.tools.load import parse_mix, run_load

    try:
        result = run_load(
            args.url or None,
            rate=args.rate,
            concurrency=args.concurrency,
            duration_s=args.duration,
            mix=parse_mix(args.mix),
            products=args.products,
            strategy=args.strategy,
            outbox_mode=args.outbox_mode,
            track=args.track,
            track_fraction=args.track_fraction,
            progress=not args.no_progress,
            seed=args.seed,
            serve_log=args.serve_log,
            client=args.client,
        )
    except ValueError as exc:
        print(f"pulse: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
    return 1 if result["server_errors"] or result["transport_errors"] else 0


def register(subparsers: Subparsers) -> None:
    """Add ``pulse load`` to the ``pulse`` command."""
    p = subparsers.add_parser(
        "load",
        help="generate checkout load over HTTP and print latency and throughput as JSON",
        description="Shoppers add items to a cart, then order, through the HTTP API: open loop at --rate sessions/s "
        "or closed loop with --concurrency shoppers. Without --url a `pulse serve` child is started "
        "(on the PULSE_* services) and stopped afterwards. Exit status 1 if any request got a 5xx "
        "or failed to connect.",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="sessions started per second, whatever the latency (open loop)")
    how.add_argument("--concurrency", type=int, help="shoppers running sessions back to back (closed loop)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    p.add_argument(
        "--strategy",
        choices=sorted(config.STRATEGIES),
        help="saga strategy of the started server; with --url, checked against the server's",
    )
    p.add_argument("--outbox-mode", choices=config.OUTBOX_MODES, help="outbox relay of the started server")
    p.add_argument(
        "--mix",
        default="adds=2,abandon=0",
        help="adds=N cart adds per session, abandon=F share of sessions that never order (default adds=2,abandon=0)",
    )
    p.add_argument(
        "--url",
        action="append",
        help="API base URL of a running server; repeat it to spread sessions over several servers",
    )
    p.add_argument("--products", type=int, default=20, help="products to create for the run (default 20)")
    p.add_argument(
        "--track",
        choices=("poll", "db", "off"),
        default="poll",
        help="measure create->COMPLETED by polling a sample of orders over HTTP, from the database "
        "(PULSE_DATABASE_URL) for every order, with the time each saga step took (completion.steps), "
        "or not at all (default poll)",
    )
    p.add_argument("--track-fraction", type=float, default=0.2, help="share of orders polled (default 0.2)")
    p.add_argument("--seed", type=int, help="random seed for product choice and abandonment")
    p.add_argument("--output", help="also write the JSON result to this file")
    p.add_argument("--serve-log", help="log file of the started server (default: discarded)")
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP client: raw (lean HTTP/1.1, default) or httpx (about 10x the client CPU per request)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_load)
