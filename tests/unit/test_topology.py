"""The saga topology (pulse/topology.py) against SPEC §2/§3 read independently as "who must hear what"."""

import sys
import uuid

import pytest

from pulse import topology
from pulse.events import Envelope, MalformedEnvelope, OrderCreated
from pulse.events import EventType as E
from pulse.infra import broker
from pulse.inventory import handlers as inventory
from pulse.orders import handlers as orders
from pulse.payment import handlers as payment
from pulse.redisstock import handlers as redisstock
from pulse.views import handlers as views

STRATEGIES = ("OPTIMISTIC", "POST_PAYMENT")
EXPECTED = {
    "OPTIMISTIC": {
        "inventory.queue": {"ORDER_CREATED": inventory.on_reserve, "PAYMENT_FAILED": inventory.on_restock},
        "payment.queue": {"STOCK_RESERVED": payment.on_charge},
        "redis-stock.queue": {
            "ORDER_CREATED": redisstock.on_order_created,
            "STOCK_RESERVED": redisstock.on_stock_decided,
            "STOCK_FAILED": redisstock.on_stock_decided,
            "STOCK_RELEASED": redisstock.on_stock_released,
        },
    },
    "POST_PAYMENT": {
        "inventory.queue": {"PAYMENT_PROCESSED": inventory.on_reserve},
        "payment.queue": {"ORDER_CREATED": payment.on_charge, "STOCK_FAILED": payment.on_refund},
        "redis-stock.queue": {
            "ORDER_CREATED": redisstock.on_order_created,
            "STOCK_RESERVED": redisstock.on_stock_decided,
            "STOCK_FAILED": redisstock.on_stock_decided,
            "PAYMENT_FAILED": redisstock.on_stock_decided,
            "STOCK_RELEASED": redisstock.on_stock_released,
        },
    },
}
COMMON = {"order-view.queue": {"ORDER_UPDATED": views.on_order_updated}}
# Events each strategy's saga can produce; the order must hear every one of them.
PRODUCED = {
    "OPTIMISTIC": {"STOCK_RESERVED", "STOCK_FAILED", "STOCK_RELEASED", "PAYMENT_PROCESSED", "PAYMENT_FAILED"},
    "POST_PAYMENT": {"PAYMENT_PROCESSED", "PAYMENT_FAILED", "STOCK_RESERVED", "STOCK_FAILED", "PAYMENT_REFUNDED"},
}


def handlers(strategy: str) -> dict[str, dict[str, object]]:
    return {q.name: {r.event.value: r.handler for r in q.routes if strategy in r.strategies} for q in topology.TOPOLOGY}


def test_the_spec_queues_inboxes_and_exchange():
    assert broker.EXCHANGE == "outbox-exchange"
    assert topology.QUEUES == (
        "order.queue",
        "inventory.queue",
        "payment.queue",
        "order-view.queue",
        "redis-stock.queue",
    )
    assert topology.QUEUE_INBOX == {
        "order.queue": "orders.inbox",
        "inventory.queue": "inventory.inbox",
        "payment.queue": "payment.inbox",
        "order-view.queue": "orders.order_view_inbox",
        "redis-stock.queue": "infra.redis_stock_inbox",
    }
    assert broker.dead_letter_queue("order.queue") == "order.queue.dlq"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_module_gets_what_the_saga_of_its_strategy_sends_it(strategy):
    on = handlers(strategy)
    for queue, wanted in {**EXPECTED[strategy], **COMMON}.items():
        assert on[queue] == wanted, queue
    assert PRODUCED[strategy] <= set(on["order.queue"])
    assert all(h is orders.on_saga_event for h in on["order.queue"].values())


def test_the_broker_delivers_each_event_only_to_the_modules_that_act_on_it_for_its_strategy():
    bound = topology.bindings()
    for strategy in STRATEGIES:
        on = handlers(strategy)
        for event_type in E:
            wanted = sorted(q for q in topology.QUEUES if event_type.value in on[q])
            assert bound.queues_for(event_type.value, strategy) == wanted, (event_type, strategy)


def test_an_event_without_a_strategy_reaches_only_the_queues_bound_for_every_strategy():
    bound = topology.bindings()
    assert bound.queues_for("ORDER_CREATED", None) == ["redis-stock.queue"]
    assert bound.queues_for("PAYMENT_FAILED", None) == ["order.queue"]


def test_nobody_charges_or_reserves_twice_for_one_order():
    for strategy in STRATEGIES:
        on = handlers(strategy)
        charges = [(q, e) for q, hs in on.items() for e, h in hs.items() if h is payment.on_charge]
        reserves = [(q, e) for q, hs in on.items() for e, h in hs.items() if h is inventory.on_reserve]
        assert len(charges) == 1 and len(reserves) == 1, strategy


