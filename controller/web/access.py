"""Who may use the controller: the web UI's users and the REST API's tokens, for admins only.

The same functions as ``probe-fleet user`` and ``probe-fleet token`` (``controller.web.users``,
``controller.api.tokens``), so the command line and the pages keep one set of rules: names,
password length, at least one enabled admin. A new token is shown once, on the page that answers
its creation (never stored, never cached); afterwards only its name, role and last use are.
Every handler here, GET included, asks for the admin role: an operator sees no user list.
"""

from __future__ import annotations

import logging

from aiohttp import web

from controller.api import tokens
from controller.api.tokens import ROLES
from controller.web import users
from controller.web.guard import require
from controller.web.render import Form, page
from controller.web.state import UI_ENGINE

log = logging.getLogger(__name__)

#: Notices after a change, by the query flag the redirect sets.
NOTICES = {
    "added": "User added: they can log in now.",
    "role": "Role changed; it applies from the user's next page.",
    "password": "Password changed; the user's sessions were ended.",
    "disabled": "User disabled; their sessions were ended.",
    "enabled": "User enabled.",
    "revoked": "Token revoked: requests carrying it are refused from now on.",
}


def _notice(request: web.Request) -> str | None:
    return next((text for flag, text in NOTICES.items() if flag in request.query), None)


def _name(request: web.Request) -> str:
    return request.match_info["name"]


async def _users_page(request: web.Request, form: Form | None = None, status: int = 200) -> web.Response:
    listed = await users.list_users(request.app[UI_ENGINE])
    form = form or Form(values={"name": "", "role": "viewer"})
    return page(
        request, "users.html", status=status, users=listed, form=form, roles=ROLES, notice=_notice(request)
    )


async def user_list(request: web.Request) -> web.Response:
    """GET /users: every user, and the form to add one."""
    require(request, "admin")
    return await _users_page(request)


async def user_add(request: web.Request) -> web.Response:
    """POST /users/new: add a user, or show the form again with each problem at its field."""
    session = require(request, "admin")
    posted = await request.post()
    form = Form(values={key: str(posted.get(key, "")) for key in ("name", "role")})
    password, repeated = str(posted.get("password", "")), str(posted.get("password_again", ""))
    if password != repeated:
        form.errors["password_again"] = "the two passwords differ"
    else:
        try:
            engine, values = request.app[UI_ENGINE], form.values
            user = await users.add_user(engine, values["name"], values["role"], password)
        except users.UserError as exc:
            form.errors[_field_of(str(exc))] = str(exc)
        else:
            log.info("user %s added user %s (%s)", session.user.name, user.name, user.role)
            raise web.HTTPSeeOther("/users?added=1")
    return await _users_page(request, form, status=400)


def _field_of(problem: str) -> str:
    """The form field a :class:`~controller.web.users.UserError` is about."""
    if problem.startswith("role"):
        return "role"
    if "password" in problem:
        return "password"
    return "name"


async def _user_page(request: web.Request, form: Form | None = None, status: int = 200) -> web.Response:
    name = _name(request)
    found = next((u for u in await users.list_users(request.app[UI_ENGINE]) if u.name == name), None)
    if found is None:
        raise web.HTTPNotFound(text=f"no user named {name!r}")
    return page(
        request,
        "user.html",
        status=status,
        user=found,
        form=form or Form(),
        roles=ROLES,
        notice=_notice(request),
    )


async def user_detail(request: web.Request) -> web.Response:
    """GET /users/{name}: change a user's role or password, or disable / enable them."""
    require(request, "admin")
    return await _user_page(request)


