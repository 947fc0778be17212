"""What every invariant takes and gives: a :class:`Scope` (which orders and products to judge) and a
:class:`Result` (name, passed, details, offending ids), plus the SQL fragments that apply a scope."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection
from typing import Any

MAX_IDS = 20  # offending ids (and examples) a result reports; the count is always whole


@dataclasses.dataclass
class Result:
    name: str
    passed: bool
    details: str
    offending: list[Any] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "details": self.details,
            "offending": [str(i) for i in self.offending[:MAX_IDS]],
            "offendingCount": len(self.offending),
            **({"data": self.data} if self.data else {}),
        }


@dataclasses.dataclass
class Scope:
    """What to check: orders/events since ``since`` (None: all) and these ``products`` (None: all)."""

    since: dt.datetime | None = None
    products: list[str] | None = None

    def sql(self) -> dict[str, Any]:
        return {
            "since": self.since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            "products": None if self.products is None else [str(p) for p in self.products],
        }


PRODUCT_FILTER = "(%(products)s::uuid[] IS NULL OR {col} = ANY(%(products)s::uuid[]))"
# The campaign's orders: created since the scope's moment and, when it names products, holding one of them.
ORDERS_IN_SCOPE = (
    "SELECT o.* FROM orders.orders o WHERE o.created_at >= %(since)s AND (%(products)s::uuid[] IS NULL "
    "OR EXISTS (SELECT 1 FROM orders.order_items oi WHERE oi.order_id = o.id "
    "AND oi.product_id = ANY(%(products)s::uuid[])))"
)


def result(name: str, offending: Collection[Any], ok_text: str, bad_text: str, **data: Any) -> Result:
    """A result that passes when nothing is offending; ``bad_text`` may say ``{n}``."""
    return Result(
        name, not offending, ok_text if not offending else bad_text.format(n=len(offending)), list(offending), data
    )
