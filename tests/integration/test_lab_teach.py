"""The teaching API, each test on fresh private services of its own: every naive switch demonstrated off and on,
the stepper walking a saga, predictions and the generated summary."""

from __future__ import annotations

import multiprocessing

import pytest

from pulse.lab import Lab, teach
from pulse.lab import scenarios as sc
from pulse.seed import IPHONE

pytestmark = pytest.mark.integration


@pytest.fixture
def lab(campaign_env, tmp_path):
    # Services of its own: a demonstration's off run leaves broken orders (and, were it to fail half way, an armed
    # switch) on purpose, which later tests of the session must not meet.
    lab = Lab(
        strategy="optimistic",
        outbox_mode="polling",
        log_dir=tmp_path,
        env={**campaign_env, "PULSE_WATCHDOG_DEADLINE_S": "2", "PULSE_WATCHDOG_INTERVAL_S": "1"},
    ).start(tap=False)
    yield lab
    lab.stop()


DEMOS = [
    ("lua-reservation", "reserve-get-set", sc.rush),
    ("cart-promise", "release-on-order-created", sc.promise_window),
    ("inbox", "no-inbox", sc.redelivery),
    ("state-guards", "unguarded-state", sc.late_event),
    ("reconcile-cooldown", "reconcile-full-scan", sc.reconcile_in_flight),
    ("idempotency-lock", "lock-no-owner", sc.triple_click),
    ("publisher-confirms", "publish-no-confirm", sc.relay_crash),
    ("cart-expiry", "cart-native-ttl", sc.expiring_carts),
    ("dead-letter", "dlq-drop", sc.poison_message),
    ("compensation", "no-compensation", sc.declined_order),
]


@pytest.mark.parametrize("pattern,switch,scenario", DEMOS, ids=[d[1] for d in DEMOS])
def test_each_switch_is_demonstrated_off_and_on(lab, pattern, switch, scenario):
    demo = lab.demonstrate(pattern, switch, scenario)
    assert set(demo["off"]["violations"]) & set(teach.caught_by(switch)), demo
    assert demo["on"]["violations"] == [], demo
    assert lab.demonstrations == [demo]
    text = teach.what_you_saw(lab.demonstrations, display=False)
    assert pattern in text and demo["off"]["violations"][0] in text


def _burn(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def test_the_rush_shoppers_arrive_together_on_a_busy_machine(lab):
    # CI once saw the naive rush accept no more carts than there were units: the shoppers trickled in as their
    # threads started and connected. On a machine kept busy, every naive add must still read the same count.
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=_burn, args=(stop,), daemon=True) for _ in range(4)]
    for hog in hogs:
        hog.start()
    try:
        demo = lab.demonstrate("lua-reservation", "reserve-get-set", lambda lab: sc.rush(lab, stock=3, shoppers=16))
    finally:
        stop.set()
        for hog in hogs:
            hog.join()
    assert demo["off"]["accepted"] == 16 and demo["on"]["accepted"] == 3, demo


def test_lost_updates_are_demonstrated_with_two_inventory_consumers(lab):
    lab.switch(consumer_threads=2)
    demo = lab.demonstrate("optimistic-locking", "no-version-check", sc.crowd)
    assert "stock-conservation" in demo["off"]["violations"] and demo["on"]["violations"] == [], demo
    assert demo["off"]["unitsLeftShelf"] < demo["off"]["unitsOrdered"] == demo["on"]["unitsLeftShelf"], demo


def test_a_lost_event_hangs_the_order_only_without_the_watchdog(lab):
    lab.env["PULSE_WATCHDOG_DEADLINE_S"] = "60"  # the server's own watchdog must not finish the off run's order
    lab.restart()
    demo = lab.demonstrate("watchdog", "no-watchdog", sc.lost_event)
    assert "orders-terminal" in demo["off"]["violations"] and demo["on"]["violations"] == [], demo
    assert demo["off"]["completed"] == 0 and demo["on"]["completed"] == 1, demo


