"""The campaign and message pages in a real browser (Debian's Chromium through Playwright)
against a real controller serving a copy of the demo's database (``tests.ui_server``).

What is tried: a new campaign with one invalid field (cadence 0: the model's message beside
that field, the form keeps everything typed, nothing stored), then fixed and created; an edit
to a taken name and to a route deleted meanwhile (each refused at its field); pause and resume
from the list; a viewer (no buttons; GET of the forms and forged POSTs carrying the viewer's own
valid CSRF token answered 403, nothing changed); deleting a campaign with test cases (refused)
and one without (after a confirmation); today's spend with a skipped test that must not count
and a route budget used up; the messages list, a search by a probe's number typed with spaces,
by our id and by a route's part id; a message whose text and decision reason carry HTML and
script (shown as text, never run). Pure tests of the form mapping and the search parsing need
no browser.
"""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from multidict import MultiDict

from controller.web import campaign_form
from controller.web.messages import parse_search
from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import UiServer, check_accessible, csrf_token, log_in, screenshot

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

VALID = {
    "routes": ["direct"],
    "networks": ["23410"],
    "probes": [],
    "cadence_s": 300.0,
    "jitter_s": 0.0,
    "templates": ["otp"],
    "sender": "ProbeFleet",
    "allowed_hours": [],
    "timezone": "UTC",
    "daily_budget_per_route": None,
    "daily_budget_per_network": None,
    "deadline_s": None,
}


