"""Checkouts from the lab: a fixed batch (:func:`run_orders`) or a steady rate you can turn up and down (:class:`LoadDriver`)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from pulse.lab.client import PulseClient
from pulse.tools.checkout import LAB_WORDS, NO_RETRY, Shopper, wait_out_restarts


def one_checkout(
    client: PulseClient, product: str, quantity: int, *, wait_up=None, retry_for_s: float = 20.0
) -> tuple[str, str | None]:
    """Cart add then order for a new user; returns ``(outcome, orderId)``.

    Outcomes: ``placed``; ``cart-rejected`` (409, not enough stock: nothing was reserved);
    ``error`` (any other API error); ``no-answer`` (the server died mid-request, e.g. a crash fault).

    With ``wait_up`` (a function that waits for the restarted server) it behaves as a careful shop
    front-end: after a request got no answer it waits, then places the order with the same
    idempotency key until it gets an answer (a 409 "in flight" from the dead attempt's lock is
    retried too, for ``retry_for_s``), so no cart is left behind by a crash. Without it, the first
    failure is the outcome. The driver is :class:`pulse.tools.checkout.Shopper`.
    """
    policy = NO_RETRY if wait_up is None else wait_out_restarts(wait_up, retry_for_s)
    done = Shopper(client.http, policy).checkout(product, quantity)
    return LAB_WORDS[done.outcome], done.order_id


def run_orders(
    url: str, count: int, products: list[str], *, quantity: int = 1, concurrency: int = 4, seed: int = 1, wait_up=None
) -> dict:
    """Place ``count`` checkouts over ``products`` (chosen with a seeded RNG) with ``concurrency`` clients.

    Returns ``{'placed', 'cart-rejected', 'error', 'no-answer', 'orderIds', 'seconds'}``. When a
    request finds the server down, ``wait_up()`` (if given) waits for the supervisor's restart and
    the checkout is retried with its idempotency key (see :func:`one_checkout`).
    """
    rng = random.Random(seed)
    picks = [rng.choice(products) for _ in range(count)]
    counts = {"placed": 0, "cart-rejected": 0, "error": 0, "no-answer": 0}
    order_ids: list[str] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def work(chunk: list[str]):
        client = PulseClient(url)
        try:
            for product in chunk:
                outcome, order_id = one_checkout(client, product, quantity, wait_up=wait_up)
                with lock:
                    counts[outcome] += 1
                    if order_id:
                        order_ids.append(order_id)
        finally:
            client.close()

    chunks = [picks[i::concurrency] for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(work, chunks))
    return {**counts, "orderIds": order_ids, "seconds": round(time.perf_counter() - started, 3)}


class LoadDriver:
    """Checkouts at ``rate`` per second (0 pauses) in a background thread, until :meth:`stop`.

    The rate can change while it runs (the dashboard's slider does that). ``counts`` accumulates
    the outcomes of :func:`one_checkout`.
    """

    def __init__(
        self, url_of, products: list[str], *, rate: float = 5.0, quantity: int = 1, workers: int = 4, seed: int = 1
    ):
        self.url_of, self.products, self.rate, self.quantity = url_of, list(products), rate, quantity
        self.counts = {"placed": 0, "cart-rejected": 0, "error": 0, "no-answer": 0}
        self.order_ids: list[str] = []
        self._rng = random.Random(seed)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pulse-lab-load")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LoadDriver:
        if not self.running:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="pulse-lab-load", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.rate <= 0:
                self._stop.wait(0.2)
                next_at = time.monotonic()
                continue
            self._pool.submit(self._one, self._rng.choice(self.products))
            next_at += 1.0 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, product: str):
        client = PulseClient(self.url_of(), timeout_s=5)
        try:
            outcome, order_id = one_checkout(client, product, self.quantity)
        finally:
            client.close()
        with self._lock:
            self.counts[outcome] += 1
            if order_id:
                self.order_ids.append(order_id)

    def stop(self) -> dict:
        """Stop sending (requests in flight finish); returns the counts. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=True)
        self._pool = ThreadPoolExecutor(self._pool._max_workers, thread_name_prefix="pulse-lab-load")
        return dict(self.counts)