def test_a_demonstration_that_does_not_break_fails_with_one_sentence(lab):
    def harmless(lab):
        return {"products": [lab.new_product(stock=3)]}

    with pytest.raises(AssertionError, match=r"should have broken no-oversell, but the checker reported nothing\.$"):
        lab.demonstrate("lua-reservation", "reserve-get-set", harmless)


def test_scoped_check_uses_the_checkers_names(lab):
    since = lab.now()
    product = lab.new_product(stock=2)
    lab.checkout({product: 1})
    report = lab.check(since=since, products=[product])
    names = {r["name"] for r in report}
    assert {"no-oversell", "cart-promise-kept", "delivery", "orders-terminal"} <= names
    assert [r["name"] for r in report if not r["ok"]] == []


def test_stepper_walks_a_declined_order_through_its_compensation(lab):
    stepper = lab.hold()
    assert lab.held
    lab.arm("payment.decline", 1.0, max=1)
    order = lab.checkout({IPHONE: 1}, wait=False)
    first = lab.step(show=False)
    assert first["event"] == "ORDER_CREATED" and first["acted"]
    steps = [first] + stepper.run(show=False)
    lab.disarm("payment.decline")
    events = [(s["module"], s["event"]) for s in steps if s["acted"]]
    assert ("payment", "STOCK_RESERVED") in events and ("inventory", "PAYMENT_FAILED") in events
    restock = next(s for s in steps if (s["module"], s["event"]) == ("inventory", "PAYMENT_FAILED"))
    changed = {c["what"]: c for c in restock["changes"]}
    assert changed["inventory.reservations.status"]["after"] == "RELEASED"
    assert "STOCK_RELEASED" in restock["emitted"]
    lab.release()
    assert not lab.held
    assert lab.client.order(order["orderId"])["displayStatus"] == "FAILED_PAYMENT"


def test_predictions_are_read_from_the_parameter_and_compared():
    teach.predict("How many carts?", ["3", "more than 3"], "carts", answers={"carts": "3"})
    result = teach.reveal("carts", "more than 3")
    assert result == {"key": "carts", "predicted": "3", "actual": "more than 3", "correct": False}


def test_stepper_walks_a_post_payment_refund_under_cdc_then_the_relay_takes_over(campaign_env, tmp_path):
    # The stepper relays in the kernel while the cdc slot also records those rows; once released, the cdc relay
    # starts from a new slot (lab.release drops the idle one) and carries the next saga.
    lab = Lab(strategy="post-payment", outbox_mode="cdc", log_dir=tmp_path, env=campaign_env).start(tap=False)
    try:
        since = lab.now()
        product = lab.new_product(stock=1)
        stepper = lab.hold()
        order = lab.checkout({product: 1}, wait=False)
        # The warehouse finds the last unit damaged after the cart reserved it: charged first, then out of stock.
        lab.execute("UPDATE inventory.inventory_items SET available_quantity = 0 WHERE product_id = %s", (product,))
        steps = stepper.run(show=False)
        acted = [(s["module"], s["event"]) for s in steps if s["acted"]]
        assert ("payment", "ORDER_CREATED") in acted and ("inventory", "PAYMENT_PROCESSED") in acted, acted
        refund = next(s for s in steps if (s["module"], s["event"]) == ("payment", "STOCK_FAILED"))
        assert "PAYMENT_REFUNDED" in refund["emitted"]
        lab.release()
        assert lab.client.wait_settled(order["orderId"])["displayStatus"] == "REFUNDED"
        after = lab.checkout({IPHONE: 1})  # a saga through the cdc relay after the release: the relay streams again
        assert after["displayStatus"] == "COMPLETED", after
        payments = lab.execute("SELECT status FROM payment.payments WHERE order_id = %s", (order["orderId"],))
        assert [p["status"] for p in payments] == ["REFUNDED"]
        violations = {c["name"] for c in lab.check(since=since, products=[product]) if not c["ok"]}
        # The write-off happened outside the system, and the checker rightly says so (units gone, a held cart
        # refused); nothing else: no effect twice, no delivery missing, the money refunded.
        assert violations <= {"stock-conservation", "cart-promise-kept"}, violations
    finally:
        lab.stop()
