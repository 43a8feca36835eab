"""The routing table pages and the probe page in a real browser (Debian's Chromium, headless,
through Playwright) against a real controller serving the demo's database (``tests.ui_server``),
and their query counts in process.

What is tried: the table page against the stored newest version (every network, routes in the
stored order, weights summing to 100 %), a country filter, the history against the stored
versions, a diff between two stored versions whose order differs, the CSV download (clicked,
parsed) against the REST API's CSV of the same version (a token made with ``probe-fleet token
add``), the JSON download against the stored row; a version that is not a number, one that
does not exist, an IMSI that is markup; an SMS whose text is HTML with a script and an image
with an onerror handler, published over MQTT as an agent would (shown as text, nothing from it
in the DOM, listed as unsolicited: the CSP alone would stop the script, so the test looks for
the elements, not only for the script's effect); a signal change and a registration change
published over MQTT (in the signal history and the state changes after a reload). In process:
each page makes the same number of queries for a table of 300 networks x 100 routes and a probe
with 600 SMS and samples as for a tiny one.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import event, insert
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api.app import make_app
from controller.config import ControllerConfig
from controller.ingest import SAMPLE_EVERY
from controller.storage import schema as s
from controller.storage.db import open_database
from controller.web.users import add_user
from hardware.sms_pdu import encode_deliver
from probe_agent.protocol import (
    ClockState,
    ModemState,
    Observation,
    RouteChoice,
    RoutingTable,
    SimIdentity,
    Topics,
)
from tests.db import postgres_database
from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import UiServer, check_accessible, log_in, screenshot

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

NETWORKS = ("20801", "20810", "23410", "23415", "23420", "26201", "26202", "26203")
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


def query(server: UiServer, sql: str, *args: Any) -> list[Any]:
    with sqlite3.connect(server.database) as db:
        return db.execute(sql, args).fetchall()


def stored_tables(server: UiServer) -> dict[int, dict[str, Any]]:
    return {v: json.loads(t) for v, t in query(server, 'SELECT version, "table" FROM routing_tables')}


def publish(server: UiServer, topic: str, payload: bytes, retain: bool = False) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", server.broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def wait_until(check: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the controller did not ingest it in time"
        time.sleep(0.2)


def test_the_table_shows_every_network_with_its_routes_in_order(page: Any, server: UiServer) -> None:
    tables = stored_tables(server)
    newest = tables[max(tables)]
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routing-table")
    assert page.locator("[data-version]").inner_text() == str(newest["version"])
    assert set(newest["networks"]) == set(NETWORKS)
    for network in NETWORKS:
        body = page.locator(f'tbody[data-network="{network}"]')
        routes = body.locator("tr[data-route]")
        shown = [routes.nth(i).get_attribute("data-route") for i in range(routes.count())]
        assert shown == [c["route"] for c in newest["networks"][network]], network
        roles = body.locator(".badge.choice").all_inner_texts()
        assert "direct" in shown and roles == [c["role"] for c in newest["networks"][network]], network
        weights = [
            float(w)
            for w in body.locator("td[data-weight]").evaluate_all("l => l.map(e => e.dataset.weight)")
        ]
        assert sum(weights) == pytest.approx(1.0, abs=0.002), network
        assert body.locator("[data-total]").inner_text() == "weights 100.0 %"
        reasons = body.locator("td.reason").all_inner_texts()
        assert reasons == [c["reason"] for c in newest["networks"][network]], network
    check_accessible(page)
    screenshot(page, "routing-table")
    scored = max(
        v for v, t in tables.items() if any(c["role"] == "primary" for n in t["networks"].values() for c in n)
    )
    page.goto(f"{server.url}/routing-table?version={scored}")
    # the newest version has no "older" badge; any other one does (checked first: no badge to wait for)
    assert scored == max(tables) or page.locator(".badge.warn").inner_text() == "an older version"
    screenshot(page, "routing-table-scored")

    page.get_by_label("Country").select_option("FR")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url("**country=FR**")
    shown = page.locator("tbody[data-network]").evaluate_all("l => l.map(e => e.dataset.network)")
    assert shown == ["20801", "20810"]


def _differing(tables: dict[int, dict[str, Any]]) -> tuple[int, str, list[str], list[str]]:
    """Two consecutive stored versions where a network's route order differs, the pair with
    the fewest networks changed (so the diff also leaves some out): (the newer version, the
    network, the old order, the new order)."""
    found = []
    for version in sorted(tables):
        old = tables.get(version - 1)
        if old is None:
            continue
        new = tables[version]["networks"]
        changed = sum(1 for n in set(new) | set(old["networks"]) if new.get(n) != old["networks"].get(n))
        for network, choices in sorted(new.items()):
            before = [c["route"] for c in old["networks"].get(network, [])]
            after = [c["route"] for c in choices]
            if before and sorted(before) == sorted(after) and before != after:
                found.append((changed, version, network, before, after))
    assert found, "the demo made no two versions whose route order differs"
    _, version, network, before, after = min(found)
    return version, network, before, after


def test_the_history_lists_versions_and_the_diff_shows_what_changed(page: Any, server: UiServer) -> None:
    tables = stored_tables(server)
    version, network, before, after = _differing(tables)
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routing-table/versions")
    rows = page.locator("tr[data-version]").evaluate_all("l => l.map(e => Number(e.dataset.version))")
    assert rows == sorted(tables, reverse=True)
    check_accessible(page)
    screenshot(page, "routing-table-versions")

    page.locator(f'tr[data-version="{version}"]').get_by_role(
        "link", name=f"what changed from {version - 1}"
    ).click()
    page.wait_for_url(f"**/routing-table/diff?from={version - 1}&to={version}")
    section = page.locator(f'section[data-network="{network}"]')
    assert section.count() == 1
    reordered = section.locator('[data-kind="reordered"]').inner_text()
    assert reordered == f"Order changed from {', '.join(before)} to {', '.join(after)}"
    moved = [r for r in after if before.index(r) != after.index(r)]
    for route in moved:
        rank = section.locator(f'tr[data-route="{route}"] td.num').first.inner_text()
        assert rank == f"{before.index(route) + 1} → {after.index(route) + 1}"
    unchanged = [
        n
        for n in tables[version]["networks"]
        if tables[version]["networks"][n] == tables[version - 1]["networks"].get(n)
    ]
    for same in unchanged:
        assert page.locator(f'section[data-network="{same}"]').count() == 0
    check_accessible(page)
    screenshot(page, "routing-table-diff")

    page.goto(f"{server.url}/routing-table/diff")  # default: the newest against the one before
    assert f"to version {max(tables)}" in page.locator(".summary").inner_text()
    for bad, status in (("?from=abc&to=2", 400), ("?from=1", 400), (f"?from=1&to={max(tables) + 1}", 404)):
        response = page.goto(f"{server.url}/routing-table/diff{bad}")
        assert response is not None and response.status == status, bad
    for bad, status in (("?version=0", 400), ("?version=1e3", 400), (f"?version={max(tables) + 1}", 404)):
        response = page.goto(f"{server.url}/routing-table{bad}")
        assert response is not None and response.status == status, bad


def _api_token(server: UiServer) -> str:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "token",
            "add",
            f"ui-{uuid.uuid4().hex[:8]}",
            "--role",
            "viewer",
            "--config",
            str(server.workdir / "controller.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_the_csv_download_is_the_apis_csv(page: Any, server: UiServer) -> None:
    tables = stored_tables(server)
    token = _api_token(server)
    log_in(page, server, "viewer")
    for version, api_path in (
        (max(tables), "/api/v1/routing-table"),
        (max(tables) - 3, f"/api/v1/routing-table/versions/{max(tables) - 3}"),
    ):
        page.goto(f"{server.url}/routing-table" + ("" if version == max(tables) else f"?version={version}"))
        with page.expect_download() as info:
            page.get_by_role("link", name="Download CSV").click()
        download = info.value
        assert download.suggested_filename == f"routing-table-v{version}.csv"
        with open(download.path(), newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        api = page.request.get(
            f"{server.url}{api_path}?format=csv", headers={"Authorization": f"Bearer {token}"}
        )
        assert api.status == 200
        assert rows == list(csv.reader(io.StringIO(api.text())))
        assert rows[0] == ["version", "mcc_mnc", "rank", "route", "role", "weight", "score", "reason"]
        assert {r[0] for r in rows[1:]} == {str(version)}
        assert len(rows) - 1 == sum(len(c) for c in tables[version]["networks"].values())

        with page.expect_download() as info:
            page.get_by_role("link", name="Download JSON").click()
        with open(info.value.path(), encoding="utf-8") as f:
            assert RoutingTable.model_validate_json(f.read()) == RoutingTable.model_validate(tables[version])


def test_an_sms_with_html_is_shown_as_text_and_listed_as_unsolicited(page: Any, server: UiServer) -> None:
    imsi, msisdn = query(
        server, "SELECT imsi, msisdn FROM probes WHERE agent_id = 'pi-gb-1' AND mcc_mnc = '23410'"
    )[0]
    now = datetime.now(UTC)
    pdus = encode_deliver("+447700900123", XSS, smsc="+447802000332", scts=now.replace(microsecond=0))
    observation = Observation(
        id=f"xss-{uuid.uuid4().hex}",
        agent="pi-gb-1",
        modem="o2",
        sim=SimIdentity(imsi=imsi, msisdn=msisdn, mcc_mnc="23410"),
        sender="+447700900123",
        sender_type="international",
        text=XSS,
        smsc="+447802000332",
        scts=now.replace(microsecond=0),
        urc_at=now,
        completed_at=now,
        parts=len(pdus),
        total_parts=len(pdus),
        partial=False,
        origin="cmti",
        pdus=pdus,
        clock=ClockState(),
        software_version="test",
    )
    publish(server, Topics().sms("pi-gb-1"), observation.to_json())
    wait_until(lambda: query(server, "SELECT match FROM observations WHERE id = ?", observation.id))
    assert query(server, "SELECT match FROM observations WHERE id = ?", observation.id) == [("none",)]

    log_in(page, server, "viewer")
    page.goto(f"{server.url}/probes/{imsi}")
    row = page.locator(f'tr[data-observation="{observation.id}"]')
    assert row.locator("td.sms-text").inner_text() == XSS
    assert row.locator("td.sms-text").evaluate("e => e.children.length") == 0
    assert page.locator('img[src="x"]').count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert row.locator("[data-match]").inner_text() == "unsolicited"
    assert (
        page.locator("tbody tr[data-observation]").first.get_attribute("data-observation") == observation.id
    )
    matched = page.locator('td[data-match="token"]')
    assert matched.count() >= 1 and matched.first.inner_text().startswith("test ")
    check_accessible(page)
    screenshot(page, "probe")

    for bad in ("999999999999999", "%3Cscript%3E", "1234567890123456789"):
        response = page.goto(f"{server.url}/probes/{bad}")
        assert response is not None and response.status == 404, bad
        assert page.locator("script:not([src])").count() == 0


def test_signal_and_registration_changes_show_after_a_reload(page: Any, server: UiServer) -> None:
    imsi, agent, modem, state = query(
        server,
        "SELECT imsi, agent_id, modem_id, state FROM probes WHERE agent_id = 'pi-gb-1' AND mcc_mnc = '23415'",
    )[0]
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/probes/{imsi}")
    assert page.locator('circle[data-dbm="-97"]').count() == 0
    base = ModemState.model_validate_json(state)
    # The demo sampled this probe minutes ago, and a change of signal alone is kept at most every
    # SAMPLE_EVERY: let that much time pass for its samples so far.
    age = f"-{int(SAMPLE_EVERY.total_seconds()) + 60} seconds"
    query(server, "UPDATE probe_samples SET at = datetime(at, ?) WHERE imsi = ?", age, imsi)
    for changes in ({"signal_dbm": -97, "signal_rssi": 8}, {"signal_dbm": -97, "registration": "searching"}):
        published = base.model_copy(update={**changes, "updated_at": datetime.now(UTC)})
        before = query(server, "SELECT count(*) FROM probe_samples WHERE imsi = ?", imsi)[0][0]
        publish(server, Topics().modem_state(agent, modem), published.to_json(), retain=True)
        wait_until(
            lambda n=before: (
                query(server, "SELECT count(*) FROM probe_samples WHERE imsi = ?", imsi)[0][0] > n
            )
        )
    page.reload()
    assert page.locator('circle[data-dbm="-97"]').count() >= 1
    assert page.locator("[data-signal]").inner_text() == "-97 dBm"
    samples = page.locator("tr[data-sample-dbm]").evaluate_all("l => l.map(e => e.dataset.sampleDbm)")
    assert samples[:2] == ["-97", "-97"]
    changes = page.locator('tr[data-event="registration"] td:nth-child(2)').all_inner_texts()
    assert "registration registered_home → searching" in changes
    assert "searching" in page.locator("[data-probe-state]").inner_text()
    svg = page.locator("svg#signal-chart")
    text = svg.text_content() or ""
    assert "signal (dBm)" in text and "time (UTC)" in text and svg.get_attribute("role") == "img"
    check_accessible(page)
    screenshot(page, "probe-signal")
    publish(server, Topics().modem_state(agent, modem), base.to_json(), retain=True)  # as it was


# --- in process: queries per page do not grow with the data ---------------------------------


def _table(version: int, networks: int, routes: int, at: datetime) -> dict[str, Any]:
    """A table whose route order turns by one with every version (so every network changes)."""
    table = RoutingTable(
        version=version,
        created_at=at,
        exploration_share=0.05,
        networks={
            f"{200 + n:03d}10": [
                RouteChoice(
                    route=f"route-{(r + version) % routes}",
                    weight=1 / routes,
                    score=0.5,
                    role="backup",
                    reason="x",
                )
                for r in range(routes)
            ]
            for n in range(networks)
        },
    )
    return table.model_dump(mode="json")


async def _fill(engine: AsyncEngine, imsi: str, *, networks: int, routes: int, rows: int) -> None:
    """Two table versions (replacing any), and a probe with ``rows`` SMS and samples."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(s.routing_tables.delete())
        for version in (1, 2):
            await conn.execute(
                insert(s.routing_tables).values(
                    version=version, created_at=now, table=_table(version, networks, routes, now)
                )
            )
        await conn.execute(
            insert(s.probes).values(
                imsi=imsi,
                agent_id="pi-1",
                modem_id=imsi[-2:],
                connected=True,
                registration="registered_home",
                signal_dbm=-70,
                state={},
                updated_at=now,
            )
        )
        ago = [now - timedelta(minutes=i) for i in range(rows)]
        await conn.execute(
            insert(s.observations),
            [
                {
                    "id": f"{imsi}-{i}",
                    "agent_id": "pi-1",
                    "modem_id": "m",
                    "imsi": imsi,
                    "sender": "x",
                    "text": "t",
                    "urc_at": at,
                    "ingested_at": now,
                    "match": "none",
                    "payload": {},
                }
                for i, at in enumerate(ago)
            ],
        )
        await conn.execute(
            insert(s.probe_samples),
            [
                {
                    "imsi": imsi,
                    "at": at,
                    "signal_dbm": -70 - i % 20,
                    "registration": "home",
                    "connected": True,
                }
                for i, at in enumerate(ago)
            ],
        )
        await conn.execute(
            insert(s.probe_events),
            [{"at": at, "kind": "registration", "imsi": imsi, "detail": {}} for at in ago],
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_each_page_makes_the_same_queries_however_big_the_data(backend: str, tmp_path: Path) -> None:
    """Tried: a tiny table (3 networks, 1 route) and a probe with 6 SMS, samples and events,
    then a big table (300 networks x 100 routes) and a probe with 600 of each: every page
    makes as many queries for the big data as for the tiny. (In a thread of its own: this
    module's browser keeps an event loop running in the test thread.)"""

    async def run() -> None:
        if backend == "sqlite":
            engine = await open_database(f"sqlite:///{tmp_path / 'controller.db'}")
            try:
                await _count_queries(engine)
            finally:
                await engine.dispose()
            return
        async with postgres_database() as url:
            engine = await open_database(url)
            try:
                await _count_queries(engine)
            finally:
                await engine.dispose()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


async def _count_queries(database: AsyncEngine) -> None:
    await add_user(database, "viewer", "viewer", "viewer password 1")
    now = datetime.now(UTC)
    async with database.begin() as conn:
        await conn.execute(
            insert(s.agents).values(
                id="pi-1", state="online", status_at=now, last_seen_at=now, dropped=0, invalid_payloads=0
            )
        )
    config = ControllerConfig.model_validate({"broker": {"host": "127.0.0.1", "port": 1883}})
    client = TestClient(TestServer(make_app(database, config)))
    await client.start_server()
    statements: list[str] = []

    def counted(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(database.sync_engine, "before_cursor_execute", counted)
    try:
        form = await (await client.get("/login")).text()
        token = re.search(r'name="login_token" value="([^"]+)"', form)
        assert token is not None
        login = {
            "name": "viewer",
            "password": "viewer password 1",
            "login_token": token.group(1),
            "next": "/",
        }
        assert (await client.post("/login", data=login)).status == 200

        async def queries(path: str) -> int:
            statements.clear()
            response = await client.get(path)
            assert response.status == 200, (path, await response.text())
            await response.read()
            return len(statements)

        paths = (
            "/routing-table",
            "/routing-table?page=2",
            "/routing-table/versions",
            "/routing-table/diff",
            "/routing-table.csv",
        )
        await _fill(database, "100000000000001", networks=3, routes=1, rows=6)
        small = {path: await queries(path) for path in paths}
        small["probe"] = await queries("/probes/100000000000001")
        await _fill(database, "100000000000002", networks=300, routes=100, rows=600)
        big = {path: await queries(path) for path in paths}
        big["probe"] = await queries("/probes/100000000000002")
        assert big == small, (big, small)
        assert small["probe"] <= 8 and small["/routing-table"] <= 6, small  # the session's, and the page's
        table = await (await client.get("/routing-table?page=2")).text()
        assert table.count("<tbody data-network=") == config.ui.page_size // 4
        assert table.count("<tr data-route=") == 100 * config.ui.page_size // 4
        diff = await (await client.get("/routing-table/diff")).text()
        assert "<strong data-changed>300</strong>" in diff
        probe = await (await client.get("/probes/100000000000002")).text()
        assert probe.count("<tr data-observation=") == config.ui.page_size
        assert probe.count("<circle ") == 500 + 1  # the newest samples and the current signal
    finally:
        event.remove(database.sync_engine, "before_cursor_execute", counted)
        await client.close()
