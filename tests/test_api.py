"""The REST API on a real aiohttp server (loopback) and real databases: tokens and roles, CRUD with
validation messages naming the field, pause / resume, paging that stays stable while rows are
added, filters, the routing table's ETag and CSV, a sweep of bad input that must never give a
500, ``probe-fleet token`` end to end, and serving on a socket until stopped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api.app import ApiStartError, make_app, serving
from controller.api.tokens import add_token, new_token, revoke_token
from controller.config import ControllerConfig
from controller.storage import schema as s
from controller.storage.db import make_engine, open_database
from probe_agent.protocol import RouteChoice, RoutingTable
from tests.mosquitto import free_port

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
V1 = "/api/v1"
DEFINITION: dict[str, Any] = {"routes": ["direct-uk"], "networks": ["23415"], "cadence_s": 600}


def controller_config(**api: Any) -> ControllerConfig:
    return ControllerConfig.model_validate({"broker": {"host": "127.0.0.1"}, "api": api})


@dataclass
class Api:
    """A test client on a real server, with one token per role."""

    client: TestClient[Any, Any]
    engine: AsyncEngine
    tokens: dict[str, str] = field(default_factory=dict)

    async def call(
        self,
        method: str,
        path: str,
        *,
        role: str | None = "admin",
        body: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        """(status, parsed JSON or text, headers); ``path`` is under /api/v1 unless absolute."""
        sent = dict(headers or {})
        if role is not None:
            sent.setdefault("Authorization", f"Bearer {self.tokens[role]}")
        url = path if path.startswith("/api/") else V1 + path
        kwargs: dict[str, Any] = {"headers": sent}
        if body is not None:
            kwargs["json"] = body
        elif data is not None:
            kwargs["data"] = data
        async with self.client.request(method, url, **kwargs) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return response.status, json.loads(text) if is_json and text else text, response.headers


@asynccontextmanager
async def running_api(engine: AsyncEngine, **settings: Any) -> AsyncIterator[Api]:
    client = TestClient(TestServer(make_app(engine, controller_config(**settings))))
    await client.start_server()
    api = Api(client, engine)
    for role in ("viewer", "operator", "admin"):
        api.tokens[role] = await add_token(engine, f"test-{role}", role)
    try:
        yield api
    finally:
        await client.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API on a fresh SQLite database."""
    engine = await open_database(f"sqlite:///{tmp_path / 'api.db'}")
    try:
        async with running_api(engine) as running:
            yield running
    finally:
        await engine.dispose()


@pytest.fixture
async def api_both(database: AsyncEngine) -> AsyncIterator[Api]:
    """The API on a fresh SQLite file and a fresh PostgreSQL database."""
    async with running_api(database) as running:
        yield running


def route_body(name: str = "direct-uk", **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "connector": {
            "kind": "smpp",
            "host": "smsc.example.net",
            "port": 2775,
            "system_id": "probe",
            "password": "s3cret",
        },
        "prices": {"23415": 0.021},
        **more,
    }


async def seed_test_cases(engine: AsyncEngine, count: int, routes: tuple[str, ...] = ("direct-uk",)) -> None:
    """Agents, probes, routes, a campaign and ``count`` test cases with results (route by turns,
    every third one not delivered and flagged fake_receipt), scheduled a minute apart from T0."""
    async with engine.begin() as conn:
        await conn.execute(
            insert(s.agents).values(id="pi-uk-1", state="online", status_at=T0, last_seen_at=T0)
        )
        await conn.execute(
            insert(s.probes),
            [
                {
                    "imsi": "234150000000001",
                    "mcc_mnc": "23415",
                    "agent_id": "pi-uk-1",
                    "connected": True,
                    "msisdn": "+447700900001",
                    "updated_at": T0,
                },
                {
                    "imsi": "262010000000001",
                    "mcc_mnc": "26201",
                    "agent_id": "pi-uk-1",
                    "connected": False,
                    "msisdn": "+4915100000001",
                    "updated_at": T0,
                },
            ],
        )
        existing = set(await conn.scalars(select(s.routes.c.name)))
        for name in routes:
            if name not in existing:
                await conn.execute(insert(s.routes).values(name=name, connector={}, prices={}, enabled=True))
        campaign = await conn.scalar(
            insert(s.campaigns)
            .values(
                name="seeded",
                definition={**DEFINITION, "routes": list(routes)},
                paused=False,
                created_at=T0,
                updated_at=T0,
            )
            .returning(s.campaigns.c.id)
        )
        for i in range(count):
            route = routes[i % len(routes)]
            german = i % 5 == 4
            at = T0 + timedelta(minutes=i)
            case_id = await conn.scalar(
                insert(s.test_cases)
                .values(
                    token=f"tok{i:05d}",
                    campaign_id=campaign,
                    route=route,
                    imsi="262010000000001" if german else "234150000000001",
                    msisdn="+4915100000001" if german else "+447700900001",
                    mcc_mnc="26201" if german else "23415",
                    sender="ProbeFleet",
                    text=f"code {i}",
                    scheduled_at=at,
                    submitted_at=at,
                    message_id=f"m{i}",
                    deadline_at=at + timedelta(minutes=10),
                    status="done",
                )
                .returning(s.test_cases.c.id)
            )
            delivered = i % 3 != 0
            await conn.execute(
                insert(s.results).values(
                    test_case_id=case_id,
                    route=route,
                    mcc_mnc="26201" if german else "23415",
                    delivered=delivered,
                    late=False,
                    latency_ms=1500.0 + i if delivered else None,
                    decided_at=at + timedelta(seconds=5),
                    flags=[] if delivered else ["fake_receipt"],
                    notes=[],
                    observation_id=f"obs-{i}" if delivered else None,
                    receipt_status="DELIVRD",
                    receipt_honest=delivered,
                )
            )
            if delivered:
                await conn.execute(
                    insert(s.observations).values(
                        id=f"obs-{i}",
                        agent_id="pi-uk-1",
                        modem_id="m1",
                        imsi="234150000000001",
                        sender="ProbeFleet",
                        text=f"code {i}",
                        urc_at=at + timedelta(seconds=2),
                        ingested_at=at + timedelta(seconds=3),
                        test_case_id=case_id,
                        match="token",
                        payload={"id": f"obs-{i}"},
                    )
                )
            await conn.execute(
                insert(s.receipts).values(
                    route=route, message_id=f"m{i}", status="DELIVRD", received_at=at + timedelta(seconds=4)
                )
            )


