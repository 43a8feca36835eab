"""Who may see and do what in the web UI: the login session, CSRF, roles, login throttling,
security headers and HTML error pages, as one aiohttp middleware.

Every UI path but ``/login`` and ``/static/`` needs a session (a browser without one is sent to
the login page). Every request that changes something (POST) must carry the session's CSRF
token, in the form field ``csrf_token`` or the ``X-CSRF-Token`` header, and, when the browser
sends an ``Origin``, come from this site. Handlers ask for a role with :func:`require`. The
REST API under ``/api/v1`` is left to its own middlewares (bearer tokens, JSON errors).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
from aiohttp import web
from sqlalchemy.exc import DBAPIError, OperationalError

from controller.api.ops import API_ROOT
from controller.api.tokens import Role
from controller.web.sessions import COOKIE, Session

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths that need no session.
PUBLIC = ("/login", "/static/")
#: The request's session, set by the middleware on every non-public UI path.
SESSION_KEY = web.RequestKey("ui_session", Session)

#: No inline script or style, nothing from another origin, not framed by anyone.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class LoginThrottle:
    """Failed logins per key (a client address, a user name) in a sliding window: after its
    limit a key must wait until its oldest failure leaves the window. Per process: several
    controller instances each count their own."""

    #: Keys kept at most; the oldest are forgotten first (bounds memory under a spray of names).
    MAX_KEYS = 10_000
    #: A client address (``ip:...``, maybe a whole office behind NAT) may fail this many times
    #: more than one user name before it waits.
    ADDRESS_FACTOR = 4

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}

    def _limit(self, key: str) -> int:
        return self.max_failures * (self.ADDRESS_FACTOR if key.startswith("ip:") else 1)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def retry_after_s(self, *keys: str) -> float:
        """0 when every key may try now; otherwise the seconds until all may."""
        now = time.monotonic()
        wait = 0.0
        for key in keys:
            failures = self._recent(key, now)
            if len(failures) >= self._limit(key):
                wait = max(wait, self.window_s - (now - failures[0]))
        return wait

    def failed(self, *keys: str) -> None:
        """Count a failed attempt against every key."""
        now = time.monotonic()
        for key in keys:
            if key not in self._failures and len(self._failures) >= self.MAX_KEYS:
                del self._failures[next(iter(self._failures))]
            self._failures.setdefault(key, deque(maxlen=self._limit(key))).append(now)

    def succeeded(self, *keys: str) -> None:
        """Forget the failures of these keys."""
        for key in keys:
            self._failures.pop(key, None)


THROTTLE = web.AppKey("ui_login_throttle", LoginThrottle)
#: Looks a session cookie up: (cookie) -> the live session or None.
SESSIONS: web.AppKey[Callable[[str], Awaitable[Session | None]]] = web.AppKey("ui_sessions")


def session_of(request: web.Request) -> Session:
    """The session of a request that passed the guard."""
    return request[SESSION_KEY]


def require(request: web.Request, role: Role) -> Session:
    """The request's session if its user has at least ``role``; 403 otherwise."""
    session = session_of(request)
    if not session.user.may(role):
        raise web.HTTPForbidden(
            text=f"{session.user.name} is a {session.user.role}: this needs the {role} role"
        )
    return session


def same_origin(request: web.Request) -> bool:
    """Whether the request's Origin (or Referer), when the browser sent one, is this site."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    return parts.netloc == request.host and parts.scheme == request.scheme


async def _csrf_token(request: web.Request) -> str | None:
    if "X-CSRF-Token" in request.headers:
        return request.headers["X-CSRF-Token"]
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get("csrf_token")
        return value if isinstance(value, str) else None
    return None


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC) or request.match_info.http_exception is not None:
        return await handler(request)
    session = await request.app[SESSIONS](request.cookies.get(COOKIE, ""))
    if session is None:
        if request.method in ("GET", "HEAD") and request.path != "/events":
            raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/?=&')}")
        raise web.HTTPUnauthorized(text="your session has ended: log in again")
    request[SESSION_KEY] = session
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if not same_origin(request):
            raise web.HTTPForbidden(text="this request came from another site")
        if not session.csrf_ok(await _csrf_token(request)):
            raise web.HTTPForbidden(
                text="the form is stale or forged (CSRF token missing or wrong): reload it"
            )
    return await handler(request)


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """An HTML error page with the message (escaped by the template)."""
    context = {
        "status": status,
        "message": message,
        "session": request.get(SESSION_KEY),
        "path": request.path,
    }
    return aiohttp_jinja2.render_template("error.html", request, context, status=status)


def _unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | OSError | TimeoutError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


@web.middleware
async def ui_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The guard for every UI path; the API's paths pass untouched."""
    if request.path.startswith(API_ROOT):
        return await handler(request)
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = error_page(request, exc.status, message or exc.reason)
        for name in ("Retry-After", "Allow"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except Exception as exc:
        if _unavailable(exc):
            log.warning("%s %s: database unavailable: %s", request.method, request.path, exc)
            response = error_page(request, 503, "the database is unavailable: try again in a moment")
        else:
            log.exception("%s %s failed", request.method, request.path)
            response = error_page(request, 500, "something went wrong on the controller; it is logged")
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response
