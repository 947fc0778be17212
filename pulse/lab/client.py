"""A small HTTP client for the lab: the same calls a shop front-end would make, plus waiting for sagas."""

from __future__ import annotations

import time
import uuid

import httpx

from pulse.status import (
    TERMINAL,
    OrderStatus,
    Strategy,
)
from pulse.status import (
    DisplayStatus as D,
)
from pulse.status import (
    FailureReason as R,
)
from pulse.status import (
    InventoryStatus as Inv,
)
from pulse.status import (
    PaymentStatus as Pay,
)
from pulse.tools.checkout import Request, add_item_request, cart_request, order_request, order_status_request


class PulseError(RuntimeError):
    """The API answered with an error; ``status`` is the HTTP status, the message its one-sentence body."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class PulseClient:
    """Talks to one ``pulse serve`` over HTTP.

    >>> client = PulseClient("http://127.0.0.1:8080")
    >>> user = client.new_user(); client.add_item(user, IPHONE, 1); order = client.checkout(user)
    >>> client.wait_settled(order["orderId"])["displayStatus"]
    'COMPLETED'
    """

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s)

    @staticmethod
    def new_user() -> str:
        """A fresh random user id (so nothing depends on earlier runs)."""
        return str(uuid.uuid4())

    def _call(self, method: str, path: str, **kwargs):
        return self._answer(self.http.request(method, path, **kwargs))

    def _send(self, request: Request):
        return self._answer(self.http.request(request.method, request.path, json=request.body))

    @staticmethod
    def _answer(response: httpx.Response):
        if response.status_code >= 400:
            raise PulseError(response.status_code, response.json().get("error", response.text))
        return response.json()

    def health(self) -> dict:
        return self._call("GET", "/health")

    def products(self) -> list[dict]:
        return self._call("GET", "/api/products")

    def create_product(self, name: str, base_price: float, stock: int) -> dict:
        return self._call("POST", "/api/products", json={"name": name, "basePrice": base_price, "stock": stock})

    def add_item(self, user_id: str, product_id: str, quantity: int = 1) -> dict:
        """PUT /api/cart/{userId}/items: reserve ``quantity`` more units in the user's cart."""
        return self._send(add_item_request(user_id, product_id, quantity))

    def cart(self, user_id: str) -> dict:
        return self._send(cart_request(user_id))

    def checkout(self, user_id: str, idempotency_key: str | None = None) -> dict:
        """POST /api/orders; a random idempotency key unless you pass one (pass the same to retry safely)."""
        key = idempotency_key or str(uuid.uuid4())
        return self._send(order_request(user_id, key))

    def order(self, order_id: str) -> dict:
        return self._send(order_status_request(order_id))

    def wait_settled(self, order_id: str, timeout_s: float = 30.0, poll_s: float = 0.05) -> dict:
        """Poll the order until the saga is over: terminal status, compensation finished, view caught up."""
        deadline = time.monotonic() + timeout_s
        order = self.order(order_id)
        while time.monotonic() < deadline:
            if settled(order):
                return order
            time.sleep(poll_s)
            order = self.order(order_id)
        raise TimeoutError(f"order {order_id} did not settle within {timeout_s:.0f}s; last state: {order}")

    def close(self):
        self.http.close()


def settled(order: dict) -> bool:
    """True once nothing more will happen to this order (including restock/refund and the view)."""
    if order["status"] not in TERMINAL or order["displayStatus"] is None:
        return False
    if order["status"] == OrderStatus.COMPLETED:
        return order["displayStatus"] == D.COMPLETED
    if order["failureReason"] == R.PAYMENT_FAILED and order["strategy"] == Strategy.OPTIMISTIC:
        return order["inventoryStatus"] == Inv.RELEASED and order["displayStatus"] == D.FAILED_PAYMENT
    if order["failureReason"] == R.OUT_OF_STOCK and order["strategy"] == Strategy.POST_PAYMENT:
        return order["paymentStatus"] == Pay.REFUNDED and order["displayStatus"] == D.REFUNDED
    return order["displayStatus"] in {D.FAILED_PAYMENT, D.FAILED_OUT_OF_STOCK, D.REFUNDED}
