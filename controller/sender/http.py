"""The HTTP route connector: an SMS provider's REST API, described in config rather than in code.

Most providers take one message per request (JSON or form fields, or a GET query) and answer with
a JSON body holding the message id somewhere inside it, and an error, sometimes with a 2xx status.
``HttpSettings`` says where each of those is, so a new provider is a stored route, not a module:

* the request fields are templates with ``{to}``, ``{to_digits}``, ``{from}``, ``{text}`` and
  ``{reference}`` (our unique id of this submit, the same on every retry so a provider that
  de-duplicates on it sends once);
* the answer is read by dotted paths with list indexes (``messages.0.message-id``);
* throttling answers (429) wait as ``Retry-After`` says, server errors (5xx), connection errors
  and timeouts back off and retry, up to ``max_retries``, then fail as retryable; anything else is
  a permanent refusal carrying the provider's own words.

The provider splits long messages itself, so a submit is one request and one message id.

Delivery receipts come to the controller's webhook (``POST /api/v1/receipts/{route}``), which
hands the request to ``parse_webhook``: the same paths, a map from the provider's status values to
the SMPP receipt states, and a shared secret header.

Secrets (auth, the receipt secret, header values, a password in the URL) never reach a log line or
an error message: they are masked.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hmac
import json
import logging
import math
import random
import string
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, NoReturn

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from yarl import URL

from controller.sender.rate import RateMeter
from controller.sender.receipts import STATS, DeliveryReceipt
from controller.submit import SubmitError
from probe_agent.logs import BoundLogger, bind

log = logging.getLogger(__name__)

#: The placeholders a request field template may use.
PLACEHOLDERS: tuple[str, ...] = ("to", "to_digits", "from", "text", "reference")
#: Answers that mean our credentials are wrong: the route cannot send anything, so it is down.
AUTH_FAILURE_STATUSES = frozenset({401, 403})
#: How much of a provider's answer goes into an error message.
SNIPPET_CHARS = 200
#: E.164: at most 15 digits.
MAX_E164_DIGITS = 15
_MASK = "***"
_MISSING: Any = object()


# -- settings -------------------------------------------------------------------------------------


def _check_path(value: str) -> str:
    if not value or any(not segment for segment in value.split(".")):
        raise ValueError(f"{value!r} is not a dotted path (names and list indexes joined by '.')")
    return value


class NoAuth(BaseModel):
    """No credentials (or credentials in the URL, headers or body fields)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none"] = Field(description="No authentication.")


class BasicAuth(BaseModel):
    """HTTP Basic authentication."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["basic"] = Field(description="HTTP Basic authentication.")
    username: str = Field(description="User name (often the API key).")
    password: SecretStr = Field(description="Password (often the API secret).")


class BearerAuth(BaseModel):
    """``Authorization: Bearer <token>``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["bearer"] = Field(description="A bearer token in the Authorization header.")
    token: SecretStr = Field(description="The token.")


