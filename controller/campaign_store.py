"""Campaigns in the database: create, change, pause, resume and delete them, with the checks a
definition cannot make on its own (the name is free, the routes exist, a deleted campaign has no
test cases), and what each campaign spent today against its budgets.

The REST API (``controller.api.campaigns``) and the web UI (``controller.web.campaigns``) both
call these, so a campaign is stored one way and refused in the same words. A refusal is a
:class:`CampaignRefused` with the HTTP status it means and the field at fault, named by its path
in a campaign body (``name``, ``definition.routes``, ``id``).

Nothing here tells the scheduler: it reconciles its jobs with the campaigns table every
``[schedule] sync_interval_s`` on its own (``controller.schedule.Scheduler.sync_campaigns``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import Row, delete, func, insert, literal, select, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.campaigns import CampaignDefinition
from controller.schedule import BUDGETED
from controller.storage import schema as s

c = s.campaigns.c


class CampaignRefused(Exception):
    """A campaign change that cannot be made: ``status`` is the HTTP status it means (400 invalid,
    404 no such campaign, 409 a conflict with what is stored), ``field`` the body path at fault,
    ``problem`` what is wrong, in words."""

    def __init__(self, status: int, field: str, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.field = field
        self.problem = problem


def _taken(name: str) -> CampaignRefused:
    return CampaignRefused(409, "name", f"a campaign named {name!r} exists")


def _in_use(campaign_id: int) -> CampaignRefused:
    return CampaignRefused(409, "id", f"campaign {campaign_id} has test cases: pause it instead")


async def get_campaign(conn: AsyncConnection, campaign_id: int) -> Row[Any]:
    """The campaign's row; 404 when there is none."""
    row = (await conn.execute(select(s.campaigns).where(c.id == campaign_id))).first()
    if row is None:
        raise CampaignRefused(404, "id", f"no campaign {campaign_id}")
    return row


async def check_routes(conn: AsyncConnection, definition: CampaignDefinition) -> None:
    """Every route the definition names exists."""
    known = set(await conn.scalars(select(s.routes.c.name).where(s.routes.c.name.in_(definition.routes))))
    unknown = [name for name in definition.routes if name not in known]
    if unknown:
        raise CampaignRefused(400, "definition.routes", f"no route {', '.join(map(repr, unknown))}")


async def check_name_free(conn: AsyncConnection, name: str, campaign_id: int | None = None) -> None:
    """No other campaign (than ``campaign_id``) has this name."""
    statement = select(c.id).where(c.name == name)
    if campaign_id is not None:
        statement = statement.where(c.id != campaign_id)
    if await conn.scalar(statement) is not None:
        raise _taken(name)


