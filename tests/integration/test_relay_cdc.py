"""The CDC relay against the real PostgreSQL (wal_level=logical) and RabbitMQ of this test session.

Events are observed on a private queue bound to ``outbox-exchange`` with ``#`` in the session's vhost.
Crash tests run the relay in a child process (``python -m tests.integration.test_relay_cdc``) and SIGKILL it.
What both relays promise (order per aggregate, at-least-once across a crash, nothing deleted before its confirm,
single-active with failover) is tested once for both in test_relay_contract.py; this file keeps what only the
CDC relay does (commit order, the slot, the start-up sweep, switching modes, the status command).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from pulse import config
from pulse.faults import NoFaults
from pulse.infra import broker, outbox
from pulse.infra.pgoutput_stream import TransactionDecoder
from pulse.infra.relay_cdc import CdcRelay
from tests.conftest import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# --- helpers ---

class Tap:
    """A private exclusive queue bound to every routing key: what the relay published, in arrival order."""

    def __init__(self, amqp_url: str):
        self.conn = broker.connect(amqp_url)
        self.channel = self.conn.channel()
        self.channel.exchange_declare(broker.EXCHANGE, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, broker.EXCHANGE, routing_key="#")
        self.messages: list[dict] = []
        self.properties: dict[str, object] = {}  # message id -> AMQP properties of its last delivery

    def drain(self) -> list[dict]:
        while True:
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.messages
            self.messages.append(json.loads(body))
            self.properties[self.messages[-1]["id"]] = props

    def ids(self) -> list[str]:
        return [m["id"] for m in self.drain()]

    def wait_ids(self, ids, timeout_s: float = 20.0, message: str = "events published") -> list[str]:
        want = {str(i) for i in ids}
        wait_for(lambda: want <= set(self.ids()), timeout_s, message=message)
        return self.ids()

    def close(self):
        if self.conn.is_open:
            self.conn.close()


# No queue binds this type: the session's saga queues (declared by other tests) must not receive test events.
TEST_EVENT = "RELAY_TEST_EVENT"


def insert_events(url: str, n: int = 1, event_type: str = TEST_EVENT) -> list[str]:
    """Insert ``n`` outbox events in one transaction; returns their ids in insert order."""
    with psycopg.connect(url) as conn, conn.transaction():
        return [str(outbox.append(conn, event_type, "order", uuid.uuid4(), {"n": i})) for i in range(n)]


def slot_row(db, slot: str):
    return db.execute("SELECT active, confirmed_flush_lsn, pg_current_wal_lsn() - confirmed_flush_lsn AS lag "
                      "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()


def slot_event_ids(db, s) -> list[str]:
    """The outbox event ids the slot still holds (the relay has not advanced past them), read with a peek."""
    rows = db.execute("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
                      "'publication_names', %s)", (s.cdc_slot, s.cdc_publication)).fetchall()
    decoder = TransactionDecoder()  # the relay's own decoder, fed the peek's messages
    return [str(e.id) for r in rows if (tx := decoder.message(r["data"])) for e in tx[1]]


def slot_is_before(db, s, lsn: str) -> bool:
    """True if the slot's confirmed position has not passed ``lsn``."""
    return db.execute("SELECT confirmed_flush_lsn < %s::pg_lsn AS before FROM pg_replication_slots "
                      "WHERE slot_name = %s", (lsn, s.cdc_slot)).fetchone()["before"]


def relay_until(relay, n: int, timeout_s: float = 10.0) -> int:
    """Call ``run_once`` until it has relayed ``n`` events in total (then once more, to catch any extra)."""
    total, deadline = 0, time.monotonic() + timeout_s
    while total < n and time.monotonic() < deadline:
        total += relay.run_once()
    return total + relay.run_once()


def outbox_ids(db, ids) -> set[str]:
    return {str(r["id"]) for r in db.execute("SELECT id FROM shared.outbox WHERE id = ANY(%s::uuid[])", (list(ids),))}


def heartbeat_pid(db, slot: str):
    row = db.execute("SELECT pid FROM infra.relay_heartbeat WHERE slot = %s AND updated_at > now() - interval '3 s'",
                     (slot,)).fetchone()
    return row and row["pid"]


# --- fixtures ---

@pytest.fixture
def cdc(settings, db):
    """Settings in cdc mode; afterwards the session's slot is dropped and the outbox emptied for the next test."""
    s = settings.replace(outbox_mode="cdc")
    db.execute("DELETE FROM shared.outbox")
    yield s
    wait_for(lambda: not (r := slot_row(db, s.cdc_slot)) or not r["active"], 10, message="slot released")
    db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
               (s.cdc_slot,))
    db.execute("DELETE FROM shared.outbox")
    db.execute("DELETE FROM infra.relay_heartbeat")
    db.execute("DELETE FROM infra.relay_slot_losses")


