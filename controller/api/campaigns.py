"""Campaigns: create, read, change, pause, resume and delete.

The definition is ``controller.campaigns.CampaignDefinition`` as it is, so its validation
messages are the API's (under ``definition.``); routes it names must exist. A campaign with test
cases cannot be deleted (its results would lose their campaign): pause it instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import Field
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.api.errors import ApiError, bad_request, conflict, not_found
from controller.api.inputs import Text, no_nulls, path_id
from controller.api.ops import Call, In, Operation, Out, id_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.campaigns import CampaignDefinition
from controller.storage import schema as s


class CampaignOut(Out):
    """A campaign."""

    id: int = Field(description="Campaign id.")
    name: str = Field(description="Campaign name, unique.")
    definition: CampaignDefinition = Field(
        description="What is tested, where, how often, within what budget."
    )
    paused: bool = Field(description="A paused campaign sends nothing until resumed.")
    created_at: datetime = Field(description="When it was created.")
    updated_at: datetime = Field(description="When it was last changed, paused or resumed.")


class CampaignIn(In):
    """A new campaign."""

    name: Text = Field(max_length=128, description="Campaign name, unique.")
    definition: CampaignDefinition = Field(
        description="What is tested, where, how often, within what budget."
    )
    paused: bool = Field(False, description="Create it paused.")


class CampaignUpdate(In):
    """Changes to a campaign: only the fields given are changed; the definition is replaced whole."""

    name: Text | None = Field(None, max_length=128, description="New name, unique.")
    definition: CampaignDefinition | None = Field(None, description="The new definition.")


class CampaignsQuery(PageQuery):
    """Filters of the campaign list."""

    paused: bool | None = Field(None, description="Only paused (true) or running (false) campaigns.")


class CampaignPage(Page[CampaignOut]):
    """A page of campaigns."""


async def _check_routes(conn: AsyncConnection, definition: CampaignDefinition) -> None:
    known = set(await conn.scalars(select(s.routes.c.name).where(s.routes.c.name.in_(definition.routes))))
    unknown = [name for name in definition.routes if name not in known]
    if unknown:
        raise bad_request(f"definition.routes: no route {', '.join(map(repr, unknown))}", "definition.routes")


def _taken(name: str) -> ApiError:
    return conflict(f"a campaign named {name!r} exists", "name")


async def _name_free(conn: AsyncConnection, name: str, campaign_id: int | None = None) -> None:
    statement = select(s.campaigns.c.id).where(s.campaigns.c.name == name)
    if campaign_id is not None:
        statement = statement.where(s.campaigns.c.id != campaign_id)
    if await conn.scalar(statement) is not None:
        raise _taken(name)


async def _get(conn: AsyncConnection, campaign_id: int) -> CampaignOut:
    row = (await conn.execute(select(s.campaigns).where(s.campaigns.c.id == campaign_id))).first()
    if row is None:
        raise not_found(f"no campaign {campaign_id}", "id")
    return CampaignOut.from_row(row)


async def list_campaigns(call: Call) -> CampaignPage:
    """Campaigns, by id."""
    query = call.query(CampaignsQuery)
    statement = where_given(select(s.campaigns), (s.campaigns.c.paused, query.paused))
    return await call.list_page(
        CampaignPage, statement, Order((s.campaigns.c.id,)), query, CampaignOut.from_row
    )


async def get_campaign(call: Call) -> CampaignOut:
    """One campaign."""
    campaign_id = path_id(call.request, "id", "campaign")
    async with call.engine.connect() as conn:
        return await _get(conn, campaign_id)


async def create_campaign(call: Call) -> CampaignOut:
    """Add a campaign; its name must be new and its routes must exist."""
    body = call.body(CampaignIn)
    now = datetime.now(UTC)
    try:
        async with call.engine.begin() as conn:
            await _check_routes(conn, body.definition)
            await _name_free(conn, body.name)
            result = await conn.execute(
                insert(s.campaigns)
                .values(
                    name=body.name,
                    definition=body.definition.model_dump(mode="json"),
                    paused=body.paused,
                    created_at=now,
                    updated_at=now,
                )
                .returning(s.campaigns.c.id)
            )
            return await _get(conn, result.scalar_one())
    except IntegrityError:  # the same name, created by another request meanwhile
        raise _taken(body.name) from None


async def update_campaign(call: Call) -> CampaignOut:
    """Change a campaign's name or definition."""
    campaign_id = path_id(call.request, "id", "campaign")
    body = call.body(CampaignUpdate)
    changes: dict[str, Any] = no_nulls(body.model_dump(exclude_unset=True), "name", "definition")
    try:
        async with call.engine.begin() as conn:
            await _get(conn, campaign_id)
            if body.definition is not None:
                await _check_routes(conn, body.definition)
                changes["definition"] = body.definition.model_dump(mode="json")
            if body.name is not None:
                await _name_free(conn, body.name, campaign_id)
            if changes:
                changes["updated_at"] = datetime.now(UTC)
                await conn.execute(update(s.campaigns).where(s.campaigns.c.id == campaign_id).values(changes))
            return await _get(conn, campaign_id)
    except IntegrityError:
        raise _taken(str(changes.get("name"))) from None


