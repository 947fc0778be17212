"""The one checkout driver: a cart add then an order, what each answer means, and how hard to try.

A checkout is two requests (SPEC's API table): ``PUT /api/cart/{userId}/items {productId, quantity}`` then
``POST /api/orders {userId, idempotencyKey}``. This module owns them three ways:

* the requests themselves (:func:`add_item_request`, :func:`order_request`, ...): route, path and body;
* what an answer comes to (:func:`after_add`, :func:`after_order`): one :class:`Outcome` per status, ``None``
  standing for "no answer" (the connection failed);
* :class:`Shopper`, the synchronous driver over an ``httpx.Client``, which places checkouts under a
  :class:`RetryPolicy`: :data:`NO_RETRY` (the first failure is the outcome), :func:`wait_out_restarts` (a careful
  front-end: after a request got no answer, wait for the restarted server and place the order with the same
  key until a deadline) or :func:`through_faults` (the chaos campaign's: every request retried through
  connection errors and 5xx, a failed add followed by a look at the cart, the order retried on 409).

Who uses it: the chaos campaign (``pulse.tools.chaos``) and the lab (``pulse.lab.client``, ``pulse.lab.load``)
drive checkouts with :class:`Shopper`; the load generator (``pulse.tools.load``) builds its requests and
classifies its answers here but sends them itself. It keeps its own asyncio transport on purpose: it measures
latency per route and what fails, so it sends every request exactly once (a retry would hide the error and
fold a restart into a latency), from one event loop with a lean HTTP/1.1 client, since one httpx request
costs about 1 ms of client CPU and the generator must not take the CPU the server needs. Sharing the
requests and :func:`after_add`/:func:`after_order` is what keeps the two from drifting apart.

Each tool prints outcomes in its own words, which notebooks and tests assert on: :data:`CHAOS_WORDS` (the
campaign's ``checkouts``) and :data:`LAB_WORDS` (``run_orders``, ``LoadDriver.counts``).
"""

from __future__ import annotations

import dataclasses
import enum
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

ADD_ROUTE = "PUT /api/cart/{userId}/items"
ORDER_ROUTE = "POST /api/orders"
CART_ROUTE = "GET /api/cart/{userId}"
ORDER_STATUS_ROUTE = "GET /api/orders/{orderId}"
UNANSWERED = 599  # the status a request gets when its retries through faults ran out (never sent by the API)


class Request(NamedTuple):
    route: str  # the route template, what latencies are recorded under
    method: str
    path: str
    body: dict[str, Any] | None


def add_item_request(user: str, product: str, quantity: int) -> Request:
    return Request(ADD_ROUTE, "PUT", f"/api/cart/{user}/items", {"productId": product, "quantity": quantity})


def order_request(user: str, key: str) -> Request:
    return Request(ORDER_ROUTE, "POST", "/api/orders", {"userId": user, "idempotencyKey": key})


def cart_request(user: str) -> Request:
    return Request(CART_ROUTE, "GET", f"/api/cart/{user}", None)


def order_status_request(order_id: str) -> Request:
    return Request(ORDER_STATUS_ROUTE, "GET", f"/api/orders/{order_id}", None)


class Outcome(enum.Enum):
    """How one checkout ended."""

    ORDERED = "ordered"  # the order was created (200)
    CART_REJECTED = "cart-rejected"  # the add found too little stock (409): nothing reserved
    CART_FAILED = "cart-failed"  # the add answered another error (or a retried add never got through)
    CART_NO_ANSWER = "cart-no-answer"  # the add got no answer and nothing retried it
    NO_CART = "no-cart"  # the order found no cart (404): an add that got no answer never committed
    ORDER_FAILED = "order-failed"  # the order answered another error, or its retries ran out
    ORDER_NO_ANSWER = "order-no-answer"  # the order got no answer (and its retries, if any, ran out)
    ABANDONED = "abandoned"  # the shopper filled the cart and left (the load generator's mix)
    NOT_STARTED = "not-started"  # never begun: the chaos drive's time box was spent


# The campaign's summary counts these words (tests/integration/test_chaos.py reads "ordered", "cart-rejected").
CHAOS_WORDS = {o: o.value for o in Outcome}
# The lab's counts: placed, cart-rejected, error, no-answer (notebooks read run_orders()["placed"]).
LAB_WORDS = {
    Outcome.ORDERED: "placed",
    Outcome.CART_REJECTED: "cart-rejected",
    Outcome.CART_FAILED: "error",
    Outcome.CART_NO_ANSWER: "no-answer",
    Outcome.NO_CART: "no-answer",  # the add that got no answer never reached the database
    Outcome.ORDER_FAILED: "error",
    Outcome.ORDER_NO_ANSWER: "no-answer",
}


def after_add(status: int | None) -> Outcome | None:
    """``None`` when the add filled the cart, else the outcome it makes (``status`` None: no answer)."""
    if status == 200:
        return None
    if status is None:
        return Outcome.CART_NO_ANSWER
    return Outcome.CART_REJECTED if status == 409 else Outcome.CART_FAILED