class HeaderAuth(BaseModel):
    """A key in a header of the provider's choosing (``X-API-Key: ...``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["header"] = Field(description="A secret in a named header.")
    name: str = Field(min_length=1, description="The header's name, e.g. X-API-Key.")
    value: SecretStr = Field(description="The header's value.")


HttpAuth = Annotated[NoAuth | BasicAuth | BearerAuth | HeaderAuth, Field(discriminator="type")]


class HttpReceiptSettings(BaseModel):
    """How to read the delivery receipts the provider posts to our webhook."""

    model_config = ConfigDict(extra="forbid")

    message_id_field: str = Field(
        description="Dotted path to the message id in the JSON or form body (as the submit answer gave it)."
    )
    status_field: str = Field(description="Dotted path to the provider's delivery status.")
    status_map: dict[str, str] = Field(
        description="Provider status value -> SMPP receipt state (DELIVRD, UNDELIV, EXPIRED, REJECTD, "
        "ACCEPTD, ENROUTE, UNKNOWN, DELETED). Values that already are such a state need no entry."
    )
    error_field: str | None = Field(default=None, description="Dotted path to the provider's error code.")
    done_at_field: str | None = Field(
        default=None,
        description="Dotted path to when the final state was reached: ISO 8601 (UTC when it has no "
        "offset) or unix seconds.",
    )
    secret: SecretStr | None = Field(
        default=None, description="A shared secret the provider sends in secret_header; None: no check."
    )
    secret_header: str = Field(
        default="X-Webhook-Secret", min_length=1, description="The header carrying the shared secret."
    )

    @field_validator("message_id_field", "status_field", "error_field", "done_at_field")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return None if value is None else _check_path(value)

    @field_validator("status_map")
    @classmethod
    def _states(cls, value: dict[str, str]) -> dict[str, str]:
        mapped: dict[str, str] = {}
        for provider_value, stat in value.items():
            if stat.upper() not in STATS:
                raise ValueError(
                    f"status_map[{provider_value!r}]: {stat!r} is not one of {', '.join(sorted(STATS))}"
                )
            mapped[provider_value] = stat.upper()
        return mapped


class HttpSettings(BaseModel):
    """How to reach and use one HTTP SMS provider."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["http"] = Field(description="The connector kind: http.")
    url: str = Field(description="The provider's send endpoint (http or https).")
    method: Literal["POST", "GET"] = Field(
        default="POST", description="POST sends the fields as the body; GET as the query string."
    )
    auth: HttpAuth = Field(
        default_factory=lambda: NoAuth(type="none"),
        description="Credentials: none, basic, bearer or header (chosen by 'type').",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    body: Literal["json", "form"] = Field(
        default="json", description="POST body encoding: a JSON object or form fields (UTF-8)."
    )
    body_template: dict[str, str] = Field(
        description="Request field -> template using {to} (E.164 with +), {to_digits}, {from}, {text}, "
        "{reference} (our unique id of the submit); write {{ and }} for literal braces."
    )
    message_id_path: str = Field(
        description="Dotted path to the message id in the JSON answer, list indexes included "
        "(e.g. messages.0.message-id)."
    )
    success_statuses: list[int] = Field(
        default_factory=lambda: [200, 201, 202], description="HTTP statuses of an accepted submit."
    )
    error_path: str | None = Field(
        default=None,
        description="Dotted path whose value means a refusal even with a success status "
        "(e.g. messages.0.error-text); its value is the reason. null, false, '' and empty lists or "
        "objects count as absent.",
    )
    status_path: str | None = Field(
        default=None, description="Dotted path to the provider's own status (e.g. messages.0.status)."
    )
    success_values: list[str] = Field(
        default_factory=list, description="Values at status_path (compared as text) of an accepted submit."
    )
    throttle_values: list[str] = Field(
        default_factory=list,
        description="Values at status_path that mean throttled with a success status (Vonage's '1').",
    )
    throttle_statuses: list[int] = Field(
        default_factory=lambda: [429],
        description="HTTP statuses meaning 'too fast': wait (Retry-After when given) and retry.",
    )
    retryable_statuses: list[int] = Field(
        default_factory=lambda: [500, 502, 503, 504],
        description="HTTP statuses after which the same submit may succeed: back off and retry.",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Longest wait for one request's answer.")
    max_concurrent: int = Field(default=32, ge=1, le=1024, description="Most requests in flight at once.")
    max_retries: int = Field(
        default=3, ge=0, description="Retries of one submit (throttled, 5xx, connection error, timeout)."
    )
    backoff_s: float = Field(default=0.5, gt=0, description="First pause before a retry; doubles each time.")
    backoff_max_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause before a retry; a longer Retry-After fails the submit (retryable) "
        "at once.",
    )
    recheck_after_s: float = Field(
        default=30.0,
        gt=0,
        description="A route found unreachable counts as reachable again after this long, so traffic "
        "tries it once more (an HTTP route has no link to watch).",
    )
    receipt: HttpReceiptSettings | None = Field(
        default=None, description="How to read the delivery receipts posted to our webhook; None: none."
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = URL(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        return value

    @field_validator("body_template")
    @classmethod
    def _known_placeholders(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            try:
                parsed = list(string.Formatter().parse(template))
            except ValueError as exc:
                raise ValueError(f"body_template[{name!r}]: {exc} (write {{{{ or }}}} for a brace)") from exc
            for _, placeholder, spec, conversion in parsed:
                if placeholder is None:
                    continue
                if placeholder not in PLACEHOLDERS:
                    known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                    raise ValueError(
                        f"body_template[{name!r}]: unknown placeholder {{{placeholder}}} (known: {known})"
                    )
                if spec or conversion:
                    raise ValueError(f"body_template[{name!r}]: write {{{placeholder}}} without ! or :")
        return value

    @field_validator("message_id_path", "error_path", "status_path")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return None if value is None else _check_path(value)

    @field_validator("success_statuses", "throttle_statuses", "retryable_statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        wrong = [status for status in value if not 100 <= status <= 599]
        if wrong:
            raise ValueError(f"not HTTP statuses: {wrong}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> HttpSettings:
        lists = {
            "success_statuses": self.success_statuses,
            "throttle_statuses": self.throttle_statuses,
            "retryable_statuses": self.retryable_statuses,
        }
        names = list(lists)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                shared = sorted(set(lists[first]) & set(lists[second]))
                if shared:
                    raise ValueError(f"{first} and {second} share {shared}")
        if not self.success_statuses:
            raise ValueError("success_statuses is empty: no submit could succeed")
        if self.status_path is None and (self.success_values or self.throttle_values):
            raise ValueError("success_values / throttle_values need status_path")
        if self.status_path is not None and not self.success_values:
            raise ValueError("status_path needs success_values")
        if self.backoff_max_s < self.backoff_s:
            raise ValueError("backoff_max_s is shorter than backoff_s")
        return self


# -- reading JSON by dotted paths -----------------------------------------------------------------


def resolve_path(data: Any, path: str) -> Any:
    """The value at dotted ``path`` (``messages.0.message-id``) in decoded JSON, or ``MISSING``.

    A segment indexes a list when the value there is a list (``-1`` is not an index), a key
    otherwise; a flat mapping whose key is the whole path (form fields named ``a.b``) matches too.
    """
    if isinstance(data, Mapping) and path in data:
        return data[path]
    value = data
    for segment in path.split("."):
        if isinstance(value, Mapping):
            if segment not in value:
                return _MISSING
            value = value[segment]
        elif isinstance(value, list):
            if not segment.isdigit() or int(segment) >= len(value):
                return _MISSING
            value = value[int(segment)]
        else:
            return _MISSING
    return value


MISSING: Any = _MISSING


def _as_text(value: Any) -> str:
    """A JSON value as the text an operator would read or a config would compare with."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False)[:SNIPPET_CHARS]


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS] + "..."


# -- the connector --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSubmitted:
    """A message the provider accepted."""

    #: The provider's id of the message (one: the provider splits long messages).
    message_ids: tuple[str, ...]
    #: When the accepted request was sent, and when its answer arrived (UTC).
    submitted_at: datetime
    acked_at: datetime
    parts: int
    #: Our ``{reference}`` of the submit.
    reference: str


@dataclass
class HttpHealth:
    """A snapshot of one HTTP connector's state and counters since it was created."""

    route: str
    kind: Literal["http"]
    #: Reachable: started, and the last request reached the provider and was not failing (or it
    #: failed more than ``recheck_after_s`` ago, or nothing was sent yet).
    bound: bool
    #: Requests sent (retries included), and submits accepted.
    submitted: int
    acknowledged: int
    #: Failed requests (refused, 5xx, connection errors, timeouts), and throttling answers.
    errors: int
    throttled: int
    #: Requests awaiting their answer.
    in_flight: int
    #: Requests sent per second over the last ~10 s.
    submit_per_s: float
    last_error: str | None
    #: Receipts read by ``HttpConnector.receipt``.
    receipts: int


@dataclass
class _Counters:
    submitted: int = 0
    acknowledged: int = 0
    errors: int = 0
    throttled: int = 0
    receipts: int = 0


@dataclass(frozen=True)
class _Retry:
    """An attempt that may succeed later: why, and the wait the provider asked for."""

    reason: str
    throttled: bool = False
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header as seconds from ``now`` (delta seconds or an HTTP date); None when
    absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _secrets(settings: HttpSettings) -> list[str]:
    """Every configured value that must not appear in a log line or an error message."""
    found: list[str] = list(settings.headers.values())
    auth = settings.auth
    if isinstance(auth, BasicAuth):
        found.append(auth.password.get_secret_value())
        found.append(_basic(auth))
    elif isinstance(auth, BearerAuth):
        found.append(auth.token.get_secret_value())
    elif isinstance(auth, HeaderAuth):
        found.append(auth.value.get_secret_value())
    url = URL(settings.url)
    if url.password:
        found.append(url.password)
    found.extend(url.query.values())
    if settings.receipt is not None and settings.receipt.secret is not None:
        found.append(settings.receipt.secret.get_secret_value())
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def _basic(auth: BasicAuth) -> str:
    """The Basic credentials (RFC 7617, UTF-8) as the Authorization header's value."""
    pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
    return f"Basic {base64.b64encode(pair).decode('ascii')}"


def _auth_headers(auth: NoAuth | BasicAuth | BearerAuth | HeaderAuth) -> dict[str, str]:
    if isinstance(auth, BasicAuth):
        return {"Authorization": _basic(auth)}
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {auth.token.get_secret_value()}"}
    if isinstance(auth, HeaderAuth):
        return {auth.name: auth.value.get_secret_value()}
    return {}


class HttpConnector:
    """One HTTP route: a client session, and ``submit`` as one request per message (with retries)."""

    def __init__(self, name: str, settings: HttpSettings) -> None:
        self.name = name
        self.settings = settings
        self._log: BoundLogger = bind(log, route=name)
        self._session: aiohttp.ClientSession | None = None
        self._semaphore = asyncio.Semaphore(settings.max_concurrent)
        self._secrets = _secrets(settings)
        url = URL(settings.url)
        #: The endpoint as logged: no credentials, no query.
        self._safe_url = str(url.with_user(None).with_query(None).with_fragment(None))
        self._in_flight = 0
        self._rate = RateMeter()
        self._reachable = True
        self._failed_at = 0.0
        self._last_error: str | None = None
        self._counters = _Counters()

    # -- the public interface -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client session (connections are made per request and kept alive)."""
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.settings.max_concurrent),
        )
        self._rate.restart()
        self._log.info("HTTP connector ready for %s", self._safe_url)

    async def stop(self) -> None:
        """Close the session; submits in flight or waiting to retry fail as retryable."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def submit(self, *, source: str, destination: str, text: str) -> HttpSubmitted:
        """Send ``text`` from ``source`` to ``destination`` (E.164) in one request, retrying
        throttled, 5xx, failed and timed-out requests; SubmitError when it was not accepted."""
        if self._session is None:
            raise SubmitError(f"route {self.name}: connector is not running", retryable=True)
        digits = destination.removeprefix("+")
        if not digits.isdigit() or len(digits) > MAX_E164_DIGITS:
            raise SubmitError(f"destination {destination!r} is not an E.164 number (+ and up to 15 digits)")
        reference = uuid.uuid4().hex
        values = {
            "to": f"+{digits}",
            "to_digits": digits,
            "from": source,
            "text": text,
            "reference": reference,
        }
        fields = {key: template.format_map(values) for key, template in self.settings.body_template.items()}
        attempts = self.settings.max_retries + 1
        retry = _Retry("no attempt")
        for attempt in range(attempts):
            if self._session is None:
                raise SubmitError(f"route {self.name}: connector stopped", retryable=True)
            outcome = await self._attempt(self._session, fields, reference)
            if isinstance(outcome, HttpSubmitted):
                return outcome
            retry = outcome
            if attempt + 1 == attempts:
                break
            delay_s = self.settings.backoff_s * 2**attempt * random.uniform(0.8, 1.0)
            if retry.retry_after_s is not None:
                if retry.retry_after_s > self.settings.backoff_max_s:
                    reason = f"{retry.reason}; the provider asks to wait {retry.retry_after_s:.0f} s"
                    raise SubmitError(f"route {self.name}: {reason}", retryable=True)
                delay_s = retry.retry_after_s
            delay_s = min(delay_s, self.settings.backoff_max_s)
            self._log.info("%s: retry %d/%d in %.2f s", retry.reason, attempt + 1, attempts - 1, delay_s)
            await asyncio.sleep(delay_s)
        reason = f"route {self.name}: {retry.reason} (after {attempts} attempts)"
        self._log.warning("%s", reason)
        raise SubmitError(reason, retryable=True)

    def health(self) -> HttpHealth:
        """The connector's state and counters now."""
        counters = self._counters
        recovered = time.monotonic() - self._failed_at >= self.settings.recheck_after_s
        return HttpHealth(
            route=self.name,
            kind="http",
            bound=self._session is not None and (self._reachable or recovered),
            submitted=counters.submitted,
            acknowledged=counters.acknowledged,
            errors=counters.errors,
            throttled=counters.throttled,
            in_flight=self._in_flight,
            submit_per_s=self._rate.per_s(),
            last_error=self._last_error,
            receipts=counters.receipts,
        )

    def receipt(self, headers: Mapping[str, str], body: bytes, content_type: str) -> DeliveryReceipt:
        """A receipt posted to this route's webhook (see ``parse_webhook``), counted."""
        receipt = parse_webhook(self.settings, headers, body, content_type)
        self._counters.receipts += 1
        return receipt

    # -- one request ----------------------------------------------------------------------------

    def _request(self, fields: dict[str, str]) -> tuple[URL, dict[str, str], bytes | None]:
        """URL, headers and body of the request carrying ``fields``."""
        settings = self.settings
        headers = {**settings.headers, **_auth_headers(settings.auth)}
        url = URL(settings.url)
        if settings.method == "GET":
            # Encoded here, not by yarl: a '+' in a query value must arrive as '+', not as a space.
            query = urllib.parse.urlencode(fields)
            if not query:
                return url, headers, None
            encoded = str(url)
            sep = "&" if url.query_string else "?"
            return URL(encoded.split("#", 1)[0] + sep + query, encoded=True), headers, None
        if settings.body == "json":
            headers.setdefault("Content-Type", "application/json")
            return url, headers, json.dumps(fields, ensure_ascii=False).encode()
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return url, headers, urllib.parse.urlencode(fields).encode("ascii")

    async def _attempt(
        self, session: aiohttp.ClientSession, fields: dict[str, str], reference: str
    ) -> HttpSubmitted | _Retry:
        """One request: the accepted submit, a reason to retry, or SubmitError (permanent)."""
        settings = self.settings
        url, headers, data = self._request(fields)
        timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        async with self._semaphore:
            self._count_request()
            self._in_flight += 1
            submitted_at = datetime.now(UTC)
            try:
                async with session.request(
                    settings.method, url, data=data, headers=headers, timeout=timeout, allow_redirects=False
                ) as response:
                    body = await response.read()
                    acked_at = datetime.now(UTC)
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except TimeoutError:
                return self._failed(f"no answer from {self._safe_url} within {settings.timeout_s} s")
            except aiohttp.ClientError as exc:
                return self._failed(f"request to {self._safe_url} failed: {self._mask(repr(exc))}")
            except RuntimeError as exc:  # the session was closed under us (stop)
                if self._session is None:
                    raise SubmitError(f"route {self.name}: connector stopped", retryable=True) from exc
                raise
            finally:
                self._in_flight -= 1
        return self._classify(status, body, retry_after, submitted_at, acked_at, reference)

    def _classify(
        self,
        status: int,
        body: bytes,
        retry_after: str | None,
        submitted_at: datetime,
        acked_at: datetime,
        reference: str,
    ) -> HttpSubmitted | _Retry:
        settings = self.settings
        if status in settings.throttle_statuses:
            self._reached(failing=False)
            self._counters.throttled += 1
            return _Retry(
                f"throttled (HTTP {status})",
                throttled=True,
                retry_after_s=parse_retry_after(retry_after, acked_at),
            )
        if status in settings.retryable_statuses:
            return self._failed(f"HTTP {status} from the provider: {self._mask(_snippet(body))}")
        try:
            answer: Any = json.loads(body) if body.strip() else _MISSING
        except (ValueError, UnicodeDecodeError):
            answer = _MISSING
        error_text = self._error_text(answer)
        if status not in settings.success_statuses:
            detail = error_text if error_text is not None else _snippet(body)
            self._refused(f"HTTP {status}: {detail}", failing=status in AUTH_FAILURE_STATUSES)
        if answer is _MISSING:
            self._refused(f"HTTP {status} with a body that is not JSON: {_snippet(body)!r}")
        if settings.status_path is not None:
            value = resolve_path(answer, settings.status_path)
            if value is _MISSING:
                self._refused(f"no {settings.status_path} in the answer: {_snippet(body)}")
            provider_status = _as_text(value)
            if provider_status in settings.throttle_values:
                self._reached(failing=False)
                self._counters.throttled += 1
                return _Retry(f"throttled ({settings.status_path} {provider_status!r})", throttled=True)
            if provider_status not in settings.success_values:
                detail = f": {error_text}" if error_text is not None else ""
                self._refused(f"{settings.status_path} {provider_status!r}{detail}")
        if error_text is not None:
            self._refused(error_text)
        message_id = resolve_path(answer, settings.message_id_path)
        if message_id is _MISSING or message_id is None or isinstance(message_id, dict | list):
            self._refused(f"no message id at {settings.message_id_path} in the answer: {_snippet(body)}")
        message_id = _as_text(message_id).strip()
        if not message_id:
            self._refused(f"an empty message id at {settings.message_id_path}")
        self._reached(failing=False)
        self._counters.acknowledged += 1
        self._log.debug(
            "accepted as %s in %.0f ms", message_id, (acked_at - submitted_at).total_seconds() * 1e3
        )
        return HttpSubmitted((message_id,), submitted_at, acked_at, 1, reference)

    def _error_text(self, answer: Any) -> str | None:
        """The provider's error at ``error_path``, when it is there and not empty."""
        if self.settings.error_path is None or answer is _MISSING:
            return None
        value = resolve_path(answer, self.settings.error_path)
        if value is _MISSING or value is None or value is False or value in ("", [], {}):
            return None
        return self._mask(_as_text(value))

    def _reached(self, *, failing: bool) -> None:
        self._reachable = not failing
        if failing:
            self._failed_at = time.monotonic()

    def _failed(self, reason: str) -> _Retry:
        """A request that may succeed later: the route counts as unreachable for now."""
        self._counters.errors += 1
        self._reached(failing=True)
        self._last_error = reason
        self._log.warning("%s", reason)
        return _Retry(reason)

    def _refused(self, reason: str, *, failing: bool = False) -> NoReturn:
        """A permanent refusal of this submit."""
        self._counters.errors += 1
        self._reached(failing=failing)
        reason = self._mask(reason)
        self._last_error = reason
        self._log.warning("submit refused: %s", reason)
        raise SubmitError(f"route {self.name}: {reason}")

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _MASK)
        return text

    def _count_request(self) -> None:
        counters = self._counters
        counters.submitted += 1
        self._rate.count()


# -- receipts on the webhook ----------------------------------------------------------------------


class WebhookError(Exception):
    """A webhook request we cannot take: ``status`` is the HTTP answer, ``reason`` says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _decode_body(body: bytes, content_type: str) -> Any:
    """The JSON value or the form fields (first value of each) of a webhook body."""
    mime, _, params = content_type.partition(";")
    mime = mime.strip().lower()
    charset = "utf-8"
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    try:
        text = body.decode(charset)
    except (LookupError, UnicodeDecodeError) as exc:
        raise WebhookError(400, f"the body is not {charset} text: {exc}") from exc
    if mime == "application/x-www-form-urlencoded":
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, encoding=charset)
        fields: dict[str, str] = {}
        for key, value in pairs:
            fields.setdefault(key, value)
        return fields
    if mime == "application/json" or mime.endswith("+json") or mime in ("", "text/plain"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise WebhookError(400, f"the body is not JSON: {exc}") from exc
    raise WebhookError(415, f"unsupported content type {mime!r}: send JSON or form fields")


def _done_at(value: Any, field_name: str) -> datetime:
    """ISO 8601 (UTC when naive) or unix seconds (milliseconds when that large) as aware UTC."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text)
            except ValueError as exc:
                raise WebhookError(
                    400, f"{field_name} {value!r} is neither ISO 8601 nor unix seconds"
                ) from exc
            return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).astimezone(UTC)
    if seconds is None or not math.isfinite(seconds):
        raise WebhookError(400, f"{field_name} {value!r} is neither ISO 8601 nor unix seconds")
    if seconds > 1e11:  # a unix time in milliseconds (seconds would be past the year 5000)
        seconds /= 1000
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise WebhookError(400, f"{field_name} {value!r} is out of range") from exc


def _stat(value: str, status_map: Mapping[str, str], field_name: str) -> str:
    if value in status_map:
        return status_map[value]
    folded = {k.casefold(): v for k, v in status_map.items()}
    if value.casefold() in folded:
        return folded[value.casefold()]
    if value.upper() in STATS:
        return value.upper()
    raise WebhookError(400, f"{field_name} {value!r} is not in status_map")


def parse_webhook(
    settings: HttpSettings, headers: Mapping[str, str], body: bytes, content_type: str
) -> DeliveryReceipt:
    """The delivery receipt in a request posted to the route's webhook.

    WebhookError: 404 when the route takes no receipts, 401 when the shared secret is missing or
    wrong, 415 for a body neither JSON nor form fields, 400 naming the missing field, the unmapped
    status value or the unreadable time.
    """
    receipt = settings.receipt
    if receipt is None:
        raise WebhookError(404, "this route has no receipt settings")
    if receipt.secret is not None:
        given = _header(headers, receipt.secret_header)
        expected = receipt.secret.get_secret_value().encode()
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise WebhookError(401, f"missing or wrong {receipt.secret_header}")
    data = _decode_body(body, content_type)

    def required(path: str) -> Any:
        value = resolve_path(data, path)
        if value is _MISSING or value is None or value == "":
            raise WebhookError(400, f"missing {path}")
        return value

    def optional(path: str | None) -> Any:
        if path is None:
            return _MISSING
        value = resolve_path(data, path)
        return _MISSING if value is None or value == "" else value

    message_id = _as_text(required(receipt.message_id_field)).strip()
    if not message_id:
        raise WebhookError(400, f"missing {receipt.message_id_field}")
    stat = _stat(_as_text(required(receipt.status_field)).strip(), receipt.status_map, receipt.status_field)
    error = optional(receipt.error_field)
    done = optional(receipt.done_at_field)
    return DeliveryReceipt(
        message_id=message_id,
        message_id_alternatives=(),
        stat=stat,
        err=None if error is _MISSING else _as_text(error),
        submit_date=None,
        done_date=None if done is _MISSING else _done_at(done, receipt.done_at_field or ""),
        dlvrd=None,
        sub=None,
        text=None,
        source="text",
        message_state=None,
        raw_text=body.decode("utf-8", errors="replace"),
    )


__all__ = [
    "MISSING",
    "PLACEHOLDERS",
    "BasicAuth",
    "BearerAuth",
    "HeaderAuth",
    "HttpAuth",
    "HttpConnector",
    "HttpHealth",
    "HttpReceiptSettings",
    "HttpSettings",
    "HttpSubmitted",
    "NoAuth",
    "WebhookError",
    "parse_retry_after",
    "parse_webhook",
    "resolve_path",
]
