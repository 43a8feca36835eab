"""The routing table pages: the current table (or any version) per network with weights and
reasons, the version history, what changed between two versions, and downloads.

The downloads are the REST API's own rendering (``controller.routing.table_csv`` and
``table_json``, as ``GET /api/v1/routing-table`` answers), as attachments. A table is one row
(its JSON), so every page costs a constant number of queries whatever its size: the table page
reads the version, the newest version number and the networks' names (three queries), the
history a count and a page of versions without their tables (two), the diff the two versions
compared (one). Large tables (300 networks) are paged by network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controller import routing
from controller.storage import schema as s
from controller.web.guard import require
from controller.web.render import page, page_of
from controller.web.state import UI_CONFIG, UI_ENGINE
from probe_agent.protocol import RouteChoice, RoutingTable

#: Weights that differ by less than this are the same (the table's content is rounded to 0.001).
WEIGHT_EPSILON = 0.0005
#: Rows of the page size each network is counted as on the table and diff pages (a network is
#: several routes): 100 rows a page shows 25 networks.
ROWS_PER_NETWORK = 4

DOWNLOADS = {
    "csv": ("text/csv", routing.table_csv),
    "json": ("application/json", routing.table_json),
}


def _version_param(request: web.Request, name: str) -> int | None:
    value = request.query.get(name, "")
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 2**31 - 1:
        raise web.HTTPBadRequest(text=f"{name}: a table version, a whole number from 1")
    return int(value)


async def _table(conn: AsyncConnection, number: int | None) -> RoutingTable | None:
    """Version ``number`` (404 when missing), or the newest (None before the first)."""
    if number is None:
        return await routing.latest(conn)
    table = await routing.version(conn, number)
    if table is None:
        raise web.HTTPNotFound(text=f"there is no routing table version {number}")
    return table


async def _names(conn: AsyncConnection) -> dict[str, Any]:
    n = s.networks.c
    return {row.mcc_mnc: row for row in await conn.execute(select(n.mcc_mnc, n.country, n.operator))}


def _network_name(mcc_mnc: str, names: dict[str, Any]) -> str:
    row = names.get(mcc_mnc)
    if row is None or not (row.operator or row.country):
        return ""
    return " · ".join(part for part in (row.operator, row.country) if part)


async def table_page(request: web.Request) -> web.Response:
    """GET /routing-table: ``?version=N`` (default the newest), ``?country=GB``, ``?page=N``."""
    require(request, "viewer")
    number = _version_param(request, "version")
    async with request.app[UI_ENGINE].connect() as conn:
        table = await _table(conn, number)
        newest = await conn.scalar(select(func.max(s.routing_tables.c.version)))
        names = await _names(conn)
    country = request.query.get("country", "")
    networks = sorted(table.networks.items()) if table else []
    countries = sorted({c for m, _ in networks if (c := getattr(names.get(m), "country", None))})
    if country:
        networks = [
            (m, choices) for m, choices in networks if getattr(names.get(m), "country", None) == country
        ]
    size = max(1, request.app[UI_CONFIG].page_size // ROWS_PER_NETWORK)
    page_number, pages = page_of(request, len(networks), size)
    shown = networks[(page_number - 1) * size : page_number * size]
    return page(
        request,
        "routing_table.html",
        table=table,
        newest=newest,
        networks=[
            {
                "mcc_mnc": m,
                "name": _network_name(m, names),
                "choices": choices,
                "total": sum(c.weight for c in choices),
            }
            for m, choices in shown
        ],
        network_count=len(networks),
        countries=countries,
        country=country,
        version_query=f"?version={table.version}" if table else "",
        page_number=page_number,
        pages=pages,
    )


async def versions_page(request: web.Request) -> web.Response:
    """GET /routing-table/versions: every version, newest first, paged."""
    require(request, "viewer")
    size = request.app[UI_CONFIG].page_size
    t = s.routing_tables.c
    async with request.app[UI_ENGINE].connect() as conn:
        total = int(await conn.scalar(select(func.count()).select_from(s.routing_tables)) or 0)
        page_number, pages = page_of(request, total, size)
        versions = (
            await conn.execute(
                select(t.version, t.created_at)
                .order_by(t.version.desc())
                .limit(size)
                .offset((page_number - 1) * size)
            )
        ).all()
    return page(
        request,
        "routing_versions.html",
        versions=versions,
        total=total,
        newest=versions[0].version if versions and page_number == 1 else None,
        page_number=page_number,
        pages=pages,
    )


@dataclass
class RouteChange:
    """One route of a network in both versions (or one of them), and what changed."""

    route: str
    old: RouteChoice | None
    new: RouteChoice | None
    old_rank: int | None
    new_rank: int | None

    @property
    def kind(self) -> str:
        """added, removed, changed (role or weight) or same."""
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        if self.old.role != self.new.role or abs(self.old.weight - self.new.weight) >= WEIGHT_EPSILON:
            return "changed"
        return "same"

    @property
    def moved(self) -> bool:
        return self.old_rank is not None and self.new_rank is not None and self.old_rank != self.new_rank


@dataclass
class NetworkDiff:
    """What changed in one network's routing between two versions."""

    mcc_mnc: str
    status: str  # added, removed or changed
    routes: list[RouteChange] = field(default_factory=list)
    old_order: list[str] = field(default_factory=list)
    new_order: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def reordered(self) -> bool:
        """Whether the routes both versions have are in another order."""
        both = set(self.old_order) & set(self.new_order)
        return [r for r in self.old_order if r in both] != [r for r in self.new_order if r in both]

    def count(self, kind: str) -> int:
        return sum(1 for r in self.routes if r.kind == kind)


