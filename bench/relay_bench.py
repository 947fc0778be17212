"""Outbox relay benchmark: commit-to-consumer latency and drain throughput, cdc and polling in the same run.

    .venv/bin/python -m bench.relay_bench [--rate 1000] [--seconds 10] [--burst 20000]

For each mode a relay runs as ``pulse serve --role relay`` in a child process on private services (its own
database, vhost and Redis DB, see bench/private.py), as in production.
- latency: ``--rate`` one-event transactions per second for ``--seconds``; latency is from the moment COMMIT
  returned in this process to the moment this process received the message from a queue bound to the exchange.
- throughput: the relay is stopped, ``--burst`` events are committed (100 per transaction), the relay is started
  again, and we time the outbox draining from its first to its last deleted row (rows are deleted only after the
  broker confirmed them); every event must then reach the queue.
- idle cost: CPU used by the relay process and its PostgreSQL backend during ``--idle`` seconds with no events.
Writes bench/results/relay.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg

from bench.private import Private
from pulse.infra import broker, outbox

RESULTS = Path(__file__).resolve().parent / "results" / "relay.json"
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BENCH_EVENT = "RELAY_BENCH_EVENT"  # bound to no saga queue: only the bench's own queue receives it


class Tap(threading.Thread):
    """Consumes every message of the exchange and records when each event id arrived (monotonic seconds)."""

    def __init__(self, amqp_url: str):
        super().__init__(daemon=True, name="bench-tap")
        self.conn = broker.connect(amqp_url)
        ch = self.conn.channel()
        ch.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
        self.queue = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(self.queue, broker.EXCHANGE, routing_key="#")
        ch.basic_qos(prefetch_count=2000)
        ch.basic_consume(self.queue, self._on_message, auto_ack=True)
        self.channel = ch
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()

    def _on_message(self, _ch, _method, _props, body):
        self.arrived.setdefault(json.loads(body)["id"], time.monotonic())

    def run(self):
        while not self.stop.is_set():
            self.conn.process_data_events(time_limit=0.05)
        self.conn.close()

    def wait_for(self, ids, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(i in self.arrived for i in ids):
                return True
            time.sleep(0.05)
        return False


class Relay:
    """``pulse serve --role relay`` as a child process on the private services."""

    def __init__(self, env: dict, mode: str, log_path: Path):
        self.env = {**os.environ, **env, "PULSE_OUTBOX_MODE": mode}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self):
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for as long as it runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pulse", "serve", "--role", "relay"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def insert(url: str, n: int) -> list[str]:
    with psycopg.connect(url) as conn, conn.transaction():
        return [str(outbox.append(conn, BENCH_EVENT, "order", uuid.uuid4(), {"i": i})) for i in range(n)]


def wait_ready(url: str, tap: Tap, timeout_s: float = 60) -> None:
    """Until a probe event goes through: the relay is up and past its start-up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        probe = insert(url, 1)
        if tap.wait_for(probe, 2):
            return
    raise RuntimeError("The relay did not publish a probe event within a minute; see its log in the temp directory.")


def offered_load(url: str, rate: float, seconds: float, threads: int = 4) -> dict[str, float]:
    """Commit one-event transactions at ``rate``/s for ``seconds``; returns id -> monotonic commit time."""
    committed: dict[str, float] = {}
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def worker(k: int):
        with psycopg.connect(url, autocommit=True) as conn:
            n, total = k, int(rate * seconds)
            while n < total:
                due = start + n / rate
                if (delay := due - time.monotonic()) > 0:
                    time.sleep(delay)
                eid = outbox.append(conn, BENCH_EVENT, "order", uuid.uuid4(), {"n": n})
                now = time.monotonic()
                with lock:
                    committed[str(eid)] = now
                n += threads

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return committed


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def measure_latency(p: Private, tap: Tap, rate: float, seconds: float) -> dict:
    url = p.settings.database_url
    t0 = time.monotonic()
    committed = offered_load(url, rate, seconds)
    achieved = len(committed) / (time.monotonic() - t0)
    tap.wait_for(list(committed), 60)
    lat = [(tap.arrived[i] - c) * 1000 for i, c in committed.items() if i in tap.arrived]
    return {
        "offeredPerS": rate,
        "achievedPerS": round(achieved, 1),
        "seconds": seconds,
        "events": len(committed),
        "received": len(lat),
        "p50Ms": round(percentile(lat, 50), 2),
        "p90Ms": round(percentile(lat, 90), 2),
        "p99Ms": round(percentile(lat, 99), 2),
        "maxMs": round(max(lat), 2),
        "meanMs": round(statistics.fmean(lat), 2),
    }


