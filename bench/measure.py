"""The measurements of the benchmark suite; each returns a dict of figures and the limit it is compared with.

Every function works on the private services of a :class:`bench.private.Private` and leaves them clean.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid

import httpx
import pika
from psycopg.conninfo import conninfo_to_dict

from bench.cpu import SERVE, CpuMeter
from bench.pgserver import per_checkout
from pulse import bootstrap, topology
from pulse.cli.serve_split import api_process_count
from pulse.infra import broker, db
from pulse.tools.launcher import ServeProcess
from pulse.tools.load import run_load
from pulse.tools.load_report import LatencyHistogram

# --- cart adds through the API vs pgbench -N -------------------------------------------------------------------


def pgbench_tps(p, *, concurrency: int, duration_s: float) -> dict:
    """``pgbench -N`` (simple updates, one transaction each) on a private database created and dropped here."""
    name, _ = p.extra_database("pgbench")
    params = conninfo_to_dict(p.base.database_url)
    conn_args = [
        "-h",
        params.get("host", "127.0.0.1"),
        "-p",
        str(params.get("port", 5432)),
        "-U",
        params.get("user", "postgres"),
    ]
    env = {"PGPASSWORD": params.get("password", ""), "PATH": "/usr/bin:/bin"}
    try:
        subprocess.run(
            ["pgbench", *conn_args, "-i", "-q", "-s", "1", name], check=True, capture_output=True, env=env, timeout=120
        )
        command = [
            "pgbench",
            *conn_args,
            "-N",
            "-n",
            "-c",
            str(concurrency),
            "-j",
            "2",
            "-T",
            str(int(duration_s)),
            name,
        ]
        with CpuMeter(pg=p.pg_cpu) as cpu:
            out = subprocess.run(
                command, check=True, capture_output=True, text=True, env=env, timeout=duration_s + 60
            ).stdout
    finally:
        p.drop_database(name)
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    return {
        "tps": tps,
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "command": " ".join(command[:1] + command[7:-1]) + " <private db>",
        "cpu": cpu.result(),
    }


def serve(
    p, *, strategy="optimistic", outbox_mode="polling", extra_env=None, log=None, api_processes: int | None = None
) -> ServeProcess:
    """A ``pulse serve`` on the private services, not started yet: use it in ``with`` (which starts it once).

    ``api_processes`` is ``--processes``: the API in that many child processes, the workers in the parent (0:
    everything in one process); None is the server's default (one API child).
    """
    env = {**p.env, "PULSE_OUTBOX_MODE": outbox_mode, **(extra_env or {})}
    args = ("--processes", str(api_processes)) if api_processes is not None else ()
    return ServeProcess(strategy=strategy, outbox_mode=outbox_mode, env=env, log_path=log, args=args)


def server_pids(server: ServeProcess) -> dict[int, str]:
    """The server's pid (split per thread by CpuMeter) and its API children's (``--processes``), all API."""
    return {server.proc.pid: SERVE} | {pid: SERVE + ": API" for pid in server.children()}


def cart_adds(p, *, concurrency: int, duration_s: float, log=None, api_processes: int | None = None) -> dict:
    """Closed-loop cart adds only (one add per session, never ordering) through the HTTP API."""
    with serve(p, log=log, api_processes=api_processes) as server:
        products = run_load(
            server.url, concurrency=concurrency, duration_s=1.5, mix="adds=1,abandon=1", track="off", progress=False
        )  # warm-up: connections, prepared statements, Lua
        with CpuMeter(server_pids(server), pg=p.pg_cpu) as cpu:
            r = run_load(
                server.url,
                concurrency=concurrency,
                duration_s=duration_s,
                mix="adds=1,abandon=1",
                track="off",
                progress=False,
                products=products["products"],
            )
    return {
        "cart_adds_per_s": r["cart_adds_per_s"],
        "api_processes": max(1, api_process_count(api_processes, {"api", "workers"})),
        "latency_ms": r["latency_ms"],
        "requests": r["requests"],
        "server_errors": r["server_errors"],
        "cpu": cpu.result(),
    }


# --- reservations through the Python Redis layer vs redis-benchmark EVALSHA -----------------------------------


def reservations(p, *, concurrency: int, duration_s: float, requests: int) -> dict:
    """CartService.reserve from ``concurrency`` threads vs redis-benchmark EVALSHA of the same Lua script."""
    system = bootstrap.build(p.settings, migrate=False, pool_size=2)
    product = uuid.uuid4()
    stock_key, reserved_key = f"stock:{product}", f"reserved:{product}"
    try:
        system.deps.redis.set(stock_key, 10**15)
        counts = [0] * concurrency
        stop = time.perf_counter() + duration_s

        def loop(i):
            while time.perf_counter() < stop:
                system.carts.reserve(product, 1)
                counts[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
        with CpuMeter(pg=p.pg_cpu) as py_cpu:
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
        python_per_s = sum(counts) / elapsed
        reserved = int(system.deps.redis.get(reserved_key))
        sha = system.deps.redis.script_load(system.deps.scripts.reserve_stock.source)
        url = p.settings.redis_url
        host, port = re.match(r"redis://(?:[^@]*@)?([^:/]+):?(\d+)?", url).groups()
        command = [
            "redis-benchmark",
            "-h",
            host,
            "-p",
            port or "6379",
            "--dbnum",
            str(p.redis_db),
            "-c",
            str(concurrency),
            "-n",
            str(requests),
            "--csv",
            "EVALSHA",
            sha,
            "2",
            stock_key,
            reserved_key,
            "1",
        ]
        with CpuMeter(pg=p.pg_cpu) as rb_cpu:
            out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
        rps = float(out.strip().splitlines()[-1].split('","')[1])
    finally:
        system.close()
        p.flush_redis()
    if reserved != sum(counts):
        raise RuntimeError(f"reserved:{product} is {reserved} but {sum(counts)} reservations were counted.")
    return {
        "python_reservations_per_s": round(python_per_s, 1),
        "redis_benchmark_evalsha_per_s": rps,
        "concurrency": concurrency,
        "python_cpu": py_cpu.result(),
        "redis_benchmark_cpu": rb_cpu.result(),
        "command": " ".join(command[:1] + command[5:]),
    }


# --- relay: confirmed relay vs raw unconfirmed publishes; commit-to-publish latency ----------------------------


def _fill_outbox(url: str, n: int) -> None:
    with db.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) "
            "SELECT gen_random_uuid(), 'ORDER', gen_random_uuid()::text, 'ORDER_UPDATED', "
            "jsonb_build_object('orderId', gen_random_uuid(), 'status', 'COMPLETED', 'paymentStatus', 'SUCCESS', "
            "'inventoryStatus', 'RESERVED', 'strategy', 'OPTIMISTIC', 'totalAmount', 10.00, 'n', i) "
            "FROM generate_series(1, %s) AS i",
            (n,),
        )


def relay_throughput(p, *, events: int) -> dict:
    """Drain ``events`` outbox rows with the polling relay (publisher confirms) vs raw unconfirmed pika publishes."""
    from pulse.infra.relay_polling import PollingRelay

    s = p.settings
    broker.setup(s.amqp_url, topology.bindings())
    _fill_outbox(s.database_url, events)
    relay = PollingRelay(s.database_url, broker.ConfirmingPublisher(s.amqp_url), batch=s.relay_batch)
    try:
        with CpuMeter(pg=p.pg_cpu) as relay_cpu:
            started, done, empty_passes = time.perf_counter(), 0, 0
            deadline = started + 120
            while done < events and time.perf_counter() < deadline:
                n = relay.run_once()  # 0 while rows remain: the broker refused a whole batch; try again
                done += n
                empty_passes += n == 0
            relay_s = time.perf_counter() - started
    finally:
        relay.publisher.close()
        relay._reset()
    with db.connect(s.database_url) as conn:
        body = (
            conn.execute(
                "SELECT jsonb_build_object('id', gen_random_uuid(), 'eventType', 'ORDER_UPDATED', "
                "'aggregateId', gen_random_uuid(), 'payload', jsonb_build_object('orderId', "
                "gen_random_uuid(), 'status', 'COMPLETED', 'paymentStatus', 'SUCCESS', 'inventoryStatus', "
                "'RESERVED', 'strategy', 'OPTIMISTIC', 'totalAmount', 10.00, 'n', 1))::text AS b"
            )
            .fetchone()["b"]
            .encode()
        )
    conn = broker.connect(s.amqp_url)
    try:
        channel = conn.channel()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        with CpuMeter(pg=p.pg_cpu) as raw_cpu:
            started = time.perf_counter()
            for _ in range(events):
                channel.basic_publish(broker.EXCHANGE, "ORDER_UPDATED", body, props)
            conn.process_data_events(0)
            raw_s = time.perf_counter() - started
    finally:
        conn.close()
    p.purge_queues()
    if done != events:
        raise RuntimeError(f"the relay confirmed {done} of {events} events.")
    return {
        "events": events,
        "relay_events_per_s": round(events / relay_s, 1),
        "unconfirmed_passes": empty_passes,
        "raw_unconfirmed_per_s": round(events / raw_s, 1),
        "batch": s.relay_batch,
        "relay_cpu": relay_cpu.result(),
        "raw_cpu": raw_cpu.result(),
    }


def relay_latency(p, *, mode: str, rate: float, duration_s: float) -> dict:
    """Commit-to-consumer latency of outbox events inserted one per transaction at ``rate``/s.

    The clock starts when the INSERT's commit returns and stops when a consumer on order-view.queue
    receives the message; both ends run in this process, so the clocks agree.
    """
    s = p.settings.replace(outbox_mode=mode)
    p.drop_slot()  # a cdc relay starts at the present, not replaying the throughput run's 100,000 events
    broker.setup(s.amqp_url, topology.bindings())
    committed: dict[str, float] = {}
    received: dict[str, float] = {}
    stop = threading.Event()
    relay = bootstrap.make_relay(s, None)
    relay_thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    consumer = threading.Thread(target=_receive, args=(s.amqp_url, received, stop), daemon=True)
    consumer.start()
    relay_thread.start()
    try:
        _wait_relay_ready(s.database_url, received, timeout_s=30)
        producers = [
            threading.Thread(target=_produce, args=(s.database_url, rate / 2, duration_s, committed)) for _ in range(2)
        ]
        for t in producers:
            t.start()
        for t in producers:
            t.join()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not set(committed) <= set(received):
            time.sleep(0.05)
    finally:
        stop.set()
        relay_thread.join(15)
        consumer.join(5)
    p.purge_queues()
    hist = LatencyHistogram()
    for event_id, t in committed.items():
        if event_id in received:
            hist.record(received[event_id] - t)
    return {
        "mode": mode,
        "target_rate": rate,
        "achieved_rate": round(len(committed) / duration_s, 1),
        "events": len(committed),
        "lost_or_late": len(set(committed) - set(received)),
        "latency_ms": hist.summary(),
    }


def _produce(url: str, rate: float, duration_s: float, committed: dict) -> None:
    with db.connect(url, autocommit=True) as conn:
        start, i = time.perf_counter(), 0
        while time.perf_counter() < start + duration_s:
            event_id = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO shared.outbox (id, aggregate_type, aggregate_id, event_type, payload) "
                "VALUES (%s, 'ORDER', %s, 'ORDER_UPDATED', '{\"probe\": true}'::jsonb)",
                (event_id, event_id),
            )
            committed[event_id] = time.perf_counter()
            i += 1
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))


def _receive(amqp_url: str, received: dict, stop: threading.Event) -> None:
    conn = broker.connect(amqp_url)
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=1000)
        for method, props, _ in channel.consume("order-view.queue", auto_ack=True, inactivity_timeout=0.2):
            if stop.is_set():
                break
            if method is not None:
                received[props.message_id] = time.perf_counter()
    finally:
        conn.close()


def _wait_relay_ready(url: str, received: dict, timeout_s: float) -> None:
    probe = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _produce(url, 100, 0.01, probe)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            if set(probe) <= set(received):
                return
            time.sleep(0.02)
    raise RuntimeError(f"the relay did not deliver a probe event within {timeout_s:.0f}s.")


# --- end to end -------------------------------------------------------------------------------------------------


def end_to_end(
    p,
    *,
    strategy: str,
    outbox_mode: str,
    concurrency: int,
    duration_s: float,
    log=None,
    api_processes: int | None = None,
    half_rate: float | None = None,
) -> dict:
    """Saturation (closed loop) gives the sustained checkouts/s; half that rate (open loop) gives the latency.

    ``half_rate`` fixes the latency phase's rate instead (bench/compare.py --rate: two trees at one load)."""
    p.purge_queues()  # a previous configuration's late messages must not reach this one's handlers
    p.drop_slot()  # nor its WAL this one's relay (see Private.drop_slot)
    with serve(p, strategy=strategy, outbox_mode=outbox_mode, log=log, api_processes=api_processes) as server:
        warm = run_load(
            server.url, concurrency=4, duration_s=1.5, track="db", progress=False, database_url=p.probe_database_url
        )
        products = warm["products"]
        before = _deliveries(server.url)
        # The window holds every statement and CPU tick of these checkouts: run_load returns once all are terminal.
        stmts0 = p.statements.snapshot() if p.statements else None
        with CpuMeter(server_pids(server), pg=p.pg_cpu) as cpu:
            sat = run_load(
                server.url,
                concurrency=concurrency,
                duration_s=duration_s,
                track="db",
                progress=False,
                database_url=p.probe_database_url,
                products=products,
                complete_timeout_s=120,
            )
        stmts = per_checkout(stmts0, p.statements.snapshot(), sat["checkouts"]) if p.statements else None
        routing = _routing_cost(before, _deliveries(server.url), sat["checkouts"])
        sustained = sat["completion"]["sustained_per_s"] or 0.0
        half = half_rate or max(1.0, round(sustained / 2, 1))
        low = run_load(
            server.url,
            rate=half,
            duration_s=duration_s,
            track="db",
            progress=False,
            database_url=p.probe_database_url,
            products=products,
            complete_timeout_s=60,
        )
    return {
        "strategy": strategy,
        "outbox_mode": outbox_mode,
        "api_processes": api_process_count(api_processes, {"api", "workers"}),
        "saturation": _brief(sat),
        "sustained_checkouts_per_s": sustained,
        "half_load_rate": half,
        "half_load": _brief(low),
        "p50_ms": low["completion"]["latency_ms"]["p50"],
        "p99_ms": low["completion"]["latency_ms"]["p99"],
        "cpu_at_saturation": cpu.result(),
        "cpu_ms_per_checkout": cpu.per_unit(sat["checkouts"]),
        "postgres_per_checkout": stmts or {"reason": p.statements_reason},
        "routing": routing,
    }


