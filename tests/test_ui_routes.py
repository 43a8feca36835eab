"""The route scoreboard and the route page, in a real browser (Debian's Chromium, headless,
through Playwright) against a real controller serving a database filled by the simulated network
(``tests.ui_server``); and their charts and text diff on their own.

What is tried: every demo (route, network) cell against the ``scores`` table (delivery share,
result count, score or "unknown", badges of the grey and fake-receipt routes); a bad score and
an unknown pair side by side (written into the served database), and a network nobody measured;
clicking through to a route and its charts (axes in ms, a histogram); an SMS received with
``<script>window.__xss=1</script><b>bold</b>`` in it, published over MQTT as an agent would (it
must show as text and never run); a result arriving while the route page is open (it must appear
without a reload); an unknown route (404), a malformed network and an out-of-range time range
(400); chart titles holding markup (escaped); labelled fields and readable contrast. Without a
browser, on SQLite and PostgreSQL: both pages' queries, and their statement count staying the
same when the data grows (no query per row).
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import Engine, create_engine, event, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import scoring
from controller.api.app import make_app
from controller.config import ControllerConfig, ScoringConfig
from controller.correlation import new_token, render
from controller.storage import schema as s
from controller.web import charts
from controller.web.render import ms, pct
from controller.web.route_detail import text_diff
from controller.web.sessions import COOKIE, start_session
from controller.web.users import add_user
from probe_agent.protocol import ClockState, Observation, SimIdentity, Topics
from tests.db import database, database_url
from tests.demo_run import DEMO_TIMEOUT_S
from tests.ui_server import UiServer, check_accessible, log_in, screenshot

__all__ = ["database", "database_url"]

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

XSS = "<script>window.__xss=1</script><b>bold</b>"
#: A demo probe (pi-gb-1's O2 SIM) and its network's own SMSC.
PROBE = {"imsi": "234100000000101", "msisdn": "+447802100101", "mcc_mnc": "23410"}
AGENT, MODEM, SMSC = "pi-gb-1", "o2", "+447802000332"
#: Tries at a check that races the controller's score recompute (every minute it rewrites the
#: scores table, so what a test wrote there may be gone before the page reads it).
TRIES = 4


# --- without a browser ----------------------------------------------------------------------------


def test_charts_label_their_axes_with_units_and_escape_their_text() -> None:
    start = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
    buckets = [
        charts.Bucket(
            start + timedelta(minutes=i), start + timedelta(minutes=i + 1), low=900.0 + i, high=2500.0
        )
        for i in range(5)
    ]
    buckets.insert(2, charts.Bucket(start + timedelta(minutes=9), start + timedelta(minutes=10)))  # a gap
    svg = charts.latency_band_chart(
        buckets, start, start + timedelta(minutes=10), chart_id="c1", title=XSS, desc="a & b"
    )
    assert svg.startswith('<svg class="chart" id="c1"') and 'role="img"' in svg
    assert "<script>" not in svg and "<b>" not in svg and "&lt;script&gt;" in svg
    assert f'aria-label="{charts.Markup.escape(XSS)}"' in svg and "<desc" in svg and "a &amp; b" in svg
    assert "latency (ms)" in svg and "time (UTC)" in svg and "10:02" in svg
    assert svg.count("<polygon") == 2  # the gap splits the band in two
    empty = charts.latency_band_chart(
        [], start, start + timedelta(hours=1), chart_id="c2", title="t", desc="d"
    )
    assert "no delivered results" in empty

    bars = charts.histogram([0, 500, 1000, 1500], [3, 0, 7], overflow=2, chart_id="h", title="h", desc="d")
    assert bars.count("<rect") == 3 and "&gt; 1,500" in bars and "latency (ms)" in bars
    with pytest.raises(ValueError, match="one more edge"):
        charts.histogram([0, 1], [1, 2], chart_id="h", title="h", desc="d")
    shares = [charts.Bucket(b.start, b.end, low=0.5 if b.low else None, count=2) for b in buckets]
    rate = charts.rate_chart(shares, start, start + timedelta(minutes=10), chart_id="r", title="r", desc="d")
    assert "delivered (%)" in rate and "100 %" in rate and rate.count("<circle") == 5
    assert charts.value_ticks(0, 8661) == [0, 2000, 4000, 6000, 8000, 10000]
    assert charts.time_ticks(0, 10 * 86400) == ([0, 172800, 345600, 518400, 691200, 864000], "%m-%d")


def test_the_text_diff_marks_what_changed_and_escapes_html() -> None:
    sent = "Your code is 123456. Ref K7Q2"
    left, right = text_diff(sent, f"{XSS} Your code is 654321. Ref K7Q2")
    assert "<del>123456</del>" in left and "<ins>654321</ins>" in right
    assert "<script>" not in right and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in right
    assert "&lt;b&gt;bold&lt;/b&gt;" in right
    assert text_diff(sent, sent) == (sent, sent)  # nothing marked when nothing changed


def test_scores_keep_a_p95_for_people_without_scoring_it() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    rows = [
        {
            "decided_at": now - timedelta(seconds=i),
            "route": "r",
            "mcc_mnc": "23410",
            "delivered": True,
            "late": False,
            "latency_ms": float(i + 1),
            "sender_kept": True,
            "content_intact": True,
            "receipt_honest": True,
            "sim_box": False,
            "smsc_known": True,
        }
        for i in range(100)
    ]
    config = ScoringConfig(half_life_s=1e9)  # every result weighs the same
    (score,) = scoring.compute(scoring.build_columns(rows, now), now, config)
    assert score.stats["latency_p95_ms"] == 95.0 and score.stats["latency_p90_ms"] == 90.0
    curve = scoring.latency_score(
        np.array([50.0, 90.0, 99.0]), config.latency_good_ms, config.latency_half_ms
    )
    expected = float(curve @ np.asarray(scoring.QUANTILE_WEIGHTS))
    assert score.explanation["components"]["latency"]["value"] == pytest.approx(expected, abs=1e-6)


async def _seed(engine: AsyncEngine, now: datetime, routes: int, networks: int, per_pair: int) -> None:
    """``routes`` x ``networks`` pairs with ``per_pair`` results each, sent over the last hour and
    decided 5 minutes ago (every third not delivered, with a fake receipt; every other one
    delivered with its text altered), then their scores."""
    nets = [f"234{n:02d}" for n in range(10, 10 + networks)]
    async with engine.begin() as conn:
        known = set((await conn.execute(select(s.networks.c.mcc_mnc))).scalars())
        named = set((await conn.execute(select(s.routes.c.name))).scalars())
        first = (await conn.scalar(select(func.max(s.test_cases.c.id)))) or 0
        for net in nets:
            if net not in known:
                await conn.execute(
                    insert(s.networks).values(
                        mcc_mnc=net, country="GB", operator=f"op {net}", smsc_addresses=[]
                    )
                )
                imsi = f"{net}0000000001"
                await conn.execute(
                    insert(s.probes).values(imsi=imsi, mcc_mnc=net, connected=True, updated_at=now)
                )
        for r in range(routes):
            if f"r{r}" not in named:
                await conn.execute(insert(s.routes).values(name=f"r{r}", connector={}, prices={}))
        case_id = first
        for r in range(routes):
            for net in nets:
                for i in range(per_pair):
                    case_id += 1
                    at = now - timedelta(minutes=50 - i)
                    delivered, altered = case_id % 3 != 0, case_id % 2 == 0
                    sent = f"Code {case_id:06d} for you"
                    await conn.execute(
                        insert(s.test_cases).values(
                            id=case_id,
                            token=f"{case_id:06d}-ABCD",
                            route=f"r{r}",
                            imsi=f"{net}0000000001",
                            msisdn="+447700900001",
                            mcc_mnc=net,
                            sender="PF",
                            text=sent,
                            scheduled_at=at,
                            submitted_at=at,
                            deadline_at=at + timedelta(minutes=5),
                            status="done",
                        )
                    )
                    if delivered:
                        await conn.execute(
                            insert(s.observations).values(
                                id=f"o{case_id}",
                                agent_id="a",
                                modem_id="m",
                                imsi=f"{net}0000000001",
                                sender="PF",
                                text=f"<i>{sent}</i>" if altered else sent,
                                urc_at=at,
                                ingested_at=at,
                                test_case_id=case_id,
                                match="token",
                                payload={},
                            )
                        )
                    await conn.execute(
                        insert(s.results).values(
                            test_case_id=case_id,
                            route=f"r{r}",
                            mcc_mnc=net,
                            delivered=delivered,
                            latency_ms=1000.0 + 100 * i if delivered else None,
                            content_intact=not altered if delivered else None,
                            sender_kept=True if delivered else None,
                            receipt_status="DELIVRD",
                            receipt_honest=delivered,
                            decided_at=now - timedelta(minutes=5),  # weighs as much as the others
                            observation_id=f"o{case_id}" if delivered else None,
                            flags=[] if delivered else ["fake_receipt"],
                            notes=[],
                        )
                    )
    await scoring.recompute(engine, ScoringConfig(min_results=2), now)


async def test_both_pages_run_on_both_databases_with_as_many_queries_whatever_the_size(
    database: AsyncEngine,
) -> None:
    now = datetime.now(UTC)
    await _seed(database, now, routes=1, networks=1, per_pair=3)
    user = await add_user(database, "ui-viewer", "viewer", "viewer password 1")
    cookie, _ = await start_session(database, user, idle_s=3600)
    config = ControllerConfig.model_validate({"broker": {"host": "127.0.0.1", "port": 1883}})
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    event.listen(database.sync_engine, "before_cursor_execute", count)
    pages = ("/routes", "/routes/r0", "/routes/r0?network=23410&hours=2")
    async with TestClient(TestServer(make_app(database, config))) as client:

        async def get(path: str) -> tuple[str, int]:
            statements[0] = 0
            response = await client.get(path, headers={"Cookie": f"{COOKIE}={cookie}"})
            body = await response.text()
            assert response.status == 200, (path, body[-2000:])
            return body, statements[0]

        small = {path: await get(path) for path in pages}
        board = small["/routes"][0]
        assert 'data-route="r0" data-network="23410"' in board and "66.7 % delivered" in board
        assert "3 results" in board and "fake receipts 33 %" in board
        detail = small["/routes/r0?network=23410&hours=2"][0]
        assert detail.count("<svg") == 3 and "&lt;i&gt;" in detail and "<i>" not in detail
        assert "DELIVRD; never arrived: fake receipt" in detail and "ms" in detail
        await _seed(database, now, routes=3, networks=4, per_pair=4)
        large = {path: await get(path) for path in pages}
    assert "r2" in large["/routes"][0] and "23413" in large["/routes"][0]
    assert {path: n for path, (_, n) in large.items()} == {path: n for path, (_, n) in small.items()}
    assert all(n <= 8 for _, n in large.values())


# --- in the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(server: UiServer) -> Iterator[Engine]:
    """The served database, for reading what the page should show and writing into it."""
    engine = create_engine(f"sqlite:///{server.database}", connect_args={"timeout": 30})
    yield engine
    engine.dispose()


def _scores(db: Engine) -> tuple[datetime | None, list[Any]]:
    with db.connect() as conn:
        rows = conn.execute(select(s.scores)).all()
    return (rows[0].computed_at if rows else None), rows


def _range_hours(db: Engine) -> int:
    """A time range covering every demo result (24 h unless the cached demo run is older)."""
    with db.connect() as conn:
        first = conn.scalar(select(func.min(s.results.c.decided_at)))
    assert first is not None
    return max(24, int((datetime.now(UTC) - first).total_seconds() // 3600) + 2)


def _cell(page: Any, route: str, network: str) -> Any:
    return page.locator(f'td.cell[data-route="{route}"][data-network="{network}"]')


def test_the_scoreboard_shows_every_route_and_network_as_the_scores_table_has_it(
    page: Any, server: UiServer, db: Engine
) -> None:
    log_in(page, server, "viewer")
    for _ in range(TRIES):
        computed_at, rows = _scores(db)
        page.goto(f"{server.url}/routes")
        cells = {(row.route, row.mcc_mnc): _cell(page, row.route, row.mcc_mnc).inner_text() for row in rows}
        if _scores(db)[0] == computed_at:  # no recompute in between: the page shows these rows
            break
    else:
        pytest.fail("the scores were recomputed during every try")
    routes = {row.route for row in rows}
    assert routes == {"direct", "aggregator", "grey", "fakedlr", "degrading"}
    assert len(rows) == 40  # 5 routes x 8 networks
    for row in rows:
        text = cells[row.route, row.mcc_mnc]
        where = f"{row.route} x {row.mcc_mnc}: {text!r}"
        assert f"{pct(row.stats['delivered'])} delivered" in text, where
        assert f"{row.results} results" in text, where
        assert f"{ms(row.stats['latency_p50_ms'])} / {ms(row.stats.get('latency_p95_ms'))}" in text, where
        assert (f"score {row.score:.2f}" if row.score is not None else "unknown") in text, where
        if row.route == "grey":
            assert "sender replaced" in text and "grey signs" in text, where
        if row.route == "fakedlr":
            assert "fake receipts" in text, where
        if row.route == "direct":
            assert "fake receipts" not in text and "sender replaced" not in text, where
    with db.connect() as conn:
        networks = set(conn.scalars(select(s.networks.c.mcc_mnc))) | {row.mcc_mnc for row in rows}
    assert page.locator("td.cell").count() == len(networks) * len(routes)
    assert page.locator("table.matrix thead th[scope=col]").count() == len(routes) + 1
    assert page.locator("table.matrix tbody th[scope=row]").count() == len(networks)
    link = _cell(page, "grey", "23415").locator("a")
    assert link.get_attribute("href") == "/routes/grey?network=23415"
    assert page.locator("table[data-live-results] tbody tr").count() == 20
    screenshot(page, "routes-scoreboard")
    check_accessible(page)

    page.select_option("#country", "FR")
    page.get_by_role("button", name="Show").click()
    page.wait_for_url(f"{server.url}/routes?country=FR")
    shown = {n.split()[1] for n in page.locator("table.matrix tbody th[scope=row] .net").all_inner_texts()}
    assert shown == {"20801", "20810"}


def test_an_unknown_pair_looks_different_from_a_bad_one(page: Any, server: UiServer, db: Engine) -> None:
    log_in(page, server, "viewer")
    with db.begin() as conn:  # a network nobody has measured: a row of "not measured" cells
        conn.execute(
            insert(s.networks).prefix_with("OR IGNORE"),
            {"mcc_mnc": "23430", "country": "GB", "operator": "EE", "smsc_addresses": []},
        )
    c = s.scores.c
    for _ in range(TRIES):
        with db.begin() as conn:
            pair = (c.mcc_mnc == "23410",)
            conn.execute(update(s.scores).where(c.route == "fakedlr", *pair).values(score=0.04))
            conn.execute(update(s.scores).where(c.route == "direct", *pair).values(score=None))
        page.goto(f"{server.url}/routes?country=GB")
        bad, unknown = _cell(page, "fakedlr", "23410"), _cell(page, "direct", "23410")
        if "score 0.04" in bad.inner_text() and "unknown" in unknown.inner_text():
            break
    else:
        pytest.fail("the score recompute replaced what the test wrote every time")
    assert "s0" in (bad.get_attribute("class") or "") and "unknown" not in bad.inner_text()
    assert "unknown" in (unknown.get_attribute("class") or "")
    never = _cell(page, "direct", "23430")
    assert "unknown" in (never.get_attribute("class") or "") and "not measured" in never.inner_text()

    def look(cell: Any) -> dict[str, str]:
        style: dict[str, str] = cell.evaluate(
            "el => ({color: getComputedStyle(el).backgroundColor,"
            " image: getComputedStyle(el).backgroundImage})"
        )
        return style

    bad_look, unknown_look = look(bad), look(unknown)
    assert bad_look["color"] != unknown_look["color"]
    assert "repeating-linear-gradient" in unknown_look["image"] and bad_look["image"] == "none"
    assert look(never) == unknown_look
    legend = page.locator("ul.legend").inner_text()
    assert "unknown" in legend and "0.0\u20130.1" in legend  # an en dash
    screenshot(page, "routes-scoreboard-unknown")


def test_a_route_opened_from_the_scoreboard_shows_its_charts_and_results(
    page: Any, server: UiServer, db: Engine
) -> None:
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routes")
    _cell(page, "grey", "23415").locator("a").click()
    page.wait_for_url(f"{server.url}/routes/grey?network=23415")
    hours = _range_hours(db)
    if hours > 24:  # a cached demo run older than a day: widen the range to hold it
        page.goto(f"{server.url}/routes/grey?network=23415&hours={hours}")
    assert page.locator("h1").inner_text().startswith("Route grey")
    latency = page.locator("svg#chart-latency")
    assert "latency (ms)" in latency.text_content() and "time (UTC)" in latency.text_content()
    assert latency.get_attribute("role") == "img" and "grey" in (latency.get_attribute("aria-label") or "")
    assert latency.locator("circle").count() >= 1  # medians drawn
    histogram = page.locator("svg#chart-histogram")
    assert "latency (ms)" in histogram.text_content() and histogram.locator("rect").count() >= 1
    assert page.locator("svg#chart-rate circle").count() >= 1
    with db.connect() as conn:
        explanation = conn.scalar(
            select(s.scores.c.explanation).where(s.scores.c.route == "grey", s.scores.c.mcc_mnc == "23415")
        )
        results = conn.scalar(
            select(func.count()).where(s.results.c.route == "grey", s.results.c.mcc_mnc == "23415")
        )
    assert explanation is not None
    assert page.locator("table.explain-table tbody tr").count() == len(scoring.COMPONENTS)
    rows = page.locator("table.results tbody tr")
    assert rows.count() == results  # fewer than a page
    table = page.locator("table.results").inner_text()
    assert "PFDemo →" in table and "foreign" in table and "sender_replaced" in table
    assert page.locator("table.results del").count() >= 1  # the grey route strips Unicode: marked
    screenshot(page, "route-detail")
    check_accessible(page)

    page.goto(f"{server.url}/routes/grey?hours={hours}")  # every network: a score per network
    assert page.locator("table.scores tbody tr").count() == 8
    for path, status in (
        ("/routes/no-such-route", 404),
        ("/routes/grey?network=2341x", 400),
        ("/routes/grey?hours=100000", 400),
        ("/routes?country=gbr", 400),
    ):
        response = page.request.get(f"{server.url}{path}")
        assert response.status == status, path
        assert "text/html" in response.headers["content-type"], path


def _deliver(server: UiServer, db: Engine, text: str) -> int:
    """A test case on route direct to the demo's O2 probe, and the SMS its probe reports for it
    over MQTT (``text`` with the token put in), as its agent would: the real ingest correlates it.
    Returns the test case id."""
    token = new_token()
    sent = render(token, "otp")
    now = datetime.now(UTC)
    with db.begin() as conn:
        case_id = conn.execute(
            insert(s.test_cases).values(
                token=str(token),
                route="direct",
                sender="PFDemo",
                text=sent,
                template="otp",
                scheduled_at=now - timedelta(seconds=3),
                submitted_at=now - timedelta(seconds=2),
                submit_acked_at=now - timedelta(seconds=2),
                message_id=f"ui-{secrets.token_hex(4)}",
                deadline_at=now + timedelta(minutes=5),
                status="submitted",
                **PROBE,
            )
        ).inserted_primary_key[0]
    urc = datetime.now(UTC)
    observation = Observation(
        id=f"ui-test-{uuid.uuid4().hex[:16]}",
        agent=AGENT,
        modem=MODEM,
        sim=SimIdentity(imsi=PROBE["imsi"], msisdn=PROBE["msisdn"], mcc_mnc=PROBE["mcc_mnc"]),
        sender="PFDemo",
        sender_type="alphanumeric",
        text=text.format(sent=sent),
        smsc=SMSC,
        scts=urc.replace(microsecond=0),
        urc_at=urc,
        completed_at=urc,
        parts=1,
        total_parts=1,
        partial=False,
        origin="cmti",
        pdus=["00"],
        clock=ClockState(offset_ms=0.0, error_ms=5.0, source="chrony", since_sync_s=10.0),
        software_version="test",
    )
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", server.broker.port)
    client.loop_start()
    try:
        client.publish(Topics().sms(AGENT), observation.to_json(), qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()
    return int(case_id)


def _wait_result(db: Engine, case_id: int, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with db.connect() as conn:
            row = conn.execute(select(s.results).where(s.results.c.test_case_id == case_id)).first()
        if row is not None:
            return row
        time.sleep(0.2)
    pytest.fail(f"no result for test case {case_id} within {timeout_s:g} s")


def test_a_new_result_appears_on_the_open_route_page_without_a_reload(
    page: Any, server: UiServer, db: Engine
) -> None:
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routes/direct?network=23410")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_function("document.getElementById('live-state').textContent === 'live'")
    live = page.locator("table[data-live-results]")
    assert live.get_attribute("data-route") == "direct" and live.get_attribute("data-network") == "23410"
    case_id = _deliver(server, db, "{sent}")
    row = live.locator(f'tr[data-test-case="{case_id}"]')
    row.wait_for(timeout=20_000)
    cells = row.locator("td").all_inner_texts()
    assert cells[1:4] == ["direct", "23410", "delivered"] and cells[5] == "PFDemo"
    assert page.evaluate("window.__notReloaded") is True
    assert live.locator("[data-empty]").count() == 0
    result = _wait_result(db, case_id)
    assert result.delivered and result.content_intact
    screenshot(page, "route-detail-live")


def test_a_received_text_with_html_in_it_is_shown_as_text(page: Any, server: UiServer, db: Engine) -> None:
    case_id = _deliver(server, db, XSS + " {sent}")
    result = _wait_result(db, case_id)
    assert result.delivered and result.content_intact is False  # the route "added" the markup
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routes/direct?network=23410")
    row = page.locator(f'table.results tr[data-test-case="{case_id}"]')
    received = row.locator("td[data-received]")
    assert XSS in received.inner_text()
    assert received.locator("ins").first.inner_text().startswith("<script>")
    assert received.locator("script, b").count() == 0
    assert page.evaluate("window.__xss") is None
    assert "content_altered" in row.inner_text() and "known" in row.inner_text()
    screenshot(page, "route-detail-xss")
    check_accessible(page)


def test_a_result_opens_its_test_page_with_everything_that_came_of_it(
    page: Any, server: UiServer, db: Engine
) -> None:
    case_id = _deliver(server, db, XSS + " {sent}")
    result = _wait_result(db, case_id)
    log_in(page, server, "viewer")
    page.goto(f"{server.url}/routes/direct?network=23410")
    page.get_by_role("link", name=re.compile(rf"^Test {case_id},")).click()
    page.wait_for_url(f"{server.url}/tests/{case_id}")
    assert page.locator("h1").inner_text().startswith(f"Test {case_id}")
    assert "delivered" in page.locator("h1").inner_text()
    received = page.locator("td[data-received]")
    assert XSS in received.inner_text() and received.locator("ins").count() >= 1
    assert received.locator("script, b").count() == 0 and page.evaluate("window.__xss") is None
    facts = page.locator("main").inner_text()
    assert "altered" in facts and "the network's own" in facts and f"{AGENT} / {MODEM}" in facts
    assert "no receipt; arrived" in facts and "content_altered" in facts
    assert result.sender_kept and "PFDemo → PFDemo kept" in facts
    assert page.get_by_role("link", name=PROBE["msisdn"]).get_attribute("href") == f"/probes/{PROBE['imsi']}"
    screenshot(page, "test-case")
    check_accessible(page)
    assert page.goto(f"{server.url}/tests/999999999").status == 404
