"""HTTP error bodies (SPEC §6): one plain sentence, no stack trace, and bad input never reaches a service.

The services are fakes here on purpose: this tests only the API layer's translation of input and
errors (pure logic); the real services behind it are covered by the integration and e2e tiers.
"""

import re
import uuid

import psycopg
import psycopg_pool
import pytest
from fastapi.testclient import TestClient

from pulse.api.app import create_app
from pulse.errors import Conflict, Invalid, KeyTaken, NotFound, Unavailable
from pulse.seed import IPHONE as PRODUCT

USER = "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60"


def one_sentence(text: str) -> bool:
    """Non-empty, one line, ends with a full stop, exactly one sentence, nothing from a traceback."""
    return (
        bool(text)
        and "\n" not in text
        and text.endswith(".")
        and "Traceback" not in text
        and 'File "' not in text
        and not re.search(r"[.!?] [A-Z]", text)
    )


class Recorder:
    """Stands in for a service: records each call and returns or raises what the test chose."""

    def __init__(self, calls, outcome=None):
        self.calls, self.outcome = calls, outcome

    def __getattr__(self, name):
        def method(*args):
            self.calls.append((name, args))
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome

        return method


class FakeSystem:
    class settings:
        strategy_name, outbox_mode = "OPTIMISTIC", "polling"

    def __init__(self, outcome=None):
        self.calls = []
        self.products = self.carts = self.orders = Recorder(self.calls, outcome)


def client(outcome=None):
    system = FakeSystem(outcome)
    return TestClient(create_app(system), raise_server_exceptions=False), system


BAD_INPUTS = [
    ("POST", "/api/products", {"name": "", "basePrice": 1, "stock": 1}, "name"),
    ("POST", "/api/products", {"name": "x", "basePrice": -1, "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": 1.234, "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": "cheap", "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": 1, "stock": -1}, "stock"),
    ("POST", "/api/products", {"name": "x", "basePrice": 1, "stock": 1.5}, "stock"),
    ("POST", "/api/products", {"name": "x", "basePrice": 1}, "stock"),
    ("POST", "/api/products", [1, 2], None),
    ("GET", "/api/products/not-a-uuid", None, "productId"),
    ("PUT", "/api/cart/not-a-uuid/items", {"productId": PRODUCT, "quantity": 1}, "userId"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": "zz", "quantity": 1}, "productId"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": 0}, "quantity"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": -3}, "quantity"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": "two"}, "quantity"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": 10_000_000}, "quantity"),
    ("PUT", f"/api/cart/{USER}/items", {"quantity": 1}, "productId"),
    ("GET", "/api/cart/42", None, "userId"),
    ("POST", "/api/orders", {"userId": "nobody", "idempotencyKey": "k"}, "userId"),
    ("POST", "/api/orders", {"userId": USER, "idempotencyKey": ""}, "idempotencyKey"),
    ("POST", "/api/orders", {"userId": USER}, "idempotencyKey"),
    ("POST", "/api/orders", {"idempotencyKey": "k"}, "userId"),
    ("GET", "/api/orders/123", None, "orderId"),
    # Issue 10, item 6: what PostgreSQL cannot hold, and what JSON Schema does not call an integer.
    ("POST", "/api/products", {"name": "a\x00b", "basePrice": 1, "stock": 1}, "name"),
    ("POST", "/api/products", {"name": "a\nb", "basePrice": 1, "stock": 1}, "name"),
    ("POST", "/api/products", {"name": "x", "basePrice": 10_000_000_000, "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": "1e3", "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": True, "stock": 1}, "basePrice"),
    ("POST", "/api/products", {"name": "x", "basePrice": 1, "stock": True}, "stock"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": True}, "quantity"),
    ("PUT", f"/api/cart/{USER}/items", {"productId": PRODUCT, "quantity": "1"}, "quantity"),
    ("POST", "/api/orders", {"userId": USER, "idempotencyKey": "k\x00"}, "idempotencyKey"),
    ("POST", "/api/orders", {"userId": USER, "idempotencyKey": "k\x1b"}, "idempotencyKey"),
]


