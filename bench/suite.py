"""``bench/run [--quick] [--only NAME,...]``: every performance figure of the project next to a limit measured in
the same run on the same machine, so a busy day moves both and the ratio still says something.

Sections (all by default, in this order; ``--only`` picks some):
  cart       PUT /api/cart adds/s (1 and 2 API processes) against pgbench -N at equal concurrency
  redis      CartService.reserve/s against redis-benchmark EVALSHA of the same script
  relay      outbox relay events/s against raw unconfirmed publishes; polling and cdc p99 at 1,000 events/s
  e2e        checkouts/s at saturation, then create->COMPLETED p50/p99 at half that rate, for both strategies
             and both relays; CPU ms, statements, transactions and messages per checkout, per component
  reconcile  delta reconciliation against a full scan, 10k/100k/1M products
  scaling    1 against 2 `pulse serve` processes

Plans: the default (full) plan runs 15 s phases and takes about 8 minutes; ``--quick`` runs 4 s phases in under 5
minutes, enough to see a change but too short to quote a p99 from. The run uses private services: its own
PostgreSQL cluster with pg_stat_statements (bench/pgserver.py), a vhost and a Redis DB; nothing shared is flushed.

Results go to ``bench/results/<timestamp>.json`` and ``bench/results/latest.json``; BENCHMARKS.md gets the tables,
``goals`` and ``goals_13`` say which limits were met. A measurement that cannot run leaves its keys null with the
reason in ``<key>_reason``; nothing is made up. Compare two source trees in one run with bench/compare.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The imports below need the project root on sys.path first.
from bench import measure, pgserver  # noqa: E402
from bench.cpu import Postgres  # noqa: E402
from bench.private import Private  # noqa: E402
from pulse import config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HEADLINE = (
    "cart_adds_per_s",
    "pgbench_tps",
    "e2e_checkouts_per_s",
    "e2e_p99_ms",
    "relay_events_per_s",
    "cdc_p99_ms",
    "reconcile_ms_1m_catalog",
    "full_scan_ms_1m_catalog",
)

PLANS = {  # quick: under 5 minutes on the 2-core box; full: longer runs, the catalogue sizes of the issue
    "quick": {
        "duration_s": 4,
        "concurrency": 8,
        "e2e_concurrency": 16,
        "relay_events": 20_000,
        "latency_s": 4,
        "redis_requests": 50_000,
        "sizes": [10_000, 100_000, 1_000_000],
    },
    "full": {
        "duration_s": 15,
        "concurrency": 8,
        "e2e_concurrency": 16,
        "relay_events": 100_000,
        "latency_s": 10,
        "redis_requests": 200_000,
        "sizes": [10_000, 100_000, 1_000_000],
    },
}
SECTIONS = ("cart", "redis", "relay", "e2e", "reconcile", "scaling")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_section(name: str, results: dict, fn) -> None:
    """Run one section; a failure is recorded with its reason and the suite goes on."""
    log(f"{name} ...")
    started = time.perf_counter()
    try:
        results["sections"][name] = fn()
    except Exception as exc:  # one broken measurement must not lose the others
        results["sections"][name] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=5),
        }
        log(f"{name} failed: {exc}")
    results["sections"][name]["section_s"] = round(time.perf_counter() - started, 1)
    results["sections"][name]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    log(f"{name} done in {results['sections'][name]['section_s']}s")


@contextlib.contextmanager
def services(shared_pg: bool):
    """Private services for the run: a private PostgreSQL cluster with pg_stat_statements when one can be started
    (bench/pgserver.py), else a private database on the shared server (then no statement counts)."""
    base = config.from_env()
    reason = "--shared-pg was given" if shared_pg else pgserver.unavailable()
    with contextlib.ExitStack() as stack:
        cluster = None
        if reason is None:
            cluster = stack.enter_context(pgserver.PrivatePostgres(base.database_url))
            base = base.replace(database_url=cluster.url)
        p = stack.enter_context(Private(base))
        p.postgres = {
            "private_cluster": cluster is not None,
            "reason": reason,
            "port": cluster.port if cluster else None,
        }
        if cluster is not None:
            import psycopg

            with psycopg.connect(p.settings.database_url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            p.pg_cpu = Postgres(cluster.postmaster, pgserver.PROBE_ROLE)
            p._probe_url = cluster.probe_url
            p.statements = pgserver.StatementCounter(cluster.probe_url(p.settings.database_url))
            p.statements_reason = None
        else:
            p.statements_reason = f"no private PostgreSQL ({reason}), so no pg_stat_statements"
        yield p


def run(plan_name: str, only: set[str], shared_pg: bool = False) -> dict:
    plan = PLANS[plan_name]
    d, c = plan["duration_s"], plan["concurrency"]
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    serve_log = str(logs / "serve.log")
    results = {
        "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "plan": plan_name,
        "params": plan,
        "machine": machine(),
        "sections": {},
    }
    with services(shared_pg) as p:
        results["private"] = {"database": p.tag, "vhost": p.vhost, "redis_db": p.redis_db, "postgres": p.postgres}
        sections = {
            "cart": lambda: {
                "pgbench": measure.pgbench_tps(p, concurrency=c, duration_s=d),
                "api": measure.cart_adds(p, concurrency=c, duration_s=d, log=serve_log),
                "api_2_processes": measure.cart_adds(p, concurrency=c, duration_s=d, log=serve_log, api_processes=2),
            },
            "redis": lambda: measure.reservations(p, concurrency=4, duration_s=d, requests=plan["redis_requests"]),
            "relay": lambda: relay_section(p, plan),
            "e2e": lambda: (
                {
                    f"{s}/{m}": measure.end_to_end(
                        p, strategy=s, outbox_mode=m, concurrency=plan["e2e_concurrency"], duration_s=d, log=serve_log
                    )
                    for s in ("optimistic", "post-payment")
                    for m in ("polling", "cdc")
                }
                # Without the role split (`--processes 0`: API and workers in one process, sharing one GIL),
                # default mode only so that --quick stays under 5 minutes.
                | {
                    f"optimistic/{m} (all in one process)": measure.end_to_end(
                        p,
                        strategy="optimistic",
                        outbox_mode=m,
                        concurrency=plan["e2e_concurrency"],
                        duration_s=d,
                        log=serve_log,
                        api_processes=0,
                    )
                    for m in [config.Settings().outbox_mode]
                }
            ),
            "reconcile": lambda: measure.reconciliation(
                p, sizes=plan["sizes"], changed=1000, steady_full_scan=plan_name == "full"
            ),
            "scaling": lambda: measure.scaling(p, concurrency=plan["e2e_concurrency"], duration_s=d, log=serve_log),
        }
        for name in SECTIONS:
            if not only or name in only:
                run_section(name, results, sections[name])
    results["finished_at"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    headline(results)
    return results


def relay_section(p, plan: dict) -> dict:
    out = {"throughput": measure.relay_throughput(p, events=plan["relay_events"])}
    helper = ROOT / "bench" / "relay_bench.py"
    out["latency"] = {"polling": measure.relay_latency(p, mode="polling", rate=1000, duration_s=plan["latency_s"])}
    out["latency"]["cdc"] = measure.relay_latency(p, mode="cdc", rate=1000, duration_s=plan["latency_s"])
    relay_json = RESULTS / "relay.json"
    if helper.exists() and relay_json.exists():
        out["relay_bench_json"] = json.loads(relay_json.read_text())  # the CDC helper's own, fuller measurement
    return out


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": "services, servers and load generator share these CPUs; see each section's cpu breakdown",
    }


def _get(results: dict, *path):
    node = results["sections"]
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _why(results: dict, section: str, default: str) -> str:
    err = _get(results, section, "error")
    if err:
        return f"the {section} section failed: {err}"
    if section not in results["sections"]:
        return f"the {section} section was not run (--only)"
    return default


def headline(results: dict) -> None:
    """The keys of issue 6 at the top level, each with its limit and ratio; null plus ``*_reason`` when missing."""
    h = {}
    default_mode = config.Settings().outbox_mode
    e2e = _get(results, "e2e", f"optimistic/{default_mode}") or {}
    rec = _get(results, "reconcile", "1000000") or {}
    values = {
        "cart_adds_per_s": _get(results, "cart", "api", "cart_adds_per_s"),
        "cart_adds_per_s_2_api_processes": _get(results, "cart", "api_2_processes", "cart_adds_per_s"),
        "pgbench_tps": _get(results, "cart", "pgbench", "tps"),
        "python_reservations_per_s": _get(results, "redis", "python_reservations_per_s"),
        "redis_benchmark_evalsha_per_s": _get(results, "redis", "redis_benchmark_evalsha_per_s"),
        "relay_events_per_s": _get(results, "relay", "throughput", "relay_events_per_s"),
        "raw_publish_per_s": _get(results, "relay", "throughput", "raw_unconfirmed_per_s"),
        "polling_p50_ms": _get(results, "relay", "latency", "polling", "latency_ms", "p50"),
        "polling_p99_ms": _get(results, "relay", "latency", "polling", "latency_ms", "p99"),
        "cdc_p50_ms": _get(results, "relay", "latency", "cdc", "latency_ms", "p50"),
        "cdc_p99_ms": _get(results, "relay", "latency", "cdc", "latency_ms", "p99"),
        "e2e_checkouts_per_s": e2e.get("sustained_checkouts_per_s"),
        "e2e_p50_ms": e2e.get("p50_ms"),
        "e2e_p99_ms": e2e.get("p99_ms"),
        "reconcile_ms_1m_catalog": rec.get("delta_ms"),
        "full_scan_ms_1m_catalog": rec.get("full_scan_ms"),
        "scaling_speedup_2_processes": _get(results, "scaling", "speedup"),
    }
    sections = {
        "cart_adds_per_s": "cart",
        "cart_adds_per_s_2_api_processes": "cart",
        "pgbench_tps": "cart",
        "python_reservations_per_s": "redis",
        "redis_benchmark_evalsha_per_s": "redis",
        "relay_events_per_s": "relay",
        "raw_publish_per_s": "relay",
        "polling_p50_ms": "relay",
        "polling_p99_ms": "relay",
        "cdc_p50_ms": "relay",
        "cdc_p99_ms": "relay",
        "e2e_checkouts_per_s": "e2e",
        "e2e_p50_ms": "e2e",
        "e2e_p99_ms": "e2e",
        "reconcile_ms_1m_catalog": "reconcile",
        "full_scan_ms_1m_catalog": "reconcile",
        "scaling_speedup_2_processes": "scaling",
    }
    for key, value in values.items():
        h[key] = value
        if value is None:
            h[f"{key}_reason"] = _why(results, sections[key], "not measured")
    h["e2e_config"] = f"optimistic/{default_mode}"
    # Issue 13: work per checkout of the default configuration.
    h["cpu_ms_per_checkout"] = e2e.get("cpu_ms_per_checkout")
    stmts = e2e.get("postgres_per_checkout") or {}
    h["statements_per_checkout"] = stmts.get("statements_per_checkout")
    h["transactions_per_checkout"] = (
        {"explicit_commits": stmts.get("explicit_commits_per_checkout"), "xids": stmts.get("xids_per_checkout")}
        if stmts.get("xids_per_checkout") is not None
        else None
    )
    h["messages_per_checkout"] = {
        "published": stmts.get("outbox_messages_per_checkout"),
        "delivered": (e2e.get("routing") or {}).get("deliveries_per_checkout"),
    }
    for key in ("cpu_ms_per_checkout", "statements_per_checkout", "transactions_per_checkout"):
        if h[key] is None:
            h[f"{key}_reason"] = (
                stmts.get("reason")
                if key != "cpu_ms_per_checkout" and stmts.get("reason")
                else _why(results, "e2e", "not measured")
            )
    h["ratios"] = {
        "cart_adds_vs_pgbench": _ratio(h["cart_adds_per_s"], h["pgbench_tps"]),
        "cart_adds_2_api_processes_vs_pgbench": _ratio(h["cart_adds_per_s_2_api_processes"], h["pgbench_tps"]),
        "reservations_vs_redis_benchmark": _ratio(h["python_reservations_per_s"], h["redis_benchmark_evalsha_per_s"]),
        "relay_vs_raw_publish": _ratio(h["relay_events_per_s"], h["raw_publish_per_s"]),
        "full_scan_vs_delta_1m": _ratio(h["full_scan_ms_1m_catalog"], h["reconcile_ms_1m_catalog"]),
    }
    h["goals"] = goals(h)
    h["goals_13"] = goals_13(h, results)
    results.update(h)


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def goals(h: dict) -> dict:
    """Issue 6's goals, each met (True), missed (False) or unknown (None)."""

    def check(cond, *values):
        return None if any(v is None for v in values) else bool(cond())

    r = h["ratios"]
    return {
        "cart_adds >= 60% of pgbench": check(lambda: r["cart_adds_vs_pgbench"] >= 0.6, r["cart_adds_vs_pgbench"]),
        "cart_adds (API on 2 processes) >= 60% of pgbench": check(
            lambda: r["cart_adds_2_api_processes_vs_pgbench"] >= 0.6, r["cart_adds_2_api_processes_vs_pgbench"]
        ),
        "e2e >= 250 checkouts/s": check(lambda: h["e2e_checkouts_per_s"] >= 250, h["e2e_checkouts_per_s"]),
        "e2e p99 <= 200 ms at half load": check(lambda: h["e2e_p99_ms"] <= 200, h["e2e_p99_ms"]),
        "relay >= 5000 events/s with confirms": check(lambda: h["relay_events_per_s"] >= 5000, h["relay_events_per_s"]),
        "cdc p99 <= 50 ms at 1000 events/s": check(lambda: h["cdc_p99_ms"] <= 50, h["cdc_p99_ms"]),
        "reconcile 1k changed in 1M <= 500 ms": check(
            lambda: h["reconcile_ms_1m_catalog"] <= 500, h["reconcile_ms_1m_catalog"]
        ),
        "reconcile >= 20x faster than full scan": check(
            lambda: r["full_scan_vs_delta_1m"] >= 20, r["full_scan_vs_delta_1m"]
        ),
    }


