"""Rendering for the web UI: the Jinja environment (autoescaped: text from SMS, agents and
operators is always shown as text), its filters, and :func:`page`, which every page handler
ends with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from multidict import MultiDict

from controller.web.guard import SESSION_KEY

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

#: The navigation bar: (path, label).
NAV = (
    ("/", "Fleet"),
    ("/routes", "Routes"),
    ("/routing-table", "Routing table"),
    ("/campaigns", "Campaigns"),
    ("/messages", "Messages"),
)
#: More of it for admins: (path, label).
ADMIN_NAV = (("/users", "Users"), ("/tokens", "API tokens"))


def utc(value: datetime | None) -> str:
    """A time as UTC, to the second: ``2026-11-26 10:03:12Z``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago, in the largest unit that fits: ``45 s ago``, ``3 min ago``, ``2 h ago``."""
    if value is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - value).total_seconds()
    if seconds < -1:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{max(0, int(seconds))} s ago"


def ms(value: float | None) -> str:
    """A duration in ms, readable: ``840 ms``, ``3.2 s``."""
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.1f} s"


def pct(value: float | None, digits: int = 1) -> str:
    """A share 0..1 as a percentage."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 100:.{digits}f} %"


def _query_with(request: web.Request, **changes: object) -> str:
    """The request's query string with some parameters changed (for pagers and filters)."""
    query = MultiDict(request.query)
    for name, value in changes.items():
        query.popall(name, None)
        if value is not None and value != "":
            query[name] = str(value)
    return urlencode(list(query.items()))


def page_of(request: web.Request, total: int, size: int) -> tuple[int, int]:
    """The page asked for in ``?page=`` (clamped to the pages there are) and the page count."""
    pages = max(1, -(-total // size))
    try:
        number = int(request.query.get("page", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="page: a whole number") from None
    return min(max(1, number), pages), pages


@dataclass
class Form:
    """What was typed into a simple form and the problem with each field, shown beside it by the
    macros of ``fields.html``."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def error(self, name: str) -> str | None:
        return self.errors.get(name)


def setup(app: web.Application) -> None:
    """The Jinja environment on ``app``."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(utc=utc, ago=ago, ms=ms, pct=pct)
    env.globals.update(nav=NAV, admin_nav=ADMIN_NAV)


def environment(app: web.Application) -> jinja2.Environment:
    """The app's Jinja environment."""
    return aiohttp_jinja2.get_env(app)


def page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """Render a page with what every page needs: the session (user, CSRF token) and the path."""
    context.setdefault("session", request.get(SESSION_KEY))
    context.setdefault("path", request.path)
    context.setdefault("request_query", partial(_query_with, request))
    return aiohttp_jinja2.render_template(template, request, context, status=status)