def test_expected_deliveries_follow_the_order_strategy():
    assert set(topology.consumers_of("ORDER_CREATED", "OPTIMISTIC")) == {"inventory.queue", "redis-stock.queue"}
    assert set(topology.consumers_of("ORDER_CREATED", "POST_PAYMENT")) == {"payment.queue", "redis-stock.queue"}
    assert "inventory.queue" not in topology.consumers_of("PAYMENT_FAILED", "POST_PAYMENT")
    assert "redis-stock.queue" not in topology.consumers_of("PAYMENT_FAILED", "OPTIMISTIC")


class Deps:
    def __init__(self):
        self.calls = []

    def naive(self, name):
        return False


def _envelope(event_type, **payload):
    order = {"orderId": "o", "userId": "u", "totalPrice": "1.00", "items": [{"productId": "p", "quantity": 1}]}
    return Envelope(id=uuid.uuid4(), event_type=event_type, aggregate_id="o", payload={**order, **payload})


def test_the_dispatcher_acts_by_the_order_strategy_and_skips_other_queues_re_drives():
    calls = []
    queue = topology.Queue(
        "payment.queue",
        "payment",
        "payment.inbox",
        routes=(
            topology.Route(
                E.ORDER_CREATED,
                lambda deps, event_id, event: calls.append((event_id, event)),
                topology.POST,
                claims_inbox=False,
            ),
        ),
    )
    dispatch = topology.Dispatcher(queue, Deps())
    dispatch(_envelope("ORDER_CREATED", strategy="OPTIMISTIC"))  # the other strategy's event: not ours
    dispatch(_envelope("ORDER_CREATED", strategy="POST_PAYMENT", redriveFor="inventory.queue"))
    assert calls == [] and dispatch.skipped == 2
    mine = _envelope("ORDER_CREATED", strategy="POST_PAYMENT", redriveFor="payment.queue")
    dispatch(mine)
    assert calls == [(mine.id, OrderCreated.from_payload(mine.payload))]  # the handler gets the typed event


def test_the_dispatcher_refuses_a_payload_its_module_cannot_read_before_claiming_anything():
    calls = []
    queue = topology.Queue(
        "payment.queue",
        "payment",
        "payment.inbox",
        routes=(
            topology.Route(
                E.ORDER_CREATED, lambda deps, event_id, event: calls.append(event_id), topology.POST, claims_inbox=False
            ),
        ),
    )
    dispatch = topology.Dispatcher(queue, Deps())
    broken = Envelope(
        id=uuid.uuid4(),
        event_type="ORDER_CREATED",
        aggregate_id="o",
        payload={"orderId": "o", "strategy": "POST_PAYMENT", "items": []},
    )
    with pytest.raises(MalformedEnvelope, match="ORDER_CREATED payload: missing 'userId', 'totalPrice'"):
        dispatch(broken)
    dispatch(
        Envelope(
            id=uuid.uuid4(),
            event_type="ORDER_CREATED",
            aggregate_id="o",
            payload={"orderId": "o", "strategy": "OPTIMISTIC"},
        )
    )  # not this module's: dropped unread
    assert calls == [] and dispatch.skipped == 1


@pytest.mark.parametrize("payload", [{"strategy": None}, {"strategy": "PESSIMISTIC"}, {}])
def test_an_event_without_a_known_strategy_is_refused(payload):
    dispatch = topology.Dispatcher(topology.BY_NAME["order.queue"], Deps())
    with pytest.raises(topology.UnroutableEvent):
        dispatch(_envelope("STOCK_RESERVED", **payload))


def test_an_unknown_event_type_is_refused():
    dispatch = topology.Dispatcher(topology.BY_NAME["payment.queue"], Deps())
    with pytest.raises(topology.UnroutableEvent):
        dispatch(_envelope("ORDER_UPDATED", strategy="OPTIMISTIC"))


def test_a_handler_claimed_for_up_front_claims_the_inbox_of_its_own_queue():
    """A batch claims ``claims_always`` routes' events in the queue's inbox; a handler claiming another table would
    leave that claim unread (the consumer then refuses to commit the batch)."""
    always = [(q, r) for q in topology.TOPOLOGY for r in q.routes if r.claims_always]
    assert {q.name for q, _ in always} == {"redis-stock.queue", "payment.queue"}
    for queue, route in always:
        assert not route.claims_inbox
        assert queue.inbox == sys.modules[route.handler.__module__].INBOX
