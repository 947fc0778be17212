"""BENCHMARKS.md from a results dict: the headline table, each figure beside its limit, and the goals."""

from __future__ import annotations

from pathlib import Path


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        value = f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value}{unit}"


def _why(r: dict, key: str) -> str:
    return r.get(f"{key}_reason", "") if r.get(key) is None else ""


def rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    ratio = r["ratios"]
    return [
        (
            "Cart adds through the API (closed loop)",
            _fmt(r["cart_adds_per_s"], "/s"),
            "`pgbench -N`, same concurrency",
            _fmt(r["pgbench_tps"], " TPS"),
            _fmt(ratio["cart_adds_vs_pgbench"]) + " " + _why(r, "cart_adds_per_s"),
        ),
        (
            "Cart adds, API on 2 processes (`pulse serve --processes 2`)",
            _fmt(r.get("cart_adds_per_s_2_api_processes"), "/s"),
            "`pgbench -N`, same concurrency",
            _fmt(r["pgbench_tps"], " TPS"),
            _fmt(ratio.get("cart_adds_2_api_processes_vs_pgbench")) + " " + _why(r, "cart_adds_per_s_2_api_processes"),
        ),
        (
            "Reservations via CartService.reserve (4 threads)",
            _fmt(r["python_reservations_per_s"], "/s"),
            "`redis-benchmark` EVALSHA reserve_stock, -c 4",
            _fmt(r["redis_benchmark_evalsha_per_s"], "/s"),
            _fmt(ratio["reservations_vs_redis_benchmark"]),
        ),
        (
            "Polling relay with publisher confirms",
            _fmt(r["relay_events_per_s"], " events/s"),
            "raw unconfirmed pika publishes",
            _fmt(r["raw_publish_per_s"], "/s"),
            _fmt(ratio["relay_vs_raw_publish"]),
        ),
        (
            "Commit→consumer p50 / p99, polling relay, 1,000 events/s",
            f"{_fmt(r['polling_p50_ms'])} / {_fmt(r['polling_p99_ms'], ' ms')}",
            "—",
            "—",
            _why(r, "polling_p99_ms"),
        ),
        (
            "Commit→consumer p50 / p99, CDC relay, 1,000 events/s",
            f"{_fmt(r['cdc_p50_ms'])} / {_fmt(r['cdc_p99_ms'], ' ms')}",
            "goal",
            "≤ 50 ms",
            _why(r, "cdc_p99_ms"),
        ),
        (
            f"End-to-end sustained checkouts/s ({r['e2e_config']})",
            _fmt(r["e2e_checkouts_per_s"], "/s"),
            "goal",
            "≥ 250/s",
            _why(r, "e2e_checkouts_per_s"),
        ),
        (
            "create→COMPLETED p50 / p99 at half that load",
            f"{_fmt(r['e2e_p50_ms'])} / {_fmt(r['e2e_p99_ms'], ' ms')}",
            "goal",
            "p99 ≤ 200 ms",
            _why(r, "e2e_p99_ms"),
        ),
        (
            "Reconciliation, 1k changed rows in 1M products",
            _fmt(r["reconcile_ms_1m_catalog"], " ms"),
            "full scan of the same catalogue",
            _fmt(r["full_scan_ms_1m_catalog"], " ms"),
            (_fmt(ratio["full_scan_vs_delta_1m"], "× faster") if ratio["full_scan_vs_delta_1m"] else "")
            + " "
            + _why(r, "reconcile_ms_1m_catalog"),
        ),
        (
            "Scaling 1 → 2 `pulse serve` (competing consumers)",
            _fmt(r["scaling_speedup_2_processes"], "×"),
            "—",
            "—",
            _why(r, "scaling_speedup_2_processes"),
        ),
    ]


