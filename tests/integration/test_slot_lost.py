"""A CDC slot lost past ``max_slot_wal_keep_size`` (issue 10, item 9): the relay creates it again, loses nothing.

The cap is cluster-wide and other test sessions stream their own slots meanwhile, so the test never lowers it
blindly. It leaves its own slot several WAL segments behind, lets every streaming slot move past a fresh
checkpoint, then sets the cap just under its own slot's lag, for a checkpoint or two, and restores the previous
value at once (in ``finally``). Only a slot that trails as far as this one can be lost with it; when an
inactive one does, the test is skipped rather than take that slot down too.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pulse.cli import relay as cli_relay
from pulse.infra import broker, cdc_slot
from pulse.infra.cdc_slot import SlotLost
from pulse.infra.pgoutput_stream import WalStream
from pulse.infra.relay_cdc import CdcRelay
from pulse.tools.check.invariants import Scope, replication_slot
from tests.conftest import wait_for
from tests.integration.relays import insert_events, outbox_ids, relay_until, slot_row

pytestmark = pytest.mark.integration

CAP = "max_slot_wal_keep_size"
SEGMENTS_BEHIND = 4  # how far our slot trails when the cap drops: every streaming slot is then well ahead of it
SEGMENT_BYTES = "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
LOCK_SQL = "SELECT pg_advisory_lock(hashtext('pulse.test.max_slot_wal_keep_size'))"


def wal_segment(admin, lsn_sql: str) -> int:
    return admin.execute(f"SELECT pg_wal_lsn_diff({lsn_sql}, '0/0')::bigint / {SEGMENT_BYTES}").fetchone()[0]


def switch_segments(admin, n: int) -> None:
    """Move the WAL ``n`` segments on; a switch needs a record since the last one, hence the message."""
    for _ in range(n):
        admin.execute("SELECT pg_logical_emit_message(false, 'pulse-test', 'switch')")
        admin.execute("SELECT pg_switch_wal()")


@contextmanager
def cap_set(admin, megabytes: int):
    """``ALTER SYSTEM SET max_slot_wal_keep_size`` and a reload, undone on exit the same way."""
    setting, source, sourcefile = admin.execute(
        "SELECT setting, source, sourcefile FROM pg_settings WHERE name = %s", (CAP,)
    ).fetchone()
    admin.execute(f"ALTER SYSTEM SET {CAP} = '{int(megabytes)}MB'")
    admin.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        if source == "configuration file" and (sourcefile or "").endswith("postgresql.auto.conf"):
            admin.execute(
                f"ALTER SYSTEM SET {CAP} = '{int(setting)}MB'" if setting != "-1" else f"ALTER SYSTEM SET {CAP} = -1"
            )
        else:
            admin.execute(f"ALTER SYSTEM RESET {CAP}")
        admin.execute("SELECT pg_reload_conf()")


def lose_slot(admin, slot: str) -> float:
    """Make the server invalidate our (inactive) slot and no other; returns how long the cap was lowered (s)."""
    admin.execute(LOCK_SQL)  # one lowered cap at a time, whatever session runs this test
    try:
        switch_segments(admin, SEGMENTS_BEHIND)
        admin.execute("CHECKPOINT")  # its running-xacts record lets every streaming slot move its restart_lsn on
        ours = wal_segment(admin, f"(SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}')")
        at_risk = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            # A slot within one segment of ours could go with it (others' WAL may finish a segment meanwhile).
            at_risk = admin.execute(
                "SELECT slot_name, active FROM pg_replication_slots WHERE slot_name <> %s AND restart_lsn IS NOT "
                f"NULL AND pg_wal_lsn_diff(restart_lsn, '0/0')::bigint / {SEGMENT_BYTES} <= %s",
                (slot, ours + 1),
            ).fetchall()
            if not at_risk:
                break
            time.sleep(0.2)
        if at_risk:
            pytest.skip(
                f"slots {at_risk} trail as far as this test's own slot; a cap that loses ours would lose them too"
            )
        keep_segments = wal_segment(admin, "pg_current_wal_lsn()") - ours - 1
        segment_mb = admin.execute(f"SELECT {SEGMENT_BYTES} / 1048576").fetchone()[0]
        started = time.monotonic()
        with cap_set(admin, keep_segments * segment_mb):
            # The checkpointer reads the new cap a moment after the reload: checkpoint until the slot is lost.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                admin.execute("CHECKPOINT")
                status = admin.execute(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()[0]
                if status == "lost":
                    break
                time.sleep(0.1)
        lowered_s = time.monotonic() - started
        assert status == "lost", f"slot {slot} is {status}, not lost, after the cap went down"
        return lowered_s
    finally:
        admin.execute("SELECT pg_advisory_unlock(hashtext('pulse.test.max_slot_wal_keep_size'))")


@pytest.fixture
def admin(settings):
    """An autocommit superuser session on the ``postgres`` database (the cap and the lock are cluster-wide)."""
    with psycopg.connect(make_conninfo(settings.database_url, dbname="postgres"), autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("found_by", ["wal_status", "start_replication"])
def test_a_lost_slot_is_recreated_and_every_event_still_delivered(found_by, cdc, tap, db, admin, caplog, monkeypatch):
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        first = insert_events(cdc.database_url, 2)
        relay_until(relay, 2)
    finally:
        relay.close()
    tap.wait_ids(first)
    wait_for(lambda: not slot_row(db, cdc.cdc_slot)["active"], 10, message="slot released")
    waiting = insert_events(cdc.database_url, 5)  # in the slot's WAL and in the table when the slot goes

    lowered_s = lose_slot(admin, cdc.cdc_slot)
    assert lowered_s < 15  # the cap was down for one or a few checkpoints, not for the whole test
    check = replication_slot(db, Scope(), cdc.cdc_slot)
    assert not check.passed and "lost" in check.details
    status = cli_relay.relay_status(cdc)
    assert status["slot"]["walStatus"] == "lost"
    assert any("lost" in w for w in status["warnings"])

    with pytest.raises(SlotLost, match="invalidated"):  # PostgreSQL's refusal is recognised as a lost slot
        WalStream(cdc.database_url, cdc.cdc_slot, cdc.cdc_publication, 0, "pulse-test").close()
    if found_by == "start_replication":  # the slot is lost after the relay looked at wal_status
        monkeypatch.setattr(cdc_slot, "slot_lost_reason", lambda conn, slot: None)

    caplog.set_level(logging.WARNING, logger="pulse.infra.relay_cdc")
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        relay_until(relay, len(waiting))
        assert tap.wait_ids(waiting)
        after = insert_events(cdc.database_url, 2)  # the new slot streams as the old one did
        relay_until(relay, len(after))
        tap.wait_ids(after)
    finally:
        relay.close()
    assert not outbox_ids(db, waiting + after)
    assert slot_row(db, cdc.cdc_slot) is not None
    lines = [r for r in caplog.records if r.levelno == logging.WARNING and "was lost" in r.getMessage()]
    assert len(lines) == 1 and cdc.cdc_slot in lines[0].getMessage()
    assert relay.slot_recreated_at is not None

    loss = db.execute("SELECT * FROM infra.relay_slot_losses WHERE slot = %s", (cdc.cdc_slot,)).fetchall()
    assert len(loss) == 1 and loss[0]["outbox_rows"] >= len(waiting)
    assert ("wal_status = lost" if found_by == "wal_status" else "invalidated") in loss[0]["reason"]
    status = cli_relay.relay_status(cdc)
    assert status["slot"]["walStatus"] in ("reserved", "extended")
    assert status["slotRecreated"]["at"] and status["slotRecreated"]["outboxRows"] >= len(waiting)
    assert "lost and recreated" in cli_relay.render(status)
    check = replication_slot(db, Scope(), cdc.cdc_slot)
    assert check.passed and "recreated" in check.details and check.data["recreatedAfterLoss"]


def test_a_slot_found_lost_is_dropped_created_again_and_its_rows_swept(cdc, tap, db, caplog, monkeypatch):
    """The recreation path without lowering the cluster's cap (the test above skips when another slot trails as
    far as ours): wal_status is reported lost once, as PostgreSQL would after the checkpoint."""
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        relay_until(relay, 0)
    finally:
        relay.close()
    wait_for(lambda: not slot_row(db, cdc.cdc_slot)["active"], 10, message="slot released")
    db.execute("SELECT pg_drop_replication_slot(%s)", (cdc.cdc_slot,))
    waiting = insert_events(cdc.database_url, 3)  # not in the WAL the new slot will read: only the sweep has them
    db.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (cdc.cdc_slot,))
    reports = iter(["wal_status = lost"])
    monkeypatch.setattr(cdc_slot, "slot_lost_reason", lambda conn, slot: next(reports, None))
    caplog.set_level(logging.WARNING, logger="pulse.infra.relay_cdc")
    relay = CdcRelay(cdc, broker.ConfirmingPublisher(cdc.amqp_url))
    try:
        relay_until(relay, len(waiting))
        tap.wait_ids(waiting)
    finally:
        relay.close()
    assert not outbox_ids(db, waiting) and relay.slot_recreated_at is not None
    assert [r for r in caplog.records if "was lost" in r.getMessage()]
    loss = db.execute("SELECT * FROM infra.relay_slot_losses WHERE slot = %s", (cdc.cdc_slot,)).fetchall()
    assert len(loss) == 1 and loss[0]["outbox_rows"] == len(waiting) and loss[0]["reason"] == "wal_status = lost"
    assert cli_relay.relay_status(cdc)["slotRecreated"]["outboxRows"] == len(waiting)
