"""The product catalogue: create and read products with their available stock."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pulse.errors import NotFound
from pulse.infra import db

if TYPE_CHECKING:
    from pulse.deps import Deps

SELECT = (
    "SELECT p.id, p.name, p.base_price, COALESCE(i.available_quantity, 0) AS stock "
    "FROM inventory.products p LEFT JOIN inventory.inventory_items i ON i.product_id = p.id"
)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "basePrice": float(row["base_price"]), "stock": row["stock"]}


class ProductService:
    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    def create(self, name: str, base_price: Decimal, stock: int) -> dict[str, Any]:
        """Add a product with its initial stock; the Redis cache fills on the first reservation."""
        product_id = uuid.uuid4()
        with db.transaction(self.deps.pool) as conn:
            conn.execute(
                "INSERT INTO inventory.products (id, name, base_price) VALUES (%s, %s, %s)",
                (product_id, name, base_price),
            )
            conn.execute(
                "INSERT INTO inventory.inventory_items (product_id, available_quantity) VALUES (%s, %s)",
                (product_id, stock),
            )
        return self.get(product_id)

    def get(self, product_id: uuid.UUID) -> dict[str, Any]:
        with self.deps.pool.connection() as conn:
            row = conn.execute(SELECT + " WHERE p.id = %s", (product_id,)).fetchone()
        if row is None:
            raise NotFound(f"Product {product_id} does not exist.")
        return _public(row)

    def list(self) -> list[dict[str, Any]]:
        with self.deps.pool.connection() as conn:
            rows = conn.execute(SELECT + " ORDER BY p.name, p.id").fetchall()
        return [_public(r) for r in rows]
