"""Logging in and out of the web UI.

The login form has no session yet, so its CSRF protection is a double-submit token: a random
value in a SameSite=Strict cookie and in the form, which must match. Failed attempts are
throttled per client address and per user name (``controller.web.guard.LoginThrottle``).
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets

from aiohttp import web

from controller.web.guard import THROTTLE, require, same_origin, session_of
from controller.web.render import page
from controller.web.sessions import COOKIE, end_session, start_session
from controller.web.state import UI_CONFIG, UI_ENGINE
from controller.web.users import authenticate

log = logging.getLogger(__name__)

LOGIN_COOKIE = "pf_login"


def _next_path(value: object) -> str:
    """Where to go after logging in: only a path on this site (never ``//host`` or a URL)."""
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/"


def _form(
    request: web.Request, *, name: str = "", error: str | None = None, status: int = 200
) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = page(
        request,
        "login.html",
        status=status,
        login_token=token,
        name=name,
        error=error,
        next=_next_path(request.query.get("next")),
    )
    response.set_cookie(
        LOGIN_COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/login"
    )
    return response


async def login_form(request: web.Request) -> web.Response:
    """GET /login."""
    return _form(request)


def _client(request: web.Request) -> str:
    return request.remote or "unknown"


async def login(request: web.Request) -> web.Response:
    """POST /login: start a session, or show the form again with what went wrong."""
    form = await request.post()
    name = str(form.get("name", "")).strip()
    password = str(form.get("password", ""))
    given = str(form.get("login_token", ""))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not same_origin(request) or not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        return _form(
            request, name=name, error="The form expired or came from another site: try again.", status=403
        )
    throttle = request.app[THROTTLE]
    keys = (f"ip:{_client(request)}", f"user:{name.lower()}")
    wait_s = throttle.retry_after_s(*keys)
    if wait_s > 0:
        response = _form(
            request,
            name=name,
            error=f"Too many failed logins: try again in {math.ceil(wait_s)} s.",
            status=429,
        )
        response.headers["Retry-After"] = str(math.ceil(wait_s))
        return response
    if not name or not password:
        return _form(request, name=name, error="Give your user name and password.", status=400)
    engine = request.app[UI_ENGINE]
    user = await authenticate(engine, name, password)
    if user is None:
        throttle.failed(*keys)
        log.warning("failed login for %r from %s", name[:64], _client(request))
        return _form(request, name=name, error="Wrong user name or password.", status=401)
    throttle.succeeded(*keys)
    cookie, _ = await start_session(engine, user, request.app[UI_CONFIG].session_idle_s)
    log.info("user %s (%s) logged in from %s", user.name, user.role, _client(request))
    response = web.HTTPSeeOther(_next_path(form.get("next")))
    response.set_cookie(COOKIE, cookie, httponly=True, samesite="Lax", secure=request.secure, path="/")
    response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def logout(request: web.Request) -> web.Response:
    """POST /logout (a form with the CSRF token, so no other site can log anyone out)."""
    require(request, "viewer")
    session = session_of(request)
    await end_session(request.app[UI_ENGINE], session)
    log.info("user %s logged out", session.user.name)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


ROUTES = [
    web.get("/login", login_form),
    web.post("/login", login),
    web.post("/logout", logout),
]
