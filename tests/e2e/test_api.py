"""Every route and status code of SPEC §6 against a real `pulse serve`; bad input never changes state."""

from __future__ import annotations

import uuid

import pytest

from pulse.seed import IPHONE, KEYBOARD  # KEYBOARD is seeded with stock 0
from tests.e2e.support import one_sentence

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(launch):
    return launch("optimistic")


@pytest.fixture
def http(server, http_for):
    return http_for(server)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and one_sentence(body["error"]), body
    return body["error"]


def product(http, stock=5, price=10.0) -> dict:
    response = http.post(
        "/api/products", json={"name": f"API product {uuid.uuid4().hex[:6]}", "basePrice": price, "stock": stock}
    )
    assert response.status_code == 201
    return response.json()


def state(db, rds, user, product_id):
    """Everything a cart request could change for this user and product."""
    return (
        rds.get(f"stock:{product_id}"),
        rds.get(f"reserved:{product_id}"),
        rds.hgetall(f"cart:{user}"),
        rds.zscore("cart:cleanup:queue", str(user)),
        db.execute("SELECT count(*) AS n FROM inventory.carts WHERE user_id = %s", (user,)).fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM inventory.cart_items").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM orders.orders").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM orders.idempotency_records").fetchone()["n"],
        db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"],
    )


# --- products -------------------------------------------------------------------------------------------


def test_create_product_is_201_with_its_fields(http):
    response = http.post("/api/products", json={"name": "Desk lamp", "basePrice": 19.99, "stock": 7})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "basePrice", "stock"}
    assert (body["name"], body["basePrice"], body["stock"]) == ("Desk lamp", 19.99, 7)
    uuid.UUID(body["id"])
    assert http.get(f"/api/products/{body['id']}").json() == body


@pytest.mark.parametrize(
    "payload",
    [
        {"name": "", "basePrice": 1, "stock": 1},
        {"name": "x", "basePrice": -1, "stock": 1},
        {"name": "x", "basePrice": 1, "stock": -5},
        {"name": "x", "basePrice": "free", "stock": 1},
        {"name": "x", "basePrice": 1.001, "stock": 1},
        {"basePrice": 1, "stock": 1},
        {},
    ],
)
def test_create_product_with_bad_input_is_422_and_creates_nothing(http, db, payload):
    before = db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"]
    error_of(http.post("/api/products", json=payload), 422)
    assert db.execute("SELECT count(*) AS n FROM inventory.products").fetchone()["n"] == before


def test_list_and_get_products(http):
    listed = http.get("/api/products")
    assert listed.status_code == 200
    by_id = {p["id"]: p for p in listed.json()}
    assert by_id[IPHONE]["name"] == "iPhone 15 Pro" and by_id[IPHONE]["basePrice"] == 999.0
    assert by_id[KEYBOARD]["stock"] == 0
    one = http.get(f"/api/products/{IPHONE}")
    assert one.status_code == 200 and one.json()["id"] == IPHONE


def test_unknown_product_is_404_and_a_bad_id_422(http):
    assert "does not exist" in error_of(http.get(f"/api/products/{uuid.uuid4()}"), 404)
    assert "productId" in error_of(http.get("/api/products/nope"), 422)


# --- cart -----------------------------------------------------------------------------------------------


def test_put_cart_item_is_200_with_the_cart(http):
    p, user = product(http, stock=5, price=4.0), str(uuid.uuid4())
    response = http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 2})
    assert response.status_code == 200
    assert response.json() == {
        "userId": user,
        "total": 8.0,
        "items": [{"productId": p["id"], "name": p["name"], "quantity": 2, "unitPrice": 4.0, "subTotal": 8.0}],
    }
    assert http.get(f"/api/cart/{user}").json() == response.json()


def test_an_empty_cart_is_200_with_no_items(http):
    user = str(uuid.uuid4())
    response = http.get(f"/api/cart/{user}")
    assert response.status_code == 200 and response.json() == {"userId": user, "items": [], "total": 0}


def test_a_bad_user_id_on_get_cart_is_422(http):
    assert "userId" in error_of(http.get("/api/cart/12345"), 422)


def test_unknown_product_in_cart_is_404_and_changes_nothing(http, db, rds):
    user, missing = uuid.uuid4(), str(uuid.uuid4())
    before = state(db, rds, user, missing)
    error_of(http.put(f"/api/cart/{user}/items", json={"productId": missing, "quantity": 1}), 404)
    assert state(db, rds, user, missing) == before


def test_not_enough_stock_is_409_and_changes_nothing(http, db, rds):
    p, user = product(http, stock=3), uuid.uuid4()
    assert http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 2}).status_code == 200
    before = state(db, rds, user, p["id"])
    assert "Not enough stock" in error_of(
        http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 2}), 409
    )
    assert state(db, rds, user, p["id"]) == before
    error_of(http.put(f"/api/cart/{user}/items", json={"productId": KEYBOARD, "quantity": 1}), 409)


