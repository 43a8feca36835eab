"""The web UI in a real browser (Debian's Chromium, headless, through Playwright) against a real
controller serving a database filled by the simulated network (``tests.ui_server``).

What is tried: no session (sent to the login page), a wrong password (an error, no session),
repeated failures (throttled), the fleet page with the demo's agents and modems, a status
change published over MQTT appearing on the open page without a reload, a POST without its
CSRF token (refused), keyboard-only use, labelled form fields and readable contrast.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from probe_agent.protocol import AgentStatus, Topics
from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import USERS, UiServer, check_accessible, log_in, screenshot

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

AGENTS = ("pi-gb-1", "pi-gb-2", "pi-fr-1", "pi-de-1")


def test_login_then_the_fleet_shows_every_agent_with_its_modems(page: Any, server: UiServer) -> None:
    page.goto(f"{server.url}/")
    assert page.url.startswith(f"{server.url}/login?next=/")
    page.get_by_label("User name").fill("viewer")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
    assert "pf_session" not in {c["name"] for c in page.context.cookies()}
    screenshot(page, "login-error")

    log_in(page, server, "viewer")
    cookie = next(c for c in page.context.cookies() if c["name"] == "pf_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    for agent in AGENTS:
        box = page.locator(f'[data-agent="{agent}"]')
        assert box.count() == 1, agent
        assert box.locator("[data-agent-state]").inner_text() in ("online", "offline", "lost")
        assert box.locator("table.modems tbody tr").count() >= 1, agent
    # the demo's handsets: every modem row names its network
    networks = {cell.strip() for cell in page.locator("table.modems tbody td:nth-child(3)").all_inner_texts()}
    assert {"23410", "20801", "26201"} <= networks
    assert page.get_by_text("viewer", exact=True).count() >= 1
    screenshot(page, "fleet")


def test_a_status_change_appears_without_a_reload(page: Any, server: UiServer) -> None:
    log_in(page, server, "viewer")
    page.evaluate("window.__notReloaded = true")
    badge = page.locator('[data-agent="pi-fr-1"] [data-agent-state]')
    page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
    now = datetime.now(UTC)
    status = AgentStatus(
        state="offline", agent="pi-fr-1", session=uuid.uuid4().hex, version="test", started_at=now, at=now
    )
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", server.broker.port)
    client.loop_start()
    try:
        info = client.publish(Topics().status("pi-fr-1"), status.to_json(), qos=1, retain=True)
        info.wait_for_publish(10)
        page.wait_for_function(
            "document.querySelector('[data-agent=\"pi-fr-1\"] [data-agent-state]').textContent === 'offline'",
            timeout=15_000,
        )
    finally:
        client.loop_stop()
        client.disconnect()
    assert badge.inner_text() == "offline"
    assert page.evaluate("window.__notReloaded") is True
    screenshot(page, "fleet-live")


def test_repeated_failed_logins_are_throttled(page: Any, server: UiServer) -> None:
    for _ in range(3):  # the test controller allows 3 failures a minute
        page.goto(f"{server.url}/login")
        page.get_by_label("User name").fill("throttled")
        page.get_by_label("Password").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        assert page.get_by_role("alert").inner_text() == "Wrong user name or password."
    page.goto(f"{server.url}/login")
    page.get_by_label("User name").fill("throttled")
    page.get_by_label("Password").fill(USERS["throttled"][1])  # right, but too late
    page.get_by_role("button", name="Log in").click()
    assert page.get_by_role("alert").inner_text().startswith("Too many failed logins")
    assert "pf_session" not in {c["name"] for c in page.context.cookies()}
    log_in(page, server, "viewer")  # the same address may still log in as someone else
    assert page.locator("[data-agent]").count() == len(AGENTS)


def test_a_post_without_its_csrf_token_is_refused(page: Any, server: UiServer) -> None:
    log_in(page, server, "admin")
    refused = page.request.post(f"{server.url}/logout", form={"csrf_token": "forged"})
    assert refused.status == 403
    assert "CSRF" in refused.text()
    page.reload()  # still logged in
    assert page.url == f"{server.url}/"
    assert page.get_by_role("button", name="Log out").count() == 1
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{server.url}/login")
    page.goto(f"{server.url}/")
    assert page.url.startswith(f"{server.url}/login")


def test_keyboard_only_login_labelled_fields_and_readable_contrast(page: Any, server: UiServer) -> None:
    page.goto(f"{server.url}/login")
    page.keyboard.press("Tab")  # the skip link comes first
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(4):  # then the brand link, then the form
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "name":
            break
    assert page.evaluate("document.activeElement.id") == "name"
    page.keyboard.type("operator")
    page.keyboard.press("Tab")
    page.keyboard.type(USERS["operator"][1])
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server.url}/")
    check_accessible(page)
    page.goto(f"{server.url}/login")
    check_accessible(page)
