"""The checkout driver's retry policies and outcome mapping, against a scripted fake server (httpx.MockTransport):
pure client logic, no service involved. The load generator's async sessions are checked against the same script,
so its classification cannot drift from the sync driver's."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import httpx
import pytest

from pulse.tools import checkout
from pulse.tools.checkout import CHAOS_WORDS, LAB_WORDS, NO_RETRY, UNANSWERED, Outcome, Shopper
from pulse.tools.load import _Load

PRODUCT = str(uuid.uuid4())
DOWN = "down"  # in a script: the connection is refused


class FakeServer:
    """Answers each route from its script, one entry per request (the last entry repeats)."""

    def __init__(self, adds=(200,), orders=(200,), cart_items=0):
        self.scripts = {"PUT": list(adds), "POST": list(orders)}
        self.cart_items = cart_items
        self.seen: list[tuple[str, str, dict | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.seen.append((request.method, request.url.path, body))
        if request.method == "GET":
            return httpx.Response(200, json={"items": [{"productId": PRODUCT}] * self.cart_items})
        script = self.scripts[request.method]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer == DOWN:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(answer, json={"orderId": "o-1"} if answer == 200 else {"error": "no"})

    def sent(self, method: str) -> list:
        return [s for s in self.seen if s[0] == method]


def shop(server: FakeServer, policy=NO_RETRY) -> checkout.Checkout:
    with httpx.Client(base_url="http://shop", transport=httpx.MockTransport(server)) as http:
        return Shopper(http, policy).checkout(PRODUCT, 2)


def quick(policy):
    return dataclasses.replace(policy, request_pause_s=0, order_pause_s=0, cart_check_pause_s=0)


def test_the_requests_follow_the_spec():
    server = FakeServer()
    done = shop(server)
    assert done.outcome is Outcome.ORDERED and done.order_id == "o-1"
    assert server.seen == [
        ("PUT", f"/api/cart/{done.user}/items", {"productId": PRODUCT, "quantity": 2}),
        ("POST", "/api/orders", {"userId": done.user, "idempotencyKey": done.key}),
    ]


@pytest.mark.parametrize(
    ("adds", "orders", "outcome", "lab"),
    [
        ((200,), (200,), Outcome.ORDERED, "placed"),
        ((409,), (200,), Outcome.CART_REJECTED, "cart-rejected"),
        ((500,), (200,), Outcome.CART_FAILED, "error"),
        ((DOWN,), (200,), Outcome.CART_NO_ANSWER, "no-answer"),
        ((200,), (404,), Outcome.NO_CART, "no-answer"),
        ((200,), (409, 200), Outcome.ORDER_FAILED, "error"),  # no retry: the 409 is the outcome
        ((200,), (503,), Outcome.ORDER_FAILED, "error"),
        ((200,), (DOWN, 200), Outcome.ORDER_NO_ANSWER, "no-answer"),
    ],
)
def test_without_retries_the_first_failure_is_the_outcome(adds, orders, outcome, lab):
    server = FakeServer(adds, orders)
    done = shop(server)
    assert done.outcome is outcome and LAB_WORDS[done.outcome] == lab
    assert len(server.sent("PUT")) == 1 and len(server.sent("POST")) == (0 if adds[0] != 200 else 1)
    assert (done.order_id is not None) == (outcome is Outcome.ORDERED)


def test_waiting_out_a_restart_places_the_order_with_the_same_key():
    waits = []
    policy = quick(checkout.wait_out_restarts(lambda: waits.append(1), deadline_s=5))
    # The add's answer was lost: wait, then the order (not the add again) finds out; a dead attempt's lock
    # answers 409, a second crash loses another answer, then the order goes through.
    server = FakeServer(adds=(DOWN, 200), orders=(409, DOWN, 200))
    done = shop(server, policy)
    assert done.outcome is Outcome.ORDERED and len(waits) == 2
    assert len(server.sent("PUT")) == 1
    assert {body["idempotencyKey"] for _, _, body in server.sent("POST")} == {done.key}
    assert len(server.sent("POST")) == 3


def test_waiting_out_a_restart_stops_at_its_deadline_and_on_other_errors():
    policy = quick(checkout.wait_out_restarts(lambda: None, deadline_s=0.05))
    assert shop(FakeServer(orders=(409,)), policy).outcome is Outcome.ORDER_FAILED  # 409 past the deadline
    assert shop(FakeServer(orders=(DOWN,)), policy).outcome is Outcome.ORDER_NO_ANSWER
    assert shop(FakeServer(adds=(DOWN,), orders=(404,)), policy).outcome is Outcome.NO_CART  # the add never landed
    server = FakeServer(orders=(500, 200))
    assert shop(server, policy).outcome is Outcome.ORDER_FAILED and len(server.sent("POST")) == 1  # 5xx: no retry


def test_through_faults_retries_each_request_and_looks_at_the_cart():
    policy = quick(checkout.through_faults(retry_for_s=5, order_attempts=4))
    server = FakeServer(adds=(DOWN, 503, 200), orders=(502, 409, 200))
    done = shop(server, policy)
    assert done.outcome is Outcome.ORDERED and CHAOS_WORDS[done.outcome] == "ordered"
    assert len(server.sent("PUT")) == 3 and len(server.sent("POST")) == 3
    # An add rejected on retry although an earlier attempt filled the cart: the order goes ahead.
    assert shop(FakeServer(adds=(409,), cart_items=1), policy).outcome is Outcome.ORDERED
    rejected = shop(FakeServer(adds=(409,)), policy)
    assert CHAOS_WORDS[rejected.outcome] == "cart-rejected"
    assert CHAOS_WORDS[shop(FakeServer(adds=(422,)), policy).outcome] == "cart-failed"
    assert CHAOS_WORDS[shop(FakeServer(orders=(404,)), policy).outcome] == "no-cart"
    server = FakeServer(orders=(409,))
    assert CHAOS_WORDS[shop(server, policy).outcome] == "order-failed" and len(server.sent("POST")) == 4


def test_through_faults_answers_unanswered_once_its_retries_ran_out():
    policy = quick(checkout.through_faults(retry_for_s=0.02, order_attempts=2))
    server = FakeServer(adds=(DOWN,))
    with httpx.Client(base_url="http://shop", transport=httpx.MockTransport(server)) as http:
        assert Shopper(http, policy).add("u", PRODUCT, 1) == UNANSWERED
    assert len(server.sent("PUT")) > 1
    done = shop(FakeServer(orders=(503,)), policy)  # the order is tried again after its retries ran out
    assert done.outcome is Outcome.ORDER_FAILED


def test_every_outcome_a_shopper_returns_has_words_for_each_tool():
    assert set(CHAOS_WORDS) == set(Outcome)
    sync = set(Outcome) - {Outcome.ABANDONED, Outcome.NOT_STARTED}  # the load mix's and the chaos drive's own
    assert set(LAB_WORDS) == sync
    assert set(LAB_WORDS.values()) == {"placed", "cart-rejected", "error", "no-answer"}
    # the campaign's summary keeps its words (tests and notebooks read them)
    chaos = {"ordered", "cart-rejected", "cart-failed", "no-cart", "order-failed", "not-started"}
    assert chaos <= set(CHAOS_WORDS.values())


@pytest.mark.parametrize(
    ("adds", "orders"),
    [((200,), (200,)), ((409,), (200,)), ((500,), (200,)), ((DOWN,), (200,)), ((200,), (404,)), ((200,), (409,))],
)
def test_the_load_generator_classifies_its_sessions_like_the_driver(adds, orders):
    server = FakeServer(adds, orders)

    async def session():
        load = _Load(
            [PRODUCT],
            mix={"adds": 1, "abandon": 0.0},
            track="off",
            track_fraction=0.0,
            poll_s=0.01,
            complete_timeout_s=1.0,
            seed=1,
        )
        async with httpx.AsyncClient(base_url="http://shop", transport=httpx.MockTransport(server)) as client:
            return await load.session([client]), load.tally

    outcome, tally = asyncio.run(session())
    assert outcome is shop(FakeServer(adds, orders)).outcome
    assert tally.checkouts == int(outcome is Outcome.ORDERED)
    assert set(tally.requests) <= {checkout.ADD_ROUTE, checkout.ORDER_ROUTE}
