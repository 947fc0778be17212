"""Paired half-load runs of `pulse serve` with and without the role split, at one fixed rate:
``bench/split_pairs.py [--rate 70] [--seconds 15] [--pairs 3]``.

Each pair runs the default (the API in its own process) and ``--processes 0`` (everything in one process)
on the same private services, alternating which goes first, and prints each run's create→COMPLETED p50 and
p99 as a JSON line. One rate for both, unlike the full plan, where each configuration's half load is half its
own sustained rate.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import measure  # noqa: E402
from bench.private import Private  # noqa: E402
from pulse.tools.load import run_load  # noqa: E402

MODES = {"split": None, "one process": 0}  # name: --processes (None: the server's default)


def main() -> int:
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the private database, vhost and Redis DB are dropped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=70.0, help="checkouts started per second (default 70)")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each run (default 15)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of runs (default 3)")
    ap.add_argument("--outbox-mode", default="cdc", choices=("polling", "cdc"))
    args = ap.parse_args()
    with Private() as p:
        for pair in range(args.pairs):
            names = list(MODES) if pair % 2 == 0 else list(reversed(MODES))
            for name in names:
                p.purge_queues()  # no late message or WAL of the previous run reaches this one
                p.drop_slot()
                with measure.serve(p, outbox_mode=args.outbox_mode, api_processes=MODES[name]) as server:
                    warm = run_load(
                        server.url,
                        concurrency=4,
                        duration_s=1.5,
                        track="db",
                        progress=False,
                        database_url=p.probe_database_url,
                    )
                    run = run_load(
                        server.url,
                        rate=args.rate,
                        duration_s=args.seconds,
                        track="db",
                        progress=False,
                        database_url=p.probe_database_url,
                        products=warm["products"],
                        complete_timeout_s=60,
                    )
                latency = run["completion"]["latency_ms"]
                row = {"pair": pair, "mode": name, "checkouts": run["checkouts"], **latency}
                print(json.dumps({k: row[k] for k in ("pair", "mode", "checkouts", "p50", "p99")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
