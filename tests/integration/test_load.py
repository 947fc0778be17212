import json
import subprocess
import sys

import pytest

from pulse.tools.launcher import ServeProcess
from pulse.tools.load import run_load

pytestmark = pytest.mark.integration


@pytest.fixture
def server(serve_env, tmp_path):
    with ServeProcess(env=serve_env, log_path=tmp_path / "serve.log") as s:
        yield s


def test_three_second_closed_loop_run_checks_out_without_server_errors(server, settings):
    r = run_load(
        server.url,
        concurrency=4,
        duration_s=3,
        products=5,
        progress=False,
        track="db",
        database_url=settings.database_url,
        seed=1,
    )
    assert r["server_errors"] == 0 and r["transport_errors"] == 0
    assert r["checkouts"] > 0 and r["checkouts_per_s"] > 0
    adds = r["requests"]["PUT /api/cart/{userId}/items"]
    assert set(adds) == {"200"} and adds["200"] == r["cart_adds"] == 2 * r["sessions"]
    assert r["requests"]["POST /api/orders"] == {"200": r["checkouts"]}
    assert r["latency_ms"]["POST /api/orders"]["count"] == r["checkouts"]
    assert 0 < r["latency_ms"]["POST /api/orders"]["p50"] <= r["latency_ms"]["POST /api/orders"]["p99"]
    completion = r["completion"]
    assert completion["tracked"] == r["checkouts"] and completion.get("COMPLETED") == r["checkouts"]
    assert completion["latency_ms"]["p99"] > 0
    # The default strategy's saga, step by step; a step is a part of its order's create→COMPLETED.
    steps = completion["steps"]
    assert steps["path"] == ["placed", "ORDER_CREATED", "STOCK_RESERVED", "PAYMENT_PROCESSED", "COMPLETED"]
    assert steps["orders"] + steps["other_paths"] == r["checkouts"] and steps["orders"] > r["checkouts"] / 2
    assert all(0 < s["p50_ms"] <= s["p99_ms"] <= completion["latency_ms"]["max"] for s in steps["steps"])
    json.dumps(r)  # the result is plain JSON


def test_open_loop_with_polling_and_abandoned_carts(server):
    r = run_load(
        server.url,
        rate=20,
        duration_s=3,
        products=3,
        mix="adds=1,abandon=0.5",
        progress=False,
        track="poll",
        track_fraction=1.0,
        seed=2,
        client="httpx",
    )
    assert r["server_errors"] == 0 and r["transport_errors"] == 0
    assert r["mode"] == "open" and 50 <= r["sessions"] <= 70 and r["skipped_sessions"] == 0
    assert 0 < r["checkouts"] < r["sessions"]  # about half abandon their cart
    assert r["completion"]["tracked"] == r["checkouts"] == r["completion"].get("COMPLETED")


def test_cli_prints_json_and_rejects_a_wrong_strategy(server):
    cmd = [
        sys.executable,
        "-m",
        "pulse",
        "load",
        "--url",
        server.url,
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--products",
        "2",
        "--no-progress",
        "--track",
        "off",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkouts"] > 0
    wrong = subprocess.run([*cmd, "--strategy", "post-payment"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and "runs strategy OPTIMISTIC" in wrong.stderr
