"""The REST API application: :func:`make_app` builds it, :func:`serving` / :func:`run_api` serve it.
The web UI (``controller.web``) is served by the same application, at ``/``.

Three middlewares wrap every handler, outermost first: the access log (a request id, echoed in
``X-Request-Id``, and the time taken), the error middleware (every failure becomes the one JSON
error shape; something unexpected is logged with its traceback and answered 500, an unreachable
database 503) and authentication (``controller.api.auth``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api import campaigns, fleet, messages, meta, results, routes, scores
from controller.api.auth import CALLER, TOUCHED, auth_middleware
from controller.api.auth import OPERATIONS as OPERATIONS_KEY
from controller.api.errors import ApiError, ErrorBody
from controller.api.openapi import build_document, dumps
from controller.api.ops import API_CONFIG, API_ROOT, ENGINE, Operation, handler, json_response
from controller.config import ControllerConfig
from controller.leader import Leader
from controller.sender.sender import Sender
from controller.web.app import setup_ui
from controller.web.guard import ui_middleware

log = logging.getLogger(__name__)

#: Every operation of the API, in the order the OpenAPI document lists them.
OPERATIONS: tuple[Operation, ...] = (
    *meta.OPERATIONS,
    *fleet.OPERATIONS,
    *routes.OPERATIONS,
    *campaigns.OPERATIONS,
    *results.OPERATIONS,
    *scores.OPERATIONS,
    *messages.OPERATIONS,
)
HEALTH_PATH = f"{API_ROOT}/health"
#: The id of the request being handled, for log lines and the 500 message.
REQUEST_ID: ContextVar[str] = ContextVar("api_request_id", default="-")
#: A client's X-Request-Id is kept when it looks like an id; otherwise one is made.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiStartError(Exception):
    """The API cannot listen where its config says (address in use, not allowed, unknown host)."""


def _error_response(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status, headers=error.headers)


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no such path, method not allowed, body too large) in our shape."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    if exc.status == 404:
        message = f"no such path: {request.path[:200]}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed here; allowed: {headers.get('Allow', 'none')}"
    elif exc.status == 413:
        message = f"the request body is too large: at most {request.app[API_CONFIG].max_body_bytes} bytes"
    else:
        message = exc.reason
    return json_response(ErrorBody(error=message), exc.status, headers=headers)


def _unavailable(exc: BaseException) -> bool:
    """Whether an exception says the database cannot be reached (rather than a bug)."""
    if isinstance(exc, OperationalError | OSError | TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the one error shape; the unexpected ones logged and answered 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(request, exc)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        request_id = REQUEST_ID.get()
        if _unavailable(exc):
            reason = getattr(exc, "orig", None) or exc  # the driver's words, without the SQL and its values
            log.warning(
                "%s %s: database unavailable: %s (request %s)",
                request.method,
                request.path,
                reason,
                request_id,
            )
            return json_response(ErrorBody(error="the database is unavailable: try again later"), 503)
        log.exception("%s %s failed (request %s)", request.method, request.path, request_id)
        return json_response(ErrorBody(error=f"internal error (request id {request_id})"), 500)


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id, echo it, and log the request with its status and time taken."""
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
    # Context variables, not request storage: requests on one keep-alive connection share a task,
    # so each is set here and reset when the request is done.
    ids = REQUEST_ID.set(request_id), CALLER.set(None)
    started = time.perf_counter()
    try:
        response = await handler(request)
        response.headers["X-Request-Id"] = request_id
        elapsed_ms = (time.perf_counter() - started) * 1000
        caller = CALLER.get()
        # Monitors poll /health every few seconds: their successes are only worth a debug line.
        quiet = response.status == 200 and request.path == HEALTH_PATH
        log.log(
            logging.DEBUG if quiet else logging.INFO,
            "%s %s %d %.1f ms request=%s token=%s",
            request.method,
            request.path_qs[:300],
            response.status,
            elapsed_ms,
            request_id,
            caller.name if caller else "-",
            extra={"request_id": request_id, "status": response.status, "duration_ms": round(elapsed_ms, 1)},
        )
        return response
    finally:
        REQUEST_ID.reset(ids[0])
        CALLER.reset(ids[1])


def make_app(
    engine: AsyncEngine,
    config: ControllerConfig,
    sender: Sender | None = None,
    *,
    leader: Leader | None = None,
) -> web.Application:
    """The REST API on ``engine``, configured by ``config.api``; ``sender`` sends messages;
    ``leader`` says in ``/health`` whether this instance leads."""
    middlewares: list[Middleware] = [access_log_middleware, error_middleware, auth_middleware]
    if config.ui.enabled:
        middlewares.append(ui_middleware)  # innermost: UI paths get HTML errors, the API's JSON ones
    app = web.Application(middlewares=middlewares, client_max_size=config.api.max_body_bytes)
    app[ENGINE] = engine
    app[API_CONFIG] = config.api
    app[TOUCHED] = {}
    if sender is not None:
        app[messages.SENDER] = sender
    if leader is not None:
        app[meta.LEADER] = leader
    app[OPERATIONS_KEY] = {(op.method, op.full_path): op for op in OPERATIONS}
    app[meta.OPENAPI_DOCUMENT] = dumps(build_document(OPERATIONS)).encode()
    for op in OPERATIONS:
        app.router.add_route(op.method, op.full_path, handler(op))
    if config.ui.enabled:
        setup_ui(app, engine, config)
    return app


@asynccontextmanager
async def serving(
    engine: AsyncEngine,
    config: ControllerConfig,
    sender: Sender | None = None,
    *,
    leader: Leader | None = None,
) -> AsyncIterator[list[str]]:
    """Serve the API while the block runs; yields its base URLs (the real port when the config
    says 0). Requests in flight get ``shutdown_timeout_s`` to finish when the block ends."""
    api = config.api
    runner = web.AppRunner(
        make_app(engine, config, sender, leader=leader),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=api.shutdown_timeout_s,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, api.host, api.port)
        try:
            await site.start()
        except OSError as exc:
            raise ApiStartError(
                f"the API cannot listen on {api.host}:{api.port}: {exc.strerror or exc}"
            ) from exc
        urls = [f"http://{_host(address[0])}:{address[1]}{API_ROOT}" for address in runner.addresses]
        log.info("REST API listening on %s", ", ".join(urls))
        yield urls
    finally:
        await runner.cleanup()
        log.info("REST API stopped")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run_api(engine: AsyncEngine, config: ControllerConfig, stop: asyncio.Event) -> None:
    """Serve the API until ``stop`` is set. Raises :class:`ApiStartError` when it cannot listen."""
    async with serving(engine, config):
        await stop.wait()
