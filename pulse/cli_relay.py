"""``pulse relay status`` (what the outbox relay is doing) and ``pulse relay drop-slot`` (remove an abandoned slot)."""

from __future__ import annotations

import json
import sys

from pulse import config
from pulse.infra import db

RETAINED_WARN_BYTES = 1 << 30  # an unread slot retained ~10 GB/hour at 4k transactions/s here
RECREATED_WARN_S = 86_400  # a slot recreated after a loss is worth a WARNING line for a day, then a plain field

SLOT_SQL = """
SELECT s.database, s.active, s.active_pid, s.confirmed_flush_lsn::text AS confirmed_flush_lsn,
       s.wal_status, s.safe_wal_size,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes
FROM pg_replication_slots s WHERE s.slot_name = %s"""

HOLDER_SQL = """
SELECT l.pid AS backend_pid, a.application_name, a.client_addr::text AS client_addr, a.backend_start
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.database = (
      SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = %s AND l.objid::bigint = hashtext(%s) & 2147483647"""

# Events RabbitMQ returned because no queue is bound to their type (mandatory publish): kept, retried slowly.
UNROUTABLE_SQL = """
SELECT event_type, count(*) AS n, min(unroutable_at) AS oldest FROM shared.outbox
WHERE unroutable_at IS NOT NULL GROUP BY event_type ORDER BY min(unroutable_at)"""


def _settings() -> config.Settings:
    return config.from_env()


def relay_status(settings: config.Settings) -> dict:
    """Mode, lock holder, slot lag and retained WAL, heartbeat (events/s, last publish) and warnings."""
    from pulse.infra.relay_cdc import LOCK_CLASS, wal_level_problem

    with db.connect(settings.database_url, autocommit=True) as conn:
        slot = conn.execute(SLOT_SQL, (settings.cdc_slot,)).fetchone()
        holder = conn.execute(HOLDER_SQL, (LOCK_CLASS, settings.cdc_slot)).fetchone()
        beat = conn.execute("SELECT *, extract(epoch FROM now() - updated_at) AS age_s FROM infra.relay_heartbeat "
                            "WHERE slot = %s", (settings.cdc_slot,)).fetchone() if _has_heartbeat(conn) else None
        publication = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                   (settings.cdc_publication,)).fetchone() is not None
        wal_level = conn.execute("SHOW wal_level").fetchone()["wal_level"]
        outbox_rows = conn.execute("SELECT count(*) AS n FROM shared.outbox").fetchone()["n"]
        recreated = last_slot_loss(conn, settings.cdc_slot)
        unroutable = conn.execute(UNROUTABLE_SQL).fetchall()
    status = {
        "mode": settings.outbox_mode, "walLevel": wal_level, "outboxRows": outbox_rows,
        "unroutable": _unroutable(unroutable),
        "publication": {"name": settings.cdc_publication, "exists": publication},
        "slot": _slot(settings.cdc_slot, slot),
        "holder": _holder(holder),
        "heartbeat": _heartbeat(beat),
        "slotRecreated": recreated,
    }
    status["warnings"] = warnings(status, wal_level_problem(wal_level))
    return status


def last_slot_loss(conn, slot: str) -> dict | None:
    """The last time the cdc relay found ``slot`` lost and created it again (``infra.relay_slot_losses``), or None."""
    if not conn.execute("SELECT to_regclass('infra.relay_slot_losses') IS NOT NULL AS ok").fetchone()["ok"]:
        return None
    row = conn.execute("SELECT recreated_at, reason, outbox_rows, pid, host, extract(epoch FROM now() - recreated_at) "
                       "AS age_s, count(*) OVER () AS times FROM infra.relay_slot_losses WHERE slot = %s "
                       "ORDER BY recreated_at DESC LIMIT 1", (slot,)).fetchone()
    if row is None:
        return None
    return {"at": row["recreated_at"].isoformat(), "reason": row["reason"], "outboxRows": row["outbox_rows"],
            "pid": row["pid"], "host": row["host"], "ageS": round(float(row["age_s"]), 1), "times": row["times"]}


