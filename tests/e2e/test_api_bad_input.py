"""Input the database cannot hold or the contract forbids gets a one-sentence 4xx and changes nothing (issue 10, 6).

Each case here answered 500 (or was accepted) before: PostgreSQL refuses NUL in text and values
beyond numeric(12,2), and a JSON boolean was taken for the integer 1.
"""

from __future__ import annotations

import uuid

import pytest

from pulse.seed import IPHONE
from tests.e2e.support import one_sentence

pytestmark = pytest.mark.e2e

MAX_PRICE = 9999999999.99  # the largest numeric(12,2)


@pytest.fixture(scope="module")
def server(launch):
    return launch("optimistic")


@pytest.fixture
def http(server, http_for):
    return http_for(server)


def error_of(response, *statuses: int) -> str:
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and one_sentence(body["error"]), body
    return body["error"]


def product(http, stock=5, price=10.0) -> dict:
    response = http.post(
        "/api/products", json={"name": f"Bad input {uuid.uuid4().hex[:6]}", "basePrice": price, "stock": stock}
    )
    assert response.status_code == 201, response.text
    return response.json()


def state(db, rds, user, product_id):
    """Everything a product, cart or order request could change for this user and product."""
    return (
        rds.get(f"stock:{product_id}"),
        rds.get(f"reserved:{product_id}"),
        rds.hgetall(f"cart:{user}"),
        rds.zscore("cart:cleanup:queue", str(user)),
        sorted(rds.keys("lock:*")),
        db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM inventory.carts WHERE user_id = %s", (user,)).fetchone()["n"],
        db.execute(
            "SELECT coalesce(sum(quantity), 0) AS n FROM inventory.cart_items ci "
            "JOIN inventory.carts c ON c.id = ci.cart_id WHERE c.user_id = %s",
            (user,),
        ).fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM orders.orders").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM orders.order_items").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM orders.idempotency_records").fetchone()["n"],
    )


# --- products -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nul\x00inside", "\x00", "bell\x07", "line\nbreak", "escape\x1b[31m"])
def test_a_control_character_in_a_product_name_is_422_and_creates_nothing(http, db, rds, name):
    before = state(db, rds, uuid.uuid4(), "none")
    assert "name" in error_of(http.post("/api/products", json={"name": name, "basePrice": 1, "stock": 1}), 422)
    assert state(db, rds, uuid.uuid4(), "none")[5:] == before[5:]


@pytest.mark.parametrize("price", [10_000_000_000, 1e10, "10000000000.00", 1e300, 99999999999.9])
def test_a_base_price_beyond_numeric_12_2_is_422_and_creates_nothing(http, db, rds, price):
    before = db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"]
    assert "basePrice" in error_of(
        http.post("/api/products", json={"name": "Too dear", "basePrice": price, "stock": 1}), 422
    )
    assert db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"] == before


def test_the_largest_base_price_is_accepted(http):
    assert product(http, stock=1, price=MAX_PRICE)["basePrice"] == MAX_PRICE


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"name": "x", "basePrice": True, "stock": 1}, "basePrice"),
        ({"name": "x", "basePrice": 1, "stock": True}, "stock"),
        ({"name": "x", "basePrice": 1, "stock": "3"}, "stock"),
        ({"name": "x", "basePrice": 1, "stock": 2.5}, "stock"),
        ({"name": "x", "basePrice": "1e3", "stock": 1}, "basePrice"),
        ({"name": "x", "basePrice": "19.999", "stock": 1}, "basePrice"),
        ({"name": "x", "basePrice": " 19.99", "stock": 1}, "basePrice"),
        ({"name": 5, "basePrice": 1, "stock": 1}, "name"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_422_for_a_product(http, db, payload, field):
    before = db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"]
    assert field in error_of(http.post("/api/products", json=payload), 422)
    assert db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"] == before


# --- cart -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantity", [True, False, "1", 1.5, None])
def test_a_quantity_that_is_not_a_json_integer_is_422_and_changes_nothing(http, db, rds, quantity):
    p, user = product(http, stock=5), uuid.uuid4()
    before = state(db, rds, user, p["id"])
    assert "quantity" in error_of(
        http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": quantity}), 422
    )
    assert state(db, rds, user, p["id"]) == before


# --- orders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["key\x00nul", "\x00", "tab\tkey", "new\nline"])
def test_a_control_character_in_an_idempotency_key_is_422_and_changes_nothing(http, db, rds, key):
    p, user = product(http, stock=5), uuid.uuid4()
    assert http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 1}).status_code == 200
    before = state(db, rds, user, p["id"])
    assert "idempotencyKey" in error_of(
        http.post("/api/orders", json={"userId": str(user), "idempotencyKey": key}), 422
    )
    assert state(db, rds, user, p["id"]) == before


