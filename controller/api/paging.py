"""Paging for every list endpoint: ``limit`` plus an opaque ``cursor``, keyset-based.

A page is read with ``WHERE key > last key ORDER BY key LIMIT n`` on a unique key, not with an
offset: rows added or removed while a client pages through never shift it onto a row twice or
past one, and a deep page costs what the first one does. The cursor is the last row's key,
base64-encoded JSON; the API checks its shape and types before the key reaches a query.
Each page also carries the total under the same filters and a ``next`` link.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Column, ColumnElement, Row, Select, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.api.errors import bad_request
from controller.api.inputs import MAX_ID

T = TypeVar("T")

#: Longest cursor accepted; real ones are a few dozen characters.
MAX_CURSOR_CHARS = 512


class PageQuery(BaseModel):
    """The paging parameters every list endpoint takes; list queries add their filters."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    limit: int | None = Field(
        None, ge=1, description="Items per page (default and maximum set by the server's api config)."
    )
    cursor: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CURSOR_CHARS,
        description="Where to continue: the next_cursor of the previous page. Opaque.",
    )


class Page(BaseModel, Generic[T]):
    """One page of a list, in a stable order."""

    items: list[T] = Field(description="The items of this page.")
    total: int = Field(description="How many items match the filters, on every page.")
    limit: int = Field(description="The page size used.")
    next_cursor: str | None = Field(description="Cursor of the next page; null on the last page.")
    next: str | None = Field(description="Path and query of the next page; null on the last page.")


@dataclass(frozen=True)
class Order:
    """A list's stable order: unique key columns, all ascending or all descending."""

    columns: tuple[Column[Any], ...]
    descending: bool = False

    def clauses(self) -> list[ColumnElement[Any]]:
        """ORDER BY clauses."""
        return [c.desc() if self.descending else c.asc() for c in self.columns]

    def after(self, key: Sequence[Any]) -> ColumnElement[bool]:
        """Rows after ``key`` in this order: (a, b) > (x, y) written out, which every backend
        plans with the index."""
        clause: ColumnElement[bool] | None = None
        for column, value in reversed(list(zip(self.columns, key, strict=True))):
            beyond = column < value if self.descending else column > value
            clause = beyond if clause is None else or_(beyond, and_(column == value, clause))
        assert clause is not None
        return clause

    def encode(self, row: Row[Any]) -> str:
        """The cursor that continues after ``row``."""
        key = [row._mapping[column] for column in self.columns]
        text = json.dumps(key, separators=(",", ":"), ensure_ascii=False)
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    def decode(self, cursor: str) -> list[Any]:
        """The key in a cursor, checked against the key columns' types; a 400 otherwise."""
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            key = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode())
        except (ValueError, binascii.Error, UnicodeError):
            raise bad_request("not a cursor of this list", "cursor") from None
        if not isinstance(key, list) or len(key) != len(self.columns):
            raise bad_request("not a cursor of this list", "cursor")
        for column, value in zip(self.columns, key, strict=True):
            wanted = column.type.python_type
            if type(value) is not wanted or not _storable(value):
                raise bad_request("not a cursor of this list", "cursor")
        return key


def _storable(value: Any) -> bool:
    if isinstance(value, int):
        return -MAX_ID - 1 <= value <= MAX_ID
    return not (isinstance(value, str) and "\x00" in value)


def page_size(query: PageQuery, default: int, maximum: int) -> int:
    """The limit asked for, or the default; above the maximum is a 400."""
    if query.limit is None:
        return default
    if query.limit > maximum:
        raise bad_request(f"limit: at most {maximum}", "limit")
    return query.limit


def where_given(statement: Select[Any], *filters: tuple[ColumnElement[Any], object]) -> Select[Any]:
    """``statement`` narrowed to ``column == value`` for each filter whose value was given (not None)."""
    for column, value in filters:
        if value is not None:
            statement = statement.where(column == value)
    return statement


async def fetch_page(
    conn: AsyncConnection, statement: Select[Any], order: Order, query: PageQuery, limit: int
) -> tuple[list[Row[Any]], int, str | None]:
    """One page of ``statement`` (filtered, not yet ordered): its rows, the total under the
    filters, and the cursor of the next page (None on the last)."""
    total = await conn.scalar(select(func.count()).select_from(statement.subquery()))
    if query.cursor is not None:
        statement = statement.where(order.after(order.decode(query.cursor)))
    rows = list((await conn.execute(statement.order_by(*order.clauses()).limit(limit + 1))).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, int(total or 0), order.encode(rows[-1]) if more and rows else None