def _network_diff(mcc_mnc: str, old: Sequence[RouteChoice], new: Sequence[RouteChoice]) -> NetworkDiff | None:
    old_by = {c.route: (rank, c) for rank, c in enumerate(old, start=1)}
    new_by = {c.route: (rank, c) for rank, c in enumerate(new, start=1)}
    names = [c.route for c in new] + [c.route for c in old if c.route not in new_by]
    routes = [
        RouteChange(
            route=name,
            old=old_by[name][1] if name in old_by else None,
            new=new_by[name][1] if name in new_by else None,
            old_rank=old_by[name][0] if name in old_by else None,
            new_rank=new_by[name][0] if name in new_by else None,
        )
        for name in names
    ]
    status = "added" if not old else "removed" if not new else "changed"
    diff = NetworkDiff(mcc_mnc, status, routes, [c.route for c in old], [c.route for c in new])
    if status == "changed" and not diff.reordered and all(r.kind == "same" for r in routes):
        return None
    return diff


def _parsed(value: Any) -> RoutingTable:
    if isinstance(value, str):
        return RoutingTable.model_validate_json(value)
    return RoutingTable.model_validate(value)


def diff_tables(old: RoutingTable, new: RoutingTable) -> list[NetworkDiff]:
    """Per network whose routing changed from ``old`` to ``new`` (by MCC-MNC): routes added,
    removed, moved in the order, or with another role or weight. Scores and reasons alone are
    not a change (they do not make a version either)."""
    diffs = []
    for mcc_mnc in sorted(set(old.networks) | set(new.networks)):
        diff = _network_diff(mcc_mnc, old.networks.get(mcc_mnc, []), new.networks.get(mcc_mnc, []))
        if diff is not None:
            diffs.append(diff)
    return diffs


async def diff_page(request: web.Request) -> web.Response:
    """GET /routing-table/diff?from=A&to=B: what changed from version A to B; by default from
    the version before the newest to the newest."""
    require(request, "viewer")
    first, second = _version_param(request, "from"), _version_param(request, "to")
    t = s.routing_tables.c
    async with request.app[UI_ENGINE].connect() as conn:
        if first is None and second is None:
            rows = list(await conn.execute(select(t.version, t.table).order_by(t.version.desc()).limit(2)))
            rows.reverse()
        else:
            if first is None or second is None:
                raise web.HTTPBadRequest(text="give both from and to (table versions), or neither")
            found = {
                row.version: row
                for row in await conn.execute(
                    select(t.version, t.table).where(t.version.in_((first, second)))
                )
            }
            missing = sorted({first, second} - set(found))
            if missing:
                raise web.HTTPNotFound(text=f"there is no routing table version {missing[0]}")
            rows = [found[first], found[second]]
        names = await _names(conn)
        newest = await conn.scalar(select(func.max(t.version)))
    tables = [_parsed(row.table) for row in rows]
    old, new = (tables[0], tables[1]) if len(tables) == 2 else (None, None)
    diffs = diff_tables(old, new) if old and new else []
    for diff in diffs:
        diff.name = _network_name(diff.mcc_mnc, names)
    size = max(1, request.app[UI_CONFIG].page_size // ROWS_PER_NETWORK)
    page_number, pages = page_of(request, len(diffs), size)
    return page(
        request,
        "routing_diff.html",
        old=old,
        new=new,
        only=tables[0] if len(tables) == 1 else None,
        newest=newest,
        diffs=diffs[(page_number - 1) * size : page_number * size],
        changed=len(diffs),
        unchanged=(len(set(old.networks) | set(new.networks)) - len(diffs)) if old and new else 0,
        page_number=page_number,
        pages=pages,
    )


async def download(request: web.Request) -> web.Response:
    """GET /routing-table.csv and /routing-table.json (``?version=N``, default the newest): the
    table as the REST API renders it, as an attachment."""
    require(request, "viewer")
    kind = request.match_info["kind"]
    number = _version_param(request, "version")
    async with request.app[UI_ENGINE].connect() as conn:
        table = await _table(conn, number)
    if table is None:
        raise web.HTTPNotFound(text="there is no routing table yet: it is built once routes have scores")
    content_type, render = DOWNLOADS[kind]
    return web.Response(
        text=render(table),
        content_type=content_type,
        charset="utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="routing-table-v{table.version}.{kind}"',
            "Cache-Control": "no-cache",
        },
    )


ROUTES = [
    web.get("/routing-table", table_page),
    web.get("/routing-table/versions", versions_page),
    web.get("/routing-table/diff", diff_page),
    web.get(r"/routing-table.{kind:csv|json}", download),
]
