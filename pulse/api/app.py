"""HTTP API of SPEC §6: thin routes that turn JSON into service calls; errors are one plain sentence."""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import psycopg
import psycopg_pool
import redis
from fastapi import FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from pulse.api.hot import HotRoutes
from pulse.errors import PulseError
from pulse.infra.db import DatabaseUnavailable
from pulse.infra.redis_scripts import RedisUnavailable

if TYPE_CHECKING:
    from pulse.bootstrap import System

log = logging.getLogger(__name__)


# The largest value of numeric(12,2), the type of every amount column (products.base_price, orders.total_amount).
MAX_AMOUNT = Decimal("9999999999.99")
# C0 and C1 control characters (NUL, line breaks, escapes): PostgreSQL text cannot hold NUL at all, and
# none of them belongs in a name or a key. Written for both JSON Schema (ECMA) and the Rust regex of pydantic.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f]*$"
# A price may also come as a plain decimal string ("12.50"), which no float rounding can blur.
PRICE_TEXT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _cents(value: object) -> object:
    """A price as a JSON number, or as a plain decimal string ("12.50"); booleans and other text are not prices.

    A client that computes a price in binary floating point may send 0.5700000000000001 for 0.57
    (JSON Schema's ``multipleOf: 0.01`` generators do): a number within float rounding of a whole cent
    is that cent; anything further off keeps its digits and fails ``decimal_places``.
    """
    if isinstance(value, str) and PRICE_TEXT.fullmatch(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise PydanticCustomError("price_type", "must be a number such as 19.99")
    if isinstance(value, float) and math.isfinite(value):
        cents = round(value, 2)
        if math.isclose(value, cents, rel_tol=1e-14):
            return Decimal(repr(cents))
    return value


# Documented as exactly what _cents and the bounds accept (pydantic's own schema would allow any string).
Price = Annotated[
    Decimal,
    BeforeValidator(_cents),
    Field(ge=0, le=MAX_AMOUNT, max_digits=12, decimal_places=2),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": float(MAX_AMOUNT), "multipleOf": 0.01},
                {"type": "string", "pattern": f"^{PRICE_TEXT.pattern}$"},
            ],
            "examples": [19.99],
        }
    ),
]


def _json_integer(value: object) -> object:
    """JSON Schema's integer: a number without a fraction (2.0 is one), never a boolean or a string."""
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


# Lax int after the check above: it takes 2.0 as 2 and refuses 2.5 (int_from_float).
Count = Annotated[int, BeforeValidator(_json_integer)]
Text = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL_CHARACTERS)]


class ProductIn(Camel):
    name: Text
    base_price: Price
    stock: Count = Field(ge=0, le=2_000_000_000)


class CartItemIn(Camel):
    product_id: uuid.UUID
    quantity: Count = Field(gt=0, le=1_000_000)


class OrderIn(Camel):
    user_id: uuid.UUID
    idempotency_key: Text


class Error(BaseModel):
    """Every 4xx and 5xx answer: one plain sentence."""

    error: str = Field(examples=["Product e0e0e0e0-e0e0-4e0e-a0e0-000000000009 does not exist."])


class Product(Camel):
    id: uuid.UUID
    name: str
    base_price: float
    stock: int


class CartLine(Camel):
    product_id: uuid.UUID
    name: str
    quantity: int
    unit_price: float
    sub_total: float


class Cart(Camel):
    user_id: uuid.UUID
    items: list[CartLine]
    total: float


class OrderCreated(Camel):
    order_id: uuid.UUID
    status: str
    total_amount: float


class Order(Camel):
    order_id: uuid.UUID
    status: str
    display_status: str | None
    payment_status: str
    inventory_status: str
    failure_reason: str | None
    strategy: str
    total_amount: float


_WHY = {
    400: "The request body could not be read.",
    404: "The resource does not exist.",
    409: "The request conflicts with the current stock, cart or idempotency key.",
    422: "The request is not valid.",
    500: "The server failed; see its log.",
    503: "PostgreSQL or Redis is unavailable; retry in a moment.",
}