def table(version: int, networks: dict[str, list[RouteChoice]]) -> RoutingTable:
    return RoutingTable(
        version=version, created_at=T0 + timedelta(hours=version), exploration_share=0.05, networks=networks
    )


async def store_table(engine: AsyncEngine, routing_table: RoutingTable) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(s.routing_tables).values(
                version=routing_table.version,
                created_at=routing_table.created_at,
                table=routing_table.model_dump(mode="json"),
            )
        )


# --- health and tokens ---------------------------------------------------------------------------


async def test_health_needs_no_token_and_says_503_when_the_database_is_down(api: Api, tmp_path: Path) -> None:
    status, body, headers = await api.call("GET", "/health", role=None, headers={"X-Request-Id": "probe-42"})
    assert status == 200 and body["status"] == "ok" and body["database"] == "ok" and body["version"]
    assert body["time"].endswith("Z") and headers["X-Request-Id"] == "probe-42"

    dead = make_engine(f"postgresql://probe@127.0.0.1:{free_port()}/nothing")
    try:
        async with running_api_without_tokens(dead) as down:
            status, body, _ = await down.call("GET", "/health", role=None)
            assert status == 503 and body["status"] == "unavailable" and body["database"] == "unreachable"
            # Every other request needs the database for its token: a 503, never a 500.
            status, body, _ = await down.call(
                "GET", "/networks", role=None, headers={"Authorization": "Bearer pf_x"}
            )
            assert status == 503 and "database is unavailable" in body["error"]
    finally:
        await dead.dispose()


@asynccontextmanager
async def running_api_without_tokens(engine: AsyncEngine) -> AsyncIterator[Api]:
    client = TestClient(TestServer(make_app(engine, controller_config())))
    await client.start_server()
    try:
        yield Api(client, engine)
    finally:
        await client.close()


async def test_tokens_and_roles(api: Api) -> None:
    status, body, headers = await api.call("GET", "/networks", role=None)
    assert status == 401 and body["field"] == "Authorization"
    assert headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer pf_not-a-real-token", "Basic dXNlcjpwYXNz", "Bearer", "bearer   "):
        status, body, headers = await api.call(
            "GET", "/networks", role=None, headers={"Authorization": header}
        )
        assert status == 401, header
        assert headers["WWW-Authenticate"].startswith("Bearer"), header
    assert (await api.call("GET", "/networks", role="viewer"))[0] == 200

    status, body, _ = await api.call("POST", "/networks", role="viewer", body={"mcc_mnc": "23415"})
    assert status == 403 and "viewer" in body["error"] and "operator" in body["error"]
    assert (await api.call("DELETE", "/routes/x", role="viewer"))[0] == 403
    assert (await api.call("POST", "/networks", role="operator", body={"mcc_mnc": "23415"}))[0] == 201
    # Nothing was written by the refused request: the operator's create did not conflict.
    assert (await api.call("GET", "/networks/23415", role="viewer"))[1]["mcc_mnc"] == "23415"

    await revoke_token(api.engine, "test-operator")
    status, body, _ = await api.call("GET", "/networks", role="operator")
    assert status == 401 and "revoked" in body["error"]

    # last_used_at is written on use, and not again within the touch interval.
    async with api.engine.connect() as conn:
        used = await conn.scalar(
            select(s.api_tokens.c.last_used_at).where(s.api_tokens.c.name == "test-viewer")
        )
    assert used is not None and datetime.now(UTC) - used < timedelta(minutes=1)
    await api.call("GET", "/networks", role="viewer")
    async with api.engine.connect() as conn:
        again = await conn.scalar(
            select(s.api_tokens.c.last_used_at).where(s.api_tokens.c.name == "test-viewer")
        )
    assert again == used