def _deliveries(url: str) -> dict | None:
    """Handled and skipped deliveries so far, summed over the server's consumers (its /health)."""
    consumers = httpx.get(f"{url}/health", timeout=10).json().get("consumers") or []
    if not consumers:
        return None  # a server without consumers (--role api)
    return {k: sum(c.get(k, 0) for c in consumers) for k in ("handled", "skipped")}


def _routing_cost(before: dict | None, after: dict | None, checkouts: int) -> dict | None:
    """Deliveries per checkout, and those a queue dropped unhandled (per checkout and as a share of all
    deliveries): with routing by the order's strategy (pulse.topology.bindings) none should be the other
    strategy's events."""
    if before is None or after is None or not checkouts:
        return None
    # A consumer's "handled" counts every delivery it acked, the skipped ones included.
    delivered, skipped = after["handled"] - before["handled"], after["skipped"] - before["skipped"]
    return {
        "checkouts": checkouts,
        "deliveries": delivered,
        "deliveries_skipped": skipped,
        "deliveries_per_checkout": round(delivered / checkouts, 2),
        "skipped_per_checkout": round(skipped / checkouts, 2),
        "skipped_share": round(skipped / delivered, 3) if delivered else None,
    }


def _brief(r: dict) -> dict:
    return {
        k: r[k]
        for k in (
            "mode",
            "rate",
            "concurrency",
            "elapsed_s",
            "checkouts",
            "checkouts_per_s",
            "cart_adds_per_s",
            "server_errors",
            "transport_errors",
            "skipped_sessions",
            "latency_ms",
            "completion",
        )
    }


