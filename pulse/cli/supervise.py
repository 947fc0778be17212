"""``pulse supervise -- <serve args>``: run ``pulse serve`` and restart it whenever it crashes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from pulse.tools.supervise import CommandSupervisor, serve_command

if TYPE_CHECKING:
    from pulse.cli import Subparsers

log = logging.getLogger(__name__)


def cmd_supervise(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.lab:  # the supervised server obeys faults: that is what keeping it alive through crashes is for
        env["PULSE_LAB"] = "1"
    supervisor = CommandSupervisor(
        serve_command(args.serve_args), env=env, backoff_s=args.backoff, max_restarts=args.max_restarts
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        log.info("supervise: signal %d, stopping pulse serve", signum)
        threading.Thread(target=supervisor.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = supervisor.run()
    print(json.dumps(supervisor.summary()))
    return status


def register(subparsers: Subparsers) -> None:
    """Add ``pulse supervise`` to the CLI."""
    p = subparsers.add_parser(
        "supervise",
        help="run pulse serve and restart it whenever it crashes",
        description="Everything after -- goes to pulse serve, e.g. "
        "pulse supervise -- --port 8080. SIGTERM stops the server cleanly; the number of "
        "restarts is printed as JSON at the end.",
    )
    p.add_argument("--backoff", type=float, default=0.2, help="first restart delay in seconds, doubling (max 5)")
    p.add_argument("--max-restarts", type=int, default=None, help="give up after this many restarts")
    p.add_argument("--lab", action="store_true", help="run pulse serve in lab mode (PULSE_LAB=1): it obeys faults")
    p.add_argument("serve_args", nargs="*", help="arguments for pulse serve (after --)")
    p.set_defaults(func=cmd_supervise)
