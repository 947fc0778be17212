"""`pulse serve` shuts down cleanly on SIGTERM, also with sagas in flight."""

from __future__ import annotations

import time

import pytest

from tests.e2e.support import client, new_product

pytestmark = pytest.mark.e2e


def test_sigterm_gives_a_clean_shutdown(launch):
    server = launch("optimistic")
    api = client(server)
    try:
        product = new_product(api, stock=50)
        for _ in range(5):  # leave work in flight for the workers
            user = api.new_user()
            api.add_item(user, product, 1)
            api.checkout(user)
    finally:
        api.close()
    started = time.monotonic()
    status = server.stop(timeout_s=15)
    elapsed = time.monotonic() - started
    assert status == 0, server._tail()
    assert elapsed < 8, f"shutdown took {elapsed:.1f}s"
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_api_on_two_processes_serves_a_checkout_and_stops_cleanly(e2e_env, tmp_path):
    """`pulse serve --processes 2`: two API children share the port, the workers run in the parent; a saga
    completes through them and SIGTERM stops all three."""
    from pulse.tools.launcher import ServeProcess

    server = ServeProcess(
        strategy="optimistic", env=e2e_env, log_path=tmp_path / "serve.log", args=("--processes", "2")
    ).start()
    try:
        api = client(server)
        try:
            product = new_product(api, stock=10)
            user = api.new_user()
            api.add_item(user, product, 2)
            order = api.checkout(user)
            deadline = time.monotonic() + 30
            while api.order(order["orderId"])["status"] != "COMPLETED" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert api.order(order["orderId"])["status"] == "COMPLETED"
        finally:
            api.close()
    finally:
        status = server.stop(timeout_s=20)
    assert status == 0, server._tail()
    log = server.log_path.read_text(errors="replace")
    assert "API in 2 processes" in log and "Traceback" not in log, log[-3000:]
