"""Rows a statement always returns, typed as such: psycopg types ``fetchone()`` as Optional for every query."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import psycopg

Row = TypeVar("Row")


def one(cursor: psycopg.Cursor[Row]) -> Row:
    """The row of a statement that always returns one (``UPDATE ... RETURNING`` of a locked row, an aggregate,
    ``INSERT ... RETURNING`` without ON CONFLICT); a missing row is a bug, not a case to handle."""
    row = cursor.fetchone()
    if row is None:
        raise LookupError("the statement returned no row")
    return row
