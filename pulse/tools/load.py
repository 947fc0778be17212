"""Load generator: real HTTP clients doing cart adds then orders, open-loop at a rate or closed-loop at a concurrency.

Use it from a notebook as ``run_load(url, rate=50, duration_s=10, progress=True)`` (a dict comes back), or from a
shell as ``pulse load``. Without a URL it starts its own ``pulse serve`` child and stops it afterwards.

This module is the generator (sessions, open and closed loops, the run); it speaks HTTP through
:mod:`pulse.tools.rawhttp` (or httpx) and measures and reports through :mod:`pulse.tools.load_report`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from pulse.tools import checkout
from pulse.tools.checkout import Outcome
from pulse.tools.load_report import TERMINAL, Tally, completion_from_db, completion_from_poll, report
from pulse.tools.rawhttp import Client, RawClient, RawHttpError, Response

if TYPE_CHECKING:
    from pulse.tools.launcher import ServeProcess

LOAD_STOCK = 1_000_000_000  # so that a long run never sells out and every checkout can complete
T = TypeVar("T")


def parse_mix(text: str | None) -> dict[str, Any]:
    """``"adds=2,abandon=0.1"``: cart adds per session, and the share of sessions that never check out."""
    mix: dict[str, Any] = {"adds": 2, "abandon": 0.0}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in mix or not value.strip():
            raise ValueError(f"--mix takes adds=N,abandon=F (for example adds=2,abandon=0.1), got {text!r}.")
        try:
            mix[name] = int(value) if name == "adds" else float(value)
        except ValueError:
            raise ValueError(f"--mix {name} must be a number, got {value.strip()!r}.") from None
    if mix["adds"] < 1 or not 0.0 <= mix["abandon"] <= 1.0:
        raise ValueError("--mix needs adds >= 1 and abandon between 0 and 1.")
    return mix


def _status(response: Response | None) -> int | None:
    return None if response is None else response.status_code


class _Load:
    def __init__(
        self,
        products: list[str],
        *,
        mix: dict[str, Any],
        track: str,
        track_fraction: float,
        poll_s: float,
        complete_timeout_s: float,
        seed: int | None,
    ) -> None:
        self.products, self.mix = products, mix
        self.track, self.track_fraction = track, track_fraction
        self.poll_s, self.complete_timeout_s = poll_s, complete_timeout_s
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.pollers: set[asyncio.Task[None]] = set()
        self._next_url = 0

    async def call(self, client: Client, request: checkout.Request) -> Response | None:
        """Send ``request`` once, recording its latency and status under its route; None when unanswered."""
        started = time.perf_counter()
        try:
            response = await client.request(request.method, request.path, json=request.body)
        except (httpx.HTTPError, RawHttpError) as exc:
            self.tally.requests[request.route][f"error:{type(exc).__name__}"] += 1
            return None
        self.tally.latency[request.route].record(time.perf_counter() - started)
        self.tally.requests[request.route][str(response.status_code)] += 1
        return response

    async def session(self, clients: list[Client]) -> Outcome:
        """One shopper: ``adds`` cart adds of random products, then (unless abandoned) an order.

        Its outcome comes from the sync driver's classification (:func:`checkout.after_add`,
        :func:`checkout.after_order`), with no retries: each answer is what the run measures."""
        client = clients[self._next_url % len(clients)]
        self._next_url += 1
        self.tally.sessions += 1
        user = str(uuid.uuid4())
        for _ in range(self.mix["adds"]):
            response = await self.call(client, checkout.add_item_request(user, self.rng.choice(self.products), 1))
            outcome = checkout.after_add(_status(response))
            if outcome is not None:
                return outcome
            self.tally.cart_adds += 1
        if self.rng.random() < self.mix["abandon"]:
            return Outcome.ABANDONED
        sent = time.perf_counter()
        response = await self.call(client, checkout.order_request(user, str(uuid.uuid4())))
        outcome = checkout.after_order(_status(response))
        if outcome is not Outcome.ORDERED:
            return outcome
        self.tally.checkouts += 1
        assert response is not None  # ORDERED: a 200 came with its body
        order_id = response.json()["orderId"]
        self.tally.orders.append(order_id)
        if self.track == "poll" and self.rng.random() < self.track_fraction:
            task = asyncio.create_task(self.follow(client, order_id, sent))
            self.pollers.add(task)
            task.add_done_callback(self.pollers.discard)
        return outcome

    async def follow(self, client: Client, order_id: str, sent: float) -> None:
        """Poll the order until its status is terminal; record create→COMPLETED as the client saw it."""
        deadline = sent + self.complete_timeout_s
        while time.perf_counter() < deadline:
            await asyncio.sleep(self.poll_s)
            response = await self.call(client, checkout.order_status_request(order_id))
            if response is None or response.status_code != 200:
                continue
            status = response.json()["status"]
            if status in TERMINAL:
                self.tally.outcomes[status] += 1
                if status == "COMPLETED":
                    self.tally.completion.record(time.perf_counter() - sent)
                return
        self.tally.outcomes["TIMED_OUT"] += 1


async def _closed_loop(load: _Load, clients: list[Client], concurrency: int, until: float) -> None:
    async def worker() -> None:
        while time.perf_counter() < until:
            await load.session(clients)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(load: _Load, clients: list[Client], rate: float, until: float, max_inflight: int) -> None:
    """Start sessions on a fixed schedule whatever the latency (no coordinated omission); sessions that
    would exceed ``max_inflight`` are counted as skipped: the server is not keeping up."""
    inflight: set[asyncio.Task[Outcome]] = set()
    start = time.perf_counter()
    started = 0
    while (now := time.perf_counter()) < until:
        due = int((now - start) * rate) + 1
        while started < due:
            started += 1
            if len(inflight) >= max_inflight:
                load.tally.skipped += 1
                continue
            task = asyncio.create_task(load.session(clients))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        await asyncio.sleep(max(0.0, start + started / rate - time.perf_counter()))
    if inflight:
        await asyncio.gather(*inflight)


async def _progress(tally: Tally, started: float, duration_s: float, enabled: bool, stop: asyncio.Event) -> None:
    if not enabled:
        await stop.wait()
        return
    from tqdm.auto import tqdm

    with tqdm(
        total=round(duration_s, 1),
        unit="s",
        file=sys.stderr,
        desc="pulse load",
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}",
    ) as bar:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            elapsed = min(time.perf_counter() - started, duration_s)
            bar.n = round(elapsed, 1)
            errors = sum(n for c in tally.requests.values() for s, n in c.items() if not s.startswith("2"))
            bar.set_postfix(
                checkouts=tally.checkouts,
                per_s=f"{tally.checkouts / max(elapsed, 1e-9):.0f}",
                errors=errors,
                refresh=False,
            )
            bar.refresh()


async def _create_products(client: Client, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    ids: list[str] = []
    for i in range(count):
        response = await client.request(
            "POST", "/api/products", json={"name": f"load {tag} #{i}", "basePrice": 10, "stock": LOAD_STOCK}
        )
        if response.status_code != 201:
            raise RuntimeError(f"Could not create the load products: the server answered {response.status_code}.")
        ids.append(response.json()["id"])
    return ids


def _client(kind: str, url: str, width: int, timeout_s: float) -> Client:
    if kind == "httpx":
        limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
        return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)
    return RawClient(url, timeout=timeout_s, max_connections=width)


async def _run(
    urls: list[str],
    *,
    rate: float | None,
    concurrency: int | None,
    duration_s: float,
    mix: dict[str, Any],
    products: int | list[str],
    track: str,
    track_fraction: float,
    poll_s: float,
    complete_timeout_s: float,
    max_inflight: int,
    progress: bool,
    seed: int | None,
    timeout_s: float,
    client: str,
) -> tuple[_Load, float, list[str]]:
    width = concurrency or max_inflight
    clients = [_client(client, u, width, timeout_s) for u in urls]
    try:
        product_ids = products if isinstance(products, list) else await _create_products(clients[0], products)
        load = _Load(
            product_ids,
            mix=mix,
            track=track,
            track_fraction=track_fraction,
            poll_s=poll_s,
            complete_timeout_s=complete_timeout_s,
            seed=seed,
        )
        stop = asyncio.Event()
        started = time.perf_counter()
        bar = asyncio.create_task(_progress(load.tally, started, duration_s, progress, stop))
        until = started + duration_s
        if rate:
            await _open_loop(load, clients, rate, until, max_inflight)
        else:
            if concurrency is None:  # run_load refuses this before
                raise ValueError("Give either a rate or a concurrency, not both and not neither.")
            await _closed_loop(load, clients, concurrency, until)
        elapsed = time.perf_counter() - started
        stop.set()
        await bar
        if load.pollers:
            await asyncio.gather(*list(load.pollers))
        return load, elapsed, product_ids
    finally:
        for c in clients:
            await c.aclose()


def _in_fresh_loop(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from inside a running loop (a Jupyter kernel): then on a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_load(
    url: str | list[str] | None = None,
    *,
    rate: float | None = None,
    concurrency: int | None = None,
    duration_s: float = 10.0,
    mix: str | dict[str, Any] | None = None,
    products: int | list[str] = 20,
    strategy: str | None = None,
    outbox_mode: str | None = None,
    env: dict[str, str] | None = None,
    track: str = "poll",
    track_fraction: float = 0.2,
    poll_s: float = 0.01,
    complete_timeout_s: float = 30.0,
    max_inflight: int = 512,
    database_url: str | None = None,
    progress: bool = True,
    seed: int | None = None,
    timeout_s: float = 30.0,
    serve_log: str | None = None,
    client: str = "raw",
) -> dict[str, Any]:
    """Drive ``pulse serve`` with real HTTP shoppers and return the measurements as a dict.

    Give exactly one of ``rate`` (sessions started per second, open loop) or ``concurrency`` (shoppers
    looping back to back, closed loop). ``url`` may be a list: sessions alternate between the servers.
    ``products`` is a number of products to create (with ample stock) or a list of product ids.
    ``track`` measures create→COMPLETED: ``"poll"`` polls a ``track_fraction`` sample of orders over
    HTTP, ``"db"`` reads every order's timestamps from ``database_url`` after the run, ``"off"`` skips it.
    Without ``url`` a ``pulse serve`` child is started with ``strategy``/``outbox_mode``/``env``.
    ``client`` is ``"raw"`` (a lean HTTP/1.1 client, the default: the generator should not eat the
    server's CPU) or ``"httpx"``.
    """
    if (rate is None) == (concurrency is None):
        raise ValueError("Give either a rate or a concurrency, not both and not neither.")
    if (rate is not None and rate <= 0) or (concurrency is not None and concurrency < 1) or duration_s <= 0:
        raise ValueError("Rate, concurrency and duration must be positive.")
    if client not in ("raw", "httpx"):
        raise ValueError(f"client must be raw or httpx, got {client!r}.")
    if track not in ("poll", "db", "off"):
        raise ValueError(f"track must be poll, db or off, got {track!r}.")
    mix = mix if isinstance(mix, dict) else parse_mix(mix)
    server: ServeProcess | None = None
    if url is None:
        from pulse.tools.launcher import ServeProcess

        server = ServeProcess(
            strategy=strategy or "optimistic", outbox_mode=outbox_mode, env=env, log_path=serve_log
        ).start()
        urls = [server.url]
        database_url = database_url or server.env.get("PULSE_DATABASE_URL")
    else:
        urls = [url] if isinstance(url, str) else list(url)
    try:
        health = httpx.get(urls[0] + "/health", timeout=5).json()
        if strategy and health.get("strategy") != strategy.upper().replace("-", "_"):
            raise ValueError(f"The server at {urls[0]} runs strategy {health.get('strategy')}, not {strategy}.")
        load, elapsed, product_ids = _in_fresh_loop(
            _run(
                urls,
                rate=rate,
                concurrency=concurrency,
                duration_s=duration_s,
                mix=mix,
                products=products,
                track=track,
                track_fraction=track_fraction,
                poll_s=poll_s,
                complete_timeout_s=complete_timeout_s,
                max_inflight=max_inflight,
                progress=progress,
                seed=seed,
                timeout_s=timeout_s,
                client=client,
            )
        )
        completion = completion_from_poll(load.tally) if track == "poll" else None
        if track == "db":
            completion = completion_from_db(
                database_url or os.environ.get("PULSE_DATABASE_URL"), load.tally.orders, timeout_s=complete_timeout_s
            )
    finally:
        if server is not None:
            server.stop()
    return report(
        load.tally,
        elapsed,
        urls,
        health,
        rate=rate,
        concurrency=concurrency,
        duration_s=duration_s,
        mix=mix,
        products=len(product_ids),
        completion=completion,
        client=client,
    )