# --- CRUD (both databases) -----------------------------------------------------------------------


async def test_networks_routes_and_campaigns_crud(api_both: Api) -> None:
    api = api_both
    # networks
    network = {
        "mcc_mnc": "23415",
        "country": "GB",
        "operator": "Vodafone UK",
        "smsc_addresses": ["+447785016005"],
    }
    status, body, _ = await api.call("POST", "/networks", role="operator", body=network)
    assert status == 201 and body == network
    status, body, _ = await api.call("POST", "/networks", role="operator", body=network)
    assert status == 409 and body["field"] == "mcc_mnc"
    for bad, where in (
        ({"mcc_mnc": "2341"}, "mcc_mnc"),
        ({"mcc_mnc": "23410", "country": "gb"}, "country"),
        ({"mcc_mnc": "23410", "smsc_addresses": ["+44 77"]}, "smsc_addresses.0"),
        ({"mcc_mnc": "23410", "colour": "red"}, "colour"),
    ):
        status, body, _ = await api.call("POST", "/networks", role="operator", body=bad)
        assert status == 400 and body["field"] == where, (bad, body)
    status, body, _ = await api.call("PATCH", "/networks/23415", role="operator", body={"operator": "VF"})
    assert status == 200 and body["operator"] == "VF" and body["country"] == "GB"
    status, body, _ = await api.call("GET", "/networks/23415")
    assert body["operator"] == "VF" and body["smsc_addresses"] == ["+447785016005"]

    # routes: the connector's secret is never answered
    status, body, _ = await api.call("POST", "/routes", role="operator", body=route_body())
    assert (
        status == 201
        and body["connector"]["password"] == "***"
        and body["connector"]["host"] == "smsc.example.net"
    )
    status, body, _ = await api.call("GET", "/routes/direct-uk")
    assert status == 200 and body["prices"] == {"23415": 0.021} and body["connector"]["password"] == "***"
    status, body, _ = await api.call(
        "PATCH", "/routes/direct-uk", role="operator", body={"connector": body["connector"]}
    )
    assert status == 400 and body["field"] == "connector"
    status, body, _ = await api.call("PATCH", "/routes/direct-uk", role="operator", body={"enabled": False})
    assert status == 200 and body["enabled"] is False
    for bad, where in (
        (route_body(prices={"23415": -1}), "prices.23415"),
        (route_body("no spaces"), "name"),
        (route_body(connector="smpp"), "connector"),
        ({"name": "x"}, "connector"),
        (
            route_body(connector={"kind": "smpp", "host": "smsc.example.net", "port": 2775}),
            "connector.system_id",
        ),
        (route_body(connector={"kind": "smpp", "hots": "typo"}), "connector.host"),
        (route_body(connector={"kind": "carrier-pigeon"}), "connector"),
        (route_body(connector={"kind": "http", "url": "ftp://x", "body_template": {}}), "connector.url"),
    ):
        status, body, _ = await api.call("POST", "/routes", role="operator", body=bad)
        assert status == 400 and body["field"] == where, (bad, body)
    status, body, _ = await api.call("PATCH", "/routes/direct-uk", role="operator", body={"prices": None})
    assert status == 400 and body["field"] == "prices"

    # campaigns: the definition's own validation, under "definition."
    bad_definitions = (
        ({**DEFINITION, "routes": ["nowhere"]}, "definition.routes"),
        ({**DEFINITION, "cadence_s": 0}, "definition.cadence_s"),
        ({**DEFINITION, "networks": []}, "definition"),
        ({**DEFINITION, "timezone": "Mars/Olympus"}, "definition.timezone"),
    )
    for definition, where in bad_definitions:
        status, body, _ = await api.call(
            "POST", "/campaigns", role="operator", body={"name": "c", "definition": definition}
        )
        assert status == 400 and body["field"] == where, (definition, body)
    name = "Kampagne ü — 東京 'quoted'"
    status, created, _ = await api.call(
        "POST", "/campaigns", role="operator", body={"name": name, "definition": DEFINITION}
    )
    assert status == 201 and created["name"] == name and created["paused"] is False
    assert created["definition"]["routes"] == ["direct-uk"] and created["definition"]["templates"] == ["otp"]
    cid = created["id"]
    status, body, _ = await api.call(
        "POST", "/campaigns", role="operator", body={"name": name, "definition": DEFINITION}
    )
    assert status == 409 and body["field"] == "name"

    status, body, _ = await api.call("POST", f"/campaigns/{cid}/pause", role="operator")
    assert status == 200 and body["paused"] is True and body["updated_at"] >= created["updated_at"]
    assert (await api.call("POST", f"/campaigns/{cid}/pause", role="operator"))[1]["paused"] is True
    status, body, _ = await api.call("GET", "/campaigns", headers={}, role="viewer")
    assert [c["id"] for c in body["items"]] == [cid] and body["items"][0]["paused"] is True
    assert (await api.call("GET", "/campaigns?paused=false"))[1]["total"] == 0
    status, body, _ = await api.call("POST", f"/campaigns/{cid}/resume", role="operator")
    assert status == 200 and body["paused"] is False

    changed = {**DEFINITION, "cadence_s": 900, "templates": ["otp", "unicode"]}
    status, body, _ = await api.call(
        "PATCH", f"/campaigns/{cid}", role="operator", body={"definition": changed}
    )
    assert status == 200 and body["definition"]["cadence_s"] == 900 and body["name"] == name

    # a route a campaign uses cannot go; the campaign can, then the route
    status, body, _ = await api.call("DELETE", "/routes/direct-uk", role="operator")
    assert status == 409 and name in body["error"]
    assert (await api.call("DELETE", f"/campaigns/{cid}", role="operator"))[0] == 204
    assert (await api.call("GET", f"/campaigns/{cid}"))[0] == 404
    assert (await api.call("DELETE", "/routes/direct-uk", role="operator"))[0] == 204
    assert (await api.call("DELETE", "/networks/23415", role="operator"))[0] == 204
    status, body, _ = await api.call("GET", "/networks/23415")
    assert status == 404 and body["field"] == "mcc_mnc"


