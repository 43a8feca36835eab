"""The campaign pages: the list with today's spend against the budgets, one campaign in full,
the form to create or change one, pause, resume, and delete (after a confirmation).

Viewers see; operators and admins change (every POST asks for the operator role, so a viewer's
forged form is a 403 whatever its CSRF token). Storing, and the checks beyond the model (the
name is free, the routes exist, no test cases before a delete), are ``controller.campaign_store``'s,
shared with the REST API; the form maps onto the API's own model (``controller.web.campaign_form``).
The scheduler picks changes up at its next sync of the campaigns table, as after an API change.

Queries per page, whatever the number of campaigns, routes and networks: the list 3 (the count,
the page, today's spend of the page's campaigns grouped by route and by network); a campaign 3
(the row, its spend, the names of its networks); the form 3 (the row when editing, routes,
networks).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import available_timezones

from aiohttp import web
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controller import campaign_store as store
from controller.api.inputs import MAX_ID
from controller.campaign_store import CampaignRefused, Spend
from controller.campaigns import CampaignDefinition
from controller.correlation import TEMPLATES
from controller.storage import schema as s
from controller.web import campaign_form
from controller.web.campaign_form import CampaignForm
from controller.web.guard import require
from controller.web.render import page, page_of
from controller.web.state import UI_CONFIG, UI_ENGINE

log = logging.getLogger(__name__)

#: A budget this used up is shown as nearly spent.
NEARLY_SPENT = 0.8
#: The time zones offered while typing one (the model accepts exactly these).
TIMEZONES = sorted(available_timezones() | {"UTC"})
#: Notices shown after a change, by the query flag the redirect sets.
NOTICES = {
    "created": "Campaign created; the scheduler picks it up at its next sync of the campaigns.",
    "saved": "Changes saved; the scheduler follows them at its next sync of the campaigns.",
    "deleted": "Campaign deleted.",
}


def amount(value: float | None) -> str:
    """Money in route price units: 2 decimals, up to 4 when the prices need them."""
    if value is None:
        return "-"
    if abs(value * 100 - round(value * 100)) < 1e-6:
        return f"{value:.2f}"
    return f"{value:.4f}".rstrip("0")


def seconds(value: float | None) -> str:
    """A duration in seconds, with a larger unit beside it when one reads better."""
    if value is None:
        return "-"
    text = f"{value:g} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{text} ({value / size:.3g} {unit})"
    return text


@dataclass(frozen=True)
class Budget:
    """What one route or network cost today in a campaign, against its daily budget."""

    key: str
    label: str
    spent: float
    budget: float | None

    @property
    def share(self) -> float | None:
        """Spent / budget (a budget of 0 is used up from the start); None without a budget."""
        if self.budget is None:
            return None
        return self.spent / self.budget if self.budget > 0 else 1.0

    @property
    def level(self) -> str:
        """``bad`` when the budget is used up, ``warn`` when nearly, else ``good``."""
        share = self.share
        if share is None:
            return ""
        return "bad" if share >= 1 - 1e-9 else "warn" if share >= NEARLY_SPENT else "good"

    @property
    def spent_text(self) -> str:
        return amount(self.spent)

    @property
    def budget_text(self) -> str:
        return amount(self.budget) if self.budget is not None else "no budget"

    @property
    def meter_max(self) -> float:
        """The meter's scale: the budget (a budget of 0 still draws a full meter)."""
        return self.budget if self.budget else 1.0


@dataclass
class CampaignView:
    """One campaign as the pages show it."""

    id: int
    name: str
    paused: bool
    created_at: datetime
    updated_at: datetime
    definition: CampaignDefinition | None
    invalid: str | None
    spend: Spend
    routes: list[Budget] = field(default_factory=list)
    networks: list[Budget] = field(default_factory=list)

    @property
    def state(self) -> str:
        return "paused" if self.paused else "running"

    @property
    def cadence_text(self) -> str:
        return seconds(self.definition.cadence_s) if self.definition else "-"

    @property
    def total_text(self) -> str:
        return amount(self.spend.total)

    @property
    def top_route(self) -> Budget | None:
        """The route that spent most today."""
        return max(self.routes, key=lambda b: b.spent, default=None) if self.spend.tests else None

    @property
    def top_network(self) -> Budget | None:
        """The network that spent most today."""
        return max(self.networks, key=lambda b: b.spent, default=None) if self.spend.tests else None