async def _change(request: web.Request, flag: str, where: str, **change: object) -> web.Response:
    """Apply one change to the user in the path; a refusal is shown on the user's page, beside the
    form ``where`` (role, password, state)."""
    session = require(request, "admin")
    name = _name(request)
    try:
        await users.set_user(request.app[UI_ENGINE], name, **change)  # type: ignore[arg-type]
    except users.UserError as exc:
        if str(exc).startswith("no user"):
            raise web.HTTPNotFound(text=str(exc)) from None
        return await _user_page(request, Form(errors={where: str(exc)}), status=400)
    log.info("user %s changed user %s: %s", session.user.name, name, flag)
    raise web.HTTPSeeOther(f"/users/{name}?{flag}=1")


async def user_role(request: web.Request) -> web.Response:
    """POST /users/{name}/role."""
    return await _change(request, "role", "role", role=str((await request.post()).get("role", "")))


async def user_password(request: web.Request) -> web.Response:
    """POST /users/{name}/password: a new password, typed twice."""
    posted = await request.post()
    password, repeated = str(posted.get("password", "")), str(posted.get("password_again", ""))
    if password != repeated:
        require(request, "admin")
        differ = Form(errors={"password_again": "the two passwords differ"})
        return await _user_page(request, differ, status=400)
    return await _change(request, "password", "password", password=password)


async def user_disable(request: web.Request) -> web.Response:
    """POST /users/{name}/disable: they cannot log in, their sessions end (not oneself)."""
    if _name(request) == require(request, "admin").user.name:
        return await _user_page(request, Form(errors={"state": "you cannot disable yourself"}), status=400)
    return await _change(request, "disabled", "state", disabled=True)


async def user_enable(request: web.Request) -> web.Response:
    """POST /users/{name}/enable."""
    return await _change(request, "enabled", "state", disabled=False)


async def _tokens_page(
    request: web.Request,
    form: Form | None = None,
    *,
    made: tuple[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    """The token list and form; ``made`` (name, token) is shown once, above them."""
    listed = await tokens.list_tokens(request.app[UI_ENGINE])
    form = form or Form(values={"name": "", "role": "viewer"})
    response = page(
        request,
        "tokens.html",
        status=status,
        tokens=listed,
        form=form,
        roles=ROLES,
        made=made,
        notice=_notice(request),
    )
    if made:
        response.headers["Cache-Control"] = "no-store"  # the token must not be kept by any cache
    return response


async def token_list(request: web.Request) -> web.Response:
    """GET /tokens: every API token (never the secret), and the form to make one."""
    require(request, "admin")
    return await _tokens_page(request)


async def token_add(request: web.Request) -> web.Response:
    """POST /tokens/new: make a token and show it, this once."""
    session = require(request, "admin")
    posted = await request.post()
    form = Form(values={key: str(posted.get(key, "")) for key in ("name", "role")})
    try:
        made = await tokens.add_token(request.app[UI_ENGINE], form.values["name"], form.values["role"])
    except tokens.TokenError as exc:
        form.errors["role" if str(exc).startswith("role") else "name"] = str(exc)
        return await _tokens_page(request, form, status=400)
    log.info("user %s made API token %s (%s)", session.user.name, form.values["name"], form.values["role"])
    return await _tokens_page(request, made=(form.values["name"], made), status=201)


async def token_revoke(request: web.Request) -> web.Response:
    """POST /tokens/{name}/revoke."""
    session = require(request, "admin")
    name = _name(request)
    try:
        await tokens.revoke_token(request.app[UI_ENGINE], name)
    except tokens.TokenError as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    log.info("user %s revoked API token %s", session.user.name, name)
    raise web.HTTPSeeOther("/tokens?revoked=1")


_USER = "/users/{name}"
_TOKEN = "/tokens/{name}"

ROUTES = [
    web.get("/users", user_list),
    web.post("/users/new", user_add),
    web.get(_USER, user_detail),
    web.post(f"{_USER}/role", user_role),
    web.post(f"{_USER}/password", user_password),
    web.post(f"{_USER}/disable", user_disable),
    web.post(f"{_USER}/enable", user_enable),
    web.get("/tokens", token_list),
    web.post("/tokens/new", token_add),
    web.post(f"{_TOKEN}/revoke", token_revoke),
]
