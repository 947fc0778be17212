"""The outbox relay contract, run against both relays (polling and cdc) as `pulse serve` builds them.

Whatever reads the outbox (the table or the WAL), a relay must: publish the events of one aggregate in the order
they were written; publish every event at least once across a crash between publish and delete (or slot
advance); delete nothing (and advance nothing) the broker has not confirmed; and, with two relays running,
publish each event once and go on when one dies. Relay-specific behaviour (the slot, the start-up sweep, commit
order across unrelated transactions, several polling relays sharing work) stays in test_relay_cdc.py and
test_relay_polling.py.

Crash and failover tests run relays in child processes (tests/integration/relays.py) and SIGKILL them; the others run a relay in a thread of the test.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from pulse.infra import outbox
from pulse.tools.launcher import free_port
from tests.conftest import wait_for
from tests.integration.relays import TEST_EVENT, RelayChildren, RelayThreads, heartbeat_pid, outbox_ids, slot_is_before

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


class Proxy:
    """A TCP proxy in front of RabbitMQ that the test can cut (connections reset, new ones refused) and restore."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = free_port()  # outside the ephemeral range: restore() binds it again after a cut
        self.sockets: list[socket.socket] = []
        self.listener = None
        self.lock = threading.Lock()
        self.restore()

    def restore(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not on Linux
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.sockets.clear()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        return
                    (b if src is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture(params=["polling", "cdc"])
def mode(request, settings, db):
    """Settings for one relay kind; the outbox starts empty (and, for cdc, with no slot: the ``cdc`` fixture)."""
    if request.param == "cdc":
        yield request.getfixturevalue("cdc")
        return
    db.execute("DELETE FROM shared.outbox")
    yield settings.replace(outbox_mode="polling")
    db.execute("DELETE FROM shared.outbox")


def append(url: str, aggregate: str, n: int = 1) -> list[str]:
    """``n`` events of one aggregate in one transaction; their ids in insert order."""
    with psycopg.connect(url) as conn, conn.transaction():
        return [str(outbox.append(conn, TEST_EVENT, "order", aggregate, {"i": i})) for i in range(n)]


def ready(relay) -> bool:
    """A cdc relay is ready once it streams and has swept; a polling relay has nothing to prepare."""
    return getattr(relay, "ready", True)


@pytest.fixture
def relays(mode):
    """``start(settings=None)`` runs the relay of the mode in a thread and waits until it is ready."""
    threads = RelayThreads()
    yield lambda s=None: threads.start(s or mode, ready=ready)
    threads.stop_all()


@pytest.fixture
def children(mode, serve_env, tmp_path):
    """``spawn(block_marker=None)`` runs the relay of the mode in a child process; all are killed afterwards."""
    procs = RelayChildren(serve_env, tmp_path)
    yield lambda block_marker=None: procs.spawn(mode.outbox_mode, block_marker)
    procs.kill_all()


def wait_active(mode, db, proc) -> None:
    """A cdc child is active once its heartbeat names it; a polling child as soon as it runs."""
    if mode.outbox_mode == "cdc":
        wait_for(lambda: heartbeat_pid(db, mode.cdc_slot) == proc.pid, message="child relay active")


# --- the contract ---


def test_events_of_an_aggregate_go_out_in_order_and_their_rows_go(mode, relays, tap, db):
    relay = relays()
    aggregates = [str(uuid.uuid4()) for _ in range(4)]
    written: dict[str, list[str]] = {a: [] for a in aggregates}
    for round_ in range(6):  # interleaved: one transaction per aggregate per round, of 1 to 3 events
        for a in aggregates:
            written[a] += append(mode.database_url, a, 1 + (round_ + len(written[a])) % 3)
    every = [i for ids in written.values() for i in ids]
    tap.wait_ids(every)
    for a, ids in written.items():
        got = [m["id"] for m in tap.messages if m["aggregateId"] == a]
        assert list(dict.fromkeys(got)) == ids, f"events of aggregate {a} out of order"
    wait_for(lambda: not outbox_ids(db, every), message="published rows deleted")
    wait_for(lambda: relay.published >= len(every) and relay.last_publish_at, message="relay counted the events")
    first = next(m for m in tap.messages if m["id"] == written[aggregates[0]][0])
    assert set(first) == {"id", "eventType", "aggregateId", "payload"}
    assert (first["eventType"], first["payload"]) == (TEST_EVENT, {"i": 0})
    props = tap.properties[first["id"]]
    assert (props.message_id, props.type, props.delivery_mode, props.content_type) == (
        first["id"],
        TEST_EVENT,
        2,
        "application/json",
    )


def test_a_crash_between_publish_and_delete_publishes_again(mode, children, relays, tap, db, tmp_path):
    marker = tmp_path / "published"
    crashing = children(block_marker=marker)
    wait_active(mode, db, crashing)
    ids = append(mode.database_url, str(uuid.uuid4()), 3)
    wait_for(marker.exists, message="the child published and stopped before deleting")
    tap.wait_ids(ids, message="the broker confirmed the events")
    assert outbox_ids(db, ids) == set(ids), "rows are deleted only after the fault point"
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.wait(10)
    relays()  # a new relay finds the rows (or the slot position) the dead one left
    wait_for(lambda: all(tap.ids().count(i) >= 2 for i in ids), message="every event published again")
    wait_for(lambda: not outbox_ids(db, ids), message="rows deleted by the new relay")


def test_nothing_is_deleted_before_the_broker_confirms(mode, relays, tap, db):
    url = urlsplit(mode.amqp_url)
    proxy = Proxy((url.hostname, url.port or 5672))
    via_proxy = mode.replace(
        amqp_url=urlunsplit(url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}"))
    )
    relays(via_proxy)
    aggregate = str(uuid.uuid4())
    tap.wait_ids(append(mode.database_url, aggregate, 2))
    proxy.cut()
    during = append(mode.database_url, aggregate, 2)
    mark = db.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()["l"]  # past the first commit
    during += [i for _ in range(5) for i in append(mode.database_url, aggregate, 2)]
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # an observation window: nothing may get through while the broker is cut
        assert not set(during) & set(tap.ids())
        tap.conn.sleep(0.1)
    assert outbox_ids(db, during) == set(during), "rows must stay until the broker confirms them"
    if mode.outbox_mode == "cdc":
        assert slot_is_before(db, mode, mark), "the slot must not move past unconfirmed events"
    proxy.restore()
    got = tap.wait_ids(during, timeout_s=20, message="events published after the broker came back")
    assert list(dict.fromkeys(i for i in got if i in set(during))) == during  # all, in order (retries may repeat)
    wait_for(lambda: not outbox_ids(db, during), message="rows deleted after the outage")
    proxy.cut()


def test_two_relays_publish_each_event_once_and_one_carries_on_alone(mode, children, tap, db):
    first = children()
    wait_active(mode, db, first)
    second = children()
    ids = [i for _ in range(10) for i in append(mode.database_url, str(uuid.uuid4()), 2)]
    got = tap.wait_ids(ids)
    assert sorted(got) == sorted(ids), "two relays: each event exactly once"
    if mode.outbox_mode == "cdc":  # single-active: the standby waits on the relay lock
        assert heartbeat_pid(db, mode.cdc_slot) == first.pid and second.poll() is None
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    after = append(mode.database_url, str(uuid.uuid4()), 5)
    tap.wait_ids(after, timeout_s=10, message="events relayed by the survivor")
    failover_s = time.monotonic() - killed_at
    assert failover_s < 5, f"failover took {failover_s:.1f}s"
    if mode.outbox_mode == "cdc":
        wait_for(lambda: heartbeat_pid(db, mode.cdc_slot) == second.pid, message="standby is the holder")
    second.send_signal(signal.SIGTERM)
    assert second.wait(15) == 0