def _has_heartbeat(conn) -> bool:
    return conn.execute("SELECT to_regclass('infra.relay_heartbeat') IS NOT NULL AS ok").fetchone()["ok"]


def _slot(name: str, row) -> dict:
    if row is None:
        return {"name": name, "exists": False}
    return {"name": name, "exists": True, "database": row["database"], "active": row["active"],
            "activePid": row["active_pid"], "confirmedFlushLsn": row["confirmed_flush_lsn"],
            "lagBytes": row["lag_bytes"], "retainedBytes": row["retained_bytes"], "walStatus": row["wal_status"],
            "safeWalSizeBytes": row["safe_wal_size"]}


def _unroutable(rows) -> dict:
    oldest = min((r["oldest"] for r in rows), default=None)
    return {"rows": sum(r["n"] for r in rows), "oldestAt": oldest.isoformat() if oldest else None,
            "byType": {r["event_type"]: r["n"] for r in rows}}


def _holder(row) -> dict | None:
    if row is None:
        return None
    return {"backendPid": row["backend_pid"], "application": row["application_name"],
            "clientAddr": row["client_addr"],
            "since": row["backend_start"].isoformat() if row["backend_start"] else None}


def _heartbeat(row) -> dict | None:
    if row is None:
        return None
    return {"pid": row["pid"], "host": row["host"], "mode": row["mode"], "published": row["published"],
            "eventsPerS": round(row["events_per_s"], 1), "updatedAt": row["updated_at"].isoformat(),
            "ageS": round(float(row["age_s"]), 1),
            "lastPublishAt": row["last_publish_at"].isoformat() if row["last_publish_at"] else None}


