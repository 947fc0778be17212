"""Broker bindings (pulse/infra/broker.py) and the handlers bootstrap wires to them must agree."""

import pytest

from pulse import bootstrap
from pulse.events import EventType as E
from pulse.infra import broker
from pulse.inventory import handlers as inventory
from pulse.orders import handlers as orders
from pulse.payment import handlers as payment
from pulse.redisstock import handlers as redisstock
from pulse.views import handlers as views

STRATEGIES = ("optimistic", "post-payment")


def test_the_spec_queues_and_exchange():
    assert broker.EXCHANGE == "outbox-exchange"
    assert set(broker.QUEUES) == {"order.queue", "inventory.queue", "payment.queue", "order-view.queue",
                                  "redis-stock.queue"}
    assert broker.dead_letter_queue("order.queue") == "order.queue.dlq"
    for strategy in STRATEGIES:
        assert set(broker.BINDINGS[strategy]) == set(broker.QUEUES)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_bound_key_has_a_handler_and_every_handler_a_binding(strategy):
    handlers = bootstrap.queue_handlers(strategy)
    bound = {q: {e.value for e in events} for q, events in broker.BINDINGS[strategy].items()}
    assert set(handlers) == set(bound)
    for queue in bound:
        assert set(handlers[queue]) == bound[queue], queue


# SPEC §3 read as "who must hear what", independently of the code's tables.
EXPECTED = {
    "optimistic": {
        "inventory.queue": {"ORDER_CREATED": inventory.on_reserve, "PAYMENT_FAILED": inventory.on_restock},
        "payment.queue": {"STOCK_RESERVED": payment.on_charge},
    },
    "post-payment": {
        "inventory.queue": {"PAYMENT_PROCESSED": inventory.on_reserve},
        "payment.queue": {"ORDER_CREATED": payment.on_charge, "STOCK_FAILED": payment.on_refund},
    },
}
COMMON = {
    "order-view.queue": {"ORDER_UPDATED": views.on_order_updated},
    "redis-stock.queue": {"ORDER_CREATED": redisstock.on_order_created, "STOCK_RESERVED": redisstock.on_stock_changed,
                          "STOCK_RELEASED": redisstock.on_stock_changed},
}
# Events each strategy's saga can produce; the order must hear every one of them.
PRODUCED = {
    "optimistic": {"STOCK_RESERVED", "STOCK_FAILED", "STOCK_RELEASED", "PAYMENT_PROCESSED", "PAYMENT_FAILED"},
    "post-payment": {"PAYMENT_PROCESSED", "PAYMENT_FAILED", "STOCK_RESERVED", "STOCK_FAILED", "PAYMENT_REFUNDED"},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_module_gets_what_the_saga_of_its_strategy_sends_it(strategy):
    handlers = bootstrap.queue_handlers(strategy)
    for queue, wanted in {**EXPECTED[strategy], **COMMON}.items():
        assert handlers[queue] == wanted, queue
    assert set(handlers["order.queue"]) == PRODUCED[strategy]
    assert all(h is orders.on_saga_event for h in handlers["order.queue"].values())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_order_handler_accepts_everything_it_is_bound_to(strategy):
    assert set(bootstrap.queue_handlers(strategy)["order.queue"]) <= {e.value for e in orders.HANDLED}


def test_nobody_charges_or_reserves_twice_under_one_strategy():
    for strategy in STRATEGIES:
        on = bootstrap.queue_handlers(strategy)
        charges = [(q, e) for q, hs in on.items() for e, h in hs.items() if h is payment.on_charge]
        reserves = [(q, e) for q, hs in on.items() for e, h in hs.items() if h is inventory.on_reserve]
        assert len(charges) == 1 and len(reserves) == 1, strategy


def test_the_strategies_really_differ_where_the_saga_differs():
    opt, post = broker.BINDINGS["optimistic"], broker.BINDINGS["post-payment"]
    assert set(opt["inventory.queue"]) != set(post["inventory.queue"])
    assert set(opt["payment.queue"]) != set(post["payment.queue"])
    assert E.PAYMENT_FAILED not in post["inventory.queue"]  # post-payment: nothing reserved before the charge