def scaling(p, *, concurrency: int, duration_s: float, log=None) -> dict:
    """Sustained checkouts/s with one and with two ``pulse serve`` processes sharing the queues."""
    result = {}
    for n in (1, 2):
        p.purge_queues()
        p.drop_slot()
        servers = []
        try:
            for _ in range(n):
                servers.append(serve(p, log=log).start())
            urls = [s.url for s in servers]
            warm = run_load(
                urls, concurrency=4, duration_s=1.5, track="db", progress=False, database_url=p.settings.database_url
            )
            r = run_load(
                urls,
                concurrency=concurrency,
                duration_s=duration_s,
                track="db",
                progress=False,
                database_url=p.settings.database_url,
                products=warm["products"],
                complete_timeout_s=120,
            )
        finally:
            for s in servers:
                s.stop()
        result[f"{n}_process"] = {
            "sustained_checkouts_per_s": r["completion"]["sustained_per_s"],
            "created_per_s": r["checkouts_per_s"],
            "server_errors": r["server_errors"],
            "completion_p99_ms": r["completion"]["latency_ms"]["p99"],
        }
    one, two = result["1_process"]["sustained_checkouts_per_s"], result["2_process"]["sustained_checkouts_per_s"]
    result["speedup"] = round(two / one, 2) if one and two else None
    return result