async def create_campaign(
    engine: AsyncEngine, name: str, definition: CampaignDefinition, *, paused: bool = False
) -> Row[Any]:
    """Add a campaign; its routes must exist and its name must be new. Returns its row."""
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            await check_routes(conn, definition)
            await check_name_free(conn, name)
            new_id = (
                await conn.execute(
                    insert(s.campaigns)
                    .values(
                        name=name,
                        definition=definition.model_dump(mode="json"),
                        paused=paused,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(c.id)
                )
            ).scalar_one()
            return await get_campaign(conn, new_id)
    except IntegrityError:  # the same name, created by another request meanwhile
        raise _taken(name) from None


async def update_campaign(
    engine: AsyncEngine,
    campaign_id: int,
    *,
    name: str | None = None,
    definition: CampaignDefinition | None = None,
) -> Row[Any]:
    """Change a campaign's name or replace its definition (what is None stays). Returns its row."""
    changes: dict[str, Any] = {}
    try:
        async with engine.begin() as conn:
            await get_campaign(conn, campaign_id)
            if definition is not None:
                await check_routes(conn, definition)
                changes["definition"] = definition.model_dump(mode="json")
            if name is not None:
                await check_name_free(conn, name, campaign_id)
                changes["name"] = name
            if changes:
                changes["updated_at"] = datetime.now(UTC)
                await conn.execute(update(s.campaigns).where(c.id == campaign_id).values(changes))
            return await get_campaign(conn, campaign_id)
    except IntegrityError:
        raise _taken(str(name)) from None


async def set_paused(engine: AsyncEngine, campaign_id: int, paused: bool) -> Row[Any]:
    """Pause or resume a campaign; doing it twice is a no-op. Returns its row."""
    async with engine.begin() as conn:
        await conn.execute(
            update(s.campaigns)
            .where(c.id == campaign_id, c.paused != paused)
            .values(paused=paused, updated_at=datetime.now(UTC))
        )
        return await get_campaign(conn, campaign_id)


async def count_test_cases(conn: AsyncConnection, campaign_id: int) -> int:
    """How many test cases the campaign made (any state)."""
    count = await conn.scalar(select(func.count()).where(s.test_cases.c.campaign_id == campaign_id))
    return int(count or 0)


async def delete_campaign(engine: AsyncEngine, campaign_id: int) -> None:
    """Remove a campaign without test cases; one with test cases is a 409 (its results would lose
    their campaign: pause it instead)."""
    try:
        async with engine.begin() as conn:
            await get_campaign(conn, campaign_id)
            if await count_test_cases(conn, campaign_id):
                raise _in_use(campaign_id)
            await conn.execute(delete(s.campaigns).where(c.id == campaign_id))
    except IntegrityError:  # a test case was written meanwhile
        raise _in_use(campaign_id) from None


# --- today's spend -------------------------------------------------------------------------------


@dataclass
class Spend:
    """What a campaign's tests cost on one UTC day, as the scheduler's budget rule counts it (the
    prices of its tests in every state but skipped), per route and per network (MCC-MNC)."""

    by_route: dict[str, float] = field(default_factory=dict)
    by_network: dict[str, float] = field(default_factory=dict)
    tests: int = 0

    @property
    def total(self) -> float:
        """All of it."""
        return sum(self.by_route.values())


def utc_day(at: datetime) -> tuple[datetime, datetime]:
    """The UTC day ``at`` falls in: [start, end)."""
    begin = datetime.combine(at.astimezone(UTC).date(), time(0), UTC)
    return begin, begin + timedelta(days=1)


async def spend_on_day(
    conn: AsyncConnection, campaign_ids: Sequence[int], at: datetime | None = None
) -> dict[int, Spend]:
    """The spend of each campaign on the UTC day of ``at`` (today by default), in one query
    whatever the number of campaigns, routes and networks: sums grouped by (campaign, route)
    and by (campaign, network), so the rows are at most campaigns x (routes + networks)."""
    spends = {campaign_id: Spend() for campaign_id in campaign_ids}
    if not spends:
        return spends
    begin, end = utc_day(at or datetime.now(UTC))
    tc = s.test_cases.c
    today = (
        tc.campaign_id.in_(list(spends)),
        tc.status.in_(BUDGETED),
        tc.scheduled_at >= begin,
        tc.scheduled_at < end,
    )
    by_route = (
        select(
            literal("route").label("kind"),
            tc.campaign_id,
            tc.route.label("key"),
            func.coalesce(func.sum(tc.price), 0.0).label("spent"),
            func.count().label("tests"),
        )
        .where(*today)
        .group_by(tc.campaign_id, tc.route)
    )
    by_network = (
        select(
            literal("network").label("kind"),
            tc.campaign_id,
            tc.mcc_mnc.label("key"),
            func.coalesce(func.sum(tc.price), 0.0).label("spent"),
            func.count().label("tests"),
        )
        .where(*today)
        .group_by(tc.campaign_id, tc.mcc_mnc)
    )
    for row in await conn.execute(union_all(by_route, by_network)):
        spend = spends[row.campaign_id]
        if row.kind == "route":
            spend.by_route[row.key] = float(row.spent)
            spend.tests += int(row.tests)
        else:
            spend.by_network[row.key] = float(row.spent)
    return spends


__all__ = [
    "CampaignRefused",
    "Spend",
    "check_name_free",
    "check_routes",
    "count_test_cases",
    "create_campaign",
    "delete_campaign",
    "get_campaign",
    "set_paused",
    "spend_on_day",
    "update_campaign",
    "utc_day",
]
