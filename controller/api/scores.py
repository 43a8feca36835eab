"""Scores per (route, network) with their explanation, and the routing table: the newest
version and every earlier one, as JSON or CSV, with a strong ETag so exporters poll cheaply
(``If-None-Match`` answers 304 while the table is unchanged)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row, select

from controller import routing
from controller.api.errors import not_found
from controller.api.inputs import RouteName, path_id
from controller.api.ops import Call, Operation, Out, id_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.storage import schema as s
from probe_agent.protocol import MccMnc, RoutingTable

CSV_TYPE = "text/csv"
JSON_TYPE = "application/json"


class ScoreOut(Out):
    """A route's score for one network, with the statistics behind it and why it ranks where it does."""

    route: str = Field(description="Route.")
    mcc_mnc: str = Field(description="Destination network.")
    computed_at: datetime = Field(description="When the score was computed.")
    score: float | None = Field(description="Composite score, 0..1 (1 best); null while the pair is unknown.")
    results: int = Field(description="Results in the scoring window.")
    state: str | None = Field(description="The pair's state from the explanation (scored, unknown, ...).")
    why: str | None = Field(description="The explanation in one sentence.")
    stats: dict[str, Any] = Field(description="Measured values: shares 0..1, latencies in ms, counts.")
    explanation: dict[str, Any] = Field(
        description="Each component's value, weight and contribution, the state and the sentence."
    )


class ScoresQuery(PageQuery):
    """Filters of the score list."""

    route: RouteName | None = Field(None, description="Only scores of this route.")
    mcc_mnc: MccMnc | None = Field(None, description="Only scores for this network.")


class FormatQuery(BaseModel):
    """How a routing table is answered; without it the Accept header decides (JSON by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["json", "csv"] | None = Field(
        None, description="json or csv; overrides the Accept header (text/csv for CSV)."
    )


class TableVersion(Out):
    """One version of the routing table, in short."""

    version: int = Field(description="Table version.")
    created_at: datetime = Field(description="When it was built.")
    networks: int = Field(description="Networks it routes.")


class ScorePage(Page[ScoreOut]):
    """A page of scores."""


class VersionPage(Page[TableVersion]):
    """A page of routing table versions."""


async def list_scores(call: Call) -> ScorePage:
    """Scores, by route then network."""
    query = call.query(ScoresQuery)
    c = s.scores.c
    statement = where_given(select(s.scores), (c.route, query.route), (c.mcc_mnc, query.mcc_mnc))

    def item(r: Row[Any]) -> ScoreOut:
        return ScoreOut.from_row(r, state=r.explanation.get("state"), why=r.explanation.get("why"))

    return await call.list_page(ScorePage, statement, Order((c.route, c.mcc_mnc)), query, item)


def _networks(value: Any) -> int:
    table = json.loads(value) if isinstance(value, str) else value
    return len(table.get("networks") or {})


def _wants_csv(request: web.Request, query: FormatQuery) -> bool:
    if query.format is not None:
        return query.format == "csv"
    best_json = best_csv = 0.0
    for part in request.headers.get("Accept", "").split(","):
        media, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.strip().lower()
        if media == CSV_TYPE:
            best_csv = max(best_csv, quality)
        elif media in (JSON_TYPE, "application/*", "*/*"):
            best_json = max(best_json, quality)
    return best_csv > best_json


def _matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak comparison, as RFC 9110 says)."""
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


def _represent(call: Call, table: RoutingTable) -> web.Response:
    csv_wanted = _wants_csv(call.request, call.query(FormatQuery))
    text = routing.table_csv(table) if csv_wanted else routing.table_json(table)
    kind = "csv" if csv_wanted else "json"
    etag = f'"{table.version}-{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Vary": "Accept", "Cache-Control": "no-cache"}
    if _matches(call.request.headers.get("If-None-Match", ""), etag):
        return web.Response(status=304, headers=headers)
    return web.Response(
        text=text, content_type=CSV_TYPE if csv_wanted else JSON_TYPE, charset="utf-8", headers=headers
    )


async def get_routing_table(call: Call) -> web.Response:
    """The current routing table: JSON, or CSV for ``Accept: text/csv`` or ``?format=csv``."""
    async with call.engine.connect() as conn:
        table = await routing.latest(conn)
    if table is None:
        raise not_found("no routing table yet: it is built once routes have scores")
    return _represent(call, table)


async def list_table_versions(call: Call) -> VersionPage:
    """Routing table versions, newest first."""
    order = Order((s.routing_tables.c.version,), descending=True)

    def item(r: Row[Any]) -> TableVersion:
        return TableVersion.from_row(r, networks=_networks(r.table))

    return await call.list_page(VersionPage, select(s.routing_tables), order, call.query(PageQuery), item)


async def get_table_version(call: Call) -> web.Response:
    """One version of the routing table, as JSON or CSV like the current one."""
    number = path_id(call.request, "version", "routing table version")
    async with call.engine.connect() as conn:
        table = await routing.version(conn, number)
    if table is None:
        raise not_found(f"no routing table version {number}", "version")
    return _represent(call, table)


OPERATIONS = (
    Operation(
        "GET",
        "/scores",
        list_scores,
        "List scores with their explanation",
        "scores",
        ScorePage,
        query=ScoresQuery,
    ),
    Operation(
        "GET",
        "/routing-table",
        get_routing_table,
        "Get the current routing table",
        "routing",
        RoutingTable,
        query=FormatQuery,
        errors=(404,),
        csv=True,
        conditional=True,
    ),
    Operation(
        "GET",
        "/routing-table/versions",
        list_table_versions,
        "List routing table versions",
        "routing",
        VersionPage,
        query=PageQuery,
    ),
    Operation(
        "GET",
        "/routing-table/versions/{version}",
        get_table_version,
        "Get one routing table version",
        "routing",
        RoutingTable,
        query=FormatQuery,
        errors=(404,),
        csv=True,
        conditional=True,
        path_params={"version": id_param("Table version.")},
    ),
)
