"""Helpers of the e2e tier: a checkout over HTTP and waiting for the saga to settle."""

from __future__ import annotations

import uuid

from pulse.infra import db as pulse_db
from pulse.lab.client import PulseClient


def client(server) -> PulseClient:
    return PulseClient(server.url)


def new_product(client: PulseClient, stock: int, price: float = 10.0) -> str:
    return client.create_product(f"E2E product {uuid.uuid4().hex[:8]}", price, stock)["id"]


def stock_of(client: PulseClient, product_id: str) -> int:
    return client.http.get(f"/api/products/{product_id}").json()["stock"]


def zero_db_stock(database_url: str, product_id: str) -> None:
    """The warehouse finds the last units damaged after the cart reserved them (as pulse/lab/demo.py does)."""
    with pulse_db.connect(database_url) as conn:
        conn.execute(
            "UPDATE inventory.inventory_items SET available_quantity = 0, version = version + 1, "
            "updated_at = now() WHERE product_id = %s",
            (product_id,),
        )


def one_sentence(text: str) -> bool:
    """Non-empty, one line, ends with a full stop, exactly one sentence, nothing from a traceback."""
    import re

    return (
        bool(text)
        and "\n" not in text
        and text.endswith(".")
        and "Traceback" not in text
        and 'File "' not in text
        and not re.search(r"[.!?] [A-Z]", text)
    )