def goals_13(h: dict, results: dict) -> list[dict]:
    """Issue 13's goals: each figure with its limit from this same run and met / missed / unknown (None)."""

    def e2e(config_name, key):
        return (_get(results, "e2e", config_name) or {}).get(key)

    pg, cpu = h["pgbench_tps"], h["cpu_ms_per_checkout"] or {}
    out = []

    def goal(name, figure, limit, ok, note=""):
        out.append(
            {
                "goal": name,
                "figure": figure,
                "limit": limit,
                "met": None if figure is None or limit is None else bool(ok(figure, limit)),
                "note": note,
            }
        )

    largest = sorted((cpu.get("by_component") or {}).items(), key=lambda kv: -kv[1])[:3]
    goal(
        f"cpu_ms_per_checkout ({h['e2e_config']}), all processes <= 8 ms",
        cpu.get("total"),
        8.0,
        lambda f, lim: f <= lim,
        "largest: " + ", ".join(f"{k} {v} ms" for k, v in largest) if largest else "",
    )
    for config_name in ("optimistic/cdc", "post-payment/cdc"):
        busy = (e2e(config_name, "cpu_at_saturation") or {}).get("machine_busy_cores")
        ms = (e2e(config_name, "cpu_ms_per_checkout") or {}).get("total")
        goal(
            f"e2e sustained checkouts/s ({config_name}) >= pgbench_tps / 25",
            e2e(config_name, "sustained_checkouts_per_s"),
            round(pg / 25, 1) if pg else None,
            lambda f, lim: f >= lim,
            f"{ms} ms per checkout; machine busy {busy} of {os.cpu_count()} cores" if busy is not None else "",
        )
    goal(
        "cart adds >= 0.3 x pgbench_tps (same concurrency)",
        h["cart_adds_per_s"],
        round(0.3 * pg, 1) if pg else None,
        lambda f, lim: f >= lim,
        f"with the API on 2 processes (--processes 2): {two:,.1f}/s, {two / pg:.2f} x pgbench"
        if (two := h.get("cart_adds_per_s_2_api_processes")) and pg
        else "",
    )
    goal(
        f"half-load create->COMPLETED p99 ({h['e2e_config']}) <= 100 ms",
        h["e2e_p99_ms"],
        100.0,
        lambda f, lim: f <= lim,
        "quote the full plan: --quick's half-load phase is ~4 s" if results.get("plan") == "quick" else "",
    )
    raw = h["raw_publish_per_s"]
    goal(
        "relay events/s >= 0.4 x raw unconfirmed publishes",
        h["relay_events_per_s"],
        round(0.4 * raw, 1) if raw else None,
        lambda f, lim: f >= lim,
    )
    goal("cdc commit->consumer p99 at 1,000 events/s <= 15 ms", h["cdc_p99_ms"], 15.0, lambda f, lim: f <= lim)
    return out


def write(results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")[:15]
    path = RESULTS / f"{stamp}-{results['plan']}.json"
    text = json.dumps(results, indent=2, default=str) + "\n"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    from bench.report import write_markdown

    write_markdown(results, ROOT / "BENCHMARKS.md")
    return path


def main(argv=None) -> int:
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the private database, vhost and Redis DB are dropped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short runs (under 5 minutes)")
    ap.add_argument(
        "--shared-pg",
        action="store_true",
        help="use a database on the shared server, not a private cluster (no statement counts)",
    )
    ap.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        print(
            f"bench/run: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}.",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    results = run("quick" if args.quick else "full", only, args.shared_pg)
    results["total_s"] = round(time.perf_counter() - started, 1)
    path = write(results)
    print(
        json.dumps(
            {
                k: results.get(k)
                for k in (
                    *HEADLINE,
                    "cpu_ms_per_checkout",
                    "statements_per_checkout",
                    "transactions_per_checkout",
                    "messages_per_checkout",
                    "ratios",
                    "goals",
                    "goals_13",
                    "total_s",
                )
            },
            indent=2,
        )
    )
    log(f"wrote {path.relative_to(ROOT)}, bench/results/latest.json and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