@pytest.mark.parametrize(
    "path_user, payload, field",
    [
        (None, {"productId": None, "quantity": 0}, "quantity"),
        (None, {"productId": None, "quantity": -2}, "quantity"),
        (None, {"productId": None, "quantity": 1.5}, "quantity"),
        (None, {"productId": "not-a-uuid", "quantity": 1}, "productId"),
        (None, {"quantity": 1}, "productId"),
        ("not-a-uuid", {"productId": None, "quantity": 1}, "userId"),
    ],
)
def test_bad_cart_input_is_422_and_changes_nothing(http, db, rds, path_user, payload, field):
    p, user = product(http, stock=5), uuid.uuid4()
    body = {k: (p["id"] if v is None and k == "productId" else v) for k, v in payload.items()}
    before = state(db, rds, user, p["id"])
    assert field in error_of(http.put(f"/api/cart/{path_user or user}/items", json=body), 422)
    assert state(db, rds, user, p["id"]) == before


# --- orders ---------------------------------------------------------------------------------------------


def test_post_order_is_200_and_get_order_shows_the_saga(http):
    p, user = product(http, stock=5, price=3.0), str(uuid.uuid4())
    http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 3})
    response = http.post("/api/orders", json={"userId": user, "idempotencyKey": f"key-{user}"})
    assert response.status_code == 200
    created = response.json()
    assert set(created) == {"orderId", "status", "totalAmount"} and created["totalAmount"] == 9.0
    got = http.get(f"/api/orders/{created['orderId']}")
    assert got.status_code == 200
    assert set(got.json()) == {
        "orderId",
        "status",
        "displayStatus",
        "paymentStatus",
        "inventoryStatus",
        "failureReason",
        "strategy",
        "totalAmount",
    }
    assert got.json()["strategy"] == "OPTIMISTIC"


def test_order_without_a_cart_is_404_and_stores_nothing(http, db, rds):
    user = uuid.uuid4()
    before = state(db, rds, user, IPHONE)
    assert "no cart" in error_of(
        http.post("/api/orders", json={"userId": str(user), "idempotencyKey": f"key-{user}"}), 404
    )
    assert state(db, rds, user, IPHONE) == before
    assert not rds.exists(f"lock:key-{user}")


def test_a_duplicate_in_flight_is_409_and_creates_nothing(http, db, rds):
    p, user = product(http, stock=5), uuid.uuid4()
    http.put(f"/api/cart/{user}/items", json={"productId": p["id"], "quantity": 1})
    rds.set(f"lock:key-{user}", "another-request", ex=10)  # the first request is still being processed
    before = state(db, rds, user, p["id"])
    error_of(http.post("/api/orders", json={"userId": str(user), "idempotencyKey": f"key-{user}"}), 409)
    assert state(db, rds, user, p["id"]) == before


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"userId": "someone", "idempotencyKey": "k"}, "userId"),
        ({"userId": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60", "idempotencyKey": ""}, "idempotencyKey"),
        ({"userId": "6f1c2b8e-9d7a-4f0e-8a51-1d2c3b4a5f60"}, "idempotencyKey"),
        ({"idempotencyKey": "k"}, "userId"),
    ],
)
def test_bad_order_input_is_422_and_changes_nothing(http, db, rds, payload, field):
    before = state(db, rds, uuid.uuid4(), IPHONE)[4:]
    assert field in error_of(http.post("/api/orders", json=payload), 422)
    assert state(db, rds, uuid.uuid4(), IPHONE)[4:] == before


def test_a_body_that_is_not_json_is_422(http):
    response = http.post("/api/orders", content=b"{oops", headers={"content-type": "application/json"})
    error_of(response, 422)


def test_unknown_order_is_404_and_a_bad_id_422(http):
    assert "does not exist" in error_of(http.get(f"/api/orders/{uuid.uuid4()}"), 404)
    assert "orderId" in error_of(http.get("/api/orders/123"), 422)


# --- docs -----------------------------------------------------------------------------------------------


def test_docs_serve_openapi_with_every_route(http):
    docs = http.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"] and "swagger" in docs.text.lower()
    spec = http.get("/openapi.json").json()
    methods = {path: set(ops) for path, ops in spec["paths"].items()}
    normalised = {
        path.replace("{product_id}", "{productId}")
        .replace("{user_id}", "{userId}")
        .replace("{order_id}", "{orderId}"): ops
        for path, ops in methods.items()
    }
    assert {"get", "post"} <= normalised["/api/products"]
    assert "get" in normalised["/api/products/{productId}"]
    assert "put" in normalised["/api/cart/{userId}/items"]
    assert "get" in normalised["/api/cart/{userId}"]
    assert "post" in normalised["/api/orders"]
    assert "get" in normalised["/api/orders/{orderId}"]
