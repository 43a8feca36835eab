"""The route scoreboard (``GET /routes``): every destination network against every route, each
cell coloured by the pair's score and showing its delivery rate, latency p50 / p95, how many
results it rests on and what went wrong (sender replaced, content altered, fake receipts,
grey-route signs). A pair without a score (too few results, or never measured) is *unknown*:
hatched grey and saying so, never coloured as bad.

Networks are the rows, routes the columns: a fleet has a handful to a hundred routes and hundreds
of networks, so the page pages over networks (by country then MCC-MNC), as many per page as
keep it near ``CELLS_PER_PAGE`` cells (25 networks with 100 routes, 100 with 25 or fewer), with
a country filter. Four queries whatever the size: the networks, the routes, the page's cells
from ``scores`` (one query, reading only the stats it shows out of the JSON), and the latest
results for the live table.

A page holds some 2,500 cells, so each row's cells are built here as one piece of markup
(:func:`cells_html`, every text escaped) rather than by the template cell by cell, which cost
over 50 µs a cell (``bench/ui.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web
from markupsafe import Markup, escape
from sqlalchemy import select, union
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.storage import schema as s
from controller.web.guard import require
from controller.web.render import ms, page, page_of, pct
from controller.web.state import UI_ENGINE

#: Cells per page the network paging aims at (some 700 KB of HTML), and the bounds on the
#: networks (rows) per page it gives.
CELLS_PER_PAGE: Final = 2500
MIN_NETWORKS_PER_PAGE: Final = 10
MAX_NETWORKS_PER_PAGE: Final = 100
#: Results in the "latest results" table (new ones are added live on top).
LATEST_RESULTS: Final = 20
#: A problem share at or above this gets a badge on the cell (1 %: shown as at least "1 %").
BADGE_MIN_SHARE: Final = 0.01
#: Score buckets: s0 (0 to 0.1) .. s9 (0.9 to 1), one colour each.
BUCKETS: Final = 10
COUNTRY_PATTERN: Final = re.compile(r"^[A-Z]{2}$")
#: The stats a cell shows (see ``controller.scoring``), read out of the JSON by the database.
CELL_STATS: Final = (
    "delivered",
    "latency_p50_ms",
    "latency_p95_ms",
    "sender_kept",
    "content_intact",
    "receipts_fake",
    "grey",
)


@dataclass(frozen=True)
class Network:
    """A destination network as the scoreboard's rows show it."""

    mcc_mnc: str
    country: str | None
    operator: str | None


@dataclass
class CellView:
    """One (route, network) pair: its score and what its stats say."""

    route: str
    mcc_mnc: str
    score: float | None
    results: int
    delivered: float | None
    p50_ms: float | None
    p95_ms: float | None
    badges: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.score is not None

    @property
    def bucket(self) -> str:
        """The CSS class of the cell's colour: s0..s9 by score, ``unknown`` without one."""
        if self.score is None:
            return "unknown"
        return f"s{min(BUCKETS - 1, max(0, int(self.score * BUCKETS)))}"