@pytest.fixture
def tap(settings):
    t = Tap(settings.amqp_url)
    yield t
    t.close()


@pytest.fixture
def relays(cdc, db):
    """``start(settings=None)`` runs a CdcRelay in a thread; every one is stopped after the test."""
    running = []

    def start(s=None):
        s = s or cdc
        relay = CdcRelay(s, broker.ConfirmingPublisher(s.amqp_url))
        stop = threading.Event()
        thread = threading.Thread(target=relay.run, args=(stop,), daemon=True, name="test-cdc-relay")
        thread.start()
        running.append((stop, thread))
        return relay, stop, thread

    def start_ready(s=None):
        relay, stop, thread = start(s)
        # The heartbeat is written after the start-up pass; rows inserted during it may go out twice, out of order.
        wait_for(lambda: relay.ready and heartbeat_pid(db, cdc.cdc_slot) == os.getpid(), message="relay active")
        return relay, stop, thread

    yield start_ready
    for stop, thread in running:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "relay thread did not stop"


@pytest.fixture
def children(cdc, serve_env, tmp_path):
    """``spawn(block_marker=None)`` runs a relay in a child process; all are killed after the test."""
    procs = []

    def spawn(block_marker: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, **serve_env, "PULSE_OUTBOX_MODE": "cdc"}
        log = open(tmp_path / f"relay-{len(procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.test_relay_cdc", str(block_marker or "")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


# --- tests ---

def test_events_keep_commit_order_across_transactions(relays, cdc, tap):
    relays()
    expected = []
    for i in range(30):
        expected += insert_events(cdc.database_url, 1 + i % 3)
    # Commit order, not insert order: the first transaction inserts first but commits last.
    first = psycopg.connect(cdc.database_url)
    with first.transaction():
        late = str(outbox.append(first, TEST_EVENT, "order", uuid.uuid4(), {"late": True}))
        early = insert_events(cdc.database_url, 1)[0]
    first.close()
    expected += [early, late]
    assert tap.wait_ids(expected) == expected


def test_sigkill_between_publish_and_slot_advance_redelivers_with_effect_once(
        make_system, cdc, children, tap, db, new_product, tmp_path):
    system = make_system(outbox_mode="cdc")
    system.start_workers(relay=False, schedulers=False)  # real consumers with their inboxes, relay in the child
    product = new_product(stock=10)
    marker = tmp_path / "published"
    first = children(block_marker=marker)
    wait_for(lambda: heartbeat_pid(db, cdc.cdc_slot) == first.pid, message="child relay active")
    user = uuid.uuid4()
    system.carts.add_item(user, uuid.UUID(product), 2)
    order = system.orders.create(user, f"key-{user}")
    wait_for(marker.exists, message="child published and stopped before advancing the slot")
    created = db.execute("SELECT id FROM shared.outbox WHERE event_type = 'ORDER_CREATED' AND aggregate_id = %s",
                         (order["orderId"],)).fetchone()
    assert created is not None, "the row is deleted only after the fault point"
    lsn_before = slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: not slot_row(db, cdc.cdc_slot)["active"], message="the dead relay's walsender exits")
    assert slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"] == lsn_before
    assert str(created["id"]) in slot_event_ids(db, cdc), "published but not yet advanced: still in the slot"
    children()  # a new relay resumes from the slot
    event_id = str(created["id"])
    wait_for(lambda: tap.ids().count(event_id) >= 2, message="ORDER_CREATED delivered again after the crash")
    done = wait_for(lambda: (o := system.orders.get(uuid.UUID(order["orderId"])))["status"] == "COMPLETED" and o,
                    message="order COMPLETED")
    assert done["inventoryStatus"] == "RESERVED"
    stock = db.execute("SELECT available_quantity FROM inventory.inventory_items WHERE product_id = %s",
                       (product,)).fetchone()["available_quantity"]
    assert stock == 8, "the redelivered ORDER_CREATED must not reserve twice"
    assert db.execute("SELECT count(*) AS n FROM inventory.inbox WHERE event_id = %s", (event_id,)).fetchone()["n"] == 1


