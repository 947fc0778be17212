"""Same-run A/B of two source trees: ``bench/compare.py --a /path/to/old/tree --b . [--config optimistic/cdc]``.

One private PostgreSQL cluster, vhost and Redis DB; the saturation + half-load phases of bench/measure.end_to_end
alternate between a ``pulse serve`` running tree A's code and one running tree B's (``PYTHONPATH``), ``--rounds``
times, so both see the same machine load. Prints CPU ms, statements and xids per checkout. ``--config cart``
compares the cart section instead (bench/measure.cart_adds): cart adds/s and the cores each component used.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import measure  # noqa: E402
from bench.suite import services  # noqa: E402


def brief(e: dict) -> dict:
    cpu, pg = e["cpu_ms_per_checkout"] or {}, e.get("postgres_per_checkout") or {}
    top = pg.get("top_statements") or []
    return {
        "sustained_per_s": e["sustained_checkouts_per_s"],
        "half_load_p50_ms": e["p50_ms"],
        "half_load_p99_ms": e["p99_ms"],
        "cpu_ms_total": cpu.get("total"),
        "cpu_ms": cpu.get("by_component"),
        "statements": pg.get("statements_per_checkout"),
        "xids": pg.get("xids_per_checkout"),
        "commits": pg.get("explicit_commits_per_checkout"),
        # Executor time of the statements (pg_stat_statements' top list), and the heaviest five: where it went.
        "exec_ms": round(sum(t["exec_ms_per_checkout"] for t in top), 3),
        "top_exec_ms": {
            t["query"][:60]: t["exec_ms_per_checkout"]
            for t in sorted(top, key=lambda t: -t["exec_ms_per_checkout"])[:5]
        },
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def per_tree_database(p, label: str):
    """(settings, statement counter) of a new database of the run's cluster, for one tree's server."""
    import psycopg

    from bench import pgserver

    name, url = p.extra_database(label)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    settings = p.settings.replace(database_url=url, cdc_slot=name, cdc_publication=f"{name}_pub")
    counter = pgserver.StatementCounter(p._probe_url(url)) if p._probe_url else None
    return settings, counter


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="source tree A (its pulse/ is imported by A's server)")
    ap.add_argument("--b", default=str(ROOT), help="source tree B (default: this one)")
    ap.add_argument("--config", default="optimistic/cdc", help="STRATEGY/OUTBOX_MODE of the e2e phases, or cart")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--rate",
        type=float,
        help="checkouts/s of the latency phase for both trees (default: half of each tree's own saturation rate)",
    )
    ap.add_argument(
        "--db-per-tree",
        action="store_true",
        help="each tree its own database (and cdc slot) in the cluster: for trees whose migrations differ",
    )
    ap.add_argument("--log-dir", help="keep each server's log here, as <tree>-<round>.log (batch failures, warnings)")
    args = ap.parse_args()
    strategy, mode = args.config.split("/") if args.config != "cart" else (None, None)
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    out = {"a": str(Path(args.a).resolve()), "b": str(Path(args.b).resolve()), "config": args.config, "runs": []}
    with services(shared_pg=False) as p:
        real_serve = measure.serve
        # Each `pulse serve` migrates its database with its own tree's sql/ at start; a tree's schema change would
        # otherwise stay in the shared database and be measured under the other tree too.
        per_tree = {label: per_tree_database(p, label) for label in ("a", "b")} if args.db_per_tree else {}
        for r in range(args.rounds):
            for label in ("a", "b"):
                tree = out[label]

                def serve(p_, tree=tree, log_to=f"{args.log_dir}/{label}-{r}.log" if args.log_dir else None, **kw):
                    kw["extra_env"] = {**(kw.get("extra_env") or {}), "PYTHONPATH": tree}  # the other tree's code
                    kw["log"] = kw.get("log") or log_to
                    return real_serve(p_, **kw)

                measure.serve = serve
                if per_tree:
                    p.settings, p.statements = per_tree[label]
                # `python -m pulse` puts its working directory ahead of PYTHONPATH: run it from the tree itself.
                os.chdir(tree)
                try:
                    if args.config == "cart":
                        c = measure.cart_adds(p, concurrency=args.concurrency, duration_s=args.seconds)
                        run = {"cart_adds_per_s": c["cart_adds_per_s"], "cpu": c["cpu"]}
                    else:
                        e = measure.end_to_end(
                            p,
                            strategy=strategy,
                            outbox_mode=mode,
                            concurrency=args.concurrency,
                            duration_s=args.seconds,
                            half_rate=args.rate,
                        )
                        run = brief(e)
                finally:
                    measure.serve = real_serve
                    os.chdir(ROOT)
                out["runs"].append({"round": r, "tree": label, **run})
                print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