async def _set_paused(call: Call, paused: bool) -> CampaignOut:
    campaign_id = path_id(call.request, "id", "campaign")
    async with call.engine.begin() as conn:
        await conn.execute(
            update(s.campaigns)
            .where(s.campaigns.c.id == campaign_id, s.campaigns.c.paused != paused)
            .values(paused=paused, updated_at=datetime.now(UTC))
        )
        return await _get(conn, campaign_id)


async def pause_campaign(call: Call) -> CampaignOut:
    """Stop a campaign sending (tests already sent are still judged). Pausing a paused one is a no-op."""
    return await _set_paused(call, True)


async def resume_campaign(call: Call) -> CampaignOut:
    """Let a paused campaign send again. Resuming a running one is a no-op."""
    return await _set_paused(call, False)


async def delete_campaign(call: Call) -> None:
    """Remove a campaign that has no test cases; one with test cases is a 409 (pause it instead)."""
    campaign_id = path_id(call.request, "id", "campaign")
    in_use = "campaign {} has test cases: pause it instead"
    try:
        async with call.engine.begin() as conn:
            await _get(conn, campaign_id)
            cases = await conn.scalar(select(func.count()).where(s.test_cases.c.campaign_id == campaign_id))
            if cases:
                raise conflict(in_use.format(campaign_id), "id")
            await conn.execute(delete(s.campaigns).where(s.campaigns.c.id == campaign_id))
    except IntegrityError:  # a test case was written meanwhile
        raise conflict(in_use.format(campaign_id), "id") from None


_ID = {"id": id_param("Campaign id.")}

OPERATIONS = (
    Operation(
        "GET", "/campaigns", list_campaigns, "List campaigns", "campaigns", CampaignPage, query=CampaignsQuery
    ),
    Operation(
        "POST",
        "/campaigns",
        create_campaign,
        "Create a campaign",
        "campaigns",
        CampaignOut,
        status=201,
        body=CampaignIn,
        role="operator",
        errors=(409,),
    ),
    Operation(
        "GET",
        "/campaigns/{id}",
        get_campaign,
        "Get a campaign",
        "campaigns",
        CampaignOut,
        errors=(404,),
        path_params=_ID,
    ),
    Operation(
        "PATCH",
        "/campaigns/{id}",
        update_campaign,
        "Change a campaign",
        "campaigns",
        CampaignOut,
        body=CampaignUpdate,
        role="operator",
        errors=(404, 409),
        path_params=_ID,
    ),
    Operation(
        "POST",
        "/campaigns/{id}/pause",
        pause_campaign,
        "Pause a campaign",
        "campaigns",
        CampaignOut,
        role="operator",
        errors=(404,),
        path_params=_ID,
    ),
    Operation(
        "POST",
        "/campaigns/{id}/resume",
        resume_campaign,
        "Resume a campaign",
        "campaigns",
        CampaignOut,
        role="operator",
        errors=(404,),
        path_params=_ID,
    ),
    Operation(
        "DELETE",
        "/campaigns/{id}",
        delete_campaign,
        "Delete a campaign without test cases",
        "campaigns",
        status=204,
        role="operator",
        errors=(404, 409),
        path_params=_ID,
    ),
)