def _definition(row: Any) -> tuple[CampaignDefinition | None, str | None]:
    """The stored definition, or None and why not (stored by hand or by an older version: the
    campaign is shown, and the scheduler skips it)."""
    try:
        return CampaignDefinition.model_validate(row.definition), None
    except ValidationError as exc:
        return None, f"the stored definition is invalid ({exc.error_count()} problems)"


def _network_label(row: Any) -> str:
    return " ".join(filter(None, (row.mcc_mnc, row.operator, f"({row.country or '??'})")))


def _view(row: Any, spend: Spend, network_names: dict[str, str] | None = None) -> CampaignView:
    definition, invalid = _definition(row)
    view = CampaignView(
        id=row.id,
        name=row.name,
        paused=row.paused,
        created_at=row.created_at,
        updated_at=row.updated_at,
        definition=definition,
        invalid=invalid,
        spend=spend,
    )
    route_budget = definition.daily_budget_per_route if definition else None
    network_budget = definition.daily_budget_per_network if definition else None
    routes = list(definition.routes) if definition else []
    networks = list(definition.networks) if definition else []
    names = network_names or {}
    view.routes = [
        Budget(key, key, spend.by_route.get(key, 0.0), route_budget)
        for key in [*routes, *sorted(spend.by_route.keys() - set(routes))]
    ]
    view.networks = [
        Budget(key, names.get(key, key), spend.by_network.get(key, 0.0), network_budget)
        for key in [*networks, *sorted(spend.by_network.keys() - set(networks))]
    ]
    return view


def _campaign_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if len(text) > 10 or not 0 < int(text) <= MAX_ID:
        raise web.HTTPNotFound(text=f"no campaign {text[:20]}")
    return int(text)


def _back(value: object, default: str) -> str:
    """Where a pause or resume returns to: a campaign page of this site, else ``default``."""
    if isinstance(value, str) and value.startswith("/campaigns") and "//" not in value and "\\" not in value:
        return value
    return default


def _notice(request: web.Request) -> str | None:
    return next((text for flag, text in NOTICES.items() if request.query.get(flag) == "1"), None)


async def campaign_list(request: web.Request) -> web.Response:
    """GET /campaigns: every campaign with its state and today's spend; ``?state=running`` or
    ``paused`` filters, ``?page=N`` pages."""
    session = require(request, "viewer")
    engine = request.app[UI_ENGINE]
    size = request.app[UI_CONFIG].page_size
    state = request.query.get("state", "")
    statement = select(s.campaigns)
    if state in ("running", "paused"):
        statement = statement.where(s.campaigns.c.paused == (state == "paused"))
    async with engine.connect() as conn:
        total = int(await conn.scalar(select(func.count()).select_from(statement.subquery())) or 0)
        number, pages = page_of(request, total, size)
        rows = (
            await conn.execute(statement.order_by(s.campaigns.c.id).limit(size).offset((number - 1) * size))
        ).all()
        spends = await store.spend_on_day(conn, [row.id for row in rows])
    return page(
        request,
        "campaigns.html",
        campaigns=[_view(row, spends[row.id]) for row in rows],
        total=total,
        state=state,
        may_change=session.user.may("operator"),
        notice=_notice(request),
        nearly=NEARLY_SPENT,
        page_number=number,
        pages=pages,
    )


async def _network_names(conn: AsyncConnection, keys: list[str]) -> dict[str, str]:
    n = s.networks.c
    rows = await conn.execute(select(n.mcc_mnc, n.country, n.operator).where(n.mcc_mnc.in_(keys)))
    return {row.mcc_mnc: _network_label(row) for row in rows}


