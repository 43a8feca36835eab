"""The API's one error shape, ``{"error": ..., "field": ..., "problems": [...]}``, and the
exceptions that produce it.

Handlers raise :class:`ApiError` (or let a pydantic ``ValidationError`` through
:func:`from_validation`); the error middleware in ``controller.api.app`` turns those, aiohttp's
own HTTP errors (404, 405, 413) and anything unexpected (a logged 500) into this shape, so a
client parses one kind of error body whatever went wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails


class Problem(BaseModel):
    """One thing wrong with a request."""

    model_config = ConfigDict(frozen=True)

    field: str | None = Field(description="The field, query parameter or path part at fault (dotted path).")
    error: str = Field(description="What is wrong with it, in words.")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx body."""

    model_config = ConfigDict(frozen=True)

    error: str = Field(description="What went wrong, in words (the first problem when there are several).")
    field: str | None = Field(None, description="The field at fault, when one is (dotted path).")
    problems: list[Problem] = Field(
        default_factory=list, description="Every problem found, when a body or query had more than one."
    )


class ApiError(Exception):
    """A request the API refuses: its status, message, the field at fault and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        *,
        problems: Sequence[Problem] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.problems = list(problems)
        self.headers = dict(headers or {})

    def body(self) -> ErrorBody:
        """The error as the client sees it."""
        return ErrorBody(error=self.message, field=self.field, problems=self.problems)


def bad_request(message: str, field: str | None = None) -> ApiError:
    """400: the request is malformed or a value is invalid."""
    return ApiError(400, message, field)


def not_found(message: str, field: str | None = None) -> ApiError:
    """404: no such object."""
    return ApiError(404, message, field)


def conflict(message: str, field: str | None = None) -> ApiError:
    """409: the request contradicts what is stored (a duplicate name, a referenced object)."""
    return ApiError(409, message, field)


def _field(loc: Sequence[int | str], prefix: str | None) -> str | None:
    parts = [str(part) for part in loc]
    if prefix:
        parts.insert(0, prefix)
    return ".".join(parts) or None


def error_text(error: ErrorDetails) -> str:
    """One pydantic error in words (without pydantic's prefix on our validators' messages)."""
    if error["type"] == "extra_forbidden":
        return "unknown field"
    text = error["msg"]
    # pydantic prefixes the message of a ValueError raised in a validator; the words are ours.
    for prefix in ("Value error, ", "Assertion failed, "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def from_validation(exc: ValidationError, *, prefix: str | None = None, what: str = "body") -> ApiError:
    """A 400 naming every field pydantic refused; ``prefix`` puts the fields under a parent
    (``definition`` for a campaign's definition), ``what`` names the whole when the error is
    about it rather than a field (a body that is not a JSON object)."""
    problems = [
        Problem(field=_field(error["loc"], prefix) or prefix or what, error=error_text(error))
        for error in exc.errors(include_url=False, include_input=False)
    ]
    first = problems[0]
    message = f"{first.field}: {first.error}" if first.field else first.error
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return ApiError(400, message, first.field, problems=problems)
