"""One test message in full: what was sent, on which route, to which probe; what arrived, when and
how (sender, text, SMSC, parts), the receipts the route sent and whether they told the truth, and
the result's notes in words. The same record as ``GET /api/v1/test-cases/{id}``
(:func:`controller.api.results.test_case_detail`); three queries and one for the receipts.
"""

from __future__ import annotations

from aiohttp import web

from controller.api.inputs import MAX_ID
from controller.api.results import test_case_detail
from controller.web.guard import require
from controller.web.render import page
from controller.web.route_detail import receipt_verdict, text_diff
from controller.web.state import UI_ENGINE


async def test_case_page(request: web.Request) -> web.Response:
    """GET /tests/{id}."""
    require(request, "viewer")
    case_id = int(request.match_info["id"])
    if case_id > MAX_ID:
        raise web.HTTPNotFound(text=f"no test case {case_id}")
    async with request.app[UI_ENGINE].connect() as conn:
        detail = await test_case_detail(conn, case_id)
    if detail is None:
        raise web.HTTPNotFound(text=f"no test case {case_id}")
    received = detail.observation.text if detail.observation else None
    sent_markup, received_markup = text_diff(detail.text, received) if received is not None else (None, None)
    receipt_words, verdict = receipt_verdict(detail.result) if detail.result else ("no result yet", "none")
    return page(
        request,
        "test_case.html",
        case=detail,
        result=detail.result,
        observation=detail.observation,
        receipts=detail.receipts,
        sent_markup=sent_markup,
        received_markup=received_markup,
        verdict=verdict,
        receipt_words=receipt_words,
    )


ROUTES = [web.get(r"/tests/{id:\d{1,19}}", test_case_page)]
