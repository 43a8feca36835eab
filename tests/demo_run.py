"""One run of ``probe-fleet demo`` per test session, shared by the tests that need a controller
filled by the simulated network: the end-to-end truth test reads its report and database, the
web UI tests serve a copy of its database.

The demo is what a user runs (mosquitto, simnet, the controller, one probe-agent per emulated
Pi); it takes ``DEMO_DURATION_S``, so the first test that asks for it needs a timeout above that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import free_port

DEMO_DURATION_S = 140
#: A test that may be the first to ask for the demo run waits this long at most.
DEMO_TIMEOUT_S = DEMO_DURATION_S + 90
#: For development only: a folder that keeps one demo run between test sessions (made when
#: missing). CI never sets it, so every CI run makes its own.
CACHE_ENV = "PROBE_FLEET_TEST_DEMO_DIR"


@dataclass(frozen=True)
class DemoRun:
    """What one demo run left: its folder (databases, truth, configs), report and output."""

    workdir: Path
    report: dict[str, Any]
    stdout: str

    @property
    def database(self) -> Path:
        return self.workdir / "controller.db"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The default scenario run for ``DEMO_DURATION_S`` (once per session)."""
    cached = os.environ.get(CACHE_ENV)
    base = Path(cached) if cached else tmp_path_factory.mktemp("demo-run")
    workdir, report_path = base / "demo", base / "report.json"
    if cached and report_path.exists():
        stdout = (base / "stdout.txt").read_text()
        return DemoRun(workdir=workdir, report=json.loads(report_path.read_text()), stdout=stdout)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--duration",
            str(DEMO_DURATION_S),
            "--report",
            str(report_path),
            "--workdir",
            str(workdir),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_DURATION_S + 35,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (base / "stdout.txt").write_text(run.stdout)
    return DemoRun(workdir=workdir, report=json.loads(report_path.read_text()), stdout=run.stdout)
