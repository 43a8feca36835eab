"""Changing a route from the web UI: whether it is enabled, and its price per network.

For operators and admins. The values are checked by the REST API's own model
(:class:`controller.api.routes.RouteUpdate`) and written by its own function, so the page and
``PATCH /api/v1/routes/{name}`` accept exactly the same. Connector settings (hosts, accounts,
secrets) stay with the API: the page shows them masked, as the API answers them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import select

from controller.api.routes import RouteUpdate, change_route, masked
from controller.storage import schema as s
from controller.web.guard import require
from controller.web.render import Form, page
from controller.web.state import UI_ENGINE

log = logging.getLogger(__name__)

#: One price per line: ``MCC-MNC price``, the two separated by spaces, a comma, ``=`` or ``:``.
PRICE_LINE = re.compile(r"^\s*(\S+?)\s*[\s,=:]\s*(\S+)\s*$")


def prices_text(prices: dict[str, float]) -> str:
    """A route's prices as the form shows them, one network per line, by MCC-MNC."""
    return "\n".join(f"{mcc_mnc} {price:g}" for mcc_mnc, price in sorted(prices.items()))


def parse_prices(text: str) -> dict[str, str]:
    """The lines of the prices field as {MCC-MNC: price text}; ValueError names a bad line."""
    prices: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PRICE_LINE.match(line)
        if match is None:
            raise ValueError(f"line {number}: write the MCC-MNC, a space and the price, e.g. 23410 0.012")
        mcc_mnc, price = match.groups()
        if mcc_mnc in prices:
            raise ValueError(f"line {number}: {mcc_mnc} is given twice")
        prices[mcc_mnc] = price
    return prices


def check(enabled: bool, prices_field: str) -> tuple[dict[str, Any] | None, Form]:
    """The changes the form asks for, checked by the API's model, or None and the form with the
    problem beside the prices field."""
    form = Form(values={"prices": prices_field, "enabled": "1" if enabled else ""})
    try:
        update = RouteUpdate.model_validate({"enabled": enabled, "prices": parse_prices(prices_field)})
    except ValueError as exc:  # a pydantic ValidationError is a ValueError too
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = " ".join(str(part) for part in first["loc"][1:])
            form.errors["prices"] = f"{where}: {first['msg']}" if where else first["msg"]
        else:
            form.errors["prices"] = str(exc)
        return None, form
    return update.model_dump(exclude_none=True), form


async def _route(request: web.Request) -> Any:
    name = request.match_info["name"]
    async with request.app[UI_ENGINE].connect() as conn:
        row = (await conn.execute(select(s.routes).where(s.routes.c.name == name))).first()
    if row is None:
        raise web.HTTPNotFound(text=f"no route {name!r} is configured")
    return row


def _form_page(request: web.Request, row: Any, form: Form, status: int = 200) -> web.Response:
    connector = masked(row.connector or {})
    return page(request, "route_edit.html", status=status, route=row, form=form, connector=connector)


async def edit_form(request: web.Request) -> web.Response:
    """GET /routes/{name}/edit."""
    require(request, "operator")
    row = await _route(request)
    form = Form(values={"prices": prices_text(row.prices or {}), "enabled": "1" if row.enabled else ""})
    return _form_page(request, row, form)


async def edit(request: web.Request) -> web.Response:
    """POST /routes/{name}/edit: save, or show the form again with the problem at its field."""
    session = require(request, "operator")
    row = await _route(request)
    posted = await request.post()
    changes, form = check(posted.get("enabled") == "1", str(posted.get("prices", "")))
    if changes is None:
        return _form_page(request, row, form, status=400)
    if await change_route(request.app[UI_ENGINE], row.name, changes) is None:
        raise web.HTTPNotFound(text=f"route {row.name!r} was removed meanwhile")
    log.info(
        "user %s changed route %s: enabled=%s, %d prices",
        session.user.name,
        row.name,
        changes["enabled"],
        len(changes["prices"]),
    )
    raise web.HTTPSeeOther(f"/routes/{row.name}?saved=1")


ROUTES = [web.get("/routes/{name}/edit", edit_form), web.post("/routes/{name}/edit", edit)]
