"""What the relay tests share: a tap on the exchange, outbox and slot probes, and relays run in threads or in
child processes (``python -m tests.integration.relays MARKER``) that a test can SIGKILL.

Both relays are built as `pulse serve` builds them (:func:`pulse.bootstrap.make_relay`), so the crash tests of
test_relay_cdc.py and the contract of test_relay_contract.py exercise the production wiring.
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

from pulse import bootstrap, config
from pulse.faults import NoFaults
from pulse.infra import broker, outbox
from pulse.infra.pgoutput_stream import TransactionDecoder
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
# No queue binds this type: the session's saga queues (declared by other tests) must not receive test events.
TEST_EVENT = "RELAY_TEST_EVENT"


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


def insert_events(url: str, n: int = 1, event_type: str = TEST_EVENT) -> list[str]:
    """Insert ``n`` outbox events in one transaction; returns their ids in insert order."""
    with psycopg.connect(url) as conn, conn.transaction():
        return [str(outbox.append(conn, event_type, "order", uuid.uuid4(), {"n": i})) for i in range(n)]


def slot_row(db, slot: str):
    return db.execute(
        "SELECT active, confirmed_flush_lsn, pg_current_wal_lsn() - confirmed_flush_lsn AS lag "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()


def slot_event_ids(db, s) -> list[str]:
    """The outbox event ids the slot still holds (the relay has not advanced past them), read with a peek."""
    rows = db.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
        "'publication_names', %s)",
        (s.cdc_slot, s.cdc_publication),
    ).fetchall()
    decoder = TransactionDecoder()  # the relay's own decoder, fed the peek's messages
    return [str(e.id) for r in rows if (tx := decoder.message(r["data"])) for e in tx[1]]


def slot_is_before(db, s, lsn: str) -> bool:
    """True if the slot's confirmed position has not passed ``lsn``."""
    return db.execute(
        "SELECT confirmed_flush_lsn < %s::pg_lsn AS before FROM pg_replication_slots WHERE slot_name = %s",
        (lsn, s.cdc_slot),
    ).fetchone()["before"]


def relay_until(relay, n: int, timeout_s: float = 10.0) -> int:
    """Call ``run_once`` until it has relayed ``n`` events in total (then once more, to catch any extra)."""
    total, deadline = 0, time.monotonic() + timeout_s
    while total < n and time.monotonic() < deadline:
        total += relay.run_once()
    return total + relay.run_once()


def outbox_ids(db, ids) -> set[str]:
    return {str(r["id"]) for r in db.execute("SELECT id FROM shared.outbox WHERE id = ANY(%s::uuid[])", (list(ids),))}


def heartbeat_pid(db, slot: str):
    row = db.execute(
        "SELECT pid FROM infra.relay_heartbeat WHERE slot = %s AND updated_at > now() - interval '3 s'", (slot,)
    ).fetchone()
    return row and row["pid"]


class RelayThreads:
    """Relays run in threads of the test; :meth:`stop` stops one, :meth:`stop_all` every one, failing the test if
    one hangs."""

    def __init__(self):
        self.running: dict[object, tuple[threading.Event, threading.Thread]] = {}

    def start(self, settings, ready=lambda relay: True):
        relay = bootstrap.make_relay(settings, faults=None)
        stop = threading.Event()
        thread = threading.Thread(
            target=relay.run, args=(stop,), daemon=True, name=f"test-{settings.outbox_mode}-relay"
        )
        thread.start()
        self.running[relay] = (stop, thread)
        wait_for(lambda: ready(relay), message="relay ready")
        return relay

    def stop(self, relay):
        stop, thread = self.running.pop(relay)
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "relay thread did not stop"

    def stop_all(self):
        for relay in list(self.running):
            self.stop(relay)


class RelayChildren:
    """Relays run as child processes of the test, killed afterwards. A child given a marker file writes it once
    its first events are published and confirmed, then blocks: the crash window between publish and delete (or
    slot advance) held open for the test to SIGKILL."""

    def __init__(self, serve_env: dict, log_dir: Path):
        self.serve_env, self.log_dir = serve_env, log_dir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, outbox_mode: str, block_marker: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, **self.serve_env, "PULSE_OUTBOX_MODE": outbox_mode}
        with open(self.log_dir / f"relay-{len(self.procs)}.log", "wb") as log:  # the child holds its own descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.relays", str(block_marker or "")],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def cdc(settings, db):
    """Settings in cdc mode; afterwards the session's slot is dropped and the outbox emptied for the next test."""
    s = settings.replace(outbox_mode="cdc")
    db.execute("DELETE FROM shared.outbox")
    yield s
    wait_for(lambda: not (r := slot_row(db, s.cdc_slot)) or not r["active"], 10, message="slot released")
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (s.cdc_slot,)
    )
    db.execute("DELETE FROM shared.outbox")
    db.execute("DELETE FROM infra.relay_heartbeat")
    db.execute("DELETE FROM infra.relay_slot_losses")


@pytest.fixture
def tap(settings):
    t = Tap(settings.amqp_url)
    yield t
    t.close()


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
    relay = bootstrap.make_relay(config.from_env(), _BlockAfterPublish(Path(marker)) if marker else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1] if len(sys.argv) > 1 else ""))
