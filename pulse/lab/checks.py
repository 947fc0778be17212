"""Invariants a notebook can check after a run: nothing oversold, lost, double-charged or left drifting.

These are the lab's: each is one query whose offending rows are the evidence. The project's own checker
(:mod:`pulse.tools.check.invariants`) adds its results to them.
"""

from __future__ import annotations

from pulse import topology
from pulse.infra import broker


def _result(name: str, offenders: list, detail: str) -> dict:
    return {"name": name, "ok": not offenders, "detail": detail, "offenders": [str(o) for o in offenders[:20]]}


def no_oversell(lab, initial_stock=None) -> dict:
    """No product below zero; with ``initial_stock``, initial = available + units held by RESERVED orders."""
    df = lab.q.sql(
        "SELECT i.product_id::text AS product, i.available_quantity AS available, "
        "coalesce((SELECT sum((item->>'quantity')::int) FROM inventory.reservations r, "
        "jsonb_array_elements(r.items) item WHERE r.status = 'RESERVED' "
        "AND item->>'productId' = i.product_id::text), 0) AS held FROM inventory.inventory_items i"
    )
    offenders = [r.product for r in df.itertuples() if r.available < 0]
    for product, initial in (initial_stock or {}).items():
        row = df[df["product"] == str(product)]
        if row.empty or int(row.iloc[0]["available"]) + int(row.iloc[0]["held"]) != initial:
            offenders.append(
                f"{product}: initial {initial} != available + held "
                f"{'?' if row.empty else int(row.iloc[0]['available']) + int(row.iloc[0]['held'])}"
            )
    return _result("no-oversell", offenders, "stock never negative and conserved per product")


def money(lab, initial_stock=None) -> dict:
    """Σ successful charges = Σ COMPLETED totals; no FAILED order keeps a successful charge."""
    kept = lab.q.sql(
        "SELECT o.id::text AS id FROM orders.orders o JOIN payment.payments p ON p.order_id = o.id "
        "WHERE o.status = 'FAILED' AND p.status = 'SUCCESS'"
    )
    sums = lab.q.sql(
        "SELECT (SELECT coalesce(sum(amount), 0) FROM payment.payments WHERE status = 'SUCCESS') AS charged, "
        "(SELECT coalesce(sum(total_amount), 0) FROM orders.orders WHERE status = 'COMPLETED') AS completed"
    ).iloc[0]
    offenders = list(kept["id"])
    if sums["charged"] != sums["completed"]:
        offenders.append(f"charged {sums['charged']} != completed totals {sums['completed']}")
    return _result("money", offenders, "charged - refunded = totals of completed orders")


def no_leaked_reservation(lab, initial_stock=None) -> dict:
    """A FAILED order holds no stock; a COMPLETED order holds its reservation."""
    df = lab.q.sql(
        "SELECT o.id::text AS id FROM orders.orders o LEFT JOIN inventory.reservations r ON r.order_id = o.id "
        "WHERE (o.status = 'FAILED' AND r.status = 'RESERVED') "
        "OR (o.status = 'COMPLETED' AND r.status IS DISTINCT FROM 'RESERVED')"
    )
    return _result("no-leaked-reservation", list(df["id"]), "failed orders gave their stock back")


def all_settled(lab, initial_stock=None) -> dict:
    """Every order reached its terminal state with compensation done and the view caught up."""
    n = lab.q.unsettled_count()
    return _result("all-settled", [f"{n} orders not settled"] if n else [], "every saga finished")


def outbox_drained(lab, initial_stock=None) -> dict:
    lag = lab.q.relay_lag()
    return _result(
        "outbox-drained", [f"{lag['rows']} rows waiting"] if lag["rows"] else [], "the relay published everything"
    )


def dead_letters(lab, initial_stock=None) -> dict:
    """Dead-letter queues are empty (a message there needs an explanation)."""
    conn = broker.connect(lab.settings.amqp_url)
    try:
        channel = conn.channel()
        counts = {
            broker.dead_letter_queue(q): channel.queue_declare(
                broker.dead_letter_queue(q), durable=True
            ).method.message_count
            for q in topology.QUEUES
        }
    finally:
        conn.close()
    return _result("dead-letters", [f"{q}: {n}" for q, n in counts.items() if n], "no message dead-lettered")


def redis_matches_db(lab, initial_stock=None) -> dict:
    """After a reconciliation with cooldown 0, every stock:/reserved: key equals PostgreSQL."""
    lab.reconcile_now(cooldown_s=0, full=True)
    df = lab.q.drift()
    bad = df[(df["stock_drift"].fillna(0) != 0) | (df["reserved_drift"] != 0)]
    return _result("redis-matches-db", list(bad["product_id"]), "reconciliation leaves no drift")


CHECKS = (no_oversell, money, no_leaked_reservation, all_settled, outbox_drained, dead_letters, redis_matches_db)


def run(lab, initial_stock: dict[str, int] | None = None) -> list[dict]:
    """Every lab invariant, then those of :mod:`pulse.tools.check.invariants`."""
    results = [check(lab, initial_stock) for check in CHECKS]
    return results + project_checks(lab)


def project_checks(lab) -> list[dict]:
    """The project checker's results (those of ``pulse check``) in the lab's shape."""
    from pulse.tools.check import invariants

    out = []
    for result in invariants.check_all(lab.settings)["results"]:
        out.append(
            {
                "name": f"check:{result.name}",
                "ok": result.passed,
                "detail": str(result.details),
                "offenders": [str(o) for o in result.offending][:20],
            }
        )
    return out


def scoped(lab, scope=None, *, since=None, products: list[str] | None = None) -> list[dict]:
    """The project checker's invariants (:func:`pulse.tools.check.invariants.check_all`) for one scenario's
    scope: orders and events since ``since``, products ``products`` (or an explicit ``scope``), under their own
    names.

    It reconciles Redis first (a full pass, every naive switch off), as ``pulse check`` does, so
    ``redis-matches-db`` judges what reconciliation could not repair.
    """
    from pulse.tools.check import invariants

    scope = scope or invariants.Scope(since=since, products=[str(p) for p in products] if products else None)
    report = invariants.check_all(lab.settings, scope)
    return [
        {"name": r.name, "ok": bool(r.passed), "detail": r.details, "offenders": [str(o) for o in r.offending[:20]]}
        for r in report["results"]
    ]
