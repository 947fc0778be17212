"""Display status of the CQRS view (SPEC §3): every rule, and that the first matching rule wins."""

import itertools

import pytest

from pulse.views.model import display_status

STRATEGIES = ("OPTIMISTIC", "POST_PAYMENT")
PAYMENTS = ("NOT_STARTED", "SUCCESS", "DECLINED", "REFUNDED")
INVENTORIES = ("NOT_STARTED", "RESERVED", "RELEASED", "OUT_OF_STOCK")

# SPEC §3, transcribed rule by rule, in order: (predicate(strategy, payment, inventory), display status).
SPEC_RULES = [
    (lambda s, p, i: p == "REFUNDED", "REFUNDED"),
    (lambda s, p, i: p == "DECLINED", "FAILED_PAYMENT"),
    (lambda s, p, i: s == "POST_PAYMENT" and i == "OUT_OF_STOCK" and p == "SUCCESS", "REFUND_IN_PROGRESS"),
    (lambda s, p, i: s == "POST_PAYMENT" and i == "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK"),
    (lambda s, p, i: s == "POST_PAYMENT" and p == "SUCCESS" and i == "NOT_STARTED", "AWAITING_INVENTORY"),
    (lambda s, p, i: p == "SUCCESS" and i == "RESERVED", "COMPLETED"),
    (lambda s, p, i: i == "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK"),
    (lambda s, p, i: p == "NOT_STARTED" and i == "RESERVED", "AWAITING_PAYMENT"),
    (lambda s, p, i: True, "PROCESSING"),
]


def spec(s, p, i):
    return next(status for rule, status in SPEC_RULES if rule(s, p, i))


@pytest.mark.parametrize(
    "strategy, payment, inventory, expected",
    [
        ("POST_PAYMENT", "REFUNDED", "OUT_OF_STOCK", "REFUNDED"),
        ("OPTIMISTIC", "REFUNDED", "RESERVED", "REFUNDED"),
        ("OPTIMISTIC", "DECLINED", "RELEASED", "FAILED_PAYMENT"),
        ("OPTIMISTIC", "DECLINED", "RESERVED", "FAILED_PAYMENT"),
        ("POST_PAYMENT", "DECLINED", "NOT_STARTED", "FAILED_PAYMENT"),
        ("POST_PAYMENT", "DECLINED", "OUT_OF_STOCK", "FAILED_PAYMENT"),  # declined wins over out of stock
        ("POST_PAYMENT", "SUCCESS", "OUT_OF_STOCK", "REFUND_IN_PROGRESS"),
        ("POST_PAYMENT", "NOT_STARTED", "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK"),
        ("POST_PAYMENT", "SUCCESS", "NOT_STARTED", "AWAITING_INVENTORY"),
        ("OPTIMISTIC", "SUCCESS", "NOT_STARTED", "PROCESSING"),  # awaiting inventory is post-payment only
        ("OPTIMISTIC", "SUCCESS", "RESERVED", "COMPLETED"),
        ("POST_PAYMENT", "SUCCESS", "RESERVED", "COMPLETED"),
        ("OPTIMISTIC", "NOT_STARTED", "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK"),
        ("OPTIMISTIC", "SUCCESS", "OUT_OF_STOCK", "FAILED_OUT_OF_STOCK"),  # refund in progress is post-payment only
        ("OPTIMISTIC", "NOT_STARTED", "RESERVED", "AWAITING_PAYMENT"),
        ("POST_PAYMENT", "NOT_STARTED", "RESERVED", "AWAITING_PAYMENT"),
        ("OPTIMISTIC", "NOT_STARTED", "NOT_STARTED", "PROCESSING"),
        ("POST_PAYMENT", "NOT_STARTED", "NOT_STARTED", "PROCESSING"),
        ("OPTIMISTIC", "SUCCESS", "RELEASED", "PROCESSING"),
        ("OPTIMISTIC", "NOT_STARTED", "RELEASED", "PROCESSING"),
    ],
)
def test_each_rule(strategy, payment, inventory, expected):
    assert display_status(strategy, payment, inventory) == expected


def test_every_combination_follows_the_spec_rules_in_order():
    for s, p, i in itertools.product(STRATEGIES, PAYMENTS, INVENTORIES):
        assert display_status(s, p, i) == spec(s, p, i), (s, p, i)


def test_every_rule_is_reachable():
    reached = {display_status(s, p, i) for s, p, i in itertools.product(STRATEGIES, PAYMENTS, INVENTORIES)}
    assert reached == {status for _, status in SPEC_RULES}