@pytest.mark.parametrize("method, path, body, field", BAD_INPUTS)
def test_bad_input_is_422_with_one_sentence_naming_the_field_and_reaches_no_service(method, path, body, field):
    http, system = client()
    response = http.request(method, path, json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert one_sentence(error), error
    if field:
        assert field in error, error
    assert system.calls == []


def test_a_body_that_is_not_json_is_one_sentence():
    http, system = client()
    response = http.post("/api/orders", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": "The request body is not valid JSON."}
    assert system.calls == []


@pytest.mark.parametrize(
    "error, status",
    [
        (NotFound("Product 1 does not exist."), 404),
        (Conflict("Not enough stock of product 1 for 3 more unit(s)."), 409),
        (Invalid("The request is not valid."), 422),
        (KeyTaken("This idempotency key was already used by another user; choose a new key."), 409),
        (Unavailable("The cart could not be saved; nothing was reserved, please retry."), 503),
    ],
)
def test_service_errors_keep_their_status_and_sentence(error, status):
    http, _ = client(error)
    response = http.put(f"/api/cart/{USER}/items", json={"productId": PRODUCT, "quantity": 1})
    assert response.status_code == status
    assert response.json() == {"error": str(error)}


def test_an_unexpected_failure_is_500_without_a_stack_trace():
    http, _ = client(RuntimeError('boom\nTraceback (most recent call last):\n  File "x.py"'))
    response = http.get(f"/api/cart/{USER}")
    assert response.status_code == 500
    error = response.json()["error"]
    assert one_sentence(error) and "boom" not in error


def test_unknown_route_is_404_in_plain_words():
    http, _ = client()
    response = http.get("/api/nothing-here")
    assert response.status_code == 404 and one_sentence(response.json()["error"])


def test_valid_input_reaches_the_service_with_parsed_values():
    http, system = client({"id": "p"})
    assert http.post("/api/products", json={"name": "Lamp", "basePrice": "12.50", "stock": 3}).status_code == 201
    name, args = system.calls[0]
    assert name == "create" and args[0] == "Lamp" and str(args[1]) == "12.50" and args[2] == 3
    http.put(f"/api/cart/{USER}/items", json={"productId": PRODUCT, "quantity": 2})
    assert system.calls[1] == ("add_item", (uuid.UUID(USER), uuid.UUID(PRODUCT), 2))


@pytest.mark.parametrize(
    "error, status",
    [
        (psycopg.errors.NumericValueOutOfRange("numeric field overflow\nDETAIL:  A field with precision 12"), 422),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), 422),
        (psycopg.OperationalError("connection refused"), 503),
        (psycopg_pool.PoolTimeout("couldn't get a connection after 30.00 sec"), 503),
        (psycopg.errors.UndefinedTable('relation "x" does not exist'), 500),
    ],
)
def test_database_errors_are_one_sentence_and_only_real_failures_are_500(error, status):
    http, _ = client(error)
    response = http.put(f"/api/cart/{USER}/items", json={"productId": PRODUCT, "quantity": 1})
    assert response.status_code == status
    text = response.json()["error"]
    assert one_sentence(text) and "numeric" not in text and "relation" not in text


def test_a_wrong_method_is_405_naming_every_method_of_the_path_in_allow():
    http, system = client()
    response = http.delete("/api/products")
    assert response.status_code == 405 and one_sentence(response.json()["error"])
    assert set(response.headers["allow"].split(", ")) >= {"GET", "POST"}
    assert system.calls == []


def test_a_body_that_is_not_utf8_is_400_in_one_sentence():
    http, system = client()
    response = http.post("/api/orders", content=b'{"userId": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert response.status_code == 400 and one_sentence(response.json()["error"])
    assert system.calls == []


def test_a_price_a_float_rounding_away_from_a_cent_is_that_cent():
    http, system = client({"id": "p"})
    body = {"name": "Lamp", "basePrice": 0.5700000000000001, "stock": 1}
    assert http.post("/api/products", json=body).status_code == 201
    assert str(system.calls[0][1][1]) == "0.57"
