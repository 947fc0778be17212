"""Fixtures of the integration tier (on top of tests/conftest.py): an in-process event bus and outbox tidying."""

from __future__ import annotations

import pytest

from tests.integration.relays import cdc, tap  # noqa: F401 - the relay tests' fixtures, shared by three files
from tests.integration.support import Bus


@pytest.fixture
def channel(settings):
    """A channel on this session's vhost, for looking at queues directly."""
    from pulse.infra import broker

    conn = broker.connect(settings.amqp_url)
    yield conn.channel()
    conn.close()


@pytest.fixture
def bus_for(db):
    """``bus_for(system)``: deliver a system's outbox events to its handlers in-process (see Bus)."""
    return lambda system: Bus(system, db)


@pytest.fixture
def tidy_outbox(db):
    """Aggregate ids whose leftover outbox rows are deleted after the test.

    Tests that create orders without running the saga leave events behind; a later test's relay
    would otherwise publish them (harmless, but it adds work and, for synthetic orders, retries).
    """
    ids: list = []
    yield ids
    if ids:
        db.execute("DELETE FROM shared.outbox WHERE aggregate_id = ANY(%s)", ([str(i) for i in ids],))


@pytest.fixture
def campaign_env(serve_env, base_settings):
    """``serve_env`` pointed at a fresh database, vhost, Redis DB and slot of its own, dropped afterwards.

    A campaign judges whole queues, outboxes and Redis DBs as well as its own orders; in the session's shared
    services it would also judge what earlier tests (or earlier matrix cells, some with safeguards off) left there.
    """
    from pulse.lab import private

    with private.private_services(base_settings, prefix="pulse_campaign") as env:
        yield {**serve_env, **env}
