"""Profile a ``pulse serve`` under load with py-spy: ``bench/profile_serve.py [--concurrency 8] [--seconds 8]``.

Writes a collapsed-stack file (flamegraph input) under bench/results/ and prints the functions that held
the GIL most (``--gil``: Python CPU time, not waiting), plus the CPU used by each component meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import measure  # noqa: E402
from bench.cpu import CpuMeter  # noqa: E402
from bench.private import Private  # noqa: E402
from pulse.tools.load import run_load  # noqa: E402


def top_functions(folded: Path, n: int = 40) -> list[tuple[float, str]]:
    """Inclusive share of samples per function in a py-spy ``raw`` (collapsed) file."""
    inclusive, total = collections.Counter(), 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in {f.split(" (")[0] + " " + f.split("(")[-1].split(":")[0] for f in stack.split(";")}:
            inclusive[frame] += int(count)
    return [(round(100 * c / total, 1), f) for f, c in inclusive.most_common(n)]


# The API's sync handlers run on worker threads, not under uvicorn's Server.run: the hot routes' on the API's own
# hop (Hop._work), the others' on anyio's (WorkerThread.run).
PARTS = (
    ("consumers", "Consumer.run "),
    ("relay", "Relay.run "),
    ("schedulers", "every "),
    ("API", "Server.run "),
    ("API", "Hop._work "),
    ("API", "WorkerThread.run "),
)


def by_part(folded: Path) -> dict[str, float]:
    """Share of samples per part of ``pulse serve`` (the thread's entry point in the stack), in %."""
    parts, total = collections.Counter(), 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        frames = [f.split(" (")[0] + " " for f in stack.split(";")]
        parts[next((name for name, marker in PARTS if any(f.endswith(marker) for f in frames)), "other")] += int(count)
    return {k: round(100 * v / total, 1) for k, v in parts.most_common()} if total else {}


def py_spy() -> str:
    """``$PY_SPY``, the project venv's, or the one on PATH (py-spy is a dev dependency; pip install py-spy)."""
    for candidate in (os.environ.get("PY_SPY"), str(ROOT / ".venv" / "bin" / "py-spy"), shutil.which("py-spy")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("py-spy not found: pip install py-spy, or point PY_SPY at it.")


def main() -> int:
    # SIGTERM (a timeout) unwinds like Ctrl-C, so the private database, vhost and Redis DB are dropped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--mix", default="adds=2,abandon=0", help="adds=1,abandon=1 profiles cart adds alone")
    ap.add_argument("--outbox-mode", default="polling", choices=("polling", "cdc"))
    ap.add_argument("--strategy", default="optimistic", choices=("optimistic", "post-payment"))
    ap.add_argument("--idle", action="store_true", help="add py-spy --idle: also threads waiting (not holding the GIL)")
    args = ap.parse_args()
    out = ROOT / "bench" / "results" / f"profile-{time.strftime('%Y%m%dT%H%M%S')}.folded"
    with Private() as p, measure.serve(p, strategy=args.strategy, outbox_mode=args.outbox_mode) as server:
        products = run_load(server.url, concurrency=4, duration_s=1.5, progress=False, track="off")["products"]
        spy = subprocess.Popen(
            [
                py_spy(),
                "record",
                "-p",
                str(server.proc.pid),
                "-d",
                str(args.seconds + 1),
                "-r",
                "100",
                *(["--idle"] if args.idle else ["--gil"]),
                "--threads",
                "--subprocesses",  # the API children (pulse serve runs the API in its own process by default)
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        with CpuMeter(measure.server_pids(server)) as cpu:
            r = run_load(
                server.url,
                concurrency=args.concurrency,
                duration_s=args.seconds,
                mix=args.mix,
                products=products,
                progress=False,
                track="off",
            )
        spy.wait(60)
    print(
        json.dumps(
            {
                "cart_adds_per_s": r["cart_adds_per_s"],
                "checkouts_per_s": r["checkouts_per_s"],
                "cpu": cpu.result(),
                "profile": str(out.relative_to(ROOT)),
                "samples_by_part_pct": by_part(out),
            },
            indent=2,
        )
    )
    for share, frame in top_functions(out):
        print(f"{share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