async def test_a_route_or_campaign_with_test_cases_cannot_be_deleted(api: Api) -> None:
    await seed_test_cases(api.engine, 3)
    status, body, _ = await api.call("DELETE", "/routes/direct-uk", role="operator")
    assert status == 409 and "3 test cases" in body["error"] and "enabled=false" in body["error"]
    campaign = (await api.call("GET", "/campaigns"))[1]["items"][0]
    status, body, _ = await api.call("DELETE", f"/campaigns/{campaign['id']}", role="operator")
    assert status == 409 and "pause it" in body["error"]
    assert (await api.call("GET", "/routes/direct-uk"))[0] == 200


# --- paging and filters --------------------------------------------------------------------------


async def test_paging_is_stable_while_rows_are_added(api_both: Api) -> None:
    api = api_both
    for i in range(0, 50, 2):  # 25 networks, even numbers
        assert (await api.call("POST", "/networks", role="operator", body={"mcc_mnc": f"234{i:02d}"}))[
            0
        ] == 201
    seen: list[str] = []
    path: str | None = "/networks?limit=10"
    pages = 0
    while path is not None:
        status, body, _ = await api.call("GET", path)
        assert status == 200 and body["limit"] == 10 and len(body["items"]) <= 10
        seen += [n["mcc_mnc"] for n in body["items"]]
        if pages == 0:
            assert body["total"] == 25
            # Rows added before and after the cursor while paging: neither repeats nor skips a row.
            for mcc_mnc in ("23401", "23449"):
                await api.call("POST", "/networks", role="operator", body={"mcc_mnc": mcc_mnc})
        path = body["next"]
        pages += 1
    assert len(seen) == len(set(seen)), "a row came twice"
    assert {f"234{i:02d}" for i in range(0, 50, 2)} <= set(seen)
    assert "23449" in seen and "23401" not in seen and seen == sorted(seen)

    await seed_test_cases(api.engine, 30, routes=("direct-uk", "agg-eu"))
    ids: list[int] = []
    path = "/results?route=agg-eu&limit=4"
    while path is not None:
        status, body, _ = await api.call("GET", path)
        assert status == 200 and body["total"] == 15
        assert all(r["route"] == "agg-eu" for r in body["items"])
        ids += [r["test_case_id"] for r in body["items"]]
        path = body["next"]
        assert path is None or "route=agg-eu" in path
    assert len(ids) == 15 and ids == sorted(ids, reverse=True)


