"""Structured logs: one line per record, as text or JSON, naming what the record is about.

An operator of a fleet greps one agent's journal for a modem or an observation id, and ships the
same lines to a log store as JSON; so every record carries its context (agent, modem,
observation, route, test id, transaction) as fields rather than inside the message. Code passes
them with ``extra=`` or binds them once with ``bind``. Times are UTC with milliseconds and a
'Z', whatever the Pi's time zone.

Text: ``2026-11-26T10:00:00.123Z INFO probe_agent.uplink published agent=pi-1 modem=m1``
JSON: ``{"ts": "2026-11-26T10:00:00.123Z", "level": "INFO", "logger": ..., "message": ..., "agent": ...}``
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import time
from collections.abc import Iterator, MutableMapping
from typing import IO, Any

#: The context fields a record may carry, in the order they are printed.
CONTEXT_FIELDS: tuple[str, ...] = (
    "agent",
    "modem",
    "observation",
    "route",
    "test_id",
    "transaction",
    "message_id",
    "system_id",
    "instance",
)


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-26T10:00:00.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _context(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key in CONTEXT_FIELDS:
        value = record.__dict__.get(key)
        if value is not None:
            yield key, value


def _logfmt(value: Any) -> str:
    """A value as logfmt writes it: bare, or JSON-quoted when it has spaces, quotes or '='."""
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        return jsonlib.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger message key=value ...``, then the traceback on the following lines."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        parts.extend(f"{key}={_logfmt(value)}" for key, value in _context(record))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context fields present, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _context(record):
            entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler ``setup_logging`` installs, told apart so a second call replaces it."""


def setup_logging(level: str = "INFO", json: bool = False, stream: IO[str] | None = None) -> None:
    """Log records at ``level`` and above to ``stream`` (stderr by default), as text or JSON.

    Replaces the handler of an earlier call, and leaves other handlers (a test's capture) alone.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)


class BoundLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records all carry some context fields; ``extra=`` at a call adds to them
    and wins over a bound field of the same name."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def bind(logger: logging.Logger | logging.LoggerAdapter[Any], **fields: Any) -> BoundLogger:
    """A logger adding ``fields`` (any of CONTEXT_FIELDS) to every record; binding an already
    bound logger adds to its fields. TypeError names a field that is not a context field."""
    unknown = sorted(set(fields) - set(CONTEXT_FIELDS))
    if unknown:
        raise TypeError(f"not a log context field: {', '.join(unknown)} (one of {', '.join(CONTEXT_FIELDS)})")
    if isinstance(logger, logging.LoggerAdapter):
        fields = {**(logger.extra or {}), **fields}
        while isinstance(logger, logging.LoggerAdapter):
            logger = logger.logger
    return BoundLogger(logger, fields)
