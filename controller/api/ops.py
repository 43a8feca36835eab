"""Operations: each endpoint declared once, with its models, and run through one wrapper.

An :class:`Operation` names the method, path, query model, body model, response model and the
role it needs. ``controller.api.app`` registers the wrapper :func:`handler` on the router and
``controller.api.openapi`` writes the OpenAPI document from the same declarations, so the
document cannot describe a parameter the handler does not take. The wrapper validates the query
and body before the handler runs and serialises what it returns with the declared response
model (anything else is a bug, and a 500).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Row, Select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api.inputs import parse_body, parse_query
from controller.api.paging import Order, Page, PageQuery, fetch_page, page_size
from controller.api.tokens import Role
from controller.config import ApiConfig

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=Page[Any])

#: The root every operation's path hangs under.
API_ROOT = "/api/v1"

Outcome = BaseModel | web.StreamResponse | None
Handler = Callable[["Call"], Awaitable[Outcome]]

ENGINE = web.AppKey("engine", AsyncEngine)
API_CONFIG = web.AppKey("api_config", ApiConfig)


class Out(BaseModel):
    """Base of the response models: built from a database row."""

    model_config = ConfigDict(frozen=True)

    @classmethod
    def from_row(cls, row: Row[Any], **more: Any) -> Self:
        """The model from a row's columns (and ``more``)."""
        return cls.model_validate({**row._mapping, **more})


class In(BaseModel):
    """Base of the request body models: unknown fields are an error that names them."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Operation:
    """One endpoint: how it is reached, what it takes, what it answers, who may call it.

    ``role`` None makes it public; ``errors`` lists the error statuses particular to it (every
    operation may answer 400, and those needing a token 401 and 403); ``csv`` says it also
    answers text/csv, ``conditional`` that it answers 304 to If-None-Match; ``other`` documents
    further statuses answered with a model of their own.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    response: type[BaseModel] | None = None
    status: int = 200
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    role: Role | None = "viewer"
    errors: tuple[int, ...] = ()
    path_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    csv: bool = False
    conditional: bool = False
    other: Mapping[int, type[BaseModel]] = field(default_factory=dict)

    @property
    def full_path(self) -> str:
        """The path with the API root, as the router and the OpenAPI document have it."""
        return API_ROOT + self.path

    @property
    def operation_id(self) -> str:
        """The handler's name, a stable id for the OpenAPI document."""
        return self.handler.__name__.lstrip("_")


def string_param(description: str, pattern: str | None = None) -> dict[str, Any]:
    """A path parameter's schema: a string."""
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"description": description, "schema": schema}


def id_param(description: str) -> dict[str, Any]:
    """A path parameter's schema: a positive integer id."""
    return {"description": description, "schema": {"type": "integer", "minimum": 1}}


@dataclass(frozen=True)
class Call:
    """What a handler gets: the request, the database, the API config and the validated input."""

    request: web.Request
    engine: AsyncEngine
    config: ApiConfig
    query_model: BaseModel | None
    body_model: BaseModel | None

    def query(self, model: type[M]) -> M:
        """The validated query, as the operation declared it."""
        if not isinstance(self.query_model, model):
            raise TypeError(
                f"the operation's query is {type(self.query_model).__name__}, not {model.__name__}"
            )
        return self.query_model

    def body(self, model: type[M]) -> M:
        """The validated body, as the operation declared it."""
        if not isinstance(self.body_model, model):
            raise TypeError(f"the operation's body is {type(self.body_model).__name__}, not {model.__name__}")
        return self.body_model

    def page_size(self, query: PageQuery) -> int:
        """The page size asked for, within the configured bounds."""
        return page_size(query, self.config.default_page_size, self.config.max_page_size)

    def page(
        self, page_type: type[P], items: Sequence[BaseModel], total: int, limit: int, cursor: str | None
    ) -> P:
        """A page of ``items`` with its links (the next one keeps this request's filters)."""
        link = str(self.request.rel_url.update_query(cursor=cursor)) if cursor else None
        return page_type(items=items, total=total, limit=limit, next_cursor=cursor, next=link)

    async def list_page(
        self,
        page_type: type[P],
        statement: Select[Any],
        order: Order,
        query: PageQuery,
        item: Callable[[Row[Any]], BaseModel],
    ) -> P:
        """The page ``query`` asks for of ``statement`` (filtered, not ordered), each row made an
        item by ``item``: what every list endpoint answers."""
        limit = self.page_size(query)
        async with self.engine.connect() as conn:
            rows, total, cursor = await fetch_page(conn, statement, order, query, limit)
        return self.page(page_type, [item(r) for r in rows], total, limit, cursor)


def json_response(
    model: BaseModel, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A pydantic model as the JSON response body."""
    return web.Response(
        body=model.model_dump_json(by_alias=True).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def handler(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of ``op``: validate the input, call, serialise the answer."""

    async def handle(request: web.Request) -> web.StreamResponse:
        query = parse_query(request, op.query)
        body = parse_body(await request.read(), op.body) if op.body else None
        call = Call(request, request.app[ENGINE], request.app[API_CONFIG], query, body)
        outcome = await op.handler(call)
        if isinstance(outcome, web.StreamResponse):
            return outcome
        if outcome is None:
            if op.response is not None:
                raise TypeError(f"{op.operation_id} returned nothing, but declares {op.response.__name__}")
            return web.Response(status=op.status)
        if op.response is None or not isinstance(outcome, op.response):
            raise TypeError(f"{op.operation_id} returned {type(outcome).__name__}, not its declared response")
        return json_response(outcome, op.status)

    handle.__name__ = op.operation_id
    return handle
