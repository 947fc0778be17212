"""inventory.queue: reserve stock for an order (optimistic locking) and restock after a declined payment."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pulse.events import (
    Envelope,
    Item,
    MalformedEnvelope,
    OrderCreated,
    PaymentFailed,
    PaymentProcessed,
    Shortage,
    StockFailed,
    StockReleased,
    StockReserved,
    dumps,
)
from pulse.infra import db, outbox
from pulse.status import FailureReason

if TYPE_CHECKING:
    from pulse.deps import Deps

log = logging.getLogger(__name__)
MAX_VERSION_RETRIES = 8
# Keys of a consumer batch's copies (db.Batch.locked): inventory rows by product id, decisions by order id.
ITEMS, RESERVATIONS = "inventory.inventory_items", "inventory.reservations"
_ROW = "product_id, available_quantity, version"
NAIVE_WINDOW_S = 0.02


class VersionConflict(Exception):
    """Another transaction changed the inventory row between our read and our write."""


class OutOfStock(Exception):
    def __init__(self, shortages: list[Shortage]) -> None:
        super().__init__(f"not enough stock for {len(shortages)} product(s)")
        self.shortages = shortages


def _with_version_retries(work: Callable[[], None]) -> None:
    """Run ``work()`` again on VersionConflict, with jitter, a bounded number of times."""
    for attempt in range(1, MAX_VERSION_RETRIES + 1):
        try:
            return work()
        except VersionConflict:
            if attempt == MAX_VERSION_RETRIES:
                raise
            time.sleep(random.uniform(0, 0.004 * attempt))


def _take(conn: db.Conn, items: Iterable[Item], *, checked: bool = True, locked: dict[Any, Any] | None = None) -> None:
    """Decrement every item's stock or none: a shortage is found before any row is written, and a version conflict
    midway leaves a partial decrement for the caller to undo (its savepoint, or its failed batch's rollback).

    One read of every item's row, then a versioned update of each, in product order so concurrent reservers
    take the row locks in the same order and cannot deadlock. (The updates stay one round trip each: a psycopg
    pipeline saved wall time but cost more Python CPU than it saved, 52 against 32 µs for one item.)
    ``locked`` is the consumer batch's copy of rows its pre-lock locked (:func:`lock_batch`): rows found there
    are not read again, and each updated row goes back there as the update left it.

    ``checked=False`` is the lab's naive ``no-version-check``: the stock read is written back minus the
    quantity with no version condition, so a concurrent reservation's decrement in between is overwritten.
    """
    if not checked:
        _take_unchecked(conn, items)
        return
    wanted: dict[str, int] = {}
    for item in sorted(items, key=lambda i: i.product_id):
        wanted[item.product_id] = wanted.get(item.product_id, 0) + item.quantity
    cache = locked if locked is not None else {}
    rows = {pid: row for pid in wanted if (row := cache.get((ITEMS, _canonical(pid)))) is not None}
    unread = [pid for pid in wanted if pid not in rows]
    if unread:
        read = {
            str(r["product_id"]): r
            for r in conn.execute(
                "SELECT product_id, available_quantity, version FROM inventory.inventory_items "
                "WHERE product_id = ANY(%s::uuid[])",
                (unread,),
            ).fetchall()
        }
        rows.update({pid: read[key] for pid in unread if (key := _canonical(pid)) is not None and key in read})
    found = [(pid, quantity, rows.get(pid)) for pid, quantity in wanted.items()]
    shortages = [
        Shortage(product_id=pid, requested=quantity, available=0 if row is None else row["available_quantity"])
        for pid, quantity, row in found
        if row is None or row["available_quantity"] < quantity
    ]
    if shortages:
        raise OutOfStock(shortages)
    for pid, quantity, row in found:
        updated = conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = available_quantity - %s, "
            "version = version + 1, updated_at = now() WHERE product_id = %s AND version = %s "
            f"RETURNING {_ROW}",
            (quantity, pid, row["version"]),  # type: ignore[index]  # a missing row is a shortage, raised above
        ).fetchone()
        if updated is None:
            raise VersionConflict(pid)
        if locked is not None:  # updated, so locked by this transaction until it ends: safe to keep
            locked[(ITEMS, str(updated["product_id"]))] = updated


def _take_unchecked(conn: db.Conn, items: Iterable[Item]) -> None:
    """The naive ``no-version-check`` path of :func:`_take`: read, wait, write back, one item at a time."""
    shortages: list[Shortage] = []
    for item in sorted(items, key=lambda i: i.product_id):
        row = conn.execute(
            "SELECT available_quantity FROM inventory.inventory_items WHERE product_id = %s", (item.product_id,)
        ).fetchone()
        if row is None or row["available_quantity"] < item.quantity:
            available = 0 if row is None else row["available_quantity"]
            shortages.append(Shortage(product_id=item.product_id, requested=item.quantity, available=available))
            continue
        time.sleep(NAIVE_WINDOW_S)  # widens the read-to-write window so the lab shows the lost update reliably
        conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = %s, version = version + 1, "
            "updated_at = now() WHERE product_id = %s",
            (row["available_quantity"] - item.quantity, item.product_id),
        )
    if shortages:
        raise OutOfStock(shortages)


def lock_batch(conn: db.Conn, envelopes: Iterable[Envelope], naive: Callable[[str], bool] | None = None) -> None:
    """A consumer batch's pre-lock (see Consumer.prelock): the inventory rows of every order in the batch, in
    product order, before any handler runs. The handlers then only re-take locks they hold, so two inventory
    consumers (two `pulse serve` processes) queue behind each other instead of deadlocking.

    The rows it locked, and which of the batch's orders inventory has decided already, stay in the batch
    (``Batch.locked``) for :func:`on_reserve`, which then neither reads them again nor needs a savepoint: rows
    it holds locked cannot change under it, so there is no version conflict to retry.

    ``naive(name)`` tells whether a naive switch is on: ``no-version-check`` skips the pre-lock too, since the
    pre-lock alone serializes batches and would hide the lost update the switch is there to show."""
    if naive is not None and naive("no-version-check"):
        return
    reserving = [(e, items) for e in envelopes if (items := _items_of(e))]
    ids = sorted({item.product_id for _, items in reserving for item in items})
    if not ids:
        return
    rows = conn.execute(
        f"SELECT {_ROW} FROM inventory.inventory_items WHERE product_id = ANY(%s::uuid[]) "
        "ORDER BY product_id FOR UPDATE",
        (ids,),
    ).fetchall()
    current = db.open_batch(conn)
    if current is None:
        return
    current.locked.update({(ITEMS, str(r["product_id"])): r for r in rows})
    orders = sorted({key for e, _ in reserving if (key := _canonical(e.order_id)) is not None})
    decided = {
        str(r["order_id"])
        for r in conn.execute(
            "SELECT order_id FROM inventory.reservations WHERE order_id = ANY(%s::uuid[])", (orders,)
        ).fetchall()
    }
    current.locked.update({(RESERVATIONS, order): order in decided for order in orders})


def _canonical(value: object) -> str | None:
    """The batch's key of an id (None for one that is not a UUID: its handler reads for itself)."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


def _items_of(envelope: Envelope) -> tuple[Item, ...] | None:
    """The envelope's items, or None when its payload does not parse (the dispatcher dead-letters it)."""
    try:
        items: tuple[Item, ...] | None = getattr(envelope.event, "items", None)
        return items
    except MalformedEnvelope:
        return None


def on_reserve(deps: Deps, conn: db.Conn, event: OrderCreated | PaymentProcessed) -> None:
    """ORDER_CREATED (optimistic) or PAYMENT_PROCESSED (post-payment): reserve the order's items."""
    order_id = event.order_id
    # Set by this batch's pre-lock: the order's rows are locked and its decision known (see lock_batch).
    current = db.open_batch(conn)
    key = (RESERVATIONS, _canonical(order_id) or "")
    locked = current.locked if current is not None and key in current.locked else None
    decided = (
        locked[key]
        if locked is not None
        else conn.execute("SELECT 1 FROM inventory.reservations WHERE order_id = %s", (order_id,)).fetchone()
    )
    if decided and not deps.naive("no-inbox"):
        return  # decided already under another event id (e.g. a re-driven saga)
    deps.faults.point("inventory.reserve", order=order_id)
    items = dumps([i.to_payload() for i in event.items])
    checked = not deps.naive("no-version-check")

    def reserve() -> None:
        _take(conn, event.items, checked=checked, locked=locked)
        conn.execute(
            "INSERT INTO inventory.reservations (order_id, items, status) "
            "VALUES (%s, %s::jsonb, 'RESERVED') ON CONFLICT (order_id) DO NOTHING",
            (order_id, items),
        )

    def attempt() -> None:
        with conn.transaction():  # a savepoint: a version conflict undoes this attempt only
            reserve()

    try:
        if locked is not None:
            reserve()  # no conflict to retry on rows this transaction holds locked, hence no savepoint either
        else:
            _with_version_retries(attempt)
    except OutOfStock as exc:
        # Recorded so a re-driven trigger event cannot reserve an order that already failed.
        conn.execute(
            "INSERT INTO inventory.reservations (order_id, items, status) "
            "VALUES (%s, %s::jsonb, 'FAILED') ON CONFLICT (order_id) DO NOTHING",
            (order_id, items),
        )
        outbox.append_event(conn, event.follow(StockFailed, reason=FailureReason.OUT_OF_STOCK, shortages=exc.shortages))
    else:
        outbox.append_event(conn, event.follow(StockReserved))
    if locked is not None:
        locked[key] = True  # a second event of this order in the batch finds it decided


def on_restock(deps: Deps, conn: db.Conn, event: PaymentFailed) -> None:
    """PAYMENT_FAILED (optimistic): give back exactly what this order reserved, once."""
    reservation = conn.execute(
        "SELECT items FROM inventory.reservations WHERE order_id = %s AND status = 'RESERVED' FOR UPDATE",
        (event.order_id,),
    ).fetchone()
    if reservation is None:
        return  # nothing was taken for this order (e.g. the payment failed before any reservation)
    released = StockReleased(
        order_id=event.order_id,
        user_id=event.user_id,
        strategy=event.strategy,
        items=reservation["items"],
        reason=FailureReason.PAYMENT_FAILED,
    )
    # The lab's naive no-compensation: the reservation is marked released and announced, its units never return.
    forget = deps.naive("no-compensation")
    current = db.open_batch(conn)
    for item in sorted(released.items, key=lambda i: i.product_id) if not forget else ():  # lock order
        # An increment needs no version check, but bumping the version makes concurrent
        # reservers that read the old quantity retry instead of overwriting it.
        row = conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = available_quantity + %s, "
            f"version = version + 1, updated_at = now() WHERE product_id = %s RETURNING {_ROW}",
            (item.quantity, item.product_id),
        ).fetchone()
        if current is not None and row is not None:  # keep the batch's copy current for a reservation after it
            current.locked[(ITEMS, str(row["product_id"]))] = row
    conn.execute(
        "UPDATE inventory.reservations SET status = 'RELEASED', updated_at = now() WHERE order_id = %s",
        (event.order_id,),
    )
    outbox.append_event(conn, released)
