"""The public endpoints: ``/health`` for load balancers and monitors, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from controller.api.ops import Call, Operation, json_response
from controller.leader import Leader
from probe_agent import __version__

log = logging.getLogger(__name__)

#: The OpenAPI document, serialised once when the app is made.
OPENAPI_DOCUMENT = web.AppKey("openapi_document", bytes)
#: The leader election of the service serving this API, if any.
LEADER = web.AppKey("leader", Leader)


class Health(BaseModel):
    """Whether the controller can serve: its database answers."""

    model_config = ConfigDict(frozen=True)

    status: Literal["ok", "unavailable"] = Field(description="ok, or unavailable (answered with 503).")
    database: Literal["ok", "unreachable"] = Field(description="Whether the database answered.")
    version: str = Field(description="Controller software version.")
    time: datetime = Field(description="Controller time (UTC).")
    error: str | None = Field(None, description="Why the database is unreachable.")
    instance: str | None = Field(None, description="This controller instance's id (host-pid-random).")
    leader: bool | None = Field(
        None,
        description="Whether this instance is the elected leader, running the campaign rounds, deadline "
        "sweep, routing table and clock sync (every instance serves, ingests and submits); none when the "
        "API runs without the service.",
    )


async def health(call: Call) -> web.Response:
    """200 when the database answers within the configured time (a follower too), else 503 saying why."""
    leader = call.request.app.get(LEADER)
    instance = leader.holder if leader is not None else None
    leading = leader.is_leader if leader is not None else None
    try:
        async with asyncio.timeout(call.config.health_timeout_s), call.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (DBAPIError, OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(getattr(exc, "orig", exc)).__name__
        log.warning("health: database unreachable (%s)", reason)
        body = Health(
            status="unavailable",
            database="unreachable",
            version=__version__,
            time=datetime.now(UTC),
            error=reason,
            instance=instance,
            leader=leading,
        )
        return json_response(body, 503)
    return json_response(
        Health(
            status="ok",
            database="ok",
            version=__version__,
            time=datetime.now(UTC),
            instance=instance,
            leader=leading,
        )
    )


async def openapi_document(call: Call) -> web.Response:
    """The OpenAPI 3.1 document of this API."""
    return web.Response(
        body=call.request.app[OPENAPI_DOCUMENT], content_type="application/json", charset="utf-8"
    )


OPERATIONS = (
    Operation(
        "GET",
        "/health",
        health,
        "Health: is the database reachable",
        "meta",
        Health,
        role=None,
        other={503: Health},
    ),
    Operation("GET", "/openapi.json", openapi_document, "This API's OpenAPI document", "meta", role=None),
)