def measure_drain(p: Private, tap: Tap, relay: Relay, burst: int) -> dict:
    url = p.settings.database_url
    relay.stop()
    ids = [i for _ in range(burst // 100) for i in insert(url, 100)]
    relay.start()
    first = last = None
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            left = conn.execute("SELECT count(*) FROM shared.outbox WHERE id = ANY(%s::uuid[])", (ids,)).fetchone()[0]
            now = time.monotonic()
            if first is None and left < len(ids):
                first = now
            if left == 0:
                last = now
                break
            time.sleep(0.02)
    all_received = tap.wait_for(ids, 120)
    seconds = (last - first) if first and last else float("nan")
    return {
        "events": len(ids),
        "seconds": round(seconds, 3),
        "eventsPerS": round(len(ids) / seconds, 0),
        "allReceived": all_received,
    }


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure_idle(p: Private, relay: Relay, seconds: float) -> dict:
    with psycopg.connect(p.settings.database_url, autocommit=True) as conn:
        # The relay process's own sessions are the only other ones in the private database.
        backends = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    pids = [relay.proc.pid, *backends]
    try:
        before = sum(cpu_seconds(x) for x in pids)
        time.sleep(seconds)
        used = sum(cpu_seconds(x) for x in pids) - before
    except OSError:
        return {"cpuPercent": None}
    return {"seconds": seconds, "cpuPercent": round(100 * used / seconds, 1), "processes": len(pids)}


def run_mode(p: Private, mode: str, args) -> dict:
    tap = Tap(p.settings.amqp_url)
    tap.start()
    relay = Relay(
        p.env | {"PULSE_RELAY_POLL_S": str(args.poll_s)},
        mode,
        Path(tempfile.gettempdir()) / f"pulse-relay-bench-{mode}.log",
    ).start()
    try:
        wait_ready(p.settings.database_url, tap)
        idle = measure_idle(p, relay, args.idle)
        latency = measure_latency(p, tap, args.rate, args.seconds)
        drain = measure_drain(p, tap, relay, args.burst)
    finally:
        relay.stop()
        tap.stop.set()
        tap.join(5)
    with psycopg.connect(p.settings.database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM shared.outbox")
    return {"latency": latency, "throughput": drain, "idle": idle}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--burst", type=int, default=20000)
    ap.add_argument("--idle", type=float, default=3)
    ap.add_argument("--poll-s", type=float, default=0.05, help="PULSE_RELAY_POLL_S for both relays (default 0.05)")
    ap.add_argument("--modes", default="cdc,polling")
    args = ap.parse_args(argv)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    with Private() as p:
        with psycopg.connect(p.settings.database_url) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
        for mode in args.modes.split(","):
            print(f"relay bench: {mode} ...", flush=True)
            results[mode] = run_mode(p, mode, args)
            p.purge_queues()
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": pg_version,
        "pollS": args.poll_s,
        "relayBatch": p.settings.relay_batch,
        "latencyMeasures": "COMMIT returned -> message received by a consumer of the exchange",
        "cdcReader": "logical replication stream (START_REPLICATION over psycopg.pq), pgoutput protocol 1",
        "loadAverage1m": round(os.getloadavg()[0], 2),
        "goal": {"cdcP99Ms": 50, "eventsPerS": 5000},
        "modes": results,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 0


def table(doc: dict) -> str:
    head = f"{'mode':8} {'offered/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'drain ev/s':>11} {'idle CPU%':>9}"
    lines = [head, "-" * len(head)]
    for mode, r in doc["modes"].items():
        lat, thr = r["latency"], r["throughput"]
        lines.append(
            f"{mode:8} {lat['achievedPerS']:>9.0f} {lat['p50Ms']:>8.1f} {lat['p99Ms']:>8.1f} "
            f"{lat['maxMs']:>8.1f} {thr['eventsPerS']:>11.0f} {str(r['idle'].get('cpuPercent')):>9}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
