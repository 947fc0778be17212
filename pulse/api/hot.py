"""A short path through the app for the checkout's hot requests, when they are well-formed.

A cart add or an order placement spent about 6× more Python in FastAPI's routing, dependency solving and
exception layers than in its own service call (py-spy, bench/NOTES.md). :class:`HotRoutes` answers a request to
one of the routes named in ``HOT`` itself, with the same endpoint function and the same validation model, when the
request is plainly valid: a canonical UUID in the path, a JSON content type, a body the route's model accepts.
Anything else (a bad id, broken JSON, a validation error, another content type) goes through FastAPI untouched,
so every error a client can get still comes from one place. The routes stay declared in FastAPI: /docs and the
OpenAPI document do not change.

It sits among the app's user middleware, inside FastAPI's server-error, telemetry and body-limit layers, so what
they do still applies; the exception handlers that FastAPI would apply inside them are applied here.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import functools
import queue
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The operations served by the short path: the two requests every checkout makes.
HOT = ("addCartItem", "createOrder")

# Only the canonical spelling: anything pydantic might read differently from uuid.UUID goes to FastAPI.
CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class _Hot:
    method: str
    path: re.Pattern[str]
    endpoint: Callable[..., Any]
    path_params: tuple[tuple[str, str], ...]  # (argument, alias in the path)
    body_param: str
    body_model: type[BaseModel]

    @classmethod
    def of(cls, route: APIRoute) -> _Hot:
        """The short path of a FastAPI route, which must take UUID path parameters and one model body."""
        d = route.dependant
        extras = d.query_params or d.header_params or d.cookie_params or d.dependencies
        bodies, methods = d.body_params, route.methods or set()
        if extras or len(bodies) != 1 or len(methods) != 1:
            raise ValueError(f"{route.operation_id}: a hot route takes path UUIDs and one JSON body, nothing else")
        body = bodies[0]
        model = body.field_info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or body.field_info.metadata:
            raise ValueError(f"{route.operation_id}: a hot route's body must be a plain pydantic model")
        for p in d.path_params:
            if p.field_info.annotation is not uuid.UUID:
                raise ValueError(f"{route.operation_id}: path parameter {p.alias} is not a UUID")
        return cls(
            method=next(iter(methods)),
            path=route.path_regex,
            endpoint=route.endpoint,
            path_params=tuple((p.name, p.alias) for p in d.path_params),
            body_param=body.name,
            body_model=model,
        )

    def call(self, match: re.Match[str], headers: dict[bytes, bytes], body: bytes) -> Callable[[], Any] | None:
        """The endpoint call for this request, or None when FastAPI should answer it (to say what is wrong)."""
        if not _is_json(headers.get(b"content-type")):
            return None
        kwargs: dict[str, Any] = {}
        for name, alias in self.path_params:
            text = match.group(alias)
            if not CANONICAL_UUID.fullmatch(text):
                return None
            kwargs[name] = uuid.UUID(text)
        try:
            kwargs[self.body_param] = self.body_model.model_validate(orjson.loads(body))
        except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return None
        return functools.partial(self.endpoint, **kwargs)


@functools.lru_cache(maxsize=32)
def _is_json(content_type: bytes | None) -> bool:
    """FastAPI's test for a JSON body (application/json or application/*+json), parameters allowed."""
    if content_type is None:
        return False
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class HotRoutes:
    """ASGI middleware: serves the well-formed requests of the ``HOT`` routes itself (see the module docstring)."""

    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app, self.fastapi = app, fastapi
        routes = {r.operation_id: r for r in fastapi.routes if isinstance(r, APIRoute)}
        self.hot = [_Hot.of(routes[op]) for op in HOT]
        self.hop = HOP

    def _match(self, scope: Scope) -> tuple[_Hot, re.Match[str]] | None:
        for hot in self.hot:
            if scope["method"] == hot.method and (m := hot.path.match(scope["path"])):
                return hot, m
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._match(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        hot, match = found
        body, message = await _read_body(receive)
        call = None if message is not None else hot.call(match, dict(scope["headers"]), body)
        if call is None:
            await self.app(scope, _replay(body, message, receive), send)
            return
        try:
            response = await self.hop(call)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # FastAPI's server-error layer answers 500 and logs it, as for any route
            response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for this exception, as FastAPI's exception layer picks it (by class, nearest first);
        the catch-all one (Exception) is the server-error layer's."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self.fastapi.exception_handlers.get(cls)
            if handler is not None:
                return handler
        return None


class Hop:
    """Runs a sync endpoint on one of ``threads`` worker threads and resumes the request when it returns.

    What Starlette's thread pool does for FastAPI's sync routes, minus anyio's per-call bookkeeping (capacity
    limiter, cancel scope, run vars, a Condition-based queue): that was a fifth of the API's GIL samples
    (bench/NOTES.md). Up to as many endpoints run at once as in anyio's default limiter, so a request that waits
    on the database or a lab fault's sleep never queues behind fewer threads than before. Threads start as the
    concurrent calls first need them and stay; an idle one waits in ``SimpleQueue.get``.
    """

    def __init__(self, threads: int = 40) -> None:
        self.max_threads = threads
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0

    async def __call__(self, call: Callable[[], Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._busy += 1
            if self._busy > self._threads and self._threads < self.max_threads:
                self._threads += 1
                threading.Thread(target=self._work, name=f"api-hop-{self._threads}", daemon=True).start()
        self._jobs.put((call, future))
        return await future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, future = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = call()
            except BaseException as exc:  # the request's coroutine re-raises it, as run_in_threadpool does
                error = exc
            with self._lock:
                self._busy -= 1
            # RuntimeError: the loop closed meanwhile (the server stopped), and nobody waits for this answer.
            with contextlib.suppress(RuntimeError):
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)


# One per process, as anyio keeps one thread pool per event loop: apps made by the tests share its idle threads.
HOP = Hop()


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.cancelled():  # the client went away: nobody awaits the answer any more
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The request body, or what arrived instead of it (a disconnect) for FastAPI to deal with."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, last: Message | None, receive: Receive) -> Receive:
    """A receive that gives the body already read (then what came after it), then the rest of the stream."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if last is not None:
        pending = [{"type": "http.request", "body": body, "more_body": True}, last]

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
