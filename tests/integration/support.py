"""Helpers of the integration tier: reading the outbox, delivering events without a broker, small queries."""

from __future__ import annotations

import collections
import uuid

from pulse import topology
from pulse.events import Envelope
from pulse.infra import broker
from pulse.infra.outbox import envelope_of


def outbox_rows(db, aggregate_id) -> list[dict]:
    """The outbox rows of one aggregate, in commit order."""
    return db.execute(
        "SELECT *, xmin::text AS tx FROM shared.outbox WHERE aggregate_id = %s ORDER BY seq", (str(aggregate_id),)
    ).fetchall()


def envelope(event_type: str, payload: dict, aggregate_id=None) -> Envelope:
    """A new envelope (fresh id), as the relay would put on the wire."""
    return Envelope(
        id=uuid.uuid4(),
        event_type=getattr(event_type, "value", event_type),
        aggregate_id=str(aggregate_id or payload.get("orderId")),
        payload=payload,
    )


class Bus:
    """Does the relay's and the broker's job in-process, one order at a time, with holds.

    ``run(order_id)`` takes the order's outbox rows (deleting them, as the relay would), routes each
    to every queue the broker would (pulse.topology's bindings), and hands it to that queue's dispatcher (which acts
    under the order's strategy), until nothing is left. Deliveries matching ``hold`` (queue names or (queue, event type) pairs)
    are kept back, so a test can look at the order between two steps of the saga.
    """

    def __init__(self, system, db):
        self.system, self.db = system, db
        self.bindings = topology.bindings()
        # handlers[queue][event type]: what a consumer of that queue calls (the queue's dispatcher, whatever the type).
        self.handlers = {q: collections.defaultdict(lambda q=q: system.dispatcher(q)) for q in topology.QUEUES}
        self.pending: list[tuple[str, Envelope]] = []
        self.delivered: list[tuple[str, str]] = []

    def collect(self, aggregate_id) -> None:
        rows = self.db.execute(
            "DELETE FROM shared.outbox WHERE aggregate_id = %s RETURNING *", (str(aggregate_id),)
        ).fetchall()
        for row in sorted(rows, key=lambda r: r["seq"]):
            env = envelope_of(row)
            self.pending += [(q, env) for q in self.bindings.queues_for(env.event_type, env.strategy)]

    def deliver(self, queue: str, env: Envelope) -> None:
        dispatcher = self.system.dispatcher(queue)
        dispatcher(env)
        if not dispatcher.skipped:  # only deliveries the module acted on (not the other strategy's, not re-drives)
            self.delivered.append((queue, env.event_type))

    def run(self, aggregate_id, hold=()) -> list[tuple[str, Envelope]]:
        """Deliver until only held deliveries remain; returns those."""
        held = lambda q, e: q in hold or (q, e.event_type) in hold  # noqa: E731
        while True:
            self.collect(aggregate_id)
            ready = [(q, e) for q, e in self.pending if not held(q, e)]
            if not ready:
                return self.pending
            self.pending = [(q, e) for q, e in self.pending if held(q, e)]
            for queue, env in ready:
                self.deliver(queue, env)


def publish(settings, envelopes, **kwargs) -> None:
    """Publish envelopes straight to the broker (``exchange``/``routing_key`` as ConfirmingPublisher takes them)
    and assert the broker confirmed each."""
    publisher = broker.ConfirmingPublisher(settings.amqp_url)
    try:
        assert publisher.publish_batch(envelopes, **kwargs) == [broker.Delivery.CONFIRMED] * len(envelopes)
    finally:
        publisher.close()


def order_row(db, order_id) -> dict:
    return db.execute("SELECT * FROM orders.orders WHERE id = %s", (str(order_id),)).fetchone()


def view_status(db, order_id) -> str | None:
    row = db.execute("SELECT display_status FROM orders.order_views WHERE order_id = %s", (str(order_id),)).fetchone()
    return row and row["display_status"]


def db_stock(db, product_id) -> int:
    return db.execute(
        "SELECT available_quantity FROM inventory.inventory_items WHERE product_id = %s", (str(product_id),)
    ).fetchone()["available_quantity"]


def set_db_stock(db, product_id, quantity: int) -> None:
    """Change stock the way the warehouse would: the version moves, so in-flight reservers retry."""
    db.execute(
        "UPDATE inventory.inventory_items SET available_quantity = %s, version = version + 1, "
        "updated_at = now() WHERE product_id = %s",
        (quantity, str(product_id)),
    )


def db_cart(db, user_id) -> dict[str, int]:
    """The user's live cart items in PostgreSQL (tombstones excluded)."""
    rows = db.execute(
        "SELECT ci.product_id, ci.quantity FROM inventory.carts c JOIN inventory.cart_items ci "
        "ON ci.cart_id = c.id WHERE c.user_id = %s AND ci.quantity > 0",
        (str(user_id),),
    ).fetchall()
    return {str(r["product_id"]): r["quantity"] for r in rows}


def reserved(rds, product_id) -> int:
    return int(rds.get(f"reserved:{product_id}") or 0)


def redis_cart(rds, user_id) -> dict[str, int]:
    return {p: int(q) for p, q in rds.hgetall(f"cart:{user_id}").items()}
