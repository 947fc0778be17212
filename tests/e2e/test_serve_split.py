"""`pulse serve` by default: the API in a child process, the workers in the parent (pulse.cli.serve_split).

What the split must keep from the single process: /health lists the consumers, a crash of either part is a
crash of the server, and killing the server leaves nothing behind on its port.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest

from pulse import topology
from pulse.tools.launcher import ServeProcess
from tests.conftest import wait_for
from tests.e2e.support import client, new_product

pytestmark = pytest.mark.e2e


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def server(e2e_env, tmp_path):
    started = ServeProcess(strategy="optimistic", env=e2e_env, log_path=tmp_path / "serve.log", lab=False).start()
    yield started
    started.stop()


def test_the_api_runs_in_a_child_and_health_lists_the_parents_consumers(server):
    [child] = server.children()
    assert "--role api" in Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
    health = httpx.get(server.url + "/health").json()
    assert {c["queue"] for c in health["consumers"]} == set(topology.QUEUES), health
    assert all(c["alive"] for c in health["consumers"]), health
    assert [(p["role"], p["pid"]) for p in health["processes"]] == [("api", child), ("workers", server.proc.pid)]
    api = client(server)
    try:
        product = new_product(api, stock=5)
        user = api.new_user()
        api.add_item(user, product, 1)
        order = api.wait_settled(api.checkout(user)["orderId"], timeout_s=30)
        assert order["status"] == "COMPLETED", order
    finally:
        api.close()
    # The parent's counts reach the child's /health within a moment.
    wait_for(
        lambda: sum(c["handled"] for c in httpx.get(server.url + "/health").json()["consumers"]) > 0,
        5,
        message="the consumers' handled counts in /health",
    )


def test_a_sigkill_of_the_server_takes_its_api_child_and_the_port_with_it(server):
    [child] = server.children()
    server.kill()
    wait_for(lambda: not running(child), 5, message=f"API child {child} to die with its parent")
    # A dying process is a zombie before its last thread has let go of its files, the listening socket among them.
    wait_for(lambda: not port_open(server.port), 5, message="the port to close")


def test_a_crash_of_the_api_child_stops_the_server_with_the_crash_status(server):
    [child] = server.children()
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not server.alive(), 15, message="the server to stop")
    assert server.proc.returncode == 128 + signal.SIGKILL
    log = server.log_path.read_text(errors="replace")
    assert f"API process {child} exited" in log and "Traceback" not in log, log[-3000:]