def _answers(ok: int, model: Any, *errors: int, links: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route: its success body (and OpenAPI links) and each error status, all with ``Error``.

    FastAPI adds a 422 with its own ``HTTPValidationError`` body unless a route declares 422 itself;
    ours is an ``Error`` too, so every route that validates input declares it.
    """
    answers: dict[int | str, dict[str, Any]] = {ok: {"model": model, **({"links": links} if links else {})}}
    answers.update({code: {"model": Error, "description": _WHY[code]} for code in (*errors, 500, 503)})
    return answers


_SENTENCES = {
    "string_pattern_mismatch": "{where} must not contain control characters such as NUL, a tab or a line break.",
    "string_too_short": "{where} must not be empty.",
    "string_too_long": "{where} must be at most {max_length} characters long.",
    "string_type": "{where} must be a string.",
    "int_type": "{where} must be a whole number (a JSON integer, not a boolean or a string).",
    "int_from_float": "{where} must be a whole number.",
    "price_type": '{where} must be a number such as 19.99 (or the string "19.99").',
    "decimal_max_places": "{where} must have at most 2 decimal places.",
    "decimal_max_digits": "{where} must be at most 9999999999.99 with at most 2 decimal places.",
    "decimal_whole_digits": "{where} must be at most 9999999999.99.",
    "finite_number": "{where} must be a finite number.",
    "uuid_parsing": "{where} must be a UUID such as e0e0e0e0-e0e0-4e0e-a0e0-000000000001.",
    "uuid_type": "{where} must be a UUID such as e0e0e0e0-e0e0-4e0e-a0e0-000000000001.",
    "json_invalid": "The request body is not valid JSON.",
    "model_attributes_type": "The request body must be a JSON object.",
    "dict_type": "The request body must be a JSON object.",
}


# OpenAPI links: which answer feeds which request. They document the checkout's flow and let a stateful
# client (schemathesis) walk product -> cart -> order -> order status with real ids instead of random 404s.
# The cart's user id doubles as the idempotency key: unique per cart, as a key must be.
LINKS = {
    "product": {
        "GetProduct": {"operationId": "getProduct", "parameters": {"productId": "$response.body#/id"}},
        "AddToCart": {"operationId": "addCartItem", "requestBody": {"productId": "$response.body#/id", "quantity": 1}},
    },
    "cart": {
        "GetCart": {"operationId": "getCart", "parameters": {"userId": "$response.body#/userId"}},
        "PlaceOrder": {
            "operationId": "createOrder",
            "requestBody": {"userId": "$response.body#/userId", "idempotencyKey": "$response.body#/userId"},
        },
    },
    "order": {"GetOrder": {"operationId": "getOrder", "parameters": {"orderId": "$response.body#/orderId"}}},
}


def _sentence(error: Mapping[str, Any]) -> str:
    # Path parameters are snake_case in Python; the client spells every field in camelCase.
    where = ".".join(
        to_camel(p) if isinstance(p, str) else str(p)
        for p in error.get("loc", ())
        if p not in ("body", "path", "query")
    )
    kind, msg, ctx = error.get("type", ""), error.get("msg", "is invalid"), error.get("ctx") or {}
    if kind == "missing":
        return f"{where or 'The request body'} is required."
    if kind in _SENTENCES and (where or "{where}" not in _SENTENCES[kind]):
        return _SENTENCES[kind].format(where=where, **{k: v for k, v in ctx.items() if k != "where"})
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{where} must be {msg.removeprefix('Input should be ')}."
    return f"{where + ': ' if where else ''}{msg.rstrip('.')}."


class Plain(JSONResponse):
    """A route's answer, encoded as FastAPI would have but without walking it through ``jsonable_encoder`` first.

    The services answer in JSON types already (``jsonable_encoder`` copied every dict and list of every answer,
    ≈ 50 µs a cart); a value that is not (a Decimal, a UUID) still gets ``jsonable_encoder``'s form, via ``default``.
    """

    def render(self, content: Any) -> bytes:
        # orjson writes what json.dumps(ensure_ascii=False, separators=(",", ":")) writes, in a fifth of the time;
        # non-string keys become strings as json.dumps makes them. One difference: a NaN would be written as null
        # rather than refused, and no answer holds one (prices and totals come from numeric columns checked >= 0).
        return orjson.dumps(content, default=jsonable_encoder, option=orjson.OPT_NON_STR_KEYS)


def _consumer_status(system: System) -> list[dict[str, Any]]:
    """The consumer threads of this process for /health (none in a process that runs only the API)."""
    status = getattr(system, "consumer_status", None)
    threads: list[dict[str, Any]] = status() if status is not None else []
    return threads


def create_app(system: System, *, hot: bool = True, workers: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The FastAPI application over a built :class:`pulse.bootstrap.System` (OpenAPI docs at /docs).

    ``hot=False`` leaves out the short path of the checkout's two hot requests (pulse.api.hot): every request then
    takes FastAPI's own path, which the tests compare it with. ``workers`` reports the workers of this server that
    run in another process (pulse.cli.serve_split.read_status): /health then lists their consumers and what they
    obey instead of this process's own.
    """
    app = FastAPI(
        title="Checkout Pulse",
        version="0.1.0",
        description="Cart, orders and saga status of the Checkout Pulse teaching lab.",
    )

    @app.exception_handler(PulseError)
    async def pulse_error(_: Request, exc: PulseError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _sentence(exc.errors()[0])}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            text = "No such route."
        elif exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on this path only (GET and POST
            # /api/products are two routes); RFC 9110 wants every method the resource supports.
            allowed = ", ".join(
                sorted(
                    {
                        m
                        for r in app.routes
                        if isinstance(r, Route) and r.methods and r.path_regex.match(request.url.path)
                        for m in r.methods
                    }
                )
            )
            exc.headers = {**(exc.headers or {}), "Allow": allowed}
            text = f"Method {request.method} is not allowed here; use {allowed}."
        elif exc.status_code == 400:
            text = "The request body could not be read; send JSON in UTF-8."
        else:
            text = str(exc.detail).rstrip(".") + "."
        # Starlette puts Allow on its 405: RFC 9110 requires it, so it must survive this handler.
        return JSONResponse({"error": text}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(psycopg.DataError)
    async def data_error(_: Request, exc: psycopg.DataError) -> JSONResponse:
        # Validation should have stopped it; if a value still does not fit its column, it is the
        # request's fault (nothing was written: the statement failed), not the server's.
        log.warning("a value was refused by PostgreSQL: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return JSONResponse(
            {"error": "A value in the request does not fit what the database can store."}, status_code=422
        )

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg_pool.PoolTimeout)
    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(RedisUnavailable)
    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.error("a backing service is unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": "PostgreSQL or Redis is unavailable; retry in a moment."}, status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "The server failed to handle this request; see its log."}, status_code=500)

    # response_model=None: FastAPI would otherwise take each return annotation (there for mypy) as a response model
    # and validate the answers against it; the routes return the services' dicts as they are, and `responses`
    # documents their bodies.
    @app.post(
        "/api/products",
        status_code=201,
        operation_id="createProduct",
        response_model=None,
        responses=_answers(201, Product, 400, 422, links=LINKS["product"]),
    )
    def create_product(body: ProductIn) -> Plain:
        return Plain(system.products.create(body.name, body.base_price, body.stock), status_code=201)

    @app.get("/api/products", operation_id="listProducts", response_model=None, responses=_answers(200, list[Product]))
    def list_products() -> Plain:
        return Plain(system.products.list())

    # Path parameters carry the SPEC's camelCase names, so /docs matches the contract.
    @app.get(
        "/api/products/{productId}",
        operation_id="getProduct",
        response_model=None,
        responses=_answers(200, Product, 404, 422),
    )
    def get_product(product_id: uuid.UUID = Path(alias="productId")) -> Plain:
        return Plain(system.products.get(product_id))

    @app.put(
        "/api/cart/{userId}/items",
        operation_id="addCartItem",
        response_model=None,
        responses=_answers(200, Cart, 400, 404, 409, 422, links=LINKS["cart"]),
    )
    def add_cart_item(body: CartItemIn, user_id: uuid.UUID = Path(alias="userId")) -> Plain:
        return Plain(system.carts.add_item(user_id, body.product_id, body.quantity))

    @app.get("/api/cart/{userId}", operation_id="getCart", response_model=None, responses=_answers(200, Cart, 422))
    def get_cart(user_id: uuid.UUID = Path(alias="userId")) -> Plain:
        return Plain(system.carts.get(user_id))

    @app.post(
        "/api/orders",
        operation_id="createOrder",
        response_model=None,
        responses=_answers(200, OrderCreated, 400, 404, 409, 422, links=LINKS["order"]),
    )
    def create_order(body: OrderIn) -> Plain:
        return Plain(system.orders.create(body.user_id, body.idempotency_key))

    @app.get(
        "/api/orders/{orderId}", operation_id="getOrder", response_model=None, responses=_answers(200, Order, 404, 422)
    )
    def get_order(order_id: uuid.UUID = Path(alias="orderId")) -> Plain:
        return Plain(system.orders.get(order_id))

    @app.get("/health", response_model=None)
    def health() -> dict[str, Any]:
        # faultsArmed: the registry's cached view (lab mode), or at most one SELECT every few seconds otherwise.
        armed = system.deps.faults.armed_names()
        here = {"pid": os.getpid(), "role": "api" if workers else "all", "faultsArmed": armed}
        # processes: what each process of the server obeys, which the Lab waits on after arming a fault.
        if workers is None:
            consumers, processes = _consumer_status(system), [here]
        else:
            other = workers()
            consumers = other["consumers"]
            processes = [here, {"pid": other["pid"], "role": "workers", "faultsArmed": other["faultsArmed"]}]
        return {
            "status": "ok",
            "strategy": system.settings.strategy_name,
            "outboxMode": system.settings.outbox_mode,
            "labMode": system.settings.lab,
            "faultsArmed": armed,
            "consumers": consumers,
            "processes": processes,
        }

    if hot:
        app.add_middleware(HotRoutes, fastapi=app)
    return app
