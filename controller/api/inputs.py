"""What a request carries, checked before any handler sees it: the JSON body, the query string
and path parts, plus the field types the request models share.

Everything that could reach the database as a malformed value stops here with a 400 naming the
field: invalid JSON, NaN and infinite numbers (JSON columns cannot store them), NUL characters
(PostgreSQL text cannot), unknown or repeated query parameters, and times out of range.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from aiohttp import web
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, Field, ValidationError

from controller.api.errors import bad_request, from_validation, not_found

M = TypeVar("M", bound=BaseModel)

#: Characters never accepted in a text field: C0 controls (tab and newline included) and DEL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Route names are path parts, CSV cells and log fields: a conservative alphabet keeps them safe.
ROUTE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
#: The largest id a path or filter may name: PostgreSQL's integer, beyond which a query would fail.
MAX_ID = 2**31 - 1
#: A query time written with "+hh:mm" whose "+" the query string turned into a space.
_PLUS_AS_SPACE = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+) (\d\d:?\d\d)$")


def _plain_text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters (newline, tab, NUL, ...) are not allowed")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


#: A one-line, non-blank text: names, operator names.
Text = Annotated[str, AfterValidator(_plain_text)]
#: A route name, as the routes table keys it.
RouteName = Annotated[str, Field(pattern=ROUTE_NAME_PATTERN, description="Route name.")]


def _restore_plus(value: Any) -> Any:
    if isinstance(value, str) and (match := _PLUS_AS_SPACE.match(value)):
        return f"{match.group(1)}+{match.group(2)}"
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range") from None


#: A time in a query: RFC 3339 with a zone (``Z`` or an offset), kept as UTC.
QueryTime = Annotated[AwareDatetime, BeforeValidator(_restore_plus), AfterValidator(_to_utc)]


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _nul_in_strings(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(raw: bytes) -> Any:
    """The request body as JSON, or a 400 saying why not."""
    if not raw.strip():
        raise bad_request("the request body is empty: send a JSON object", "body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8", "body") from None
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request("the request body is nested too deeply", "body") from None
    except ValueError as exc:  # JSONDecodeError, a huge integer, NaN / Infinity
        raise bad_request(f"the request body is not valid JSON: {exc}", "body") from None
    if _nul_in_strings(value):
        raise bad_request("NUL characters are not allowed in the request body", "body")
    return value


def parse_body(raw: bytes, model: type[M]) -> M:
    """The request body validated by ``model``; a 400 names each field it refuses."""
    value = parse_json(raw)
    if not isinstance(value, dict):
        raise bad_request("the request body must be a JSON object", "body")
    try:
        # Strict: JSON true is not 1 second, "5" is not a number; times still come as strings.
        body = model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise from_validation(exc) from None
    where = _non_finite(body.model_dump(mode="python"))
    if where is not None:  # "inf" as a string passes a lax float field; JSON columns refuse it
        raise bad_request(f"{where or 'body'}: number out of range", where or "body")
    return body


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite float in a dumped model, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    children: Any = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    )
    for key, child in children:
        found = _non_finite(child, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def no_nulls(changes: dict[str, Any], *fields: str) -> dict[str, Any]:
    """The changes of a PATCH body, refusing null for fields that cannot be empty."""
    for name in fields:
        if name in changes and changes[name] is None:
            raise bad_request(f"{name}: may not be null (leave it out to keep it)", name)
    return changes


def _query_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def parse_query(request: web.Request, model: type[M] | None) -> M | None:
    """The query string validated by ``model`` (whose fields are the parameters this endpoint
    takes); an unknown or repeated parameter is a 400, as is any query when ``model`` is None."""
    names = _query_names(model) if model else []
    data: dict[str, str] = {}
    for key in request.query:
        if key not in names:
            takes = f"it takes: {', '.join(names)}" if names else "it takes none"
            raise bad_request(f"unknown query parameter {key[:64]!r}; {takes}", key[:64])
        values = request.query.getall(key)
        if len(values) > 1:
            raise bad_request(f"query parameter {key!r} given more than once", key)
        if "\x00" in values[0]:
            raise bad_request("NUL characters are not allowed", key)
        data[key] = values[0]
    if model is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc, what="query") from None


def path_id(request: web.Request, name: str, what: str) -> int:
    """An integer id from the path; anything that cannot be one is a 404 (no such object)."""
    text = request.match_info[name]
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and 0 < int(text) <= MAX_ID):
        raise not_found(f"no {what} {text[:64]!r}", name)
    return int(text)


def path_text(request: web.Request, name: str, what: str, pattern: str) -> str:
    """A textual key from the path, which must match the key's pattern, else 404."""
    text = request.match_info[name]
    if not re.fullmatch(pattern.strip("^$"), text):
        raise not_found(f"no {what} {text[:64]!r}", name)
    return text