def after_order(status: int | None) -> Outcome:
    """The outcome of the order's (last) answer (``status`` None: no answer)."""
    if status == 200:
        return Outcome.ORDERED
    if status == 404:
        return Outcome.NO_CART
    return Outcome.ORDER_NO_ANSWER if status is None else Outcome.ORDER_FAILED


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard a :class:`Shopper` tries. The default tries nothing: every request once."""

    # Each request is retried through connection errors and 5xx this long, then answers UNANSWERED (0: never).
    request_retry_s: float = 0.0
    request_pause_s: float = 0.3
    # Called after a request got no answer (waits for the restarted server); the checkout then carries on.
    wait_up: Callable[[], object] | None = None
    # The order is placed again, with the same key, on these statuses (409: our earlier attempt holds the
    # lock), at most ``order_attempts`` times in all and not after ``order_retry_s`` (counted from the add).
    order_retry_on: frozenset[int] = frozenset()
    order_attempts: int | None = None
    order_retry_s: float | None = None
    order_pause_s: float = 0.2
    # After a failed add, look whether the cart holds something anyway (``cart_checks`` reads).
    check_cart: bool = False
    cart_checks: int = 20
    cart_check_pause_s: float = 0.3


NO_RETRY = RetryPolicy()


def wait_out_restarts(wait_up: Callable[[], object], deadline_s: float = 20.0) -> RetryPolicy:
    """A careful shop front-end behind a supervised server: after a request got no answer it calls
    ``wait_up()`` and carries on; the order is placed again with the same key (also on 409, the dead attempt's
    lock) for ``deadline_s``, so no cart is left behind by a crash. An add whose answer was lost is not sent
    again: the order finds out whether it committed (404: no cart)."""
    return RetryPolicy(wait_up=wait_up, order_retry_on=frozenset({409}), order_retry_s=deadline_s, order_pause_s=0.5)


def through_faults(retry_for_s: float = 60.0, order_attempts: int = 60) -> RetryPolicy:
    """The chaos campaign's shopper: every request retried through crashes and restarts (connection errors,
    5xx) for ``retry_for_s``; a failed add is followed by a look at the cart, since a retried add may find the
    shelf empty although an earlier attempt, whose answer was lost to a crash, did fill it; the order is
    placed again with its key on 409 and when its own retries ran out (UNANSWERED)."""
    return RetryPolicy(
        request_retry_s=retry_for_s,
        order_retry_on=frozenset({409, UNANSWERED}),
        order_attempts=order_attempts,
        check_cart=True,
    )


@dataclasses.dataclass(frozen=True)
class Checkout:
    outcome: Outcome
    user: str
    key: str
    order_id: str | None = None


class Shopper:
    """Places checkouts over ``http`` (an ``httpx.Client`` with the server as ``base_url``) under ``policy``.

    Holds no state of its own, so threads may share one (httpx clients are thread-safe).
    """

    def __init__(self, http: httpx.Client, policy: RetryPolicy = NO_RETRY):
        self.http, self.policy = http, policy

    def checkout(self, product: str, quantity: int = 1, *, user: str | None = None, key: str | None = None) -> Checkout:
        """Add ``quantity`` of ``product`` to ``user``'s cart (a new user by default), then order it."""
        user, key = user or str(uuid.uuid4()), key or str(uuid.uuid4())
        status = self.add(user, product, quantity)
        outcome = after_add(status)
        if outcome is Outcome.CART_NO_ANSWER and self.policy.wait_up is not None:
            self.policy.wait_up()  # the add may have committed or not: the order finds out (404: no cart)
        elif outcome is not None and not (self.policy.check_cart and self.has_cart(user)):
            return Checkout(outcome, user, key)
        return self.order(user, key)

    def add(self, user: str, product: str, quantity: int) -> int | None:
        """The add's status (None: no answer)."""
        return self._send(add_item_request(user, product, quantity))[0]

    def order(self, user: str, key: str) -> Checkout:
        """Place the order, again with the same key as the policy says."""
        policy, attempts = self.policy, 0
        deadline = None if policy.order_retry_s is None else time.monotonic() + policy.order_retry_s
        while True:
            status, response = self._send(order_request(user, key))
            attempts += 1
            outcome = after_order(status)
            if outcome is Outcome.ORDERED:
                assert response is not None  # a 200 came with its body
                return Checkout(outcome, user, key, response.json()["orderId"])
            again = policy.wait_up is not None if status is None else status in policy.order_retry_on
            spent = (policy.order_attempts is not None and attempts >= policy.order_attempts) or (
                deadline is not None and time.monotonic() > deadline
            )
            if outcome is Outcome.NO_CART or not again or spent:
                return Checkout(outcome, user, key)
            if status is not None:
                time.sleep(policy.order_pause_s)
            elif policy.wait_up is not None:  # no answer: retried only by a policy that can wait the server up
                policy.wait_up()

    def has_cart(self, user: str) -> bool:
        """Whether ``user``'s cart holds anything, asking up to ``cart_checks`` times through errors."""
        request = cart_request(user)
        for _ in range(self.policy.cart_checks):
            try:
                response = self.http.request(request.method, request.path)
                if response.status_code == 200:
                    return bool(response.json()["items"])
            except httpx.HTTPError:
                pass
            time.sleep(self.policy.cart_check_pause_s)
        return False

    def _send(self, request: Request) -> tuple[int | None, httpx.Response | None]:
        """One request, retried through faults as the policy says: (status, response); (None, None) for no
        answer, (UNANSWERED, None) once the retries ran out."""
        retry_s = self.policy.request_retry_s
        deadline = time.monotonic() + retry_s
        while True:
            try:
                response = self.http.request(request.method, request.path, json=request.body)
                if response.status_code < 500 or not retry_s:
                    return response.status_code, response
            except httpx.HTTPError:
                if not retry_s:
                    return None, None
            if time.monotonic() > deadline:
                return UNANSWERED, None
            time.sleep(self.policy.request_pause_s)
