"""The arithmetic of bench/cpu.py and bench/pgserver.py: /proc tick deltas and pg_stat_statements deltas turned
into work per checkout, and which component a thread or process is charged to. Fakes only; nothing reads /proc."""

from collections import Counter

from bench import cpu, pgserver
from bench.suite import goals_13


def test_threads_are_charged_by_os_name():
    assert cpu.classify_thread("relay") == "relay"
    assert cpu.classify_thread("c:redis-stock:0") == "consumers"
    assert cpu.classify_thread("saga-watchdog") == "schedulers"
    # The main thread keeps the interpreter's name; anyio's threadpool and psycopg's pool workers are unnamed.
    assert cpu.classify_thread("python") == "API"
    assert cpu.classify_thread("pulse") == "API"


def test_postgres_processes_of_the_private_cluster_only():
    pg = cpu.Postgres(postmaster=100, probe_role="pulse_bench_probe")
    assert pg.component(100, 1, "postgres -D /tmp/x") == "postgres"
    assert pg.component(101, 100, "postgres: walsender postgres 127.0.0.1(5) START_REPLICATION") == "postgres"
    assert pg.component(102, 100, "postgres: pulse_bench_probe db 127.0.0.1(6) idle") == "postgres (load generator)"
    assert pg.component(900, 1, "postgres: postgres shared 127.0.0.1(7) idle") == "postgres (other clusters)"
    assert cpu.Postgres().component(900, 1, "postgres: anything") == "postgres"


def test_ms_per_checkout_from_tick_deltas():
    before = Counter(
        {
            "pulse serve: API": 1.0,
            "pulse serve: consumers": 2.0,
            "postgres": 5.0,
            "rabbitmq": 3.0,
            "load generator": 1.0,
            "postgres (load generator)": 0.1,
        }
    )
    after = Counter(
        {
            "pulse serve: API": 1.5,
            "pulse serve: consumers": 2.3,
            "pulse serve: relay": 0.1,
            "postgres": 5.4,
            "rabbitmq": 3.1,
            "redis": 0.05,
            "load generator": 1.2,
            "postgres (load generator)": 0.12,
        }
    )
    r = cpu.ms_per_unit(before, after, 100, machine_busy_s=1.6)
    assert r["by_component"] == {
        "API": 5.0,
        "consumers": 3.0,
        "relay": 1.0,
        "schedulers": 0.0,
        "PostgreSQL": 4.0,
        "RabbitMQ": 1.0,
        "Redis": 0.5,
    }
    assert r["total"] == 14.5  # the system under test only
    assert r["outside_the_system"] == {"load generator": 2.0, "postgres (load generator)": 0.2}
    assert r["machine_busy"] == 16.0


def test_a_process_gone_during_the_window_does_not_give_back_cpu():
    r = cpu.ms_per_unit(Counter({"redis": 2.0, "postgres": 1.0}), Counter({"postgres": 1.5}), 10)
    assert r["by_component"]["Redis"] == 0.0 and r["total"] == 50.0


def test_no_checkouts_no_figure():
    assert cpu.ms_per_unit(Counter(), Counter({"postgres": 1.0}), 0) is None
    assert pgserver.per_checkout({"xmax": 1, "statements": {}}, {"xmax": 1, "statements": {}}, 0) is None


def test_statements_transactions_and_messages_per_checkout():
    before = {
        "xmax": 1000,
        "statements": {
            1: ("INSERT INTO shared.outbox (id) VALUES ($1)", 10, 10, 1.0),
            2: ("COMMIT", 50, 0, 0.5),
            3: ("SELECT 1", 7, 7, 0.1),
        },
    }
    after = {
        "xmax": 1040,
        "statements": {
            1: ("INSERT INTO shared.outbox (id) VALUES ($1)", 30, 50, 3.0),
            2: ("COMMIT", 70, 0, 0.7),
            3: ("SELECT 1", 7, 7, 0.1),
            4: ("BEGIN", 20, 0, 0.2),
            5: ("UPDATE orders.orders SET x = $1", 40, 40, 4.0),
        },
    }
    r = pgserver.per_checkout(before, after, 20)
    assert r["statements_per_checkout"] == 3.0  # 20 inserts + 40 updates; BEGIN/COMMIT are not statements
    assert r["explicit_commits_per_checkout"] == 1.0
    assert r["xids_per_checkout"] == 2.0
    assert r["outbox_messages_per_checkout"] == 2.0  # rows, not calls: a batched insert writes several
    assert [t["query"] for t in r["top_statements"]][:1] == ["UPDATE orders.orders SET x = $1"]
    assert all(t["query"] != "SELECT 1" for t in r["top_statements"])  # unchanged in the window


def test_issue_13_goals_take_their_limits_from_the_same_run():
    e2e = {
        "optimistic/cdc": {"sustained_checkouts_per_s": 150.0},
        "post-payment/cdc": {"sustained_checkouts_per_s": 90.0},
    }
    h = {
        "pgbench_tps": 3000.0,
        "cpu_ms_per_checkout": {"total": 9.5},
        "e2e_config": "optimistic/cdc",
        "cart_adds_per_s": 950.0,
        "e2e_p99_ms": 80.0,
        "raw_publish_per_s": 10_000.0,
        "relay_events_per_s": 4200.0,
        "cdc_p99_ms": None,
    }
    goals = {g["goal"]: g for g in goals_13(h, {"plan": "full", "sections": {"e2e": e2e}})}
    cpu_goal = goals["cpu_ms_per_checkout (optimistic/cdc), all processes <= 8 ms"]
    assert (cpu_goal["figure"], cpu_goal["met"]) == (9.5, False)
    opt = goals["e2e sustained checkouts/s (optimistic/cdc) >= pgbench_tps / 25"]
    assert (opt["limit"], opt["met"]) == (120.0, True)
    assert goals["e2e sustained checkouts/s (post-payment/cdc) >= pgbench_tps / 25"]["met"] is False
    assert goals["cart adds >= 0.3 x pgbench_tps (same concurrency)"]["met"] is True
    assert goals["cart adds >= 0.3 x pgbench_tps (same concurrency)"]["note"] == ""
    two = goals_13({**h, "cart_adds_per_s_2_api_processes": 1200.0}, {"plan": "full", "sections": {"e2e": e2e}})
    assert "1,200.0/s, 0.40 x pgbench" in next(g["note"] for g in two if g["goal"].startswith("cart adds"))
    assert goals["relay events/s >= 0.4 x raw unconfirmed publishes"]["met"] is True
    assert goals["cdc commit->consumer p99 at 1,000 events/s <= 15 ms"]["met"] is None
