"""Fixtures of the e2e tier: real `pulse serve` children on this session's private services.

Two servers on one vhost would consume each other's events (and declare different bindings), so
each test module starts at most one, module-scoped, and stops it before the next module begins.
"""

from __future__ import annotations

import httpx
import pytest

from pulse.tools.launcher import ServeProcess
from tests.conftest import serve_environment


@pytest.fixture(scope="session")
def e2e_env(settings):
    """Like ``serve_env`` (which is per test), for servers that live for a whole module; not in lab mode."""
    return serve_environment(settings)


@pytest.fixture(scope="module")
def launch(e2e_env, tmp_path_factory):
    """``launch(strategy, **env)``: start a `pulse serve` child (its log in a tmp dir); stopped after the module."""
    started = []

    def start(strategy: str = "optimistic", **env) -> ServeProcess:
        log = tmp_path_factory.mktemp("serve") / f"serve-{strategy}.log"
        server = ServeProcess(strategy=strategy, env={**e2e_env, **{k: str(v) for k, v in env.items()}}, log_path=log)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def http_for():
    """``http_for(server)``: an httpx client on the server's base URL, closed after the test."""
    clients = []

    def make(server):
        client = httpx.Client(base_url=server.url, timeout=10)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
