"""The CDC relay against the real PostgreSQL (wal_level=logical) and RabbitMQ of this test session.

Events are observed on a private queue bound to ``outbox-exchange`` with ``#`` in the session's vhost.
Crash tests run the relay in a child process (tests/integration/relays.py) and SIGKILL it.
What both relays promise (order per aggregate, at-least-once across a crash, nothing deleted before its confirm,
single-active with failover) is tested once for both in test_relay_contract.py; this file keeps what only the
CDC relay does (commit order, the slot, the start-up sweep, switching modes, the status command).
"""

from __future__ import annotations

import json
import os
import signal
import uuid

import psycopg
import pytest

from pulse.infra import broker, outbox
from pulse.infra.relay_cdc import CdcRelay
from tests.conftest import wait_for
from tests.integration.relays import (
    TEST_EVENT,
    RelayChildren,
    RelayThreads,
    heartbeat_pid,
    insert_events,
    outbox_ids,
    relay_until,
    slot_event_ids,
    slot_row,
)

pytestmark = pytest.mark.integration


# --- fixtures ---


@pytest.fixture
def relays(cdc, db):
    """``start(settings=None)`` runs the cdc relay in a thread until it streams and holds the slot's heartbeat."""
    threads = RelayThreads()

    def start(s=None):
        # The heartbeat is written after the start-up pass; rows inserted during it may go out twice, out of order.
        return threads.start(s or cdc, ready=lambda r: r.ready and heartbeat_pid(db, cdc.cdc_slot) == os.getpid())

    start.stop = threads.stop
    yield start
    threads.stop_all()


@pytest.fixture
def children(cdc, serve_env, tmp_path):
    """``spawn(block_marker=None)`` runs a cdc relay in a child process; all are killed after the test."""
    procs = RelayChildren(serve_env, tmp_path)
    yield lambda block_marker=None: procs.spawn("cdc", block_marker)
    procs.kill_all()


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
    make_system, cdc, children, tap, db, new_product, tmp_path
):
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
    created = db.execute(
        "SELECT id FROM shared.outbox WHERE event_type = 'ORDER_CREATED' AND aggregate_id = %s", (order["orderId"],)
    ).fetchone()
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
    done = wait_for(
        lambda: (o := system.orders.get(uuid.UUID(order["orderId"])))["status"] == "COMPLETED" and o,
        message="order COMPLETED",
    )
    assert done["inventoryStatus"] == "RESERVED"
    stock = db.execute(
        "SELECT available_quantity FROM inventory.inventory_items WHERE product_id = %s", (product,)
    ).fetchone()["available_quantity"]
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
    back = insert_events(cdc.database_url, 2)  # and back to cdc, with the slot where the first cdc relay left it
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        relay_until(relay, 4 + 2)  # gives a replay of `pending` the time to show up, were there one
        after = insert_events(cdc.database_url, 3)  # and the stream carries on from the present
        relay_until(relay, 3)
    finally:
        relay.close()
    got = tap.wait_ids(left_by_polling + streamed + pending + back + after)
    assert set(got) == set(left_by_polling + streamed + pending + back + after)
    assert not outbox_ids(db, got)
    # The slot held the WAL of the whole polling stretch. Replaying it would publish `pending` a second time
    # (duplicates the inboxes absorb, but work in proportion to how long polling ran): the relay starts at the
    # present instead, and the start-up sweep publishes what the table still holds.
    assert sorted(got) == sorted(set(got)), "events polling had published went out again after the switch"


def test_idle_slot_still_advances(relays, cdc, db):
    relays()
    start = slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"]
    db.execute("UPDATE inventory.inventory_items SET updated_at = updated_at")  # WAL without outbox events
    wait_for(
        lambda: slot_row(db, cdc.cdc_slot)["confirmed_flush_lsn"] > start,
        10,
        message="slot advanced past WAL without events",
    )


def test_status_and_drop_slot_commands(relays, cdc, db, tap, serve_env, monkeypatch, capsys):
    from pulse import cli

    for k, v in {**serve_env, "PULSE_OUTBOX_MODE": "cdc"}.items():
        monkeypatch.setenv(k, v)
    relay = relays()
    insert_events(cdc.database_url, 3)
    wait_for(lambda: relay.published >= 3 and heartbeat_pid(db, cdc.cdc_slot), message="published")
    wait_for(
        lambda: db.execute("SELECT published FROM infra.relay_heartbeat").fetchone()["published"] >= 3,
        message="heartbeat counts the events",
    )
    assert cli.main(["relay", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["mode"] == "cdc" and status["slot"]["exists"]
    assert status["holder"]["application"].startswith("pulse-relay")
    assert status["heartbeat"]["published"] >= 3 and status["heartbeat"]["lastPublishAt"]
    assert status["slot"]["lagBytes"] >= 0 and not [w for w in status["warnings"] if "No cdc relay" in w]
    assert cli.main(["relay", "drop-slot", "--yes"]) == 1
    assert "in use by a running cdc relay" in capsys.readouterr().err
    relays.stop(relay)
    monkeypatch.setenv("PULSE_OUTBOX_MODE", "polling")
    assert cli.main(["relay", "status"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: Slot" in out and "PULSE_OUTBOX_MODE=polling" in out
    assert cli.main(["relay", "drop-slot", "--yes"]) == 0
    assert json.loads(capsys.readouterr().out)["dropped"] is True
    assert slot_row(db, cdc.cdc_slot) is None