async def campaign_detail(request: web.Request) -> web.Response:
    """GET /campaigns/{id}: the whole definition and today's spend per route and network."""
    session = require(request, "viewer")
    campaign_id = _campaign_id(request)
    async with request.app[UI_ENGINE].connect() as conn:
        row = await _row(conn, campaign_id)
        spend = (await store.spend_on_day(conn, [campaign_id]))[campaign_id]
        definition, _ = _definition(row)
        networks = definition.networks if definition is not None else []
        names = await _network_names(conn, sorted({*networks, *spend.by_network}))
    return page(
        request,
        "campaign.html",
        campaign=_view(row, spend, names),
        may_change=session.user.may("operator"),
        notice=_notice(request),
        nearly=NEARLY_SPENT,
        amount=amount,
        seconds=seconds,
    )


async def _row(conn: AsyncConnection, campaign_id: int) -> Any:
    try:
        return await store.get_campaign(conn, campaign_id)
    except CampaignRefused as exc:
        raise web.HTTPNotFound(text=exc.problem) from None


async def _form_page(
    request: web.Request,
    conn: AsyncConnection,
    form: CampaignForm,
    *,
    campaign: Any | None,
    status: int = 200,
) -> web.Response:
    """The form, with the routes and networks to choose from (and any chosen ones no longer
    known, so they can be seen and unticked)."""
    r, n = s.routes.c, s.networks.c
    routes = [
        (row.name, row.name + ("" if row.enabled else " (disabled)"))
        for row in await conn.execute(select(r.name, r.enabled).order_by(r.name))
    ]
    networks = [
        (row.mcc_mnc, _network_label(row))
        for row in await conn.execute(select(n.mcc_mnc, n.country, n.operator).order_by(n.mcc_mnc))
    ]
    chosen_templates = [t for t in form.values["templates"] if t in TEMPLATES]
    options = {
        "routes": _with_unknown(routes, form.values["routes"]),
        "networks": _with_unknown(networks, form.values["networks"]),
        # the chosen ones first, in their order: templates are used in turn
        "templates": [
            (t, t) for t in [*chosen_templates, *(t for t in TEMPLATES if t not in chosen_templates)]
        ],
    }
    return page(
        request,
        "campaign_form.html",
        status=status,
        form=form,
        labels=campaign_form.LABELS,
        hints=campaign_form.HINTS,
        anchor=campaign_form.anchor,
        options=options,
        timezones=TIMEZONES,
        campaign=campaign,
    )


def _with_unknown(options: list[tuple[str, str]], chosen: list[str]) -> list[tuple[str, str]]:
    known = {value for value, _ in options}
    return options + [(value, f"{value} (unknown)") for value in chosen if value not in known]


async def new_form(request: web.Request) -> web.Response:
    """GET /campaigns/new."""
    require(request, "operator")
    async with request.app[UI_ENGINE].connect() as conn:
        return await _form_page(request, conn, campaign_form.blank(), campaign=None)


async def create(request: web.Request) -> web.Response:
    """POST /campaigns/new: create it, or show the form again with each problem at its field."""
    session = require(request, "operator")
    engine = request.app[UI_ENGINE]
    form = campaign_form.posted(await request.post())
    campaign = campaign_form.validate(form)
    if campaign is not None:
        try:
            row = await store.create_campaign(
                engine, campaign.name, campaign.definition, paused=campaign.paused
            )
        except CampaignRefused as exc:
            campaign_form.refused(form, exc)
        else:
            log.info("user %s created campaign %d %r", session.user.name, row.id, row.name)
            raise web.HTTPSeeOther(f"/campaigns/{row.id}?created=1")
    async with engine.connect() as conn:
        return await _form_page(request, conn, form, campaign=None, status=400)