def warnings(status: dict, wal_problem: str | None) -> list[str]:
    """Plain sentences about conditions that lose events or fill the disk."""
    out = []
    slot = status["slot"]
    if status["mode"] == "cdc" and wal_problem:
        out.append(wal_problem)
    if slot["exists"]:
        if slot["retainedBytes"] is not None and slot["retainedBytes"] > RETAINED_WARN_BYTES:
            out.append(f"Slot {slot['name']} retains {_size(slot['retainedBytes'])} of WAL; an unread slot fills the "
                       "disk, so start the cdc relay or run `pulse relay drop-slot`.")
        if slot["walStatus"] == "lost":
            out.append(f"Slot {slot['name']} is lost: the server removed WAL it still needed (max_slot_wal_keep_size)."
                       " Start the cdc relay: it creates the slot again and publishes the rows still in the outbox.")
        elif slot["walStatus"] in ("extended", "unreserved"):
            out.append(f"Slot {slot['name']} has wal_status={slot['walStatus']}: the server is keeping (or has "
                       "already removed) WAL beyond its normal limit for it.")
        if status["mode"] == "polling" and status["holder"] is None:
            out.append(f"Slot {slot['name']} exists but PULSE_OUTBOX_MODE=polling and no cdc relay reads it, so it "
                       "keeps WAL forever: run `pulse relay drop-slot` unless you switch back to cdc.")
    recreated = status.get("slotRecreated")
    if recreated and recreated["ageS"] < RECREATED_WARN_S:
        out.append(f"Slot {slot['name']} was lost and recreated at {recreated['at']} ({recreated['reason']}); the "
                   f"{recreated['outboxRows']} rows then in shared.outbox were published again, so no event was lost, "
                   "but some may have been delivered twice.")
    unroutable = status.get("unroutable") or {}
    if unroutable.get("rows"):
        types = ", ".join(f"{t} ({n})" for t, n in unroutable["byType"].items())
        out.append(f"{unroutable['rows']} unroutable event(s) stay in the outbox because no queue is bound to their "
                   f"type: {types}; the oldest since {unroutable['oldestAt']}. Bind a queue (or fix the topology) and "
                   "the relay delivers them on its next retry.")
    if status["mode"] == "cdc" and status["holder"] is None:
        out.append("No cdc relay is running (no process holds the relay lock): outbox events wait until one starts.")
    return out


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(status: dict) -> str:
    """The status as a small human-readable table, warnings last."""
    slot, holder, beat = status["slot"], status["holder"], status["heartbeat"]
    rows = [("mode", status["mode"]), ("wal_level", status["walLevel"]),
            ("publication", status["publication"]["name"] + ("" if status["publication"]["exists"] else " (missing)")),
            ("slot", slot["name"] + ("" if slot["exists"] else " (missing)"))]
    if slot["exists"]:
        rows += [("slot lag", _size(slot["lagBytes"])), ("retained WAL", _size(slot["retainedBytes"])),
                 ("wal_status", slot["walStatus"] or "-")]
    if status.get("slotRecreated"):
        rows.append(("slot lost", f"lost and recreated at {status['slotRecreated']['at']} "
                                  f"({status['slotRecreated']['times']} time(s) in all)"))
    rows.append(("holder", f"backend {holder['backendPid']} · {holder['application']}" if holder else "none"))
    if beat:
        rows += [("events/s", f"{beat['eventsPerS']:.1f} (heartbeat {beat['ageS']:.0f}s ago, pid {beat['pid']} "
                              f"on {beat['host']})"),
                 ("published", str(beat["published"])), ("last publish", beat["lastPublishAt"] or "never")]
    rows.append(("outbox rows", str(status["outboxRows"])))
    unroutable = status.get("unroutable") or {"rows": 0}
    rows.append(("unroutable", f"{unroutable['rows']} (oldest {unroutable['oldestAt']})" if unroutable["rows"]
                 else "0"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"WARNING: {w}" for w in status["warnings"]]
    return "\n".join(lines)


def cmd_status(args) -> int:
    settings = _settings()
    status = relay_status(settings)
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def drop_slot(settings: config.Settings) -> dict:
    """Drop the configured slot unless a relay is using it; returns what was dropped."""
    from pulse.infra.relay_cdc import LOCK_CLASS

    with db.connect(settings.database_url, autocommit=True) as conn:
        slot = conn.execute(SLOT_SQL, (settings.cdc_slot,)).fetchone()
        if slot is None:
            return {"slot": settings.cdc_slot, "dropped": False, "reason": "no such slot"}
        holder = conn.execute(HOLDER_SQL, (LOCK_CLASS, settings.cdc_slot)).fetchone()
        if holder is not None or slot["active"]:
            pid = holder["backend_pid"] if holder else slot["active_pid"]
            raise RuntimeError(f"Slot {settings.cdc_slot} is in use by a running cdc relay (backend {pid}); "
                               "stop it first.")
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.cdc_slot,))
    return {"slot": settings.cdc_slot, "dropped": True, "freedBytes": slot["retained_bytes"]}


def cmd_drop_slot(args) -> int:
    settings = _settings()
    if not args.yes:
        if not sys.stdin.isatty():
            print("pulse: drop-slot needs --yes when not run from a terminal.", file=sys.stderr)
            return 2
        answer = input(f"Drop replication slot {settings.cdc_slot}? Events not yet relayed from the WAL are then "
                       "only in shared.outbox (a polling or restarted cdc relay still publishes them). [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not dropped")
            return 1
    print(json.dumps(drop_slot(settings)))
    return 0


def register(subparsers) -> None:
    """Add ``pulse relay status`` and ``pulse relay drop-slot``."""
    r = subparsers.add_parser("relay", help="outbox relay: status, drop an abandoned replication slot")
    sub = r.add_subparsers(dest="relay_command", required=True, metavar="ACTION")
    s = sub.add_parser("status", help="mode, lock holder, slot lag and retained WAL, events/s, last publish, "
                       "unroutable events",
                       description="Reads the slot, the relay lock and the relay heartbeat of PULSE_CDC_SLOT in "
                       "PULSE_DATABASE_URL; prints WARNING lines for a slot that keeps too much WAL and for "
                       "unroutable events (no queue bound to their type) kept in the outbox.")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser("drop-slot", help="drop the CDC replication slot (refused while a relay holds it)",
                       description="An unread slot keeps every WAL segment from its position on and fills the "
                       "disk. Rows still in shared.outbox are not lost: a polling relay, or a cdc relay that "
                       "creates the slot again, publishes them.")
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d.set_defaults(func=cmd_drop_slot)