async def test_filters_and_details(api: Api) -> None:
    await seed_test_cases(api.engine, 30, routes=("direct-uk", "agg-eu"))

    async def total(path: str) -> int:
        status, body, _ = await api.call("GET", path)
        assert status == 200, body
        return int(body["total"])

    assert await total("/test-cases") == 30
    assert await total("/test-cases?route=direct-uk") == 15
    assert await total("/test-cases?mcc_mnc=26201") == 6
    assert await total("/test-cases?route=agg-eu&mcc_mnc=26201") == 3
    assert await total("/test-cases?status=done&campaign=1") == 30
    assert await total("/test-cases?status=scheduled") == 0
    frm, to = (T0 + timedelta(minutes=10)).isoformat(), (T0 + timedelta(minutes=20)).isoformat()
    # "+00:00" arrives as " 00:00" when a client does not encode the "+": still understood.
    assert await total(f"/test-cases?from={frm}&to={to}") == 10
    assert await total(f"/test-cases?from={frm.replace('+00:00', 'Z')}") == 20

    assert await total("/results?delivered=false") == 10
    assert await total("/results?delivered=true&route=direct-uk") == 10
    assert await total("/results?flag=fake_receipt") == 10
    assert await total("/results?flag=fake") == 0
    assert (
        await total(f"/results?since={(T0 + timedelta(minutes=25)).isoformat().replace('+00:00', 'Z')}") == 5
    )
    assert (
        await total(f"/results?until={(T0 + timedelta(minutes=1)).isoformat().replace('+00:00', 'Z')}") == 1
    )

    assert await total("/probes?connected=true") == 1
    assert await total("/probes?agent=pi-uk-1&mcc_mnc=26201") == 1
    assert await total("/agents?state=lost") == 0
    status, agent, _ = await api.call("GET", "/agents/pi-uk-1")
    assert status == 200 and [p["imsi"] for p in agent["probes"]] == ["234150000000001", "262010000000001"]
    status, probe, _ = await api.call("GET", "/probes/234150000000001")
    assert status == 200 and probe["events"] == [] and probe["connected"] is True

    case = (await api.call("GET", "/test-cases?limit=1&route=direct-uk"))[1]["items"][0]
    status, detail, _ = await api.call("GET", f"/test-cases/{case['id']}")
    assert status == 200 and detail["token"] == case["token"]
    assert detail["result"]["test_case_id"] == case["id"]
    assert detail["observation"]["id"] == detail["result"]["observation_id"]
    assert [r["message_id"] for r in detail["receipts"]] == [case["message_id"]]
    undelivered = (await api.call("GET", "/results?delivered=false&limit=1"))[1]["items"][0]
    status, detail, _ = await api.call("GET", f"/test-cases/{undelivered['test_case_id']}")
    assert detail["observation"] is None and detail["result"]["flags"] == ["fake_receipt"]


# --- the routing table ---------------------------------------------------------------------------


async def test_routing_table_json_csv_etag_and_versions(api: Api) -> None:
    status, body, _ = await api.call("GET", "/routing-table", role="viewer")
    assert status == 404 and "no routing table yet" in body["error"]

    uk = [
        RouteChoice(route="direct-uk", weight=0.9, score=0.93, role="primary", reason="best, 99% delivered"),
        RouteChoice(
            route="agg-eu", weight=0.1, score=None, role="exploration", reason='unknown, "3 results"'
        ),
    ]
    await store_table(api.engine, table(1, {"23415": uk[:1]}))
    await store_table(api.engine, table(2, {"26201": uk[1:], "23415": uk}))

    status, body, headers = await api.call("GET", "/routing-table", role="viewer")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert RoutingTable.model_validate(body) == table(2, {"26201": uk[1:], "23415": uk})
    etag = headers["ETag"]
    assert etag.startswith('"2-') and etag.endswith('"')
    status, text, again = await api.call(
        "GET", "/routing-table", role="viewer", headers={"If-None-Match": etag}
    )
    assert status == 304 and text == "" and again["ETag"] == etag
    assert (await api.call("GET", "/routing-table", headers={"If-None-Match": f'"x", W/{etag}'}))[0] == 304
    assert (await api.call("GET", "/routing-table", headers={"If-None-Match": '"1-json-0"'}))[0] == 200

    status, text, headers = await api.call("GET", "/routing-table", headers={"Accept": "text/csv"})
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    lines = text.splitlines()
    assert lines[0] == "version,mcc_mnc,rank,route,role,weight,score,reason"
    assert lines[1].startswith("2,23415,1,direct-uk,primary,0.9,0.93,")
    assert lines[2] == '2,23415,2,agg-eu,exploration,0.1,,"unknown, ""3 results"""'
    assert lines[3].startswith("2,26201,1,agg-eu")
    csv_etag = headers["ETag"]
    assert csv_etag != etag
    status, text2, headers = await api.call("GET", "/routing-table?format=csv")
    assert status == 200 and text2 == text and headers["ETag"] == csv_etag
    assert (await api.call("GET", "/routing-table?format=csv", headers={"If-None-Match": csv_etag}))[0] == 304
    assert (await api.call("GET", "/routing-table?format=csv", headers={"If-None-Match": etag}))[0] == 200
    accept_json = {"Accept": "text/csv;q=0.5, application/json"}
    assert (await api.call("GET", "/routing-table", headers=accept_json))[2]["ETag"] == etag

    status, body, _ = await api.call("GET", "/routing-table/versions")
    assert status == 200 and [(v["version"], v["networks"]) for v in body["items"]] == [(2, 2), (1, 1)]
    status, body, headers = await api.call("GET", "/routing-table/versions/1")
    assert status == 200 and body["version"] == 1 and list(body["networks"]) == ["23415"]
    assert headers["ETag"].startswith('"1-')
    status, body, _ = await api.call("GET", "/routing-table/versions/99")
    assert status == 404 and body["field"] == "version"
    status, body, _ = await api.call("GET", "/routing-table?format=xml")
    assert status == 400 and body["field"] == "format"