async def edit_form(request: web.Request) -> web.Response:
    """GET /campaigns/{id}/edit."""
    require(request, "operator")
    campaign_id = _campaign_id(request)
    async with request.app[UI_ENGINE].connect() as conn:
        row = await _row(conn, campaign_id)
        try:
            form = campaign_form.stored(row.name, CampaignDefinition.model_validate(row.definition))
        except ValidationError:  # an invalid stored definition: start from the defaults
            form = campaign_form.blank()
            form.values["name"] = row.name
            form.add(
                campaign_form.FORM, "the stored definition is invalid: give the campaign's settings again"
            )
        return await _form_page(request, conn, form, campaign=row)


async def edit(request: web.Request) -> web.Response:
    """POST /campaigns/{id}/edit: replace the name and definition, or show the form again."""
    session = require(request, "operator")
    campaign_id = _campaign_id(request)
    engine = request.app[UI_ENGINE]
    form = campaign_form.posted(await request.post())
    campaign = campaign_form.validate(form)
    if campaign is not None:
        try:
            await store.update_campaign(
                engine, campaign_id, name=campaign.name, definition=campaign.definition
            )
        except CampaignRefused as exc:
            if exc.status == 404:
                raise web.HTTPNotFound(text=exc.problem) from None
            campaign_form.refused(form, exc)
        else:
            log.info("user %s changed campaign %d", session.user.name, campaign_id)
            raise web.HTTPSeeOther(f"/campaigns/{campaign_id}?saved=1")
    async with engine.connect() as conn:
        row = await _row(conn, campaign_id)
        return await _form_page(request, conn, form, campaign=row, status=400)


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    session = require(request, "operator")
    campaign_id = _campaign_id(request)
    form = await request.post()
    try:
        await store.set_paused(request.app[UI_ENGINE], campaign_id, paused)
    except CampaignRefused as exc:
        raise web.HTTPNotFound(text=exc.problem) from None
    log.info("user %s %s campaign %d", session.user.name, "paused" if paused else "resumed", campaign_id)
    raise web.HTTPSeeOther(_back(form.get("next"), f"/campaigns/{campaign_id}"))


async def pause(request: web.Request) -> web.Response:
    """POST /campaigns/{id}/pause, back to the page it came from."""
    return await _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    """POST /campaigns/{id}/resume, back to the page it came from."""
    return await _set_paused(request, False)


async def _delete_page(
    request: web.Request, campaign_id: int, *, error: str | None = None, status: int = 200
) -> web.Response:
    async with request.app[UI_ENGINE].connect() as conn:
        row = await _row(conn, campaign_id)
        cases = await store.count_test_cases(conn, campaign_id)
    return page(request, "campaign_delete.html", status=status, campaign=row, cases=cases, error=error)


async def delete_confirm(request: web.Request) -> web.Response:
    """GET /campaigns/{id}/delete: are you sure? (or why it cannot be: it has test cases)."""
    require(request, "operator")
    return await _delete_page(request, _campaign_id(request))


async def delete(request: web.Request) -> web.Response:
    """POST /campaigns/{id}/delete: remove a campaign without test cases."""
    session = require(request, "operator")
    campaign_id = _campaign_id(request)
    try:
        await store.delete_campaign(request.app[UI_ENGINE], campaign_id)
    except CampaignRefused as exc:
        if exc.status == 404:
            raise web.HTTPNotFound(text=exc.problem) from None
        return await _delete_page(request, campaign_id, error=exc.problem, status=exc.status)
    log.info("user %s deleted campaign %d", session.user.name, campaign_id)
    raise web.HTTPSeeOther("/campaigns?deleted=1")


_ID = r"/campaigns/{id:\d+}"

ROUTES = [
    web.get("/campaigns", campaign_list),
    web.get("/campaigns/new", new_form),
    web.post("/campaigns/new", create),
    web.get(_ID, campaign_detail),
    web.get(f"{_ID}/edit", edit_form),
    web.post(f"{_ID}/edit", edit),
    web.post(f"{_ID}/pause", pause),
    web.post(f"{_ID}/resume", resume),
    web.get(f"{_ID}/delete", delete_confirm),
    web.post(f"{_ID}/delete", delete),
]
