"""Changing a route (enabled, prices) in a real browser (Debian's Chromium through Playwright)
against a real controller serving a copy of the demo's database (``tests.ui_server``).

What is tried: an operator opens the form from the route's page (prefilled from the database),
saves a line that is not a price and then a negative price (each refused beside the field by
the REST API's own model, nothing written), then disables the route with new prices (written,
the route page shows it disabled); a viewer sees no edit link, and the form's GET and a POST
carrying the viewer's own valid CSRF token are answered 403 with nothing written. The price
parsing is also checked on its own.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

import pytest

from controller.web.route_edit import check, parse_prices, prices_text
from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import UiServer, check_accessible, csrf_token, log_in, screenshot

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)


def _route(server: UiServer, name: str) -> tuple[int, dict[str, float]]:
    with sqlite3.connect(server.database, timeout=10) as db:
        enabled, prices = db.execute("SELECT enabled, prices FROM routes WHERE name = ?", (name,)).fetchone()
    return enabled, json.loads(prices)


def test_prices_are_parsed_line_by_line_and_checked_by_the_api_model() -> None:
    assert parse_prices("23410 0.012\n\n# comment\n26201, 0.5\n20801=1\n20810: 2e-3\n") == {
        "23410": "0.012",
        "26201": "0.5",
        "20801": "1",
        "20810": "2e-3",
    }
    with pytest.raises(ValueError, match="line 2: write the MCC-MNC"):
        parse_prices("23410 0.01\n23415")
    with pytest.raises(ValueError, match="line 2: 23410 is given twice"):
        parse_prices("23410 0.01\n23410 0.02")
    assert prices_text({"26201": 0.5, "23410": 0.012}) == "23410 0.012\n26201 0.5"
    changes, form = check(False, "23410 0.012")
    assert changes == {"enabled": False, "prices": {"23410": 0.012}} and not form.errors
    for text, problem in (
        ("23410 -1", "greater than or equal to 0"),
        ("2341 0.1", "2341"),
        ("23410 x", "number"),
    ):
        changes, form = check(True, text)
        assert changes is None and problem in (form.error("prices") or ""), (text, form.errors)
        assert form.values["prices"] == text  # kept as typed


def test_an_operator_disables_a_route_and_changes_its_prices(page: Any, server: UiServer) -> None:
    name = "degrading"
    enabled, prices = _route(server, name)
    assert enabled == 1 and prices
    log_in(page, server, "operator")
    page.goto(f"{server.url}/routes/{name}")
    page.get_by_role("link", name="Edit route").click()
    page.wait_for_url(f"{server.url}/routes/{name}/edit")
    check_accessible(page)
    field = page.get_by_label("Prices per network")
    assert parse_prices(field.input_value()) == {k: f"{v:g}" for k, v in prices.items()}
    assert page.get_by_label("Enabled").is_checked()

    for text, problem in (("23410 cheap", "number"), ("23410 -0.5", "greater than or equal to 0")):
        field.fill(text)
        page.get_by_role("button", name="Save route").click()
        assert field.get_attribute("aria-invalid") == "true"
        assert problem in page.locator("#f-prices-error").inner_text()
        assert field.input_value() == text
        assert _route(server, name) == (enabled, prices)
    screenshot(page, "route-edit-invalid")

    page.get_by_label("Enabled").uncheck()
    field.fill("23410 0.02\n26201, 0.015\n")
    page.get_by_role("button", name="Save route").click()
    page.wait_for_url(re.compile(rf"/routes/{name}\?saved=1"))
    assert page.get_by_role("status").inner_text().startswith("Route saved")
    assert page.locator("h1 .badge").inner_text() == "disabled"
    assert _route(server, name) == (0, {"23410": 0.02, "26201": 0.015})
    screenshot(page, "route-edit-saved")


def test_a_viewer_cannot_change_a_route(page: Any, server: UiServer) -> None:
    name = "direct"
    before = _route(server, name)
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routes/{name}")
    assert page.get_by_role("link", name="Edit route").count() == 0
    token = csrf_token(page)
    assert page.goto(f"{server.url}/routes/{name}/edit").status == 403
    response = page.request.post(
        f"{server.url}/routes/{name}/edit", form={"csrf_token": token, "prices": "23410 9", "enabled": ""}
    )
    assert response.status == 403 and "needs the operator role" in response.text()
    assert _route(server, name) == before
