"""HTTP API of SPEC §6: thin routes that turn JSON into service calls; errors are one plain sentence."""

from __future__ import annotations

import logging
import uuid
from decimal import Decimal

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pulse.errors import PulseError

log = logging.getLogger(__name__)


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class ProductIn(Camel):
    name: str = Field(min_length=1, max_length=200)
    base_price: Decimal = Field(ge=0, max_digits=12, decimal_places=2)
    stock: int = Field(ge=0, le=2_000_000_000)


class CartItemIn(Camel):
    product_id: uuid.UUID
    quantity: int = Field(gt=0, le=1_000_000)


class OrderIn(Camel):
    user_id: uuid.UUID
    idempotency_key: str = Field(min_length=1, max_length=200)


def _sentence(error: dict) -> str:
    # Path parameters are snake_case in Python; the client spells every field in camelCase.
    where = ".".join(to_camel(p) if isinstance(p, str) else str(p)
                     for p in error.get("loc", ()) if p not in ("body", "path", "query"))
    kind, msg = error.get("type", ""), error.get("msg", "is invalid")
    if kind == "missing":
        return f"{where or 'The request body'} is required."
    if kind == "uuid_parsing":
        return f"{where} must be a UUID such as e0e0e0e0-e0e0-4e0e-a0e0-000000000001."
    if kind == "json_invalid":
        return "The request body is not valid JSON."
    if kind in ("greater_than", "greater_than_equal"):
        return f"{where} must be {msg.removeprefix('Input should be ')}."
    return f"{where + ': ' if where else ''}{msg}."


def consumer_status(system) -> list[dict]:
    """The consumer threads of this process for /health (none in a process that runs only the API)."""
    status = getattr(system, "consumer_status", None)
    return status() if status is not None else []


def create_app(system) -> FastAPI:
    """The FastAPI application over a built :class:`pulse.bootstrap.System` (OpenAPI docs at /docs)."""
    app = FastAPI(title="Checkout Pulse", version="0.1.0",
                  description="Cart, orders and saga status of the Checkout Pulse teaching lab.")

    @app.exception_handler(PulseError)
    async def pulse_error(_: Request, exc: PulseError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        return JSONResponse({"error": _sentence(exc.errors()[0])}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        text = "No such route." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": text}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": "The server failed to handle this request; see its log."}, status_code=500)

    @app.post("/api/products", status_code=201)
    def create_product(body: ProductIn):
        return system.products.create(body.name, body.base_price, body.stock)

    @app.get("/api/products")
    def list_products():
        return system.products.list()

    # Path parameters carry the SPEC's camelCase names, so /docs matches the contract.
    @app.get("/api/products/{productId}")
    def get_product(product_id: uuid.UUID = Path(alias="productId")):
        return system.products.get(product_id)

    @app.put("/api/cart/{userId}/items")
    def add_cart_item(body: CartItemIn, user_id: uuid.UUID = Path(alias="userId")):
        return system.carts.add_item(user_id, body.product_id, body.quantity)

    @app.get("/api/cart/{userId}")
    def get_cart(user_id: uuid.UUID = Path(alias="userId")):
        return system.carts.get(user_id)

    @app.post("/api/orders")
    def create_order(body: OrderIn):
        return system.orders.create(body.user_id, body.idempotency_key)

    @app.get("/api/orders/{orderId}")
    def get_order(order_id: uuid.UUID = Path(alias="orderId")):
        return system.orders.get(order_id)

    @app.get("/health")
    def health():
        # faultsArmed: the registry's cached view (lab mode), or at most one SELECT every few seconds otherwise.
        return {"status": "ok", "strategy": system.settings.strategy_name, "outboxMode": system.settings.outbox_mode,
                "labMode": system.settings.lab, "faultsArmed": system.deps.faults.armed_names(),
                "consumers": consumer_status(system)}

    return app