def _share(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def badges(stats: Mapping[Any, Any]) -> list[str]:
    """What went wrong on a pair, in words with its share, from a score's stats (see
    ``controller.scoring``): sender replaced, content altered, fake receipts, grey-route signs."""
    out = []
    for label, key, inverted in (
        ("sender replaced", "sender_kept", True),
        ("content altered", "content_intact", True),
        ("fake receipts", "receipts_fake", False),
        ("grey signs", "grey", False),
    ):
        value = _share(stats.get(key))
        if value is None:
            continue
        share = 1.0 - value if inverted else value
        if share >= BADGE_MIN_SHARE:
            out.append(f"{label} {share * 100:.0f} %")
    return out


def cell_view(
    route: str, mcc_mnc: str, score: float | None, results: int, stats: Mapping[Any, Any]
) -> CellView:
    """A pair's view from its ``scores`` row."""
    return CellView(
        route=route,
        mcc_mnc=mcc_mnc,
        score=score,
        results=results,
        delivered=_share(stats.get("delivered")),
        p50_ms=_share(stats.get("latency_p50_ms")),
        p95_ms=_share(stats.get("latency_p95_ms")),
        badges=badges(stats),
    )


def route_columns(routes: Sequence[str]) -> list[tuple[str, str]]:
    """Each route's name as an HTML attribute and as a path part, escaped: once per page."""
    return [(str(escape(route)), str(escape(quote(route, safe="")))) for route in routes]


def cells_html(network: str, columns: Sequence[tuple[str, str]], cells: Sequence[CellView | None]) -> Markup:
    """One row's cells (one per :func:`route_columns` entry, None for a pair without a score row)
    as ``<td>`` markup: the score or "unknown", delivered share, latency p50 / p95, results and
    badges, linking to the route's page for the network. Every name is escaped."""
    net = escape(network)
    out = []
    for (name, path), cell in zip(columns, cells, strict=True):
        head = f'data-route="{name}" data-network="{net}"><a href="/routes/{path}?network={net}">'
        if cell is None:
            out.append(
                f'<td class="cell unknown" {head}<span class="score">unknown</span>'
                '<span class="line">not measured</span></a></td>'
            )
            continue
        score = f"score {cell.score:.2f}" if cell.score is not None else "unknown"
        flags = "".join(f'<span class="badge flag">{escape(badge)}</span>' for badge in cell.badges)
        out.append(
            f'<td class="cell {cell.bucket}" {head}<span class="score">{score}</span>'
            f'<span class="line">{pct(cell.delivered)} delivered</span>'
            f'<span class="line">{ms(cell.p50_ms)} / {ms(cell.p95_ms)}</span>'
            f'<span class="line">{cell.results} results</span></a>{flags}</td>'
        )
    return Markup("\n".join(out))


async def _networks(conn: AsyncConnection) -> list[Network]:
    """Every network that has a score or is known to the networks table, by country then MCC-MNC
    (networks of no known country last)."""
    n = s.networks.c
    known = union(select(n.mcc_mnc), select(s.scores.c.mcc_mnc)).subquery()
    rows = await conn.execute(
        select(known.c.mcc_mnc, n.country, n.operator).outerjoin(s.networks, n.mcc_mnc == known.c.mcc_mnc)
    )
    networks = [Network(row.mcc_mnc, row.country, row.operator) for row in rows]
    networks.sort(key=lambda net: (net.country is None, net.country or "", net.mcc_mnc))
    return networks


async def _routes(conn: AsyncConnection) -> list[tuple[str, bool]]:
    """Every route (configured or scored), by name, with whether it is enabled."""
    r = s.routes.c
    names = union(select(r.name), select(s.scores.c.route.label("name"))).subquery()
    rows = await conn.execute(
        select(names.c.name, r.enabled).outerjoin(s.routes, r.name == names.c.name).order_by(names.c.name)
    )
    return [(row.name, row.enabled is not False) for row in rows]


def networks_per_page(routes: int) -> int:
    """Networks per page with this many routes: about ``CELLS_PER_PAGE`` cells."""
    return min(MAX_NETWORKS_PER_PAGE, max(MIN_NETWORKS_PER_PAGE, CELLS_PER_PAGE // max(routes, 1)))


async def scoreboard(request: web.Request) -> web.Response:
    """GET /routes: the scoreboard. ``?country=GB`` one country's networks, ``?page=N`` the page."""
    require(request, "viewer")
    country = request.query.get("country", "")
    if country and not COUNTRY_PATTERN.match(country):
        raise web.HTTPBadRequest(text="country: two capital letters (ISO 3166), e.g. GB")
    engine = request.app[UI_ENGINE]
    c, r = s.scores.c, s.results.c
    async with engine.connect() as conn:
        networks = await _networks(conn)
        routes = await _routes(conn)
        countries = sorted({net.country for net in networks if net.country})
        shown = [net for net in networks if not country or net.country == country]
        size = networks_per_page(len(routes))
        number, pages = page_of(request, len(shown), size)
        shown = shown[(number - 1) * size : number * size]
        cells: dict[tuple[str, str], CellView] = {}
        computed_at = None
        if shown:
            stats = [c.stats[key].as_float().label(key) for key in CELL_STATS]
            rows = await conn.execute(
                select(c.route, c.mcc_mnc, c.score, c.results, c.computed_at, *stats).where(
                    c.mcc_mnc.in_([net.mcc_mnc for net in shown])
                )
            )
            for row in rows:
                computed_at = max(computed_at or row.computed_at, row.computed_at)
                cells[row.route, row.mcc_mnc] = cell_view(
                    row.route, row.mcc_mnc, row.score, row.results, row._mapping
                )
        latest = (
            await conn.execute(
                select(
                    r.test_case_id,
                    r.route,
                    r.mcc_mnc,
                    r.delivered,
                    r.late,
                    r.latency_ms,
                    r.sender_received,
                    r.flags,
                    r.decided_at,
                )
                .order_by(r.decided_at.desc(), r.test_case_id.desc())
                .limit(LATEST_RESULTS)
            )
        ).all()
    columns = route_columns([name for name, _ in routes])
    rows_view = [
        (net, cells_html(net.mcc_mnc, columns, [cells.get((name, net.mcc_mnc)) for name, _ in routes]))
        for net in shown
    ]
    return page(
        request,
        "scoreboard.html",
        routes=routes,
        rows=rows_view,
        networks_total=len(networks),
        computed_at=computed_at,
        countries=countries,
        country=country,
        latest=latest,
        buckets=BUCKETS,
        page_number=number,
        pages=pages,
    )


ROUTES = [web.get("/routes", scoreboard)]
