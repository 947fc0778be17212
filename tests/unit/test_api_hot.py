"""The short path of the hot requests (pulse.api.hot) answers exactly as FastAPI's own path would.

Every request here goes to two apps over the same fake services, one with the short path and one without,
and the two answers must be equal byte for byte: status, body and the headers a client reads.
"""

import asyncio
import logging
import uuid

import fastapi.routing
import pytest
from fastapi.testclient import TestClient

from pulse.api.app import create_app
from pulse.api.hot import _replay
from pulse.errors import Conflict, KeyTaken, NotFound, Unavailable
from pulse.seed import IPHONE as PRODUCT
from tests.unit.test_api_errors import FakeSystem  # services that record each call and answer as told

USER = "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60"
CART = f"/api/cart/{USER}/items"
JSON = {"content-type": "application/json"}


def answer(hot, outcome, method, path, **kwargs):
    system = FakeSystem(outcome)
    with TestClient(create_app(system, hot=hot), raise_server_exceptions=False) as http:
        r = http.request(method, path, **kwargs)
    headers = {k: v for k, v in r.headers.items() if k not in ("date", "server")}
    return (r.status_code, r.content, headers), system.calls


OK_CART = {"userId": USER, "items": [], "totalPrice": "0.00"}
REQUESTS = [
    ("PUT", CART, {"json": {"productId": PRODUCT, "quantity": 2}}),
    ("PUT", CART, {"json": {"productId": PRODUCT, "quantity": 2, "extra": [1]}}),
    (
        "PUT",
        CART.upper().replace("/API/CART/", "/api/cart/").replace("/ITEMS", "/items"),
        {"json": {"productId": PRODUCT, "quantity": 1}},
    ),
    ("PUT", f"/api/cart/{USER.replace('-', '')}/items", {"json": {"productId": PRODUCT, "quantity": 1}}),
    ("PUT", f"/api/cart/{{{USER}}}/items", {"json": {"productId": PRODUCT, "quantity": 1}}),
    ("PUT", "/api/cart/not-a-uuid/items", {"json": {"productId": PRODUCT, "quantity": 1}}),
    ("PUT", CART, {"json": {"productId": PRODUCT, "quantity": 0}}),
    ("PUT", CART, {"json": {"productId": PRODUCT, "quantity": "1"}}),
    ("PUT", CART, {"json": [1, 2]}),
    ("PUT", CART, {"content": b"{not json", "headers": JSON}),
    ("PUT", CART, {"content": b'{"productId": "\xff"}', "headers": JSON}),
    ("PUT", CART, {"content": b'{"productId": "%s", "quantity": 1}' % PRODUCT.encode(), "headers": {}}),
    (
        "PUT",
        CART,
        {
            "content": b'{"productId": "%s", "quantity": 1}' % PRODUCT.encode(),
            "headers": {"content-type": "text/plain"},
        },
    ),
    (
        "PUT",
        CART,
        {
            "content": b'{"productId": "%s", "quantity": 1}' % PRODUCT.encode(),
            "headers": {"content-type": "application/vnd.x+json; charset=utf-8"},
        },
    ),
    ("PUT", CART, {}),
    ("PUT", CART + "/", {"json": {"productId": PRODUCT, "quantity": 1}}),
    ("POST", CART, {"json": {"productId": PRODUCT, "quantity": 1}}),
    ("POST", "/api/orders", {"json": {"userId": USER, "idempotencyKey": "k-1"}}),
    ("POST", "/api/orders", {"json": {"userId": USER, "idempotencyKey": ""}}),
    ("POST", "/api/orders", {"json": {"userId": USER}}),
    ("POST", "/api/orders?x=1", {"json": {"userId": USER, "idempotencyKey": "k-2"}}),
]


@pytest.mark.parametrize("method, path, kwargs", REQUESTS, ids=lambda v: str(v)[:60])
@pytest.mark.parametrize(
    "outcome",
    [
        OK_CART,
        NotFound("Product 1 does not exist."),
        Conflict("Not enough stock of product 1 for 3 more unit(s)."),
        KeyTaken("This idempotency key was already used by another user; choose a new key."),
        Unavailable("The cart could not be saved; nothing was reserved, please retry."),
        RuntimeError("boom"),
        ConnectionError("a socket closed"),
    ],
    ids=lambda o: type(o).__name__,
)
def test_the_short_path_answers_as_fastapi_does(method, path, kwargs, outcome):
    short, short_calls = answer(True, outcome, method, path, **kwargs)
    plain, plain_calls = answer(False, outcome, method, path, **kwargs)
    assert short == plain
    assert short_calls == plain_calls


def test_well_formed_hot_requests_take_the_short_path_and_the_rest_do_not(monkeypatch):
    through_fastapi = []
    real = fastapi.routing.run_endpoint_function

    async def counted(**kwargs):
        through_fastapi.append(kwargs["dependant"].call.__name__)
        return await real(**kwargs)

    monkeypatch.setattr(fastapi.routing, "run_endpoint_function", counted)
    _, calls = answer(True, OK_CART, "PUT", CART, json={"productId": PRODUCT, "quantity": 2})
    _, more = answer(True, OK_CART, "POST", "/api/orders", json={"userId": USER, "idempotencyKey": "k"})
    assert [c[:2] for c in calls + more] == [
        ("add_item", (uuid.UUID(USER), uuid.UUID(PRODUCT), 2)),
        ("create", (uuid.UUID(USER), "k")),
    ]
    assert through_fastapi == []
    # FastAPI's own path: its spelling of a UUID, its answer
    _, calls = answer(
        True, OK_CART, "PUT", f"/api/cart/{USER.replace('-', '')}/items", json={"productId": PRODUCT, "quantity": 2}
    )
    assert calls and through_fastapi == ["add_cart_item"]


def test_an_unexpected_failure_on_the_short_path_is_logged_once_with_its_traceback(caplog):
    with caplog.at_level(logging.ERROR):
        (status, _, _), _ = answer(True, RuntimeError("boom"), "PUT", CART, json={"productId": PRODUCT, "quantity": 1})
    assert status == 500
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


def test_a_body_cut_short_by_a_disconnect_is_replayed_to_fastapi_as_it_came():
    later = [{"type": "http.disconnect"}]

    async def receive():
        return later.pop(0)

    async def read(n):
        replay = _replay(b'{"a"', {"type": "http.disconnect"}, receive)
        return [await replay() for _ in range(n)]

    assert asyncio.run(read(2)) == [
        {"type": "http.request", "body": b'{"a"', "more_body": True},
        {"type": "http.disconnect"},
    ]
