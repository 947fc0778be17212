"""The invariants of the event pipeline: the outbox drained and every event routed, each published event
consumed by every module bound to it (or its loss explained), the CDC slot able to stream, and every
dead-lettered message caused by an injected fault.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from pulse import topology
from pulse.infra import broker
from pulse.infra.db import one
from pulse.tools.check.base import ORDERS_IN_SCOPE, Result, Scope, result

if TYPE_CHECKING:
    from pulse.infra import db

QUEUE_INBOX = topology.QUEUE_INBOX


def outbox_drained(conn: db.Conn, scope: Scope) -> Result:
    n = one(conn.execute("SELECT count(*) AS n FROM shared.outbox"))["n"]
    return Result("outbox-drained", n == 0, "the outbox is empty" if n == 0 else f"{n} event(s) still in the outbox")


def events_routed(conn: db.Conn, scope: Scope) -> Result:
    """No outbox event that RabbitMQ returned as unroutable (no queue bound to its type) waits in the outbox."""
    rows = conn.execute(
        "SELECT id, event_type FROM shared.outbox WHERE unroutable_at IS NOT NULL ORDER BY seq"
    ).fetchall()
    types = collections.Counter(r["event_type"] for r in rows)
    named = ", ".join(f"{t} ({n})" for t, n in sorted(types.items()))
    return Result(
        "events-routed",
        not rows,
        "no event is waiting for a queue to be bound to its type"
        if not rows
        else f"{len(rows)} unroutable event(s) in the outbox, no queue is bound to: {named}",
        [r["id"] for r in rows],
        {"byType": dict(types)} if rows else {},
    )


def delivery(conn: db.Conn, scope: Scope, dead_lettered: dict[str, set[str]] | None = None) -> Result:
    """Every published event consumed by each module bound to it: lost = 0, unexpected = 0, duplicates counted."""
    args = scope.sql()
    explained = collections.defaultdict(set)
    for r in conn.execute(
        "SELECT context->>'queue' AS q, context->>'event_id' AS e FROM infra.fault_log "
        "WHERE name = 'consumer.lose' AND fired_at >= %(since)s",
        args,
    ):
        explained[r["q"]].add(r["e"])
    lost, injected, dlq, expected = [], 0, 0, 0
    for strategy in topology.STRATEGIES:
        for queue, types in topology.handled_events(strategy).items():
            # A re-driven event is meant for one queue only (its redrive_for); the others drop it unhandled.
            rows = conn.execute(
                f"WITH o AS ({ORDERS_IN_SCOPE}) SELECT e.event_id::text AS id, "
                f"EXISTS (SELECT 1 FROM {QUEUE_INBOX[queue]} i WHERE i.event_id = e.event_id) AS consumed "
                "FROM infra.event_log e JOIN o ON o.id::text = e.aggregate_id "
                "WHERE o.strategy = %(strategy)s AND e.event_type = ANY(%(types)s) AND e.created_at >= %(since)s "
                "AND (e.redrive_for IS NULL OR e.redrive_for = %(queue)s)",
                {**args, "strategy": strategy, "types": types, "queue": queue},
            ).fetchall()
            expected += len(rows)
            for r in rows:
                if r["consumed"]:
                    continue
                if r["id"] in explained[queue]:
                    injected += 1
                elif r["id"] in (dead_lettered or {}).get(queue, ()):
                    dlq += 1
                else:
                    lost.append(f"{queue}:{r['id']}")
    unexpected, duplicates = [], 0
    for queue, table in QUEUE_INBOX.items():
        unexpected += [
            f"{queue}:{r['event_id']}"
            for r in conn.execute(
                f"SELECT i.event_id FROM {table} i WHERE i.processed_at >= %(since)s AND NOT EXISTS "
                "(SELECT 1 FROM infra.event_log e WHERE e.event_id = i.event_id)",
                args,
            )
        ]
        duplicates += one(
            conn.execute(f"SELECT COALESCE(SUM(duplicates), 0) AS n FROM {table} WHERE processed_at >= %(since)s", args)
        )["n"]
    data = {
        "expected": expected,
        "lost": len(lost),
        "unexpected": len(unexpected),
        "duplicates": int(duplicates),
        "lostByInjection": injected,
        "deadLettered": dlq,
    }
    passed = not lost and not unexpected
    text = (
        f"{expected} deliveries expected, lost 0, unexpected 0, duplicates {duplicates} absorbed by inboxes"
        f" ({injected} lost on purpose by consumer.lose and re-driven)"
        if passed
        else f"lost {len(lost)}, unexpected {len(unexpected)} of {expected} expected deliveries"
    )
    return Result("delivery", passed, text, lost + unexpected, data)


def replication_slot(conn: db.Conn, scope: Scope, slot: str) -> Result:
    """The CDC slot can still stream. A slot lost now fails; one the relay recreated after a loss (within the
    scope) passes, since the outbox rows it missed were published again, but says so and when."""
    row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    recreated = []
    if one(conn.execute("SELECT to_regclass('infra.relay_slot_losses') IS NOT NULL AS ok"))["ok"]:
        recreated = [
            r["recreated_at"].isoformat()
            for r in conn.execute(
                "SELECT recreated_at FROM infra.relay_slot_losses WHERE slot = %s AND recreated_at >= %s "
                "ORDER BY recreated_at",
                (slot, scope.sql()["since"]),
            )
        ]
    data = {"recreatedAfterLoss": recreated} if recreated else {}
    if row is None:
        return Result("replication-slot", True, f"no slot {slot} (polling relay)", [], data)
    if row["wal_status"] == "lost":
        return Result(
            "replication-slot",
            False,
            f"slot {slot} is lost (the server removed WAL it needed, past "
            "max_slot_wal_keep_size); a cdc relay recreates it when it starts",
            [slot],
            data,
        )
    details = f"slot {slot} wal_status = {row['wal_status']}"
    if recreated:
        details += (
            f"; it was lost and recreated by the relay {len(recreated)} time(s), last at {recreated[-1]} "
            "(the outbox rows still there were published again: duplicates possible, no loss)"
        )
    return Result("replication-slot", True, details, [], data)


# -- dead letters ------------------------------------------------------------------------------------
def peek_dead_letters(
    amqp_url: str, limit: int = 1000, since_epoch: float | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Read (without removing) the dead-lettered messages of every queue: id and reason."""
    conn = broker.connect(amqp_url)
    found: dict[str, list[dict[str, Any]]] = {}
    try:
        for queue in topology.QUEUES:
            channel = conn.channel()
            messages: list[dict[str, Any]] = []
            try:
                while len(messages) < limit:
                    method, props, _body = channel.basic_get(broker.dead_letter_queue(queue), auto_ack=False)
                    if method is None:
                        break
                    headers = props.headers or {}
                    # The consumer stamps whole epoch milliseconds (AMQP tables have no float type).
                    if since_epoch is not None and float(headers.get("x-pulse-failed-at", 0)) / 1000 < since_epoch:
                        continue
                    messages.append({"id": props.message_id, "reason": str(headers.get("x-pulse-reason", ""))})
            except Exception:  # the DLQ may not exist yet (topology never declared): nothing dead-lettered
                pass
            finally:
                if channel.is_open:
                    channel.close()  # unacked messages go back to the queue untouched
            found[queue] = messages
    finally:
        conn.close()
    return found


def dlq_explained(dead: dict[str, list[dict[str, Any]]]) -> Result:
    unexplained = [f"{q}:{m['id']}" for q, ms in dead.items() for m in ms if "FaultInjected" not in m["reason"]]
    total = sum(len(ms) for ms in dead.values())
    reasons = collections.Counter(m["reason"][:120] for ms in dead.values() for m in ms)
    return result(
        "dlq-explained",
        unexplained,
        f"{total} dead-lettered message(s), all caused by injected faults" if total else "dead-letter queues empty",
        "{n} dead-lettered message(s) not caused by an injected fault",
        reasons=dict(reasons.most_common(5)),
    )
