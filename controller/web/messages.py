"""The messages pages: the traffic of the bundled sender (API traffic and the tests it submitted),
with each message's state, latest receipt and the reason its route was chosen, and one message
in full (parts, every receipt, the routing decision with its failovers).

Search (``?q=``) takes a phone number (spaces, dashes, dots, brackets and a bracketed trunk
``(0)`` ignored; ``+`` or ``00`` before the country code, or neither), our message id (``123``
or ``#123``), or the route's id of one of its parts.

Queries, whatever the traffic: a list page two (the count and the page; status, receipt and
decision are stored on the message, a test's network comes from its test case in the same
query), a message two or three (the row with its part ids, those parts' receipts, a test's
network). Everything the sender stored (the text, the decision's words) is shown as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import ColumnElement, false, func, or_, select

from controller.api.inputs import MAX_ID
from controller.sender import messages as journal
from controller.storage import schema as s
from controller.web.guard import require
from controller.web.render import page, page_of
from controller.web.state import UI_CONFIG, UI_ENGINE

#: The states of a message (``controller.storage.schema.MESSAGE_STATUS_COMMENT``), and how each looks.
STATES = {
    "accepted": "",
    "submitted": "",
    "delivered": "good",
    "undeliverable": "bad",
    "failed": "bad",
}
KINDS = ("api", "test")
#: Longest search taken (a route's message id is at most 64 characters).
MAX_QUERY = 64
#: What a number may be written with, besides its digits.
_NUMBER_NOISE = re.compile(r"[\s\-.()/]")
_NUMBER = re.compile(r"^(\+|00)?([1-9][0-9]{5,14})$")
_MESSAGE_ID = re.compile(r"^#?([0-9]{1,10})$")


@dataclass(frozen=True)
class Search:
    """What a search text may be: a number in E.164, our message id, a route's part id."""

    text: str
    e164: str | None
    message_id: int | None

    def where(self) -> ColumnElement[bool]:
        """The messages it finds."""
        m = s.messages.c
        found: list[ColumnElement[bool]] = []
        if self.e164 is not None:
            found.append(m.destination == self.e164)
        if self.message_id is not None:
            found.append(m.id == self.message_id)
        if self.text:
            parts = s.message_parts.c
            found.append(m.id.in_(select(parts.message).where(parts.message_id == self.text)))
        return or_(*found) if found else false()


def parse_search(text: str) -> Search:
    """A search text read every way it can be meant."""
    text = text.strip()[:MAX_QUERY]
    # "+44 (0)20 ..." writes the national trunk 0 in brackets: it is not part of the number
    number = _NUMBER.match(_NUMBER_NOISE.sub("", text.replace("(0)", "")))
    e164 = f"+{number.group(2)}" if number else None
    plain_id = _MESSAGE_ID.match(text)
    message_id = int(plain_id.group(1)) if plain_id and 0 < int(plain_id.group(1)) <= MAX_ID else None
    return Search(text=text, e164=e164, message_id=message_id)


#: The list's columns: all but the text and the part ids, which the message page shows.
_LIST_COLUMNS = (
    s.messages.c.id,
    s.messages.c.created_at,
    s.messages.c.kind,
    s.messages.c.test_case_id,
    s.messages.c.destination,
    # a test's message carries no network of its own: its test case knows it
    func.coalesce(s.messages.c.mcc_mnc, s.test_cases.c.mcc_mnc).label("mcc_mnc"),
    s.messages.c.sender,
    s.messages.c.route,
    s.messages.c.status,
    s.messages.c.decision,
    s.messages.c.parts,
    s.messages.c.error,
    s.messages.c.receipt_status,
    s.messages.c.receipt_at,
)


async def message_list(request: web.Request) -> web.Response:
    """GET /messages: newest first; ``?q=`` searches, ``?status=``, ``?kind=`` filter."""
    require(request, "viewer")
    size = request.app[UI_CONFIG].page_size
    m = s.messages.c
    q = request.query.get("q", "")
    status = request.query.get("status", "")
    kind = request.query.get("kind", "")
    statement = select(*_LIST_COLUMNS).select_from(
        s.messages.outerjoin(s.test_cases, s.test_cases.c.id == m.test_case_id)
    )
    search = parse_search(q) if q.strip() else None
    if search is not None:
        statement = statement.where(search.where())
    if status in STATES:
        statement = statement.where(m.status == status)
    if kind in KINDS:
        statement = statement.where(m.kind == kind)
    async with request.app[UI_ENGINE].connect() as conn:
        total = int(await conn.scalar(select(func.count()).select_from(statement.subquery())) or 0)
        number, pages = page_of(request, total, size)
        rows = (
            await conn.execute(statement.order_by(m.id.desc()).limit(size).offset((number - 1) * size))
        ).all()
    return page(
        request,
        "messages.html",
        rows=rows,
        total=total,
        q=q,
        search=search,
        status_filter=status if status in STATES else "",
        kind_filter=kind if kind in KINDS else "",
        states=STATES,
        kinds=KINDS,
        reason=reason,
        page_number=number,
        pages=pages,
    )


def reason(decision: Any) -> str:
    """The decision's reason, in words ("" when none was stored)."""
    return str(decision.get("reason") or "") if isinstance(decision, dict) else ""


async def message_detail(request: web.Request) -> web.Response:
    """GET /messages/{id}: the message, its parts with their receipts, and its routing decision."""
    require(request, "viewer")
    text = request.match_info["id"]
    if len(text) > 10 or not 0 < int(text) <= MAX_ID:
        raise web.HTTPNotFound(text=f"no message {text[:20]}")
    message_id = int(text)
    async with request.app[UI_ENGINE].connect() as conn:
        found = await journal.get(conn, message_id)
        if found is None:
            raise web.HTTPNotFound(text=f"no message {message_id}")
        if found["mcc_mnc"] is None and found["test_case_id"] is not None:
            tc = s.test_cases.c
            found["mcc_mnc"] = await conn.scalar(select(tc.mcc_mnc).where(tc.id == found["test_case_id"]))
    parts = [
        {"number": i, "id": part_id, "receipts": [r for r in found["receipts"] if r["message_id"] == part_id]}
        for i, part_id in enumerate(found.get("message_ids") or [], start=1)
    ]
    decision = found["decision"] if isinstance(found.get("decision"), dict) else {}
    return page(request, "message.html", message=found, parts=parts, decision=decision, states=STATES)


ROUTES = [
    web.get("/messages", message_list),
    web.get(r"/messages/{id:\d+}", message_detail),
]
