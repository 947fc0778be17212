"""``pulse relay status`` (what the outbox relay is doing) and ``pulse relay drop-slot`` (remove an abandoned slot)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from pulse import config
from pulse.infra import cdc_slot, db, outbox

if TYPE_CHECKING:
    from pulse.cli import Subparsers

Row = dict[str, Any]

RETAINED_WARN_BYTES = 1 << 30  # an unread slot retained ~10 GB/hour at 4k transactions/s here
RECREATED_WARN_S = 86_400  # a slot recreated after a loss is worth a WARNING line for a day, then a plain field


def _settings() -> config.Settings:
    return config.from_env()


def relay_status(settings: config.Settings) -> dict[str, Any]:
    """Mode, lock holder, slot lag and retained WAL, heartbeat (events/s, last publish) and warnings."""
    with db.connect(settings.database_url, autocommit=True) as conn:
        slot = cdc_slot.slot_info(conn, settings.cdc_slot)
        holder = cdc_slot.holder(conn, settings.cdc_slot)
        beat = cdc_slot.heartbeat(conn, settings.cdc_slot)
        publication = cdc_slot.publication_exists(conn, settings.cdc_publication)
        wal_level = cdc_slot.wal_level(conn)
        outbox_rows = outbox.count(conn)
        recreated = cdc_slot.last_slot_loss(conn, settings.cdc_slot)
        unroutable = outbox.unroutable_by_type(conn)
    status: dict[str, Any] = {
        "mode": settings.outbox_mode,
        "walLevel": wal_level,
        "outboxRows": outbox_rows,
        "unroutable": _unroutable(unroutable),
        "publication": {"name": settings.cdc_publication, "exists": publication},
        "slot": _slot(settings.cdc_slot, slot),
        "holder": _holder(holder),
        "heartbeat": _heartbeat(beat),
        "slotRecreated": recreated,
    }
    status["warnings"] = warnings(status, cdc_slot.wal_level_problem(wal_level))
    return status


def _slot(name: str, row: Row | None) -> dict[str, Any]:
    if row is None:
        return {"name": name, "exists": False}
    return {
        "name": name,
        "exists": True,
        "database": row["database"],
        "active": row["active"],
        "activePid": row["active_pid"],
        "confirmedFlushLsn": row["confirmed_flush_lsn"],
        "lagBytes": row["lag_bytes"],
        "retainedBytes": row["retained_bytes"],
        "walStatus": row["wal_status"],
        "safeWalSizeBytes": row["safe_wal_size"],
    }


def _unroutable(rows: list[Row]) -> dict[str, Any]:
    oldest = min((r["oldest"] for r in rows), default=None)
    return {
        "rows": sum(r["n"] for r in rows),
        "oldestAt": oldest.isoformat() if oldest else None,
        "byType": {r["event_type"]: r["n"] for r in rows},
    }


def _holder(row: Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "backendPid": row["backend_pid"],
        "application": row["application_name"],
        "clientAddr": row["client_addr"],
        "since": row["backend_start"].isoformat() if row["backend_start"] else None,
    }


def _heartbeat(row: Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "pid": row["pid"],
        "host": row["host"],
        "mode": row["mode"],
        "published": row["published"],
        "eventsPerS": round(row["events_per_s"], 1),
        "updatedAt": row["updated_at"].isoformat(),
        "ageS": round(float(row["age_s"]), 1),
        "lastPublishAt": row["last_publish_at"].isoformat() if row["last_publish_at"] else None,
    }


def warnings(status: dict[str, Any], wal_problem: str | None) -> list[str]:
    """Plain sentences about conditions that lose events or fill the disk."""
    out: list[str] = []
    slot = status["slot"]
    if status["mode"] == "cdc" and wal_problem:
        out.append(wal_problem)
    if slot["exists"]:
        if slot["retainedBytes"] is not None and slot["retainedBytes"] > RETAINED_WARN_BYTES:
            out.append(
                f"Slot {slot['name']} retains {_size(slot['retainedBytes'])} of WAL; an unread slot fills the "
                "disk, so start the cdc relay or run `pulse relay drop-slot`."
            )
        if slot["walStatus"] == "lost":
            out.append(
                f"Slot {slot['name']} is lost: the server removed WAL it still needed (max_slot_wal_keep_size)."
                " Start the cdc relay: it creates the slot again and publishes the rows still in the outbox."
            )
        elif slot["walStatus"] in ("extended", "unreserved"):
            out.append(
                f"Slot {slot['name']} has wal_status={slot['walStatus']}: the server is keeping (or has "
                "already removed) WAL beyond its normal limit for it."
            )
        if status["mode"] == "polling" and status["holder"] is None:
            out.append(
                f"Slot {slot['name']} exists but PULSE_OUTBOX_MODE=polling and no cdc relay reads it, so it "
                "keeps WAL forever: run `pulse relay drop-slot` unless you switch back to cdc."
            )
    recreated = status.get("slotRecreated")
    if recreated and recreated["ageS"] < RECREATED_WARN_S:
        out.append(
            f"Slot {slot['name']} was lost and recreated at {recreated['at']} ({recreated['reason']}); the "
            f"{recreated['outboxRows']} rows then in shared.outbox were published again, so no event was lost, "
            "but some may have been delivered twice."
        )
    unroutable = status.get("unroutable") or {}
    if unroutable.get("rows"):
        types = ", ".join(f"{t} ({n})" for t, n in unroutable["byType"].items())
        out.append(
            f"{unroutable['rows']} unroutable event(s) stay in the outbox because no queue is bound to their "
            f"type: {types}; the oldest since {unroutable['oldestAt']}. Bind a queue (or fix the topology) and "
            "the relay delivers them on its next retry."
        )
    if status["mode"] == "cdc" and status["holder"] is None:
        out.append("No cdc relay is running (no process holds the relay lock): outbox events wait until one starts.")
    return out


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(status: dict[str, Any]) -> str:
    """The status as a small human-readable table, warnings last."""
    slot, holder, beat = status["slot"], status["holder"], status["heartbeat"]
    rows = [
        ("mode", status["mode"]),
        ("wal_level", status["walLevel"]),
        ("publication", status["publication"]["name"] + ("" if status["publication"]["exists"] else " (missing)")),
        ("slot", slot["name"] + ("" if slot["exists"] else " (missing)")),
    ]
    if slot["exists"]:
        rows += [
            ("slot lag", _size(slot["lagBytes"])),
            ("retained WAL", _size(slot["retainedBytes"])),
            ("wal_status", slot["walStatus"] or "-"),
        ]
    if status.get("slotRecreated"):
        rows.append(
            (
                "slot lost",
                f"lost and recreated at {status['slotRecreated']['at']} "
                f"({status['slotRecreated']['times']} time(s) in all)",
            )
        )
    rows.append(("holder", f"backend {holder['backendPid']} · {holder['application']}" if holder else "none"))
    if beat:
        rows += [
            (
                "events/s",
                f"{beat['eventsPerS']:.1f} (heartbeat {beat['ageS']:.0f}s ago, pid {beat['pid']} on {beat['host']})",
            ),
            ("published", str(beat["published"])),
            ("last publish", beat["lastPublishAt"] or "never"),
        ]
    rows.append(("outbox rows", str(status["outboxRows"])))
    unroutable = status.get("unroutable") or {"rows": 0}
    rows.append(
        ("unroutable", f"{unroutable['rows']} (oldest {unroutable['oldestAt']})" if unroutable["rows"] else "0")
    )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"WARNING: {w}" for w in status["warnings"]]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    status = relay_status(settings)
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


def drop_slot(settings: config.Settings) -> dict[str, Any]:
    """Drop the configured slot unless a relay is using it; returns what was dropped."""
    with db.connect(settings.database_url, autocommit=True) as conn:
        return cdc_slot.drop(conn, settings.cdc_slot)


def cmd_drop_slot(args: argparse.Namespace) -> int:
    settings = _settings()
    if not args.yes:
        if not sys.stdin.isatty():
            print("pulse: drop-slot needs --yes when not run from a terminal.", file=sys.stderr)
            return 2
        answer = input(
            f"Drop replication slot {settings.cdc_slot}? Events not yet relayed from the WAL are then "
            "only in shared.outbox (a polling or restarted cdc relay still publishes them). [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print("not dropped")
            return 1
    print(json.dumps(drop_slot(settings)))
    return 0


def register(subparsers: Subparsers) -> None:
    """Add ``pulse relay status`` and ``pulse relay drop-slot``."""
    r = subparsers.add_parser("relay", help="outbox relay: status, drop an abandoned replication slot")
    sub = r.add_subparsers(dest="relay_command", required=True, metavar="ACTION")
    s = sub.add_parser(
        "status",
        help="mode, lock holder, slot lag and retained WAL, events/s, last publish, unroutable events",
        description="Reads the slot, the relay lock and the relay heartbeat of PULSE_CDC_SLOT in "
        "PULSE_DATABASE_URL; prints WARNING lines for a slot that keeps too much WAL and for "
        "unroutable events (no queue bound to their type) kept in the outbox.",
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_status)
    d = sub.add_parser(
        "drop-slot",
        help="drop the CDC replication slot (refused while a relay holds it)",
        description="An unread slot keeps every WAL segment from its position on and fills the "
        "disk. Rows still in shared.outbox are not lost: a polling relay, or a cdc relay that "
        "creates the slot again, publishes them.",
    )
    d.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    d.set_defaults(func=cmd_drop_slot)
