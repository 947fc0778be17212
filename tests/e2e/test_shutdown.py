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
