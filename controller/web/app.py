"""The web UI on the controller's aiohttp application: pages, static files, the live feed.

:func:`setup_ui` adds it to the API's application (one server, one port): the UI at ``/``, the
REST API at ``/api/v1``. Every page module has a ``ROUTES`` list; the guard middleware
(``controller.web.guard``) stands in front of all of them.
"""

from __future__ import annotations

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import ControllerConfig
from controller.web import (
    access,
    campaigns,
    fleet,
    live,
    login,
    messages,
    probe_detail,
    render,
    route_detail,
    route_edit,
    routing_table,
    scoreboard,
    test_case,
)
from controller.web.guard import SESSIONS, THROTTLE, LoginThrottle
from controller.web.sessions import Session, find_session
from controller.web.state import UI_API_CONFIG, UI_CONFIG, UI_ENGINE

PAGES = (
    login,
    fleet,
    live,
    routing_table,
    probe_detail,
    scoreboard,
    route_edit,
    route_detail,
    campaigns,
    messages,
    access,
    test_case,
)


def setup_ui(app: web.Application, engine: AsyncEngine, config: ControllerConfig) -> None:
    """Add the UI's routes and state to ``app`` (the guard middleware is added by the caller,
    which owns the middleware order)."""
    ui = config.ui
    app[UI_ENGINE] = engine
    app[UI_CONFIG] = ui
    app[UI_API_CONFIG] = config.api
    app[THROTTLE] = LoginThrottle(ui.login_max_failures, ui.login_window_s)

    async def sessions(cookie: str) -> Session | None:
        return await find_session(engine, cookie, ui.session_idle_s)

    app[SESSIONS] = sessions
    render.setup(app)
    static = app.router.add_static("/static/", render.STATIC, name="static", append_version=True)
    env = render.environment(app)
    env.globals["asset"] = lambda name: str(static.url_for(filename=name))
    for module in PAGES:
        app.router.add_routes(module.ROUTES)
    live.setup(app, engine, ui)