def write_markdown(r: dict, path: Path) -> None:
    """Write the table of the run ``r`` (a results dict of bench/suite.py) to ``path``."""
    lines = [
        "# Benchmarks",
        "",
        "Produced by `bench/run` (`--quick`: under 5 minutes). Each figure stands beside a limit measured in the",
        "same run on the same machine; the raw numbers, CPU use per component and the load average are in",
        "`bench/results/latest.json`. A missing figure shows — and the reason.",
        "",
        f"Run: {r['started_at']}, plan `{r['plan']}`, {r['machine']['cpus']} CPUs, load average at start "
        f"{r['machine']['loadavg_start']}, at end {r['loadavg_end']}, {r.get('total_s', '?')} s in all.",
        "",
        "| measurement | figure | limit | limit value | ratio / note |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e.strip()} |" for a, b, c, d, e in rows(r)]
    lines += [
        "",
        "## End to end, per strategy and outbox mode",
        "",
        "| configuration | sustained checkouts/s | half-load rate | p50 ms | p99 ms | server CPU at saturation "
        "| deliveries / checkout (skipped) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in (r["sections"].get("e2e") or {}).items():
        if isinstance(e, dict) and "sustained_checkouts_per_s" in e:
            cpu = e["cpu_at_saturation"]
            cores = cpu.get("pulse serve (all threads)", cpu["by_component_cores"].get("pulse serve"))
            routing = e.get("routing") or {}
            deliveries = (
                f"{_fmt(routing.get('deliveries_per_checkout'))} ({_fmt(routing.get('skipped_per_checkout'))})"
                if routing
                else "—"
            )
            lines.append(
                f"| {name} | {_fmt(e['sustained_checkouts_per_s'])} | {_fmt(e['half_load_rate'])} | "
                f"{_fmt(e['p50_ms'])} | {_fmt(e['p99_ms'])} | {_fmt(cores, ' cores')} | {deliveries} |"
            )
    lines += [
        "",
        "Skipped deliveries are the ones a queue drops unhandled: since the broker routes by the order's "
        "strategy (pulse/topology.py), only watchdog re-drives meant for another queue; before that, every "
        "queue heard both strategies' events and each checkout cost two such deliveries.",
    ]
    lines += step_lines(r)
    lines += per_checkout_lines(r)
    lines += [
        "",
        "## Reconciliation vs catalogue size (1,000 changed rows)",
        "",
        "| products | delta run ms | full scan ms | speedup |",
        "|---|---|---|---|",
    ]
    for size, rec in (r["sections"].get("reconcile") or {}).items():
        if isinstance(rec, dict) and "delta_ms" in rec:
            lines.append(
                f"| {int(size):,} | {_fmt(rec['delta_ms'])} | {_fmt(rec['full_scan_ms'])} | "
                f"{_fmt(rec['speedup'], '×')} |"
            )
    lines += ["", "## Goals of issue 6", "", "| goal | met |", "|---|---|"]
    lines += [f"| {g} | {'yes' if ok else 'no' if ok is False else 'not measured'} |" for g, ok in r["goals"].items()]
    if r.get("goals_13"):
        lines += [
            "",
            "## Goals of issue 13 (each limit measured in this run)",
            "",
            "| goal | figure | limit | met | note |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {g['goal']} | {_fmt(g['figure'])} | {_fmt(g['limit'])} | "
            f"{'yes' if g['met'] else 'no' if g['met'] is False else 'not measured'} | {g['note']} |"
            for g in r["goals_13"]
        ]
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


def step_lines(r: dict) -> list[str]:
    """Where the half-load create→COMPLETED goes: p50 / p99 of each saga step, per e2e configuration."""
    found = {
        name: steps
        for name, e in (r["sections"].get("e2e") or {}).items()
        if isinstance(e, dict)
        and (steps := (e.get("half_load", {}).get("completion") or {}).get("steps"))
        and steps.get("steps")
    }
    if not found:
        return []
    lines = [
        "",
        "## Where the half-load latency goes, step by step",
        "",
        "Each step runs from the one before it to its event's row in `infra.event_log` (stamped by the transaction "
        "that emitted it), the last to the order's COMPLETED update; so a step holds the relay, the broker, the "
        "consumer and the handler. Completed orders on their strategy's usual path; p50 / p99 ms.",
        "",
        "| configuration | orders | steps (p50 / p99 ms) |",
        "|---|---|---|",
    ]
    for name, steps in found.items():
        text = " · ".join(f"{s['from']}→{s['to']} {_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])}" for s in steps["steps"])
        lines.append(f"| {name} | {steps['orders']} | {text} |")
    return lines


COMPONENTS = ("API", "consumers", "relay", "schedulers", "PostgreSQL", "RabbitMQ", "Redis")


def per_checkout_lines(r: dict) -> list[str]:
    """Issue 13's table: CPU ms per checkout per component, statements, transactions and messages per checkout,
    from each e2e configuration's saturation phase."""
    e2e = {
        k: v
        for k, v in (r["sections"].get("e2e") or {}).items()
        if isinstance(v, dict) and v.get("cpu_ms_per_checkout")
    }
    if not e2e:
        return []
    lines = [
        "",
        "## Work per checkout at saturation (issue 13)",
        "",
        "CPU from /proc over the saturation phase divided by its checkouts; API / consumers / relay / schedulers "
        "are threads of the one `pulse serve` process told apart by their OS thread names (API children of "
        "`--processes` count as API). PostgreSQL is the run's private cluster only (the load generator's "
        "completion queries run as their own role and are left out); RabbitMQ and Redis are the shared "
        "servers, so other sessions' work on them is included. Statements (BEGIN/COMMIT left out, SAVEPOINT/RELEASE counted) come from "
        "pg_stat_statements; xids (one per writing transaction and per savepoint that wrote) from pg_current_snapshot; messages published are outbox rows, "
        "delivered are consumer deliveries.",
        "",
        "| configuration | total ms | " + " | ".join(COMPONENTS) + " | load generator ms | statements | "
        "xids | COMMITs | messages published | delivered |",
        "|---|---|" + "---|" * len(COMPONENTS) + "---|---|---|---|---|---|",
    ]
    for name, e in e2e.items():
        c = e["cpu_ms_per_checkout"]
        pg = e.get("postgres_per_checkout") or {}
        load = (c.get("outside_the_system") or {}).get("load generator")
        lines.append(
            f"| {name} | {_fmt(c['total'])} | "
            + " | ".join(_fmt(c["by_component"].get(k)) for k in COMPONENTS)
            + f" | {_fmt(load)} | {_fmt(pg.get('statements_per_checkout'))} | "
            f"{_fmt(pg.get('xids_per_checkout'))} | "
            f"{_fmt(pg.get('explicit_commits_per_checkout'))} | {_fmt(pg.get('outbox_messages_per_checkout'))}"
            f" | {_fmt((e.get('routing') or {}).get('deliveries_per_checkout'))} |"
        )
    top = ((e2e.get(r.get("e2e_config")) or {}).get("postgres_per_checkout", {}).get("top_statements") or [])[:20]
    if top:
        lines += [
            "",
            f"Statements per checkout, {r['e2e_config']} (pg_stat_statements, most frequent first):",
            "",
            "| per checkout | rows | exec ms | statement |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {t['per_checkout']} | {t['rows_per_checkout']} | {t['exec_ms_per_checkout']} | "
            f"`{t['query'].replace('|', '/')}` |"
            for t in top
        ]
    return lines