def _db(server: UiServer) -> sqlite3.Connection:
    conn = sqlite3.connect(server.database, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def _stamp(at: datetime) -> str:
    """A time as the schema stores it in SQLite (naive UTC)."""
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")


def _add_campaign(server: UiServer, name: str, **changes: Any) -> int:
    now = _stamp(datetime.now(UTC))
    with _db(server) as conn:
        cursor = conn.execute(
            "INSERT INTO campaigns (name, definition, paused, created_at, updated_at) VALUES (?, ?, 0, ?, ?)",
            (name, json.dumps({**VALID, **changes}), now, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _campaign(server: UiServer, name: str) -> sqlite3.Row | None:
    with _db(server) as conn:
        row: sqlite3.Row | None = conn.execute("SELECT * FROM campaigns WHERE name = ?", (name,)).fetchone()
        return row


def _field_error(page: Any, control: Any) -> str:
    """The error a control points to with aria-describedby (empty when none)."""
    described = (control.get_attribute("aria-describedby") or "").split()
    errors = [i for i in described if i.endswith("-error")]
    return " ".join(page.locator(f"#{e}").inner_text() for e in errors)


# --- pure: the form and the search ---------------------------------------------------------------


def test_the_form_maps_every_field_onto_the_model_and_each_error_onto_its_field() -> None:
    form = campaign_form.posted(
        MultiDict(
            [
                ("name", "  evening  "),
                ("routes", "direct"),
                ("networks", "23410"),
                ("networks", "2341x"),
                ("probes", "234100000000101,\n12"),
                ("templates", "unicode"),
                ("templates", "otp"),
                ("sender", "PF"),
                ("cadence_s", "nan"),
                ("jitter_s", "-1"),
                ("allowed_hours", "8:00-20:00, 9-10"),
                ("timezone", "Mars/Olympus"),
                ("daily_budget_per_route", "1e400"),
                ("daily_budget_per_network", ""),
                ("deadline_s", "90000"),
                ("paused", "1"),
            ]
        )
    )
    assert campaign_form.validate(form) is None
    assert form.errors == {
        "networks": ["'2341x': not an MCC-MNC (5 or 6 digits)"],
        "probes": ["'12': not an IMSI (6 to 15 digits)"],
        "cadence_s": ["'nan' is not a number: write it in digits, such as 300 or 0.5"],
        "jitter_s": ["Input should be greater than or equal to 0"],
        "allowed_hours": ["'9-10' is not a window: write HH:MM-HH:MM, such as 08:00-20:00"],
        "timezone": ["unknown time zone 'Mars/Olympus' (an IANA name such as Europe/London)"],
        "daily_budget_per_route": ["'1e400' is not a number: write it in digits, such as 300 or 0.5"],
        "deadline_s": ["Input should be less than or equal to 86400"],
    }
    assert form.values["name"] == "  evening  " and form.values["templates"] == ["unicode", "otp"]  # as typed
    assert [target for target, *_ in form.summary()][:2] == ["f-networks-1", "f-probes"]

    fixed = campaign_form.posted(
        MultiDict(
            [
                ("name", "  evening  "),
                ("routes", "direct"),
                ("probes", "234100000000101"),
                ("templates", "unicode"),
                ("templates", "otp"),
                ("sender", "PF"),
                ("cadence_s", " 600 "),
                ("jitter_s", "2.5"),
                ("allowed_hours", "22:00-06:00; 8:00 - 9:30"),
                ("timezone", "Europe/London"),
                ("daily_budget_per_route", "0.5"),
            ]
        )
    )
    campaign = campaign_form.validate(fixed)
    assert fixed.errors == {} and campaign is not None
    assert campaign.name == "evening" and campaign.paused is False
    stored = campaign.definition.model_dump(mode="json")
    assert stored["templates"] == ["unicode", "otp"] and stored["probes"] == ["234100000000101"]
    assert stored["allowed_hours"] == [
        {"start": "22:00:00", "end": "06:00:00"},
        {"start": "08:00:00", "end": "09:30:00"},
    ]
    assert stored["daily_budget_per_route"] == 0.5 and stored["daily_budget_per_network"] is None
    # and back: a stored campaign's form holds what would store it again
    again = campaign_form.stored(campaign.name, campaign.definition)
    assert again.values["allowed_hours"] == "22:00-06:00, 08:00-09:30" and again.values["cadence_s"] == "600"
    assert campaign_form.validate(again) == campaign

    targetless = campaign_form.posted(
        MultiDict(
            [("name", "x"), ("routes", "direct"), ("templates", "otp"), ("sender", "PF"), ("cadence_s", "60")]
        )
    )
    assert campaign_form.validate(targetless) is None
    assert targetless.errors == {"networks": ["give at least one network or probe to test"]}


def test_a_search_is_read_as_a_number_an_id_or_a_part_id() -> None:
    assert parse_search(" +44 (0)7802-100.101 ").e164 == "+447802100101"  # the trunk 0 goes
    assert parse_search("07802 100101").e164 is None  # national: its country is unknown
    assert parse_search("+44 7802 100101").e164 == "+447802100101"
    assert parse_search("0044 7802 100101").e164 == "+447802100101"
    assert parse_search("447802100101").e164 == "+447802100101"
    assert parse_search("447802100101").message_id is None
    assert parse_search("#517").message_id == 517 and parse_search("#517").e164 is None
    assert parse_search("99999999999").message_id is None  # beyond an id: only a number or part id
    assert parse_search("b1fb0000007f").text == "b1fb0000007f"
    assert parse_search("'; DROP TABLE messages; --").e164 is None
    assert len(parse_search("x" * 500).text) == 64


# --- campaigns -----------------------------------------------------------------------------------


def test_the_list_shows_each_campaign_with_todays_spend(page: Any, server: UiServer) -> None:
    today = datetime.now(UTC).date()
    with _db(server) as conn:
        demo = conn.execute("SELECT id, paused FROM campaigns WHERE name = 'demo'").fetchone()
        spent = conn.execute(
            "SELECT coalesce(sum(price), 0) FROM test_cases WHERE campaign_id = ? AND status != 'skipped' "
            "AND scheduled_at >= ? AND scheduled_at < ?",
            (demo["id"], today.isoformat(), (today + timedelta(days=1)).isoformat()),
        ).fetchone()[0]
    log_in(page, server, "operator")
    page.goto(f"{server.url}/campaigns")
    row = page.locator(f'tr[data-campaign="{demo["id"]}"]')
    assert row.get_by_role("link", name="demo", exact=True).count() == 1
    assert row.locator("[data-state]").inner_text() == ("paused" if demo["paused"] else "running")
    if spent:
        assert row.locator("[data-spent]").inner_text() == f"{spent:.2f}"
    else:
        assert "nothing today" in row.inner_text()
    assert page.get_by_role("link", name="New campaign").count() == 1
    check_accessible(page)
    screenshot(page, "campaigns-list")


def test_todays_spend_counts_every_state_but_skipped_against_the_budgets(page: Any, server: UiServer) -> None:
    name = f"budgeted {uuid.uuid4().hex[:6]}"
    campaign = _add_campaign(
        server, name, routes=["direct", "grey"], daily_budget_per_route=0.02, daily_budget_per_network=1
    )
    now = datetime.now(UTC)
    with _db(server) as conn:
        probe = conn.execute("SELECT imsi, msisdn, mcc_mnc FROM probes ORDER BY imsi LIMIT 1").fetchone()
        for route, status, price, at in (
            ("direct", "done", 0.01, now),
            ("direct", "failed", 0.01, now),  # unknown outcome: may have been charged
            ("direct", "skipped", 5.0, now),  # skipped: costs nothing, whatever its price says
            ("grey", "scheduled", 0.005, now),
            ("grey", "done", 7.0, now - timedelta(days=1, minutes=1)),  # yesterday
        ):
            conn.execute(
                "INSERT INTO test_cases (token, campaign_id, route, imsi, msisdn, mcc_mnc, sender, text, "
                "scheduled_at, deadline_at, status, price) VALUES (?, ?, ?, ?, ?, ?, 'PF', 'x', ?, ?, ?, ?)",
                (
                    uuid.uuid4().hex[:16],
                    campaign,
                    route,
                    probe["imsi"],
                    probe["msisdn"],
                    probe["mcc_mnc"],
                    _stamp(at),
                    _stamp(at + timedelta(minutes=5)),
                    status,
                    price,
                ),
            )
    if now.date() != (now + timedelta(seconds=5)).date():
        pytest.skip("too close to midnight UTC: the tests written for today would be yesterday's")
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/campaigns/{campaign}")
    direct = page.locator('tr[data-route="direct"]')
    assert direct.locator("[data-spent]").inner_text() == "0.02"
    assert direct.locator("span.bad").inner_text() == "100 %"  # its budget is used up
    grey = page.locator('tr[data-route="grey"]')
    assert grey.locator("[data-spent]").inner_text() == "0.005"
    assert grey.locator("span.good").inner_text() == "25 %"
    network = page.locator(f'tr[data-network="{probe["mcc_mnc"]}"]')
    assert network.locator("[data-spent]").inner_text() == "0.025"
    assert page.locator("[data-total]").inner_text() == "0.025"
    assert "in 3 tests" in page.locator("p.summary").inner_text()
    screenshot(page, "campaign-budgets")


def test_a_new_campaign_with_an_invalid_field_shows_why_there_then_is_created(
    page: Any, server: UiServer
) -> None:
    name = "UK evening <b>check</b> " + uuid.uuid4().hex[:6]  # markup in a name is text
    log_in(page, server, "operator")
    page.goto(f"{server.url}/campaigns")
    page.get_by_role("link", name="New campaign").click()
    page.wait_for_url(f"{server.url}/campaigns/new")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("group", name="Routes").get_by_label("direct").check()
    page.get_by_role("group", name="Routes").get_by_label("grey").check()
    page.get_by_label("23410 O2 - UK (GB)").check()
    page.get_by_label("unicode").check()
    page.get_by_label("Cadence (seconds)").fill("0")  # the invalid one: at least 1 s
    page.get_by_label("Jitter (seconds)").fill("5")
    page.get_by_label("Allowed hours (HH:MM-HH:MM)").fill("18:00-22:00")
    page.get_by_label("Time zone").fill("Europe/London")
    page.get_by_label("Daily budget per route (route price units)").fill("0.5")
    page.get_by_role("button", name="Create campaign").click()
    page.wait_for_load_state()

    cadence = page.get_by_label("Cadence (seconds)")
    assert cadence.get_attribute("aria-invalid") == "true"
    assert _field_error(page, cadence) == "Input should be greater than or equal to 1"
    # beside its field: in the same field box, just before the input
    box = page.locator(".field", has=page.locator("#f-cadence_s"))
    assert box.locator(".field-error").inner_text() == "Input should be greater than or equal to 1"
    assert page.locator('[aria-invalid="true"]').count() == 1  # no other field is blamed
    summary = page.get_by_role("alert")
    assert "1 problem" in summary.inner_text()
    assert summary.get_by_role("link").get_attribute("href") == "#f-cadence_s"
    # everything typed is still there
    assert page.get_by_label("Name", exact=True).input_value() == name
    assert page.get_by_role("group", name="Routes").get_by_label("grey").is_checked()
    assert page.get_by_label("23410 O2 - UK (GB)").is_checked()
    assert page.get_by_label("unicode").is_checked() and page.get_by_label("otp").is_checked()
    assert cadence.input_value() == "0"
    assert page.get_by_label("Allowed hours (HH:MM-HH:MM)").input_value() == "18:00-22:00"
    assert page.get_by_label("Time zone").input_value() == "Europe/London"
    assert _campaign(server, name) is None
    check_accessible(page)
    screenshot(page, "campaign-form-error")

    summary.get_by_role("link").click()  # the summary's link takes the keyboard to the field
    assert page.evaluate("document.activeElement.id") == "f-cadence_s"
    cadence.fill("600")
    page.get_by_role("button", name="Create campaign").click()
    page.wait_for_url(re.compile(r"/campaigns/\d+\?created=1$"))
    assert page.get_by_role("heading", level=1).inner_text() == name
    assert "Campaign created" in page.get_by_role("status").inner_text()
    stored = _campaign(server, name)
    assert stored is not None and page.url.endswith(f"/campaigns/{stored['id']}?created=1")
    definition = json.loads(stored["definition"])
    assert definition["routes"] == ["direct", "grey"] and definition["networks"] == ["23410"]
    assert definition["cadence_s"] == 600 and definition["jitter_s"] == 5
    assert definition["templates"] == ["otp", "unicode"] and definition["timezone"] == "Europe/London"
    assert definition["allowed_hours"] == [{"start": "18:00:00", "end": "22:00:00"}]
    assert definition["daily_budget_per_route"] == 0.5 and definition["daily_budget_per_network"] is None
    assert stored["paused"] == 0
    check_accessible(page)
    screenshot(page, "campaign-detail")


def test_an_edit_to_a_taken_name_or_a_vanished_route_is_refused_at_that_field(
    page: Any, server: UiServer
) -> None:
    name = f"to edit {uuid.uuid4().hex[:6]}"
    campaign = _add_campaign(server, name, jitter_s=1.5, allowed_hours=[{"start": "08:00", "end": "20:00"}])
    log_in(page, server, "operator")
    page.goto(f"{server.url}/campaigns/{campaign}")
    page.get_by_role("link", name="Edit").click()
    page.wait_for_url(f"{server.url}/campaigns/{campaign}/edit")
    assert page.get_by_label("Cadence (seconds)").input_value() == "300"
    assert page.get_by_label("Jitter (seconds)").input_value() == "1.5"
    assert page.get_by_label("Allowed hours (HH:MM-HH:MM)").input_value() == "08:00-20:00"
    assert page.get_by_label("Create it paused").count() == 0  # pausing is its own button

    page.get_by_label("Name", exact=True).fill("demo")
    page.get_by_label("Cadence (seconds)").fill("900")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_load_state()
    name_field = page.get_by_label("Name", exact=True)
    assert name_field.get_attribute("aria-invalid") == "true"
    assert _field_error(page, name_field) == "a campaign named 'demo' exists"
    assert page.get_by_label("Cadence (seconds)").input_value() == "900"

    # the route ticked is deleted before the form is sent (as if by another operator)
    page.get_by_role("group", name="Routes").get_by_label("direct").evaluate(
        "box => box.value = 'gone-route'"
    )
    name_field.fill(name + " renamed")
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_load_state()
    gone = page.get_by_label("gone-route (unknown)")
    assert gone.is_checked() and gone.get_attribute("aria-invalid") == "true"
    assert _field_error(page, gone) == "no route 'gone-route'"
    assert json.loads(_campaign(server, name)["definition"])["cadence_s"] == 300  # type: ignore[index]

    gone.uncheck()
    page.get_by_role("group", name="Routes").get_by_label("aggregator").check()
    page.get_by_role("button", name="Save changes").click()
    page.wait_for_url(f"{server.url}/campaigns/{campaign}?saved=1")
    stored = _campaign(server, name + " renamed")
    assert stored is not None and stored["id"] == campaign
    definition = json.loads(stored["definition"])
    assert definition["routes"] == ["aggregator"] and definition["cadence_s"] == 900
    assert definition["jitter_s"] == 1.5 and definition["allowed_hours"] == [
        {"start": "08:00:00", "end": "20:00:00"}
    ]


def test_pause_and_resume_from_the_list_change_the_state(page: Any, server: UiServer) -> None:
    name = f"pausable {uuid.uuid4().hex[:6]}"
    campaign = _add_campaign(server, name)
    log_in(page, server, "operator")
    page.goto(f"{server.url}/campaigns?state=running")
    row = page.locator(f'tr[data-campaign="{campaign}"]')
    assert row.locator("[data-state]").inner_text() == "running"
    row.get_by_role("button", name=f"Pause {name}").click()
    page.wait_for_url(f"{server.url}/campaigns?state=running")  # back where it was
    assert page.locator(f'tr[data-campaign="{campaign}"]').count() == 0  # no longer running
    assert _campaign(server, name)["paused"] == 1  # type: ignore[index]
    page.goto(f"{server.url}/campaigns")
    assert row.locator("[data-state]").inner_text() == "paused"
    row.get_by_role("button", name=f"Resume {name}").click()
    page.wait_for_url(f"{server.url}/campaigns")
    assert row.locator("[data-state]").inner_text() == "running"
    assert _campaign(server, name)["paused"] == 0  # type: ignore[index]


def test_a_viewer_cannot_change_a_campaign(page: Any, server: UiServer) -> None:
    with _db(server) as conn:
        before = [tuple(r) for r in conn.execute("SELECT id, name, paused, definition FROM campaigns")]
    campaign = before[0][0]
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/campaigns")
    assert page.locator("tr[data-campaign]").count() == len(before)
    assert page.get_by_role("link", name="New campaign").count() == 0
    assert page.get_by_role("button", name=re.compile("^(Pause|Resume)")).count() == 0
    assert page.get_by_role("link", name=re.compile("^Edit")).count() == 0
    page.goto(f"{server.url}/campaigns/{campaign}")
    for name in ("Edit", "Pause", "Resume", "Delete…"):
        assert page.get_by_role("link", name=name).count() == 0
        assert page.get_by_role("button", name=name).count() == 0
    for path in ("/campaigns/new", f"/campaigns/{campaign}/edit", f"/campaigns/{campaign}/delete"):
        assert page.goto(f"{server.url}{path}").status == 403, path

    page.goto(f"{server.url}/campaigns")
    token = csrf_token(page)  # the viewer's own, valid token: the role refuses, not the CSRF check
    forged = {
        "csrf_token": token,
        "name": "viewer's",
        "routes": "direct",
        "networks": "23410",
        "cadence_s": "60",
    }
    for path, form in (
        ("/campaigns/new", forged),
        (f"/campaigns/{campaign}/edit", forged),
        (f"/campaigns/{campaign}/pause", {"csrf_token": token}),
        (f"/campaigns/{campaign}/resume", {"csrf_token": token}),
        (f"/campaigns/{campaign}/delete", {"csrf_token": token}),
    ):
        response = page.request.post(f"{server.url}{path}", form=form)
        assert response.status == 403, path
        assert "needs the operator role" in response.text(), path
    with _db(server) as conn:
        assert [
            tuple(r) for r in conn.execute("SELECT id, name, paused, definition FROM campaigns")
        ] == before
    assert page.request.post(f"{server.url}/logout", form={"csrf_token": token}).ok  # the token was good


def test_delete_asks_first_and_keeps_a_campaign_with_test_cases(page: Any, server: UiServer) -> None:
    demo = _campaign(server, "demo")
    assert demo is not None
    log_in(page, server, "operator")
    page.goto(f"{server.url}/campaigns/{demo['id']}/delete")
    assert "cannot be deleted" in page.locator("main").inner_text()
    assert page.get_by_role("button", name=re.compile("^Delete")).count() == 0
    refused = page.request.post(
        f"{server.url}/campaigns/{demo['id']}/delete", form={"csrf_token": csrf_token(page)}
    )
    assert refused.status == 409 and "pause it instead" in refused.text()
    assert _campaign(server, "demo") is not None

    name = f"short-lived {uuid.uuid4().hex[:6]}"
    campaign = _add_campaign(server, name)
    page.goto(f"{server.url}/campaigns/{campaign}")
    page.get_by_role("link", name="Delete…").click()
    page.wait_for_url(f"{server.url}/campaigns/{campaign}/delete")
    assert _campaign(server, name) is not None  # asking deletes nothing
    page.get_by_role("button", name=f"Delete {name}").click()
    page.wait_for_url(f"{server.url}/campaigns?deleted=1")
    assert page.get_by_role("status").inner_text() == "Campaign deleted."
    assert _campaign(server, name) is None
    assert page.goto(f"{server.url}/campaigns/{campaign}").status == 404
    assert page.goto(f"{server.url}/campaigns/{'9' * 30}").status == 404
    assert page.goto(f"{server.url}/messages/{'9' * 30}").status == 404


# --- messages ------------------------------------------------------------------------------------


def test_the_messages_page_lists_the_demo_messages_and_finds_a_probe_by_number(
    page: Any, server: UiServer
) -> None:
    with _db(server) as conn:
        total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        newest = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        msisdn, sent = conn.execute(
            "SELECT destination, count(*) FROM messages GROUP BY destination ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        one = conn.execute(
            "SELECT m.id, m.decision, m.receipt_status, p.message_id AS part FROM messages m JOIN "
            "message_parts p ON p.message = m.id WHERE m.receipt_status IS NOT NULL ORDER BY m.id LIMIT 1"
        ).fetchone()
    assert total > 100 and sent > 1  # the demo sent through the bundled sender
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/messages")
    assert page.locator("p.summary").get_attribute("data-total") == str(total)
    rows = page.locator("tr[data-message]")
    assert rows.count() == 100  # one page
    assert rows.first.get_attribute("data-message") == str(newest)
    assert page.get_by_role("link", name="Next").count() == 1
    check_accessible(page)
    screenshot(page, "messages")

    spaced = f"{msisdn[:3]} {msisdn[3:7]} {msisdn[7:]}"  # typed as people write numbers
    page.get_by_label("Number or message id").fill(spaced)
    page.get_by_role("button", name="Search").click()
    page.wait_for_load_state()
    assert page.locator("p.summary").get_attribute("data-total") == str(sent)
    found = {cell.strip() for cell in page.locator("tr[data-message] [data-to]").all_inner_texts()}
    assert found == {msisdn} and rows.count() == min(sent, 100)
    screenshot(page, "messages-search")

    for query in (f"#{one['id']}", one["part"]):
        page.goto(f"{server.url}/messages?q={query.replace('#', '%23')}")
        assert [r.get_attribute("data-message") for r in rows.all()] == [str(one["id"])], query

    rows.first.get_by_role("link", name=str(one["id"]), exact=True).click()
    page.wait_for_url(f"{server.url}/messages/{one['id']}")
    assert page.locator("[data-reason]").inner_text() == json.loads(one["decision"])["reason"]
    assert page.locator("[data-receipt]").first.inner_text() == one["receipt_status"]
    assert one["part"] in page.locator("table.parts").inner_text()
    check_accessible(page)
    screenshot(page, "message")


def test_a_message_with_markup_in_its_text_is_shown_as_text(page: Any, server: UiServer) -> None:
    text = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> hi & bye'
    reason = "<b>no route</b> for <i>you</i>"
    with _db(server) as conn:
        message = conn.execute(
            "INSERT INTO messages (created_at, kind, destination, sender, text, decision, status, error) "
            "VALUES (?, 'api', '+447700900123', 'PF', ?, ?, 'failed', '<em>refused</em>')",
            (_stamp(datetime.now(UTC)), text, json.dumps({"route": None, "reason": reason})),
        ).lastrowid
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/messages?q=%2B447700900123")
    row = page.locator(f'tr[data-message="{message}"]')
    assert reason in row.inner_text() and "<em>refused</em>" in row.inner_text()
    page.goto(f"{server.url}/messages/{message}")
    assert page.locator("[data-text]").inner_text() == text
    assert page.locator("[data-reason]").inner_text() == reason
    assert page.locator("main img, main b, main i, main em").count() == 0
    assert page.evaluate("window.__xss") is None
    assert "no route took it" in page.locator("main").inner_text()