def test_updates_and_deletes_are_ignored(cdc, tap, db):
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        wait_for(lambda: relay.run_once() == 0 and relay.ready, message="relay ready")  # lock, slot, stream
        a, b = insert_events(cdc.database_url, 2)
        db.execute("UPDATE shared.outbox SET payload = '{\"changed\": true}' WHERE id = %s", (a,))
        db.execute("DELETE FROM shared.outbox WHERE id = %s", (b,))
        assert relay_until(relay, 2) == 2
        db.execute("UPDATE infra.relay_heartbeat SET published = published")
        insert_events(cdc.database_url, 1)
        db.execute("DELETE FROM shared.outbox")  # deletes the unpublished row: its insert is still an event
        assert relay_until(relay, 1) == 1
        messages = tap.drain()
        assert [m["id"] for m in messages[:2]] == [a, b] and len(messages) == 3
        assert messages[0]["payload"] == {"n": 0}, "the insert image is published, not the later update"
    finally:
        relay.close()


def test_switching_between_polling_and_cdc_loses_nothing(cdc, tap, db):
    from pulse.infra.relay_polling import PollingRelay

    left_by_polling = insert_events(cdc.database_url, 5)  # no slot yet: the WAL will never deliver these
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        assert relay_until(relay, 5) == 5
        assert not outbox_ids(db, left_by_polling)
        streamed = insert_events(cdc.database_url, 3)
        assert relay_until(relay, 3) == 3
    finally:
        relay.close()
    tap.wait_ids(left_by_polling + streamed)
    pending = insert_events(cdc.database_url, 4)  # relay stopped, slot kept: now switch to polling
    polling = PollingRelay(cdc.database_url, broker.ConfirmingPublisher(cdc.amqp_url))
    assert polling.run_once() == 4
    polling._reset()
    polling.publisher.close()
    back = insert_events(cdc.database_url, 2)  # and back to cdc: the slot still delivers everything after it
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        relay_until(relay, 4 + 2)  # the slot still holds `pending` (published by polling): duplicates, no loss
    finally:
        relay.close()
    got = tap.wait_ids(left_by_polling + streamed + pending + back)
    assert set(got) == set(left_by_polling + streamed + pending + back)
    assert not outbox_ids(db, got)


def test_idle_slot_still_advances(relays, cdc, db):
    relays()
    start = slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"]
    db.execute("UPDATE inventory.inventory_items SET updated_at = updated_at")  # WAL without outbox events
    wait_for(lambda: slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"] > start, 10,
             message="slot advanced past WAL without events")


def test_status_and_drop_slot_commands(relays, cdc, db, tap, serve_env, monkeypatch, capsys):
    from pulse import cli

    for k, v in {**serve_env, "PULSE_OUTBOX_MODE": "cdc"}.items():
        monkeypatch.setenv(k, v)
    relay, stop, thread = relays()
    insert_events(cdc.database_url, 3)
    wait_for(lambda: relay.published >= 3 and heartbeat_pid(db, cdc.cdc_slot), message="published")
    wait_for(lambda: db.execute("SELECT published FROM infra.relay_heartbeat").fetchone()["published"] >= 3,
             message="heartbeat counts the events")
    assert cli.main(["relay", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["mode"] == "cdc" and status["slot"]["exists"]
    assert status["holder"]["application"].startswith("pulse-relay")
    assert status["heartbeat"]["published"] >= 3 and status["heartbeat"]["lastPublishAt"]
    assert status["slot"]["lagBytes"] >= 0 and not [w for w in status["warnings"] if "No cdc relay" in w]
    assert cli.main(["relay", "drop-slot", "--yes"]) == 1
    assert "in use by a running cdc relay" in capsys.readouterr().err
    stop.set()
    thread.join(15)
    monkeypatch.setenv("PULSE_OUTBOX_MODE", "polling")
    assert cli.main(["relay", "status"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: Slot" in out and "PULSE_OUTBOX_MODE=polling" in out
    assert cli.main(["relay", "drop-slot", "--yes"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] is True
    assert slot_row(db, cdc.cdc_slot) is None


# --- the child process used by the crash tests ---

class _BlockAfterPublish(NoFaults):
    """A fault hook that, once events were published and confirmed, announces it in a file and never returns."""

    def __init__(self, marker: Path):
        self.marker = marker

    def point(self, name, **context):
        if name == "relay.after_publish" and context.get("events"):
            self.marker.write_text("published")
            time.sleep(3600)


def _child_main(marker: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = config.from_env()
    faults = _BlockAfterPublish(Path(marker)) if marker else None
    relay = CdcRelay(settings, broker.ConfirmingPublisher(settings.amqp_url), faults=faults)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1] if len(sys.argv) > 1 else ""))