# --- reconciliation vs catalogue size ---------------------------------------------------------------------------


def reconciliation(p, *, sizes: list[int], changed: int, steady_full_scan: bool = True) -> dict:
    """Delta reconciliation of ``changed`` updated rows vs the full scan, per catalogue size (private database)."""
    from pulse.infra import migrate
    from pulse.reconcile.service import Reconciler

    name, url = p.extra_database("catalog")
    results = {}
    try:
        migrate.migrate(url)
        system = bootstrap.build(p.settings.replace(database_url=url), migrate=False, pool_size=2)
        try:
            for size in sizes:
                results[str(size)] = _reconcile_one(system, Reconciler, url, size, changed, steady_full_scan)
                p.flush_redis()
        finally:
            system.close()
    finally:
        p.drop_database(name)
    return results


def _reconcile_one(system, reconciler_cls, url: str, size: int, changed: int, steady: bool) -> dict:
    started = time.perf_counter()
    with db.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE inventory.inventory_items, inventory.cart_items, inventory.carts, inventory.products CASCADE"
        )
        conn.execute(
            "INSERT INTO inventory.products (id, name, base_price) SELECT "
            "md5('p' || i)::uuid, 'product ' || i, 10.00 FROM generate_series(1, %s) AS i",
            (size,),
        )
        conn.execute(
            "INSERT INTO inventory.inventory_items (product_id, available_quantity, updated_at) "
            "SELECT md5('p' || i)::uuid, 1000, now() - interval '1 hour' FROM generate_series(1, %s) AS i",
            (size,),
        )
        conn.execute("ANALYZE inventory.products")
        conn.execute("ANALYZE inventory.inventory_items")
    generate_s = time.perf_counter() - started
    system.deps.redis.flushdb()
    reconciler = reconciler_cls(system.deps)
    first = reconciler.run_once(cooldown_s=0)  # a full pass that loads every stock: key, as after a start
    # The naive scan again with Redis already right; --quick takes the first pass instead (it measured within
    # a few % of it and saves half a minute on 1M products).
    full = reconciler.run_once(cooldown_s=0, full=True) if steady else first
    with db.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = available_quantity - 1, "
            "version = version + 1, updated_at = now() WHERE product_id IN (SELECT md5('p' || i)::uuid "
            "FROM generate_series(1, %s, %s) AS i)",
            (size, max(1, size // changed)),
        )
    delta = reconciler.run_once(cooldown_s=0)
    if delta["full"] or delta["stock"] != min(changed, size):
        raise RuntimeError(f"delta run on {size} products fixed {delta['stock']} stock keys, expected {changed}.")
    return {
        "products": size,
        "changed": changed,
        "generate_s": round(generate_s, 2),
        "first_run_ms": first["durationMs"],
        "full_scan_ms": full["durationMs"],
        "delta_ms": delta["durationMs"],
        "full_scan_kind": "steady (Redis already right)" if steady else "first pass (Redis empty)",
        "delta_stock_fixes": delta["stock"],
        "speedup": round(full["durationMs"] / delta["durationMs"], 1) if delta["durationMs"] else None,
    }
