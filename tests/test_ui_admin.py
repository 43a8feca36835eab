"""Users and API tokens in a real browser (Debian's Chromium through Playwright) against a real
controller serving a copy of the demo's database (``tests.ui_server``).

What is tried: adding a user with a short password, then two passwords that differ (each
message beside its field, nothing stored), then properly, and the new user logging in; changing
a role; disabling a user who is logged in elsewhere (their next page is the login page); an
admin disabling themselves, or demoting themselves while the last enabled admin (refused,
nothing changed); a token made
on the page, shown once (not on the next visit, the answer not cacheable), accepted by the REST
API, then revoked (refused from then on); an operator and a viewer: no links, GETs answered 403,
POSTs with their own valid CSRF token answered 403, nothing stored.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import UiServer, check_accessible, csrf_token, log_in, screenshot

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

PASSWORD = "dana's good password"


def _users(server: UiServer) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(server.database, timeout=10) as db:
        return {
            name: (role, disabled)
            for name, role, disabled in db.execute("SELECT name, role, disabled FROM users")
        }


def _api_status(server: UiServer, token: str) -> int:
    request = urllib.request.Request(
        f"{server.url}/api/v1/agents", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.load(response)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_an_admin_adds_a_user_who_then_logs_in(page: Any, server: UiServer, browser: Any) -> None:
    log_in(page, server, "admin")
    page.get_by_role("link", name="Users").click()
    page.wait_for_url(f"{server.url}/users")
    check_accessible(page)
    for name in ("admin", "operator", "viewer"):
        assert page.get_by_role("link", name=name, exact=True).count() == 1

    page.get_by_label("User name").fill("dana")
    page.get_by_label("Role").select_option("operator")
    page.get_by_label("Password", exact=True).fill("short")
    page.get_by_label("Password again").fill("short")
    page.get_by_role("button", name="Add user").click()
    password = page.get_by_label("Password", exact=True)
    assert password.get_attribute("aria-invalid") == "true"
    assert "at least 10" in page.locator("#f-password-error").inner_text()
    assert page.get_by_label("User name").input_value() == "dana"  # what was typed is kept
    assert page.get_by_label("Role").input_value() == "operator"
    screenshot(page, "users-invalid")

    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD + "x")
    page.get_by_role("button", name="Add user").click()
    assert "differ" in page.locator("#f-password_again-error").inner_text()
    assert "dana" not in _users(server)

    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Add user").click()
    page.wait_for_url(re.compile(r"/users\?added=1"))
    assert page.get_by_role("status").inner_text().startswith("User added")
    assert _users(server)["dana"] == ("operator", 0)
    screenshot(page, "users")

    other = browser.new_context()
    try:
        dana = other.new_page()
        log_in(dana, server, "dana", PASSWORD)
        assert "dana" in dana.locator(".who").inner_text()
        assert dana.get_by_role("link", name="Users").count() == 0  # an operator has no access pages
    finally:
        other.close()


def test_role_change_disable_and_the_last_admin(page: Any, server: UiServer, browser: Any) -> None:
    name = "erin"
    log_in(page, server, "admin")
    page.goto(f"{server.url}/users")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password again").fill(PASSWORD)
    page.get_by_role("button", name="Add user").click()
    page.wait_for_url(re.compile(r"/users\?added=1"))

    other = browser.new_context()
    try:
        erin = other.new_page()
        log_in(erin, server, name, PASSWORD)

        page.goto(f"{server.url}/users/{name}")
        check_accessible(page)
        page.get_by_label("Role").select_option("operator")
        page.get_by_role("button", name="Change role").click()
        page.wait_for_url(re.compile(r"\?role=1"))
        assert _users(server)[name] == ("operator", 0)

        page.get_by_role("button", name=f"Disable {name}").click()
        page.wait_for_url(re.compile(r"\?disabled=1"))
        assert _users(server)[name] == ("operator", 1)
        erin.goto(f"{server.url}/campaigns")  # their session ended with the disable
        assert erin.url.startswith(f"{server.url}/login")
        screenshot(page, "user")
        page.get_by_role("button", name=f"Enable {name}").click()
        page.wait_for_url(re.compile(r"\?enabled=1"))
        assert _users(server)[name] == ("operator", 0)
    finally:
        other.close()

    others = [n for n, (role, off) in _users(server).items() if role == "admin" and not off and n != "admin"]
    for other_admin in others:  # the demo's own admin: leave "admin" the last enabled one
        page.goto(f"{server.url}/users/{other_admin}")
        page.get_by_role("button", name=f"Disable {other_admin}").click()
        page.wait_for_url(re.compile(r"\?disabled=1"))
    page.goto(f"{server.url}/users/admin")
    page.get_by_role("button", name="Disable admin").click()
    assert "cannot disable yourself" in page.get_by_role("alert").inner_text()
    page.get_by_label("Role").select_option("operator")
    page.get_by_role("button", name="Change role").click()
    assert "last enabled admin" in page.locator("#f-role-error").inner_text()
    assert _users(server)["admin"] == ("admin", 0)
    for other_admin in others:
        page.goto(f"{server.url}/users/{other_admin}")
        page.get_by_role("button", name=f"Enable {other_admin}").click()
        page.wait_for_url(re.compile(r"\?enabled=1"))


def test_a_token_is_shown_once_works_and_can_be_revoked(page: Any, server: UiServer) -> None:
    log_in(page, server, "admin")
    page.get_by_role("link", name="API tokens").click()
    page.wait_for_url(f"{server.url}/tokens")
    page.get_by_label("Token name").fill("bad name!")
    page.get_by_role("button", name="Make token").click()
    assert page.get_by_label("Token name").get_attribute("aria-invalid") == "true"

    page.get_by_label("Token name").fill("billing-export")
    page.get_by_label("Role").select_option("viewer")
    with page.expect_response(lambda r: r.url.endswith("/tokens/new")) as answer:
        page.get_by_role("button", name="Make token").click()
    assert answer.value.status == 201
    assert answer.value.headers["cache-control"] == "no-store"
    token = page.get_by_label("Token for billing-export").input_value()
    assert token.startswith("pf_") and len(token) > 40
    check_accessible(page)
    screenshot(page, "tokens-made")
    assert _api_status(server, token) == 200

    page.goto(f"{server.url}/tokens")  # never shown again
    assert token not in page.content()
    row = page.locator("tr", has_text="billing-export")
    assert "live" in row.inner_text()
    row.get_by_role("button", name="Revoke billing-export").click()
    page.wait_for_url(re.compile(r"/tokens\?revoked=1"))
    assert "revoked" in page.locator("tr", has_text="billing-export").inner_text()
    assert _api_status(server, token) == 401


@pytest.mark.parametrize("who", ["operator", "viewer"])
def test_only_admins_manage_users_and_tokens(page: Any, server: UiServer, who: str) -> None:
    before = _users(server)
    log_in(page, server, who)
    assert page.get_by_role("link", name="Users").count() == 0
    assert page.get_by_role("link", name="API tokens").count() == 0
    token = csrf_token(page)
    for path in ("/users", "/users/admin", "/tokens"):
        assert page.goto(f"{server.url}{path}").status == 403, path
    form = {"csrf_token": token, "name": f"{who}-made", "role": "admin", "password": PASSWORD}
    form["password_again"] = PASSWORD
    for path, posted in (
        ("/users/new", form),
        ("/users/admin/role", {"csrf_token": token, "role": "viewer"}),
        ("/users/admin/password", form),
        ("/users/admin/disable", {"csrf_token": token}),
        ("/tokens/new", form),
        ("/tokens/anything/revoke", {"csrf_token": token}),
    ):
        response = page.request.post(f"{server.url}{path}", form=posted)
        assert response.status == 403, path
        assert "needs the admin role" in response.text(), path
    assert _users(server) == before
    with sqlite3.connect(server.database, timeout=10) as db:
        assert db.execute("SELECT count(*) FROM api_tokens WHERE name = ?", (f"{who}-made",)).fetchone() == (
            0,
        )
