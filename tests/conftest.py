"""Shared fixtures: virtual modems on real ptys, and a guard that fails a test whose
background threads logged an unhandled error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hardware.virtual_modem import VirtualModem

#: Fixtures for every test module: databases (SQLite file, a fresh PostgreSQL database), brokers,
#: the demo run (session-scoped: one run shared by every module, which a fixture imported into
#: each module would not be) and the web UI's server and browser.
pytest_plugins = ("tests.db", "tests.mosquitto", "tests.demo_run", "tests.ui_server")


@pytest.fixture
def make_modem(tmp_path: Path) -> Iterator[Callable[..., VirtualModem]]:
    """Start virtual modems with a udev-like link under the test's tmp dir; stop them after."""
    started: list[VirtualModem] = []

    def factory(profile: str = "generic", **kwargs: object) -> VirtualModem:
        kwargs.setdefault("link", tmp_path / f"ttyGSM{len(started)}")
        modem = VirtualModem(profile, **kwargs).start()  # type: ignore[arg-type]
        started.append(modem)
        return modem

    yield factory
    for modem in started:
        modem.stop()


@pytest.fixture(autouse=True)
def fail_on_logged_crash(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A worker or reader thread that logs an exception fails the test, even if it recovered."""
    caplog.set_level(logging.INFO)
    yield
    crashes = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.exc_info and r.name.startswith(("probe_agent", "hardware"))
    ]
    assert not crashes, "background error logged: " + "; ".join(r.getMessage() for r in crashes)
