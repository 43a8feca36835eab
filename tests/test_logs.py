"""Structured logs: the text and JSON line formats, UTC timestamps, context fields from ``extra=``
and from ``bind``, tracebacks, non-ASCII text, and setup that leaves other handlers alone."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from probe_agent.logs import CONTEXT_FIELDS, JsonFormatter, TextFormatter, bind, setup_logging

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local time zone far from UTC, so a local-time timestamp would show."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def record(msg: str = "hello", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("probe_agent.uplink", logging.INFO, __file__, 1, msg, (), None)
    rec.created = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC).timestamp() + 0.123
    rec.msecs = 123.0
    rec.__dict__.update(extra)
    return rec


@pytest.mark.usefixtures("new_york")
def test_text_format_exact() -> None:
    line = TextFormatter().format(record("published", agent="pi-1", observation="obs-9", modem="m1"))
    # context fields in their fixed order, whatever order they were given in
    assert (
        line
        == "2026-11-26T10:00:00.123Z INFO probe_agent.uplink published agent=pi-1 modem=m1 observation=obs-9"
    )


@pytest.mark.usefixtures("new_york")
def test_json_format_exact() -> None:
    line = JsonFormatter().format(record(agent="pi-1", route="smpp-a", test_id=42, transaction="tx 1"))
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": "2026-11-26T10:00:00.123Z",
        "level": "INFO",
        "logger": "probe_agent.uplink",
        "message": "hello",
        "agent": "pi-1",
        "route": "smpp-a",
        "test_id": 42,
        "transaction": "tx 1",
    }


def test_text_quotes_values_with_spaces() -> None:
    line = TextFormatter().format(record(modem='a "b" c', route="", transaction="k=v"))
    assert line.endswith(' modem="a \\"b\\" c" route="" transaction="k=v"')


def test_setup_text_through_the_root_logger() -> None:
    out = io.StringIO()
    setup_logging("debug", stream=out)
    before = datetime.now(UTC)
    logging.getLogger("tests.logs").debug("read %d parts of %s", 2, "Grüße, 你好 ✓", extra={"modem": "m1"})
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    m = re.fullmatch(rf"({TS}) DEBUG tests\.logs read 2 parts of Grüße, 你好 ✓ modem=m1\n", line)
    assert m, line
    stamp = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(stamp - before) < timedelta(seconds=5)


def test_setup_json_with_traceback_and_non_ascii() -> None:
    out = io.StringIO()
    setup_logging("INFO", json=True, stream=out)
    log = logging.getLogger("tests.logs")
    log.debug("below the level")
    try:
        raise RuntimeError("modem dit: «erreur»")
    except RuntimeError:
        log.warning("reset failed for %s", "m2", exc_info=True, extra={"agent": "pi-1", "modem": "m2"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "«erreur»" in lines[0]  # written as is, not \u-escaped
    entry = json.loads(lines[0])
    assert set(entry) == {"ts", "level", "logger", "message", "agent", "modem", "exc"}
    assert re.fullmatch(TS, entry["ts"])
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING",
        "tests.logs",
        "reset failed for m2",
    )
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].endswith("RuntimeError: modem dit: «erreur»")


def test_text_traceback_follows_the_line() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        rec = record("boom")
        rec.exc_info = sys.exc_info()
    lines = TextFormatter().format(rec).splitlines()
    assert lines[0] == "2026-11-26T10:00:00.123Z INFO probe_agent.uplink boom"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_bind_adds_fields_and_extra_wins() -> None:
    out = io.StringIO()
    setup_logging(json=True, stream=out)
    log = bind(logging.getLogger("tests.logs"), agent="pi-1", modem="m1")
    log.info("one")
    log.info("two", extra={"observation": "obs-1", "modem": "m2"})
    bind(log, transaction="t-7").info("three")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert (first["agent"], first["modem"], "observation" in first) == ("pi-1", "m1", False)
    assert (second["agent"], second["modem"], second["observation"]) == ("pi-1", "m2", "obs-1")
    assert (third["agent"], third["modem"], third["transaction"]) == ("pi-1", "m1", "t-7")


def test_bind_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="port"):
        bind(logging.getLogger("tests.logs"), agent="pi-1", port="/dev/ttyUSB0")
    assert "agent" in CONTEXT_FIELDS


def test_setup_replaces_its_handler_and_keeps_others(caplog: pytest.LogCaptureFixture) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(stream=first)
    setup_logging(stream=second)
    logging.getLogger("tests.logs").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert [r.getMessage() for r in caplog.records if r.name == "tests.logs"] == ["once"]


def test_level_filter_and_bad_level() -> None:
    out = io.StringIO()
    setup_logging("WARNING", stream=out)
    logging.getLogger("tests.logs").info("hidden")
    logging.getLogger("tests.logs").warning("shown")
    assert "hidden" not in out.getvalue()
    assert " WARNING tests.logs shown" in out.getvalue()
    with pytest.raises(ValueError, match="LOUD"):
        setup_logging("LOUD")