async def test_a_stored_table_that_is_not_valid_is_a_logged_500_in_the_error_shape(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    async with api.engine.begin() as conn:
        await conn.execute(
            insert(s.routing_tables).values(version=1, created_at=T0, table={"version": "one"})
        )
    status, body, headers = await api.call("GET", "/routing-table", headers={"X-Request-Id": "req-500"})
    assert (
        status == 500
        and body["error"] == "internal error (request id req-500)"
        and "Traceback" not in body["error"]
    )
    assert headers["X-Request-Id"] == "req-500"
    logged = [r for r in caplog.records if r.name == "controller.api.app" and r.exc_info]
    assert logged and "req-500" in logged[0].getMessage()


# --- bad input ------------------------------------------------------------------------------------

#: (method, path, raw body or JSON-able body) that must all get a 4xx with the error shape.
BAD_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/networks", b"{not json"),
    ("POST", "/networks", b""),
    ("POST", "/networks", b"[1, 2]"),
    ("POST", "/networks", b'"23415"'),
    ("POST", "/networks", b"\xff\xfe{}"),
    ("POST", "/networks", b'{"mcc_mnc": NaN}'),
    ("POST", "/networks", {"mcc_mnc": 23415}),
    ("POST", "/networks", {"mcc_mnc": "23415\u0000"}),
    ("POST", "/networks", {"mcc_mnc": "'; DROP TABLE networks; --"}),
    ("POST", "/networks", {"mcc_mnc": "23415", "operator": "x" * 129}),
    ("POST", "/networks", {"mcc_mnc": "23415", "operator": "line\nbreak"}),
    ("POST", "/networks", {"mcc_mnc": "23415", "smsc_addresses": "+447785016005"}),
    ("POST", "/routes", b'{"name": "r", "connector": {}, "prices": {"23415": 1e400}}'),
    ("POST", "/routes", {"name": "r", "connector": {}, "prices": {"23415": "inf"}}),
    ("POST", "/routes", {"name": "r", "connector": {}, "prices": {"23415": "NaN"}}),
    ("POST", "/routes", {"name": "Ünïcødé", "connector": {}}),
    ("POST", "/routes", {"name": "r", "connector": {}, "enabled": "maybe"}),
    ("POST", "/routes", b'{"name": "r", "connector": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("POST", "/routes", b'{"name": "r", "connector": {}, "prices": {"23415": ' + b"9" * 5000 + b"}}"),
    ("POST", "/campaigns", {"name": "c", "definition": {**DEFINITION, "jitter_s": "inf"}}),
    ("POST", "/campaigns", {"name": "c", "definition": "everything"}),
    ("POST", "/campaigns", {"name": "c\u0000", "definition": DEFINITION}),
    ("POST", "/campaigns", {"name": "   ", "definition": DEFINITION}),
    ("POST", "/campaigns", {"name": "c", "definition": {**DEFINITION, "cadence_s": True}}),
    ("PATCH", "/campaigns/1", {"paused": True}),
    ("PATCH", "/campaigns/1", {"definition": None}),
    ("POST", "/campaigns/abc/pause", None),
    ("POST", "/campaigns/99999999999999999999999/pause", None),
    ("GET", "/campaigns/-1", None),
    ("GET", "/campaigns/" + "9" * 5000, None),
    ("GET", "/test-cases/2147483648", None),
    ("GET", "/networks?limit=100000", None),
    ("GET", "/networks?limit=0", None),
    ("GET", "/networks?limit=-5", None),
    ("GET", "/networks?limit=abc", None),
    ("GET", "/networks?limit=", None),
    ("GET", "/networks?limit=1&limit=2", None),
    ("GET", "/networks?offset=-1", None),
    ("GET", "/networks?cursor=not-a-cursor", None),
    ("GET", "/networks?cursor=WzEwMDAwMDAwMDAwMDAwMDAwMDAwXQ", None),  # [100000000000000000000]
    ("GET", "/campaigns?cursor=WzEwMDAwMDAwMDAwMDAwMDAwMDAwXQ", None),
    ("GET", "/campaigns?cursor=WyJ4Il0", None),  # ["x"] for an integer key
    ("GET", "/scores?cursor=WyJhIl0", None),  # one value for a two-column key
    ("GET", "/networks?colour=red", None),
    ("GET", "/networks/23415?expand=all", None),
    ("GET", "/test-cases?from=yesterday", None),
    ("GET", "/test-cases?from=2026-03-01T12:00:00", None),  # no zone
    ("GET", "/test-cases?from=2026-13-45T99:00:00Z", None),
    ("GET", "/test-cases?from=0001-01-01T00:00:00%2B01:00", None),
    ("GET", "/test-cases?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", None),
    ("GET", "/test-cases?campaign=99999999999999999999", None),
    ("GET", "/test-cases?campaign=1.5", None),
    ("GET", "/test-cases?status=lost", None),
    ("GET", "/test-cases?route=x%27%20OR%201%3D1%20--", None),
    ("GET", "/results?route=%00", None),
    ("GET", "/results?delivered=perhaps", None),
    ("GET", "/results?flag=%25", None),
    ("GET", "/results?since=1e999", None),
    ("GET", "/scores?mcc_mnc=%27%3B--", None),
    ("GET", "/probes?connected=2", None),
    ("GET", "/agents?state=sleeping", None),
    ("GET", "/routes/%00", None),
    ("GET", "/routes/x%27%20OR%20%271%27%3D%271", None),
    ("GET", "/probes/%F0%9F%98%80", None),
    ("GET", "/agents/..%2F..%2Fetc", None),
    ("GET", "/networks/" + "1" * 300, None),
    ("GET", "/routing-table/versions/0", None),
    ("DELETE", "/networks/99999", None),
    ("PUT", "/networks/23415", {"mcc_mnc": "23415"}),
    ("DELETE", "/health", None),
    ("GET", "/nothing-here", None),
]


async def test_bad_input_is_always_a_4xx_naming_the_problem(api_both: Api) -> None:
    api = api_both
    await seed_test_cases(api.engine, 2)
    failures = []
    for method, path, payload in BAD_REQUESTS:
        raw = payload if isinstance(payload, bytes) else None
        status, body, _ = await api.call(
            method,
            path,
            body=None if raw is not None else payload,
            data=raw,
            headers={"Content-Type": "application/json"} if raw is not None else None,
        )
        if not (400 <= status < 500 and isinstance(body, dict) and body.get("error")):
            failures.append((method, path[:80], status, str(body)[:200]))
    assert not failures, failures
    # The refused requests changed nothing and broke nothing.
    status, body, _ = await api.call("GET", "/routes")
    assert status == 200 and [r["name"] for r in body["items"]] == ["direct-uk"]
    assert (await api.call("GET", "/networks"))[1]["total"] == 0


async def test_bad_input_statuses_and_fields(api: Api) -> None:
    status, body, headers = await api.call("PUT", "/networks/23415", body={})
    assert status == 405 and "PATCH" in headers["Allow"] and "PUT is not allowed" in body["error"]
    status, body, _ = await api.call("GET", "/nothing", role=None)
    assert status == 404 and "no such path" in body["error"]
    status, body, _ = await api.call("GET", "/networks?limit=100000")
    assert status == 400 and body["field"] == "limit" and "500" in body["error"]
    status, body, _ = await api.call("GET", "/networks?colour=red")
    assert status == 400 and body["field"] == "colour" and "limit, cursor" in body["error"]
    status, body, _ = await api.call("GET", "/test-cases?from=yesterday")
    assert status == 400 and body["field"] == "from"
    status, body, _ = await api.call(
        "POST", "/networks", data=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and body["field"] == "body" and "not valid JSON" in body["error"]
    status, body, _ = await api.call(
        "POST", "/networks", body={"mcc_mnc": "1", "country": "x", "smsc_addresses": 5}
    )
    assert status == 400 and [p["field"] for p in body["problems"]] == [
        "mcc_mnc",
        "country",
        "smsc_addresses",
    ]
    assert "2 more problems" in body["error"]
    status, body, _ = await api.call("GET", "/campaigns/abc")
    assert status == 404 and body["field"] == "id"


async def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    engine = await open_database(f"sqlite:///{tmp_path / 'api.db'}")
    try:
        async with running_api(engine, max_body_bytes=2048) as api:
            big = {"name": "r", "connector": {"blob": "x" * 4096}}
            status, body, _ = await api.call("POST", "/routes", role="operator", body=big)
            assert status == 413 and "2048 bytes" in body["error"]
            status, body, _ = await api.call("GET", "/networks?limit=100", role="viewer")
            assert status == 200 and body["limit"] == 100
    finally:
        await engine.dispose()


# --- CLI and serving ------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=60
    )


async def test_cli_token_add_prints_a_token_that_works(tmp_path: Path) -> None:
    db = tmp_path / "controller.db"
    config = tmp_path / "controller.toml"
    config.write_text(f'database_url = "sqlite:///{db}"\n[broker]\nhost = "127.0.0.1"\n')
    added = await asyncio.to_thread(
        cli, "token", "add", "grafana", "--role", "viewer", "--config", str(config)
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("pf_") and len(token) > 40 and "not shown again" in added.stderr
    duplicate = await asyncio.to_thread(
        cli, "token", "add", "grafana", "--role", "admin", "--config", str(config)
    )
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr

    engine = await open_database(f"sqlite:///{db}")
    try:
        async with async_client(engine) as client:
            bearer = {"Authorization": f"Bearer {token}"}
            async with client.get(f"{V1}/networks", headers=bearer) as response:
                assert response.status == 200
            async with client.post(f"{V1}/networks", headers=bearer, json={"mcc_mnc": "23415"}) as response:
                assert response.status == 403
            async with engine.connect() as conn:
                stored = await conn.scalar(select(s.api_tokens.c.token_hash))
            assert stored is not None and token not in stored and len(stored) == 64

            listed = await asyncio.to_thread(cli, "token", "list", "--config", str(config))
            assert (
                listed.returncode == 0
                and "grafana\tviewer\tlive" in listed.stdout
                and token not in listed.stdout
            )
            revoked = await asyncio.to_thread(cli, "token", "revoke", "grafana", "--config", str(config))
            assert revoked.returncode == 0
            async with client.get(f"{V1}/networks", headers=bearer) as response:
                assert response.status == 401
    finally:
        await engine.dispose()

    unknown = await asyncio.to_thread(cli, "token", "revoke", "nobody", "--config", str(config))
    assert unknown.returncode == 1 and "no token named 'nobody'" in unknown.stderr
    bad = tmp_path / "bad.toml"
    for settings, problem in (("port = 70000", "api.port: "), ("max_page_size = 10", "above max_page_size")):
        bad.write_text(f'[broker]\nhost = "x"\n[api]\n{settings}\n')
        invalid = await asyncio.to_thread(cli, "token", "list", "--config", str(bad))
        assert invalid.returncode == 2 and problem in invalid.stderr, invalid.stderr


async def test_cli_token_add_stores_a_token_made_elsewhere(tmp_path: Path) -> None:
    """A provisioning tool keeps the token in its vault and hands it over on stdin: it then works,
    never appears in the output, and only a token as random as ours is accepted."""
    db = tmp_path / "controller.db"
    config = tmp_path / "controller.toml"
    config.write_text(f'database_url = "sqlite:///{db}"\n[broker]\nhost = "127.0.0.1"\n')
    given = new_token()

    def add(name: str, stdin: str) -> subprocess.CompletedProcess[str]:
        argv = ["token", "add", name, "--role", "viewer", "--token-stdin", "--config", str(config)]
        return subprocess.run(
            [sys.executable, "-m", "controller.cli", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )

    for weak in ("pf_short", "not-ours-" + given, given[:-4], given + " with spaces"):
        refused = await asyncio.to_thread(add, "ansible", weak + "\n")
        assert refused.returncode == 1 and "at least 43 characters" in refused.stderr, weak
    stored = await asyncio.to_thread(add, "ansible", given + "\n")
    assert stored.returncode == 0, stored.stderr
    assert given not in stored.stdout + stored.stderr and "stored" in stored.stdout
    engine = await open_database(f"sqlite:///{db}")
    try:
        bearer = {"Authorization": f"Bearer {given}"}
        async with async_client(engine) as client, client.get(f"{V1}/networks", headers=bearer) as response:
            assert response.status == 200
    finally:
        await engine.dispose()


@asynccontextmanager
async def async_client(engine: AsyncEngine) -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(make_app(engine, controller_config())))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_serving_listens_until_stopped_and_says_when_it_cannot(tmp_path: Path) -> None:
    engine = await open_database(f"sqlite:///{tmp_path / 'api.db'}")
    try:
        config = controller_config(port=0)
        async with serving(engine, config) as urls, aiohttp.ClientSession() as session:
            assert len(urls) == 1 and urls[0].startswith("http://127.0.0.1:") and urls[0].endswith(V1)
            async with session.get(f"{urls[0]}/health") as response:
                assert response.status == 200 and (await response.json())["status"] == "ok"
            port = int(urls[0].split(":")[2].split("/")[0])
            with pytest.raises(ApiStartError, match=f"cannot listen on 127.0.0.1:{port}"):
                async with serving(engine, controller_config(port=port)):
                    pass
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{urls[0]}/health")
    finally:
        await engine.dispose()