def test_an_order_whose_total_exceeds_numeric_12_2_is_refused_and_changes_nothing(http, db, rds):
    p, user = product(http, stock=10, price=MAX_PRICE), uuid.uuid4()
    assert http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 2}).status_code == 200
    before = state(db, rds, user, p["id"])
    key = f"key-{user}"
    message = error_of(http.post("/api/orders", json={"userId": str(user), "idempotencyKey": key}), 409, 422)
    assert "total" in message.lower()
    assert state(db, rds, user, p["id"]) == before
    assert not rds.exists(f"lock:{key}")  # the lock was released: the key can be used again at once
    # The shopper lowers the quantity in a new cart and orders with the same key: it goes through.
    user2 = uuid.uuid4()
    assert http.put(f"/api/cart/{user2}/items", json={"productId": p["id"], "quantity": 1}).status_code == 200
    again = http.post("/api/orders", json={"userId": str(user2), "idempotencyKey": key})
    assert again.status_code == 200, again.text
    assert again.json()["totalAmount"] == MAX_PRICE


def test_a_cart_of_several_products_whose_sum_overflows_is_refused(http, db, rds):
    user = uuid.uuid4()
    first, second = product(http, stock=1, price=MAX_PRICE), product(http, stock=1, price=1.0)
    for p in (first, second):
        assert http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 1}).status_code == 200
    before = state(db, rds, user, first["id"])
    error_of(http.post("/api/orders", json={"userId": str(user), "idempotencyKey": f"key-{user}"}), 409, 422)
    assert state(db, rds, user, first["id"]) == before


def test_an_integral_json_number_is_an_integer_as_json_schema_says(http):
    # JSON Schema counts 2.0 as an integer; refusing it would break the OpenAPI contract.
    p, user = product(http, stock=5), uuid.uuid4()
    response = http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 2.0})
    assert response.status_code == 200 and response.json()["items"][0]["quantity"] == 2


def test_a_price_a_float_away_from_a_whole_cent_is_that_cent(http):
    assert product(http, price=0.5700000000000001)["basePrice"] == 0.57


@pytest.mark.parametrize(
    "method, path",
    [("DELETE", "/api/products"), ("PATCH", "/api/orders"), ("POST", f"/api/products/{IPHONE}"), ("TRACE", "/health")],
)
def test_a_wrong_method_is_405_with_every_allowed_method(http, method, path):
    response = http.request(method, path)
    error_of(response, 405)
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    spec = http.get("/openapi.json").json()["paths"]
    documented = {m.upper() for m in spec[path if path in spec else "/api/products/{productId}"]}
    assert documented <= allowed and method not in allowed


def test_openapi_declares_every_error_status_with_the_error_body(http):
    spec = http.get("/openapi.json").json()
    expected = {
        ("/api/products", "post"): {"201", "400", "422", "500", "503"},
        ("/api/products", "get"): {"200", "500", "503"},
        ("/api/products/{productId}", "get"): {"200", "404", "422", "500", "503"},
        ("/api/cart/{userId}/items", "put"): {"200", "400", "404", "409", "422", "500", "503"},
        ("/api/cart/{userId}", "get"): {"200", "422", "500", "503"},
        ("/api/orders", "post"): {"200", "400", "404", "409", "422", "500", "503"},
        ("/api/orders/{orderId}", "get"): {"200", "404", "422", "500", "503"},
    }
    for (path, method), codes in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == codes, (path, method)
        for code in codes - {"200", "201"}:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, code)
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]


def test_a_key_another_user_used_is_409_and_changes_nothing(http, db, rds):
    p, first, second = product(http, stock=5), uuid.uuid4(), uuid.uuid4()
    for user in (first, second):
        assert http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 1}).status_code == 200
    key = f"key-{first}"
    assert http.post("/api/orders", json={"userId": str(first), "idempotencyKey": key}).status_code == 200
    before = state(db, rds, second, p["id"])
    # A conflict with stored state, not malformed input: the same body is fine with a fresh key.
    assert "another user" in error_of(
        http.post("/api/orders", json={"userId": str(second), "idempotencyKey": key}), 409
    )
    assert state(db, rds, second, p["id"])[2:] == before[2:]  # the first order's saga may move stock meanwhile
