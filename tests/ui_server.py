"""A real controller (``probe-fleet serve``) serving the web UI on a copy of the demo's database,
with its own mosquitto, and a headless Chromium (Debian's, driven by Playwright) to look at it.

The database comes from the session's demo run (``tests.demo_run``): agents, modems, routes,
campaigns, results and routing tables made by the simulated network. Each module gets a fresh
copy, three users (admin, operator, viewer) made with ``probe-fleet user add``, and a controller
with its scheduler and sender off (the simulated routes are gone; nothing should be sent).
Screenshots go to ``build/screenshots/`` (the CI's artefacts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.demo_run import DemoRun
from tests.mosquitto import Mosquitto, free_port, require_mosquitto

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
#: Every DNS lookup fails except loopback: the browser never reaches for the internet.
CHROMIUM_ARGS = ["--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost"]
#: The users made for the tests, by name: (role, password). One per role, and one for the login
#: throttling test (its failures lock its name out, so it is nobody else's).
USERS = {
    "admin": ("admin", "admin password 1"),
    "operator": ("operator", "operator password 1"),
    "viewer": ("viewer", "viewer password 1"),
    "throttled": ("viewer", "throttled password 1"),
}


@dataclass
class UiServer:
    """The running controller: its base URL, broker and database file."""

    url: str
    broker: Mosquitto
    database: Path
    workdir: Path
    process: subprocess.Popen[bytes]


def _cli(config: Path, *args: str, stdin: str | None = None) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the controller exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the controller did not become healthy: {log.read_text()[-3000:]}")


#: Sections of the demo's controller.toml kept, so the served controller scores (and rebuilds
#: the routing table from) the demo's results the way the demo did.
DEMO_SECTIONS = ("correlation", "scoring", "scoring.weights", "routing")


def _scoring_sections(demo_config: Path) -> str:
    """The demo's scoring and routing settings, without the window and staleness limits, so its
    results stay scored however long ago the demo ran."""
    kept: list[str] = []
    section = ""
    for line in demo_config.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[] ")
            if section in DEMO_SECTIONS:
                kept.append(line)
                if section == "scoring":
                    kept.append("window_s = 315360000")
        elif section in DEMO_SECTIONS and not line.startswith(("window_s", "stale_after_s")):
            kept.append(line)
    return "\n".join(kept) + "\n"


def start_ui_server(demo: DemoRun, workdir: Path) -> UiServer:
    """A controller on a copy of ``demo``'s database, with its own broker, and three users."""
    require_mosquitto()
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "controller.db"
    shutil.copyfile(demo.database, database)
    broker = Mosquitto(workdir)
    broker.start()
    port = free_port()
    config = workdir / "controller.toml"
    config.write_text(
        f'database_url = "sqlite:///{database}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "ui-test-controller"\n'
        "[schedule]\nenabled = false\n"
        "[sender]\nenabled = false\n"
        f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
        "[ui]\nlive_poll_interval_s = 0.5\nlogin_max_failures = 3\nlogin_window_s = 60\n"
        + _scoring_sections(demo.workdir / "controller.toml")
    )
    for name, (role, password) in USERS.items():
        _cli(config, "user", "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
    log = workdir / "controller.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
    except BaseException:
        process.kill()
        broker.stop()
        raise
    return UiServer(url=url, broker=broker, database=database, workdir=workdir, process=process)


def stop_ui_server(server: UiServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
    server.broker.stop()


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, for the module."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(
    demo_run: DemoRun, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[UiServer]:
    """A real controller for the test module (see :func:`start_ui_server`)."""
    server = start_ui_server(demo_run, tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield server
    stop_ui_server(server)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context and page per test (no cookies carried over); a JavaScript error on
    the page fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def screenshot(page: Any, name: str) -> Path:
    """Save the whole page as ``build/screenshots/<name>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Any, server: UiServer, name: str, password: str | None = None) -> None:
    """Log in through the login form as one of ``USERS``, or as any user with ``password``."""
    page.goto(f"{server.url}/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password if password is not None else USERS[name][1])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{server.url}/")


def csrf_token(page: Any) -> str:
    """The session's CSRF token, as the page carries it (``<body data-csrf>``)."""
    token = page.locator("body").get_attribute("data-csrf")
    assert token
    return str(token)


#: Form fields (not hidden) without a <label for>, an enclosing label, aria-label or aria-labelledby.
UNLABELLED_FIELDS = """
() => [...document.querySelectorAll('input, select, textarea')]
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length))
  .filter(el => !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
  .map(el => el.outerHTML.slice(0, 120))
"""

#: Visible text whose colour against its nearest opaque background is below WCAG AA (4.5:1).
LOW_CONTRAST = """
() => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const c = [r, g, b].map(v => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const background = el => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.getClientRects().length) continue;
    const fg = lum(rgb(getComputedStyle(el).color)), bg = lum(background(el));
    const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    if (ratio < 4.5) bad.push(`${el.tagName} ${el.textContent.trim().slice(0, 30)} ${ratio.toFixed(2)}`);
  }
  return bad;
}
"""


def check_accessible(page: Any) -> None:
    """Every visible form field on the page is labelled and all text has 4.5:1 contrast."""
    unlabelled = page.evaluate(UNLABELLED_FIELDS)
    assert unlabelled == [], f"{page.url}: fields without a label: {unlabelled}"
    low = page.evaluate(LOW_CONTRAST)
    assert low == [], f"{page.url}: text below 4.5:1 contrast: {low[:5]}"
