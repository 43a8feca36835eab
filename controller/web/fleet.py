"""The fleet page: every agent with its modems, grouped by country and operator, the ones with
problems first (offline or lost, modems not registered, clock not synced, spool backlog).

Two queries whatever the fleet's size: every agent with its probes' light columns (to rank and
group them), then the full modem state of the page's agents only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import select

from controller.storage import schema as s
from controller.web.guard import require
from controller.web.render import page, page_of
from controller.web.state import UI_CONFIG, UI_ENGINE

#: Registrations that mean the modem can receive SMS.
REGISTERED = ("registered_home", "registered_roaming")
#: An agent not heard from for this long is "silent" even when its status says online.
SILENT_AFTER = timedelta(minutes=10)
#: Clock estimates older than this, or with an error bound above CLOCK_ERROR_MS, are unsynced.
CLOCK_STALE = timedelta(hours=1)
CLOCK_ERROR_MS = 500.0
#: Observations waiting in an agent's spool above which it is shown as a backlog.
SPOOL_BACKLOG = 100


@dataclass
class AgentView:
    """One agent as the page shows it."""

    id: str
    state: str
    version: str | None
    last_seen_at: datetime
    clock: str
    clock_ok: bool
    spool_depth: int | None
    country: str
    operator: str
    problems: list[str] = field(default_factory=list)
    severity: int = 0
    group: str = ""
    modems: list[dict[str, Any]] = field(default_factory=list)


def _clock(row: Any, now: datetime) -> tuple[str, bool]:
    """The agent's clock state in words, and whether it is good enough for latency."""
    health = row.health or {}
    agent_clock = health.get("clock") or {}
    if row.clock_measured_at is not None and row.clock_offset_ms is not None:
        error = row.clock_error_ms or 0.0
        stale = now - row.clock_measured_at > CLOCK_STALE
        words = f"offset {row.clock_offset_ms:+.0f} ms ± {error:.0f} ms"
        if stale:
            return (
                f"{words}, measured {int((now - row.clock_measured_at).total_seconds() // 60)} min ago",
                False,
            )
        return words, error <= CLOCK_ERROR_MS
    if agent_clock.get("source") and agent_clock.get("source") != "none":
        return f"synced by {agent_clock['source']}", True
    return "not measured", False


def _problems(view: AgentView, row: Any, probes: list[Any], now: datetime) -> None:
    if row.state != "online":
        view.problems.append(row.state)
        view.severity = 3
    elif now - row.last_seen_at > SILENT_AFTER:
        view.problems.append("silent")
        view.severity = 3
    unregistered = sum(1 for p in probes if not p.connected or p.registration not in REGISTERED)
    if unregistered:
        view.problems.append(f"{unregistered} modem{'s' if unregistered > 1 else ''} not registered")
        view.severity = max(view.severity, 2)
    if not view.clock_ok:
        view.problems.append("clock not synced")
        view.severity = max(view.severity, 1)
    if view.spool_depth is not None and view.spool_depth > SPOOL_BACKLOG:
        view.problems.append(f"spool backlog {view.spool_depth}")
        view.severity = max(view.severity, 1)


async def fleet(request: web.Request) -> web.Response:
    """GET /: the fleet, problems first. ``?problems=1`` shows only agents with problems,
    ``?country=GB`` one country, ``?page=N`` the page."""
    require(request, "viewer")
    engine = request.app[UI_ENGINE]
    size = request.app[UI_CONFIG].page_size
    now = datetime.now(UTC)
    a, p, n = s.agents.c, s.probes.c, s.networks.c
    async with engine.connect() as conn:
        agents = (await conn.execute(select(s.agents).order_by(a.id))).all()
        probes = (
            await conn.execute(select(p.imsi, p.agent_id, p.mcc_mnc, p.connected, p.registration))
        ).all()
        networks = {row.mcc_mnc: row for row in await conn.execute(select(n.mcc_mnc, n.country, n.operator))}
    by_agent: dict[str, list[Any]] = {}
    for probe in probes:
        by_agent.setdefault(probe.agent_id, []).append(probe)
    views: list[AgentView] = []
    for row in agents:
        mine = by_agent.get(row.id, [])
        common = Counter(pr.mcc_mnc for pr in mine if pr.mcc_mnc).most_common(1)
        network = networks.get(common[0][0]) if common else None
        clock, clock_ok = _clock(row, now)
        health = row.health or {}
        view = AgentView(
            id=row.id,
            state=row.state,
            version=row.version,
            last_seen_at=row.last_seen_at,
            clock=clock,
            clock_ok=clock_ok,
            spool_depth=health.get("spool_depth"),
            country=(network.country if network is not None and network.country else "??"),
            operator=(
                network.operator
                if network is not None and network.operator
                else (common[0][0] if common else "no SIM")
            ),
        )
        _problems(view, row, mine, now)
        views.append(view)
    countries = sorted({v.country for v in views})
    country = request.query.get("country", "")
    only_problems = request.query.get("problems") == "1"
    shown = [v for v in views if (not country or v.country == country) and (not only_problems or v.problems)]
    shown.sort(key=lambda v: (-v.severity, v.country, v.operator, v.id))
    number, pages = page_of(request, len(shown), size)
    shown = shown[(number - 1) * size : number * size]
    for view in shown:
        view.group = "Needs attention" if view.problems else f"{view.country} · {view.operator}"
    if shown:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(s.probes).where(p.agent_id.in_([v.id for v in shown])).order_by(p.agent_id, p.modem_id)
            )
            modems: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                modems.setdefault(row.agent_id, []).append({**row._mapping, "state": row.state or {}})
        for view in shown:
            view.modems = modems.get(view.id, [])
    return page(
        request,
        "fleet.html",
        agents=shown,
        total=len(views),
        problem_count=sum(1 for v in views if v.problems),
        online=sum(1 for v in views if v.state == "online"),
        countries=countries,
        country=country,
        only_problems=only_problems,
        page_number=number,
        pages=pages,
        registered=REGISTERED,
    )


ROUTES = [web.get("/", fleet)]
