"""``pulse supervise -- <serve args>``: run ``pulse serve`` and restart it whenever it crashes."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

from pulse.tools.supervise import CommandSupervisor, serve_command

log = logging.getLogger(__name__)


def cmd_supervise(args) -> int:
    env = dict(os.environ)
    if args.lab:  # the supervised server obeys faults: that is what keeping it alive through crashes is for
        env["PULSE_LAB"] = "1"
    supervisor = CommandSupervisor(
        serve_command(args.serve_args), env=env, backoff_s=args.backoff, max_restarts=args.max_restarts
    )

    def forward(signum, _frame):
        log.info("supervise: signal %d, stopping pulse serve", signum)
        threading.Thread(target=supervisor.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = supervisor.run()
    print(json.dumps(supervisor.summary()))
    return status


def register(subparsers) -> None:
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
