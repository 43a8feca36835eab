"""Campaigns: create, read, change, pause, resume and delete.

The definition is ``controller.campaigns.CampaignDefinition`` as it is, so its validation
messages are the API's (under ``definition.``); routes it names must exist. A campaign with test
cases cannot be deleted (its results would lose their campaign): pause it instead. Storing and
those checks are ``controller.campaign_store``'s, shared with the web UI.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field
from sqlalchemy import select

from controller import campaign_store as store
from controller.api.errors import ApiError
from controller.api.inputs import Text, no_nulls, path_id
from controller.api.ops import Call, In, Operation, Out, id_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.campaign_store import CampaignRefused
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


def _refused(exc: CampaignRefused) -> ApiError:
    """The store's refusal in the API's error shape (a 400 names its field first, as pydantic's do)."""
    message = f"{exc.field}: {exc.problem}" if exc.status == 400 else exc.problem
    return ApiError(exc.status, message, exc.field)


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
    try:
        async with call.engine.connect() as conn:
            return CampaignOut.from_row(await store.get_campaign(conn, campaign_id))
    except CampaignRefused as exc:
        raise _refused(exc) from None


async def create_campaign(call: Call) -> CampaignOut:
    """Add a campaign; its name must be new and its routes must exist."""
    body = call.body(CampaignIn)
    try:
        row = await store.create_campaign(call.engine, body.name, body.definition, paused=body.paused)
    except CampaignRefused as exc:
        raise _refused(exc) from None
    return CampaignOut.from_row(row)


async def update_campaign(call: Call) -> CampaignOut:
    """Change a campaign's name or definition."""
    campaign_id = path_id(call.request, "id", "campaign")
    body = call.body(CampaignUpdate)
    no_nulls(body.model_dump(exclude_unset=True), "name", "definition")
    try:
        row = await store.update_campaign(
            call.engine, campaign_id, name=body.name, definition=body.definition
        )
    except CampaignRefused as exc:
        raise _refused(exc) from None
    return CampaignOut.from_row(row)


async def _set_paused(call: Call, paused: bool) -> CampaignOut:
    campaign_id = path_id(call.request, "id", "campaign")
    try:
        return CampaignOut.from_row(await store.set_paused(call.engine, campaign_id, paused))
    except CampaignRefused as exc:
        raise _refused(exc) from None


async def pause_campaign(call: Call) -> CampaignOut:
    """Stop a campaign sending (tests already sent are still judged). Pausing a paused one is a no-op."""
    return await _set_paused(call, True)


async def resume_campaign(call: Call) -> CampaignOut:
    """Let a paused campaign send again. Resuming a running one is a no-op."""
    return await _set_paused(call, False)


async def delete_campaign(call: Call) -> None:
    """Remove a campaign that has no test cases; one with test cases is a 409 (pause it instead)."""
    campaign_id = path_id(call.request, "id", "campaign")
    try:
        await store.delete_campaign(call.engine, campaign_id)
    except CampaignRefused as exc:
        raise _refused(exc) from None


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
