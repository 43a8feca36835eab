"""Routes: the upstream SMS routes under test, with their connector settings and prices.

A route that test cases or campaigns refer to cannot be deleted (its results would lose their
route); disable it instead. Connector secrets (passwords, tokens, keys) are write-only: the API
answers with ``***`` in their place.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, ValidationError
from sqlalchemy import Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.api.errors import bad_request, conflict, from_validation, not_found
from controller.api.inputs import ROUTE_NAME_PATTERN, RouteName, no_nulls, path_text
from controller.api.ops import Call, In, Operation, Out, string_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.sender.connectors import validate_connector
from controller.storage import schema as s
from probe_agent.protocol import MccMnc

#: Connector keys whose values are secrets, answered masked.
SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.IGNORECASE)
MASK = "***"

Price = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_CONNECTOR = (
    'Connector settings: {"kind": "smpp", ...} (controller/sender/smpp.py) or {"kind": "http", ...} '
    "(controller/sender/http.py), or {} for none; values of keys naming a password, secret, token or "
    f"key are answered as {MASK!r}."
)


class RouteOut(Out):
    """An upstream route."""

    name: str = Field(description="Route name.")
    connector: dict[str, Any] = Field(description=_CONNECTOR)
    prices: dict[str, float] = Field(description="Price per message, per MCC-MNC.")
    enabled: bool = Field(description="Whether the route is tested and may carry traffic.")


class RouteIn(In):
    """A new route."""

    name: RouteName = Field(description="Route name: letters, digits and _ . : - (up to 64).")
    connector: dict[str, Any] = Field(description=_CONNECTOR)
    prices: dict[MccMnc, Price] = Field(
        default_factory=dict, description="Price per message, per MCC-MNC (the route's currency)."
    )
    enabled: bool = Field(True, description="Whether the route is tested and may carry traffic.")


class RouteUpdate(In):
    """Changes to a route: only the fields given are changed; connector and prices are replaced whole."""

    connector: dict[str, Any] | None = Field(None, description=_CONNECTOR)
    prices: dict[MccMnc, Price] | None = Field(None, description="Price per message, per MCC-MNC.")
    enabled: bool | None = Field(None, description="Whether the route is tested and may carry traffic.")


class RoutesQuery(PageQuery):
    """Filters of the route list."""

    enabled: bool | None = Field(None, description="Only enabled (true) or disabled (false) routes.")


class RoutePage(Page[RouteOut]):
    """A page of routes."""


def masked(value: Any) -> Any:
    """A connector with its secrets replaced by ``***``, at any depth."""
    if isinstance(value, dict):
        return {
            k: MASK if SECRET_KEY.search(k) and isinstance(v, str | int) else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def _echoes_mask(value: Any) -> bool:
    """Whether a connector sends ``***`` back as a secret (a client saving what it read)."""
    if isinstance(value, dict):
        return any((SECRET_KEY.search(k) and v == MASK) or _echoes_mask(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_echoes_mask(v) for v in value)
    return False


def _check_connector(connector: dict[str, Any]) -> None:
    """A real secret, not the mask read back; settings the sender can use (``{}``: no connector,
    the route is not sent on by this controller)."""
    if _echoes_mask(connector):
        raise bad_request(
            f"connector: send the real secret, not {MASK!r} (or leave connector out)", "connector"
        )
    if connector:
        try:
            validate_connector(connector)
        except ValidationError as exc:
            raise from_validation(exc, prefix="connector") from None


def _out(row: Any) -> RouteOut:
    return RouteOut.from_row(row, connector=masked(row.connector))


def _name(call: Call) -> str:
    return path_text(call.request, "name", "route", ROUTE_NAME_PATTERN)


async def list_routes(call: Call) -> RoutePage:
    """Routes, by name."""
    query = call.query(RoutesQuery)
    statement = where_given(select(s.routes), (s.routes.c.enabled, query.enabled))
    return await call.list_page(RoutePage, statement, Order((s.routes.c.name,)), query, _out)


async def get_route(call: Call) -> RouteOut:
    """One route."""
    name = _name(call)
    async with call.engine.connect() as conn:
        row = (await conn.execute(select(s.routes).where(s.routes.c.name == name))).first()
    if row is None:
        raise not_found(f"no route {name!r}", "name")
    return _out(row)


async def create_route(call: Call) -> RouteOut:
    """Add a route; its name must be new."""
    body = call.body(RouteIn)
    _check_connector(body.connector)
    values = body.model_dump()
    taken = conflict(f"route {body.name!r} exists: change it with PATCH", "name")
    try:
        async with call.engine.begin() as conn:
            if await conn.scalar(select(s.routes.c.name).where(s.routes.c.name == body.name)):
                raise taken
            await conn.execute(insert(s.routes).values(values))
    except IntegrityError:  # created by another request meanwhile
        raise taken from None
    return RouteOut.model_validate({**values, "connector": masked(body.connector)})


async def update_route(call: Call) -> RouteOut:
    """Change the fields given of a route."""
    name = _name(call)
    changes = no_nulls(
        call.body(RouteUpdate).model_dump(exclude_unset=True), "connector", "prices", "enabled"
    )
    if "connector" in changes:
        _check_connector(changes["connector"])
    row = await change_route(call.engine, name, changes)
    if row is None:
        raise not_found(f"no route {name!r}", "name")
    return _out(row)


async def change_route(engine: AsyncEngine, name: str, changes: dict[str, Any]) -> Row[Any] | None:
    """Write checked changes (fields of :class:`RouteUpdate`) to a route; the row as it is now,
    or None when there is no such route. The API and the web UI both change routes here."""
    async with engine.begin() as conn:
        if changes:
            await conn.execute(update(s.routes).where(s.routes.c.name == name).values(changes))
        return (await conn.execute(select(s.routes).where(s.routes.c.name == name))).first()


async def _campaigns_using(conn: AsyncConnection, name: str) -> list[str]:
    rows = await conn.execute(select(s.campaigns.c.name, s.campaigns.c.definition).order_by(s.campaigns.c.id))
    return [row.name for row in rows if name in (row.definition or {}).get("routes", [])]


async def delete_route(call: Call) -> None:
    """Remove a route that nothing refers to; one with test cases or campaigns is a 409."""
    name = _name(call)
    in_use = "route {!r} is used by {}: disable it instead (PATCH enabled=false)"
    try:
        async with call.engine.begin() as conn:
            if await conn.scalar(select(s.routes.c.name).where(s.routes.c.name == name)) is None:
                raise not_found(f"no route {name!r}", "name")
            cases = await conn.scalar(select(func.count()).where(s.test_cases.c.route == name))
            if cases:
                raise conflict(in_use.format(name, f"{cases} test case{'s' if cases != 1 else ''}"), "name")
            campaigns = await _campaigns_using(conn, name)
            if campaigns:
                raise conflict(in_use.format(name, "campaign " + ", ".join(campaigns)), "name")
            await conn.execute(delete(s.routes).where(s.routes.c.name == name))
    except IntegrityError:  # a test case referring to it was written meanwhile
        raise conflict(in_use.format(name, "test cases"), "name") from None


_ROUTE = {"name": string_param("Route name.", ROUTE_NAME_PATTERN)}

OPERATIONS = (
    Operation("GET", "/routes", list_routes, "List routes", "routes", RoutePage, query=RoutesQuery),
    Operation(
        "POST",
        "/routes",
        create_route,
        "Add a route",
        "routes",
        RouteOut,
        status=201,
        body=RouteIn,
        role="operator",
        errors=(409,),
    ),
    Operation(
        "GET",
        "/routes/{name}",
        get_route,
        "Get a route",
        "routes",
        RouteOut,
        errors=(404,),
        path_params=_ROUTE,
    ),
    Operation(
        "PATCH",
        "/routes/{name}",
        update_route,
        "Change a route",
        "routes",
        RouteOut,
        body=RouteUpdate,
        role="operator",
        errors=(404,),
        path_params=_ROUTE,
    ),
    Operation(
        "DELETE",
        "/routes/{name}",
        delete_route,
        "Remove a route nothing refers to",
        "routes",
        status=204,
        role="operator",
        errors=(404, 409),
        path_params=_ROUTE,
    ),
)
