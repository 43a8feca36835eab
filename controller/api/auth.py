"""Bearer-token authentication and roles, as an aiohttp middleware.

Every operation but ``/health`` and the OpenAPI document needs ``Authorization: Bearer <token>``
naming a live token (401 otherwise, with ``WWW-Authenticate: Bearer``) whose role is at least the
operation's (403 otherwise): viewer reads, operator also writes campaigns, routes and networks,
admin may do everything. A path or method the API does not have is answered 404 / 405 before
any token is asked for: the OpenAPI document is public anyway.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime

from aiohttp import web

from controller.api.errors import ApiError
from controller.api.ops import API_CONFIG, ENGINE, Operation
from controller.api.tokens import ROLES, TokenInfo, find_token, touch

#: The operations by (method, path as the router has it), for the middleware to find their role.
OPERATIONS = web.AppKey("operations", dict[tuple[str, str], Operation])
#: When each token's last_used_at was last written (monotonic seconds), by token id.
TOUCHED = web.AppKey("token_touched", dict[int, float])
#: The token of the request being handled, for the access log (None: none, or not checked).
CALLER: ContextVar[TokenInfo | None] = ContextVar("api_caller", default=None)

_CHALLENGE = 'Bearer realm="probe-fleet"'


def _unauthorized(message: str, invalid: bool) -> ApiError:
    challenge = _CHALLENGE + (', error="invalid_token"' if invalid else "")
    return ApiError(401, message, "Authorization", headers={"WWW-Authenticate": challenge})


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized("this needs an API token: Authorization: Bearer <token>", invalid=False)
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("give the token as: Authorization: Bearer <token>", invalid=True)
    return token.strip()


async def _authenticate(request: web.Request) -> TokenInfo:
    token = _bearer(request)
    engine = request.app[ENGINE]
    async with engine.connect() as conn:
        info = await find_token(conn, token)
    if info is None:
        raise _unauthorized("the API token is unknown or revoked", invalid=True)
    touched = request.app[TOUCHED]
    now = time.monotonic()
    last = touched.get(info.id)
    if last is None or now - last >= request.app[API_CONFIG].token_touch_interval_s:
        touched[info.id] = now
        async with engine.begin() as conn:
            await touch(conn, info.id, datetime.now(UTC))
    return info


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Let the request through if its token's role allows the operation."""
    match = request.match_info
    if match.http_exception is not None:  # 404 or 405: the handler raises it
        return await handler(request)
    path = match.route.resource.canonical if match.route.resource else request.path
    operation = request.app[OPERATIONS].get((request.method, path))
    if operation is None or operation.role is None:
        return await handler(request)
    info = await _authenticate(request)
    rank = ROLES.index(info.role) if info.role in ROLES else -1  # a role written by hand
    if rank < ROLES.index(operation.role):
        raise ApiError(
            403, f"token {info.name!r} is a {info.role}: {request.method} {path} needs {operation.role}"
        )
    CALLER.set(info)
    return await handler(request)
