"""The regression matrix: the regression notebook under every strategy × outbox mode × faults on/off.

    python -m pulse.lab.matrix --orders 200 --out build/matrix     (or scripts/run_matrix.sh)

Each cell of the matrix is one papermill run; the exit status is non-zero when any run failed or
recorded an invariant violation. A summary table is printed and written to ``<out>/summary.json``;
each run's executed notebook is ``<out>/<run>.ipynb`` and its ``pulse serve`` log ``<out>/logs/<run>/``.

The runs empty tables, purge queues and flush Redis, so by default the matrix makes its own database,
RabbitMQ vhost, Redis DB (1..15, leased like a test session's) and replication slot from the
``PULSE_*`` services, and drops them at the end; ``--shared`` uses the ``PULSE_*`` services as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

from pulse.config import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "regression" / "checkout_regression.ipynb"
FAULTS_ON = {"consumer.before_ack": 0.02, "relay.after_publish": 0.02, "consumer.lose": 0.02, "cart.after_redis": 0.02}


def matrix(orders: int) -> list[dict]:
    """Every parameter set of the full matrix."""
    return [
        {"STRATEGY": s, "OUTBOX_MODE": m, "FAULTS": FAULTS_ON if f else {}, "ORDERS": orders}
        for s, m, f in itertools.product(("optimistic", "post-payment"), ("polling", "cdc"), (False, True))
    ]


def run_one(params: dict, out: Path) -> dict:
    """One papermill run; returns its recorded results plus ``ok``/``error``."""
    import papermill

    name = f"{params['STRATEGY']}-{params['OUTBOX_MODE']}-{'faults' if params['FAULTS'] else 'clean'}"
    record = out / f"{name}.json"
    logs = out / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    os.environ["PULSE_LAB_LOG_DIR"] = str(logs)  # the kernel inherits it; the Lab writes serve logs there
    started = time.monotonic()
    try:
        papermill.execute_notebook(
            str(NOTEBOOK),
            str(out / f"{name}.ipynb"),
            kernel_name="python3",
            parameters={**params, "RECORD_PATH": str(record)},
            progress_bar=False,
            cwd=str(NOTEBOOK.parent),
        )
        results = json.loads(record.read_text())["results"]
        return {
            "run": name,
            "ok": not results["violations"],
            "violations": results["violations"],
            "outcomes": results["outcomes"],
            "restarts": results["restarts"],
            "seconds": round(time.monotonic() - started, 1),
        }
    except Exception as exc:  # a failed run is a result of the matrix, not the end of it
        return {
            "run": name,
            "ok": False,
            "error": str(exc).strip().splitlines()[-1][:300],
            "seconds": round(time.monotonic() - started, 1),
            "logs": str(logs),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulse.lab.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=200, help="orders per run (default 200)")
    parser.add_argument("--out", default="build/matrix", help="directory for executed notebooks and results")
    parser.add_argument(
        "--shared",
        action="store_true",
        help="use the PULSE_* services as they are instead of private ones (only on your own machine)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.monotonic()
    with _services(args.shared) as env:
        os.environ.update({**env, "MPLBACKEND": "Agg"})
        if env:
            print(
                f"private services: database/vhost/slot {env['PULSE_CDC_SLOT']}, Redis {env['PULSE_REDIS_URL']}",
                flush=True,
            )
        for params in matrix(args.orders):
            row = run_one(params, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    failed = [r["run"] for r in rows if not r["ok"]]
    print(
        f"{len(rows) - len(failed)}/{len(rows)} runs passed in {time.monotonic() - started:.0f}s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _services(shared: bool):
    if shared:
        return contextlib.nullcontext({})
    from pulse import config
    from pulse.lab.private import private_services

    return private_services(config.from_env())


if __name__ == "__main__":
    sys.exit(main())
