"""Order creation (SPEC §5): outbox rows in the order's transaction, idempotency, the lock, concurrency."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal

import pytest

from pulse.errors import Conflict, Invalid, NotFound
from tests.integration.support import outbox_rows

pytestmark = pytest.mark.integration


def cart_for(system, new_product, quantities=(2,), price="10.00"):
    user = uuid.uuid4()
    products = [new_product(stock=20, price=price) for _ in quantities]
    for product, qty in zip(products, quantities, strict=True):
        system.carts.add_item(user, uuid.UUID(product), qty)
    return user, products


def test_order_creation_writes_order_items_record_and_both_events_in_one_transaction(
    system, new_product, db, tidy_outbox
):
    user, (a, b) = cart_for(system, new_product, (2, 1), price="12.25")
    response = system.orders.create(user, f"k-{user}")
    order_id = response["orderId"]
    tidy_outbox.append(order_id)
    assert response == {"orderId": order_id, "status": "CREATED", "totalAmount": 36.75}
    order = db.execute("SELECT *, xmin::text AS tx FROM orders.orders WHERE id = %s", (order_id,)).fetchone()
    assert (order["status"], order["payment_status"], order["inventory_status"]) == (
        "CREATED",
        "NOT_STARTED",
        "NOT_STARTED",
    )
    assert order["strategy"] == "OPTIMISTIC" and order["total_amount"] == Decimal("36.75")
    assert order["user_id"] == user and order["failure_reason"] is None
    items = db.execute(
        "SELECT product_id, quantity, unit_price FROM orders.order_items WHERE order_id = %s", (order_id,)
    ).fetchall()
    assert {str(i["product_id"]): (i["quantity"], i["unit_price"]) for i in items} == {
        a: (2, Decimal("12.25")),
        b: (1, Decimal("12.25")),
    }
    record = db.execute(
        "SELECT *, xmin::text AS tx FROM orders.idempotency_records WHERE key = %s", (f"k-{user}",)
    ).fetchone()
    assert record["response_body"] == response
    events = outbox_rows(db, order_id)
    assert [e["event_type"] for e in events] == ["ORDER_CREATED", "ORDER_UPDATED"]
    # Same transaction id on every row: one commit, no dual write.
    assert {e["tx"] for e in events} == {order["tx"]} == {record["tx"]}
    created, updated = (e["payload"] for e in events)
    assert created["orderId"] == order_id and created["userId"] == str(user) and created["strategy"] == "OPTIMISTIC"
    assert Decimal(created["totalPrice"]) == Decimal("36.75")
    assert sorted((i["productId"], i["quantity"]) for i in created["items"]) == sorted([(a, 2), (b, 1)])
    assert updated["status"] == "CREATED" and updated["paymentStatus"] == "NOT_STARTED"
    assert all(e["aggregate_type"] == "ORDER" for e in events)


def test_the_order_records_its_strategy(make_system, new_product, db, tidy_outbox):
    system = make_system(strategy="post-payment")
    user, _ = cart_for(system, new_product)
    order_id = system.orders.create(user, f"k-{user}")["orderId"]
    tidy_outbox.append(order_id)
    assert (
        db.execute("SELECT strategy FROM orders.orders WHERE id = %s", (order_id,)).fetchone()["strategy"]
        == "POST_PAYMENT"
    )
    assert outbox_rows(db, order_id)[0]["payload"]["strategy"] == "POST_PAYMENT"


def test_a_repeated_idempotency_key_returns_the_same_order_and_creates_nothing(
    system, new_product, db, rds, tidy_outbox
):
    user, _ = cart_for(system, new_product)
    first = system.orders.create(user, f"k-{user}")
    tidy_outbox.append(first["orderId"])
    again = system.orders.create(user, f"k-{user}")
    assert again == first
    assert db.execute("SELECT count(*) AS n FROM orders.orders WHERE user_id = %s", (user,)).fetchone()["n"] == 1
    assert len(outbox_rows(db, first["orderId"])) == 2
    assert not rds.exists(f"lock:k-{user}")  # released by its owner after each request


def test_a_key_committed_by_a_request_whose_lock_expired_returns_its_order_and_writes_nothing(
    system, new_product, db, tidy_outbox
):
    # The lock only keeps concurrent duplicates apart; past its TTL the idempotency record's primary key decides,
    # and its UniqueViolation (raised from the pipelined writes) must roll back the whole second order.
    user, _ = cart_for(system, new_product)
    first = system.orders.create(user, f"k-{user}")
    tidy_outbox.append(first["orderId"])
    again = system.orders._create_locked(user, f"k-{user}")  # as if its lock had expired: straight to the insert
    assert again == first
    assert db.execute("SELECT count(*) AS n FROM orders.orders WHERE user_id = %s", (user,)).fetchone()["n"] == 1
    assert (
        db.execute(
            "SELECT count(*) AS n FROM orders.order_items i JOIN orders.orders o ON o.id = i.order_id WHERE o.user_id = %s",
            (user,),
        ).fetchone()["n"]
        == 1
    )
    assert len(outbox_rows(db, first["orderId"])) == 2
    assert (
        db.execute("SELECT count(*) AS n FROM shared.outbox WHERE payload->>'userId' = %s", (str(user),)).fetchone()[
            "n"
        ]
        == 2
    )


def test_a_key_whose_order_already_emptied_the_cart_returns_that_order_not_a_404(system, new_product, db, tidy_outbox):
    # The request before us held the lock, committed, and its ORDER_CREATED already moved the cart into the order.
    user, _ = cart_for(system, new_product)
    first = system.orders.create(user, f"k-{user}")
    tidy_outbox.append(first["orderId"])
    db.execute(
        "DELETE FROM inventory.cart_items ci USING inventory.carts c WHERE ci.cart_id = c.id AND c.user_id = %s",
        (user,),
    )
    assert system.orders._create_locked(user, f"k-{user}") == first  # as if our lock came right after its release
    other, _ = cart_for(system, new_product)
    with pytest.raises(Invalid, match="another user"):
        system.orders._create_locked(other, f"k-{user}")


def test_a_key_used_by_another_user_is_rejected(system, new_product, tidy_outbox):
    user, _ = cart_for(system, new_product)
    tidy_outbox.append(system.orders.create(user, f"k-{user}")["orderId"])
    other, _ = cart_for(system, new_product)
    with pytest.raises(Invalid, match="another user"):
        system.orders.create(other, f"k-{user}")


def test_no_cart_is_404_and_leaves_the_key_unused(system, new_product, db, tidy_outbox):
    user = uuid.uuid4()
    with pytest.raises(NotFound, match="no cart"):
        system.orders.create(user, f"k-{user}")
    assert db.execute("SELECT 1 FROM orders.idempotency_records WHERE key = %s", (f"k-{user}",)).fetchone() is None
    system.carts.add_item(user, uuid.UUID(new_product(stock=3)), 1)
    order = system.orders.create(user, f"k-{user}")  # the key still works once there is a cart
    tidy_outbox.append(order["orderId"])
    assert order["status"] == "CREATED"


def test_a_key_in_flight_is_409(system, new_product, rds, db):
    user, _ = cart_for(system, new_product)
    rds.set(f"lock:k-{user}", "someone-else", ex=10)
    with pytest.raises(Conflict, match="already being created"):
        system.orders.create(user, f"k-{user}")
    assert db.execute("SELECT count(*) AS n FROM orders.orders WHERE user_id = %s", (user,)).fetchone()["n"] == 0
    assert rds.get(f"lock:k-{user}") == "someone-else"  # not ours to release


def test_the_lock_has_a_ttl_so_a_key_stuck_in_progress_does_not_block_forever(
    make_system, new_product, rds, tidy_outbox
):
    system = make_system(idempotency_lock_ttl_s=1)
    user, _ = cart_for(system, new_product)
    # A request that took the lock and died: nothing in the DB, only the lock with its TTL.
    rds.set(f"lock:k-{user}", "dead-request", nx=True, ex=system.settings.idempotency_lock_ttl_s)
    with pytest.raises(Conflict):
        system.orders.create(user, f"k-{user}")
    time.sleep(1.1)
    order = system.orders.create(user, f"k-{user}")
    tidy_outbox.append(order["orderId"])
    assert order["status"] == "CREATED"


def test_the_lock_taken_by_orders_expires_by_itself(system, new_product, rds, tidy_outbox):
    user, _ = cart_for(system, new_product)
    seen = {}
    trip = system.deps.scripts.trip

    def spy(*commands):  # observe the real SET the service sends, then send it unchanged
        result = trip(*commands)
        if commands[0][:2] == ("SET", f"lock:k-{user}"):
            seen["ttl"] = rds.ttl(f"lock:k-{user}")
        return result

    system.deps.scripts.trip = spy
    try:
        tidy_outbox.append(system.orders.create(user, f"k-{user}")["orderId"])
    finally:
        system.deps.scripts.trip = trip
    assert 0 < seen["ttl"] <= 10


def test_12_concurrent_submits_with_one_key_create_exactly_one_order(system, new_product, db, tidy_outbox):
    user, _ = cart_for(system, new_product, (1, 2))
    key, start, results = f"k-{user}", threading.Barrier(12), []

    def submit():
        start.wait()
        try:
            results.append((200, system.orders.create(user, key)["orderId"]))
        except Conflict:
            results.append((409, None))
        except Exception as exc:  # anything else fails the test
            results.append((repr(exc), None))

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12 and {status for status, _ in results} <= {200, 409}, results
    orders = db.execute("SELECT id FROM orders.orders WHERE user_id = %s", (user,)).fetchall()
    assert len(orders) == 1
    order_id = str(orders[0]["id"])
    tidy_outbox.append(order_id)
    assert {oid for status, oid in results if status == 200} == {order_id}
    events = [e["event_type"] for e in outbox_rows(db, order_id)]
    assert events.count("ORDER_CREATED") == 1
    assert (
        db.execute("SELECT count(*) AS n FROM orders.idempotency_records WHERE key = %s", (key,)).fetchone()["n"] == 1
    )
