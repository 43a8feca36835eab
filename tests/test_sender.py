"""The bundled sender against real SMPP servers on loopback (simnet's SMSC) and a real database:
routing by the table's weights, failover on refusal and on a lost bind, tests pinned to their
route, idempotency keys, receipts applied to messages and to test results, and bad input refused
with the field named."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.sender import messages
from controller.sender.messages import IdempotencyConflict
from controller.sender.sender import MessageRequest, Sender, SendRefused, SendUnavailable
from controller.storage import schema as s
from controller.submit import SubmitError, SubmitRequest
from probe_agent.protocol import RouteChoice, RoutingTable
from simnet.smsc import SmscServer

GB_MOBILE = "+447400123456"  # phonenumbers' example GB mobile (carrier: Three)
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def choice(route: str, weight: float, role: str = "backup") -> RouteChoice:
    return RouteChoice(
        route=route, weight=weight, score=0.9 if role != "excluded" else 0.1, role=role, reason=role
    )


def table(version: int, *choices: RouteChoice) -> RoutingTable:
    return RoutingTable(
        version=version, created_at=NOW, exploration_share=0.05, networks={"23420": list(choices)}
    )


@pytest.fixture
async def smscs() -> AsyncIterator[dict[str, SmscServer]]:
    servers = {
        name: SmscServer(system_id=name, password="pw", name=name) for name in ("direct", "backup", "grey")
    }
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


async def seed_routes(engine: AsyncEngine, servers: dict[str, SmscServer]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            s.networks.insert().values(mcc_mnc="23420", country="GB", operator="Three", smsc_addresses=[])
        )
        await conn.execute(
            s.routes.insert(),
            [
                {
                    "name": name,
                    "connector": {
                        "kind": "smpp",
                        "host": "127.0.0.1",
                        "port": server.port,
                        "system_id": name,
                        "password": "pw",
                        "reconnect_min_s": 0.1,
                        "reconnect_max_s": 0.5,
                        "response_timeout_s": 2.0,
                    },
                    "prices": {"23420": 0.02},
                    "enabled": True,
                }
                for name, server in servers.items()
            ],
        )


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def sender(database: AsyncEngine, smscs: dict[str, SmscServer]) -> AsyncIterator[Sender]:
    await seed_routes(database, smscs)
    sender = Sender(database)
    await sender.start()

    async def all_bound() -> bool:
        return all(h.bound for h in sender.health())

    await eventually(all_bound)
    yield sender
    await sender.stop()


async def message_row(engine: AsyncEngine, message: int) -> Any:
    async with engine.connect() as conn:
        return await messages.get(conn, message)


async def test_a_message_goes_by_the_table_and_its_receipt_marks_it_delivered(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    sender.use_table(table(1, choice("direct", 1.0, "primary"), choice("grey", 0.0, "excluded")))
    outcome = await sender.send(
        MessageRequest(to="07400 123456", sender="MyBank", text="Your code is 123456", default_region="GB")
    )
    assert outcome.created and outcome.status == "submitted" and outcome.route == "direct"
    assert [m.text for m in smscs["direct"].submits] == ["Your code is 123456"]
    assert smscs["direct"].submits[0].destination_addr == GB_MOBILE[1:]
    assert smscs["grey"].submits == [] and smscs["backup"].submits == []

    async def delivered() -> bool:
        row = await message_row(database, outcome.id)
        return bool(row and row["status"] == "delivered")

    await eventually(delivered)  # the SMSC sends a receipt by itself (registered_delivery)
    row = await message_row(database, outcome.id)
    assert row["destination"] == GB_MOBILE and row["mcc_mnc"] == "23420" and row["region"] == "GB"
    assert row["decision"]["table_version"] == 1 and row["decision"]["attempts"] == []
    assert row["message_ids"] == [smscs["direct"].submits[0].message_id]
    assert [r["status"] for r in row["receipts"]] == ["DELIVRD"]


async def test_weights_share_the_traffic_and_a_new_table_takes_effect_at_once(
    sender: Sender, smscs: dict[str, SmscServer]
) -> None:
    sender.use_table(table(1, choice("direct", 0.7, "primary"), choice("backup", 0.3)))
    for i in range(200):
        await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text=f"hello {i}"))
    direct, backup = len(smscs["direct"].submits), len(smscs["backup"].submits)
    assert direct + backup == 200 and 110 <= direct <= 170, (direct, backup)
    sender.use_table(table(2, choice("backup", 1.0, "primary"), choice("direct", 0.0, "excluded")))
    for i in range(20):
        await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text=f"after {i}"))
    assert len(smscs["direct"].submits) == direct and len(smscs["backup"].submits) == backup + 20


async def test_a_refusing_route_fails_over_and_the_decision_says_so(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    """Tried: the primary answers every submit with ESME_RSYSERR; then its SMSC is stopped
    (a lost bind). Both times the message goes out on the backup, with the attempt recorded."""
    sender.use_table(table(1, choice("direct", 0.95, "primary"), choice("backup", 0.05)))
    smscs["direct"].behaviour.error_every = 1
    first = await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="one", idempotency_key="k1"))
    assert first.route == "backup" and first.status == "submitted"
    row = await message_row(database, first.id)
    assert [a["route"] for a in row["decision"]["attempts"]] == ["direct"]
    assert "failed over to backup" in row["decision"]["reason"]
    assert [m.text for m in smscs["backup"].submits] == ["one"]

    await smscs["direct"].stop()

    async def unbound() -> bool:
        return not next(h for h in sender.health() if h.route == "direct").bound

    await eventually(unbound)
    second = await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="two"))
    assert second.route == "backup"
    row = await message_row(database, second.id)
    assert "not bound" in row["decision"]["attempts"][0]["error"]


async def test_no_route_takes_it_then_the_message_failed(
    sender: Sender, smscs: dict[str, SmscServer]
) -> None:
    sender.use_table(table(1, choice("direct", 1.0, "primary")))
    smscs["direct"].behaviour.error_every = 1
    outcome = await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="x"))
    assert (
        outcome.status == "failed" and outcome.route is None and outcome.error and "direct" in outcome.error
    )


async def test_an_idempotency_key_sends_once(sender: Sender, smscs: dict[str, SmscServer]) -> None:
    sender.use_table(table(1, choice("direct", 1.0, "primary")))
    request = MessageRequest(to=GB_MOBILE, sender="MyBank", text="once", idempotency_key="order-42")
    first, again = await sender.send(request), await sender.send(request)
    assert first.created and not again.created and again.id == first.id and again.route == "direct"
    concurrent = await asyncio.gather(
        *(
            sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="c", idempotency_key="c"))
            for _ in range(5)
        )
    )
    assert len({o.id for o in concurrent}) == 1 and sum(o.created for o in concurrent) == 1
    assert [m.text for m in smscs["direct"].submits].count("once") == 1
    assert [m.text for m in smscs["direct"].submits].count("c") == 1
    with pytest.raises(IdempotencyConflict, match="order-42"):
        await sender.send(
            MessageRequest(to=GB_MOBILE, sender="MyBank", text="other", idempotency_key="order-42")
        )


async def test_bad_input_is_refused_naming_the_field(sender: Sender) -> None:
    sender.use_table(table(1, choice("direct", 1.0, "primary")))
    with pytest.raises(SendRefused) as landline:
        await sender.send(MessageRequest(to="+442079460000", sender="MyBank", text="x"))
    assert landline.value.field == "to" and "fixed" in landline.value.reason
    with pytest.raises(SendRefused) as invalid:
        await sender.send(MessageRequest(to="12", sender="MyBank", text="x"))
    assert invalid.value.field == "to"
    with pytest.raises(SendRefused) as us_alpha:
        await sender.send(MessageRequest(to="+12015550123", sender="MyBank", text="x"))
    assert us_alpha.value.field == "from"
    with pytest.raises(SendRefused, match="network of \\+4915123456789 is unknown") as unknown:
        await sender.send(MessageRequest(to="+4915123456789", sender="MyBank", text="x"))
    assert unknown.value.field == "to"
    sender.use_table(table(2, choice("grey", 1.0, "excluded")))
    with pytest.raises(SendUnavailable, match="no usable route for network 23420"):
        await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="x"))


async def test_a_test_is_pinned_to_its_route_even_when_the_table_excludes_it(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    sender.use_table(table(1, choice("direct", 1.0, "primary"), choice("grey", 0.0, "excluded")))
    async with database.begin() as conn:
        await conn.execute(
            s.probes.insert().values(
                imsi="234200000000001", msisdn=GB_MOBILE, mcc_mnc="23420", connected=True, updated_at=NOW
            )
        )
        await conn.execute(
            s.test_cases.insert().values(
                id=7,
                token="123456-ABCD",
                route="grey",
                imsi="234200000000001",
                msisdn=GB_MOBILE,
                mcc_mnc="23420",
                sender="MyBank",
                text="Your code is 123456 ABCD",
                template="otp",
                scheduled_at=NOW,
                deadline_at=NOW + timedelta(minutes=10),
                status="submitting",
            )
        )
    submitted = await sender.submit(
        SubmitRequest(
            test_case_id=7, route="grey", msisdn=GB_MOBILE, sender="MyBank", text="Your code is 123456 ABCD"
        )
    )
    assert [m.text for m in smscs["grey"].submits] == ["Your code is 123456 ABCD"]
    assert submitted.message_id == smscs["grey"].submits[0].message_id
    smscs["grey"].behaviour.error_every = 1
    with pytest.raises(SubmitError):
        await sender.submit(
            SubmitRequest(test_case_id=7, route="grey", msisdn=GB_MOBILE, sender="MyBank", text="again")
        )
    assert smscs["direct"].submits == [], "a test never fails over to another route"
    with pytest.raises(SubmitError, match="no connector"):
        await sender.submit(
            SubmitRequest(test_case_id=7, route="nowhere", msisdn=GB_MOBILE, sender="MyBank", text="x")
        )

    async def receipt_stored() -> bool:
        async with database.connect() as conn:
            rows = list(await conn.execute(select(s.receipts).where(s.receipts.c.route == "grey")))
        return any(r.message_id == submitted.message_id for r in rows)

    await eventually(receipt_stored)


async def test_a_test_submit_the_caller_gave_up_on_is_not_left_accepted(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    """Tried: the SMSC answers submit_sm after 1.5 s and the caller (as the scheduler does with
    its submit timeout) gives up after 0.2 s. The message is recorded as failed, saying it may
    still be sent, not left "accepted" for ever."""
    smscs["grey"].behaviour.response_delay_ms = 1500
    request = SubmitRequest(test_case_id=None, route="grey", msisdn=GB_MOBILE, sender="MyBank", text="slow")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sender.submit(request), 0.2)
    async with database.connect() as conn:
        row = (await conn.execute(select(s.messages).where(s.messages.c.text == "slow"))).one()
    assert row.status == "failed" and "may still be sent" in row.error


async def test_a_changed_route_gets_a_new_connector_and_a_bad_one_is_named(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    async with database.begin() as conn:
        await conn.execute(
            s.routes.update().where(s.routes.c.name == "grey").values(connector={"kind": "smpp", "hots": "x"})
        )
        await conn.execute(s.routes.update().where(s.routes.c.name == "backup").values(enabled=False))
    await sender.sync_routes()
    assert [h.route for h in sender.health()] == ["direct"]
    assert "connector.host" in sender.stats.invalid_connectors["grey"]
    with pytest.raises(SubmitError, match=r"connector\.host"):
        await sender.submit(
            SubmitRequest(test_case_id=1, route="grey", msisdn=GB_MOBILE, sender="MyBank", text="x")
        )


async def test_the_send_api_conversions_and_connector_health(
    sender: Sender, smscs: dict[str, SmscServer], database: AsyncEngine
) -> None:
    """Through the REST API on a real server: send (201, then 200 for the same idempotency key,
    sent once), get it with its receipt, list by number, bad input named, a conversion stored
    for the route and network that carried it, the connectors' health."""
    from aiohttp.test_utils import TestClient, TestServer

    from controller.api.app import make_app
    from controller.api.tokens import add_token
    from tests.test_api import controller_config

    sender.use_table(table(1, choice("direct", 1.0, "primary")))
    client = TestClient(TestServer(make_app(database, controller_config(), sender)))
    await client.start_server()
    auth = {"Authorization": f"Bearer {await add_token(database, 'ops', 'operator')}"}
    try:
        body = {"to": GB_MOBILE, "from": "MyBank", "text": "Your code is 424242"}
        headers = {**auth, "Idempotency-Key": "login-1"}
        first = await client.post("/api/v1/messages", json=body, headers=headers)
        assert first.status == 201, await first.text()
        sent = await first.json()
        assert sent["route"] == "direct" and sent["status"] in ("submitted", "delivered")
        again = await client.post("/api/v1/messages", json=body, headers=headers)
        assert again.status == 200 and (await again.json())["id"] == sent["id"]
        assert [m.text for m in smscs["direct"].submits] == ["Your code is 424242"]

        async def delivered() -> bool:
            got = await client.get(f"/api/v1/messages/{sent['id']}", headers=auth)
            return bool((await got.json())["status"] == "delivered")

        await eventually(delivered)
        got = await (await client.get(f"/api/v1/messages/{sent['id']}", headers=auth)).json()
        assert got["receipts"][0]["status"] == "DELIVRD" and got["decision"]["table_version"] == 1
        listed = await (await client.get(f"/api/v1/messages?to=%2B{GB_MOBILE[1:]}", headers=auth)).json()
        assert [m["id"] for m in listed["items"]] == [sent["id"]]

        landline = await client.post("/api/v1/messages", json={**body, "to": "+442079460000"}, headers=auth)
        assert landline.status == 400 and (await landline.json())["field"] == "to"
        missing = await client.post("/api/v1/messages", json={"to": GB_MOBILE, "text": "x"}, headers=auth)
        assert missing.status == 400 and (await missing.json())["field"] == "from"
        reused = await client.post("/api/v1/messages", json={**body, "text": "other"}, headers=headers)
        assert reused.status == 409 and (await reused.json())["field"] == "idempotency_key"

        conversion = await client.post(
            "/api/v1/conversions", json={"message_id": sent["id"], "converted": True}, headers=auth
        )
        assert conversion.status == 201, await conversion.text()
        stored = await conversion.json()
        assert (stored["route"], stored["mcc_mnc"], stored["converted"]) == ("direct", "23420", True)
        unknown = await client.post(
            "/api/v1/conversions", json={"message_id": 999, "converted": False}, headers=auth
        )
        assert unknown.status == 404

        health = await (await client.get("/api/v1/connectors", headers=auth)).json()
        direct = next(c for c in health["items"] if c["route"] == "direct")
        assert direct["bound"] and direct["kind"] == "smpp" and direct["acknowledged"] >= 1
    finally:
        await client.close()


async def test_conversion_feedback_through_the_api_changes_the_score(database: AsyncEngine) -> None:
    """Two routes equal on every measured result; conversion reports through the API (90% for
    one, 50% for the other) make the first score higher once enough are in."""
    from aiohttp.test_utils import TestClient, TestServer

    from controller import scoring
    from controller.api.app import make_app
    from controller.api.tokens import add_token
    from controller.config import ScoringConfig
    from tests.test_api import controller_config
    from tests.test_scoring import NET, insert_results, series
    from tests.test_scoring import NOW as SCORED_AT

    async with database.begin() as conn:
        await insert_results(conn, series("good", 30, 30) + series("poor", 30, 30))
        ids = {}
        for route in ("good", "poor"):
            ids[route] = [
                (
                    await conn.execute(
                        s.messages.insert()
                        .values(
                            created_at=SCORED_AT - timedelta(hours=1),
                            kind="api",
                            destination="+33612345678",
                            region="FR",
                            mcc_mnc=NET,
                            sender="MyBank",
                            text="code",
                            route=route,
                            decision={},
                            status="delivered",
                        )
                        .returning(s.messages.c.id)
                    )
                ).scalar_one()
                for _ in range(40)
            ]
    before = {sc.route: sc for sc in await scoring.recompute(database, ScoringConfig(), SCORED_AT)}
    assert before["good"].score == pytest.approx(before["poor"].score)

    client = TestClient(TestServer(make_app(database, controller_config())))
    await client.start_server()
    auth = {"Authorization": f"Bearer {await add_token(database, 'app', 'operator')}"}
    try:
        for route, rate in (("good", 9), ("poor", 5)):
            for i, message in enumerate(ids[route]):
                at = (SCORED_AT - timedelta(minutes=i)).isoformat()
                answer = await client.post(
                    "/api/v1/conversions",
                    json={"message_id": message, "converted": i % 10 < rate, "at": at},
                    headers=auth,
                )
                assert answer.status == 201, await answer.text()
    finally:
        await client.close()
    after = {sc.route: sc for sc in await scoring.recompute(database, ScoringConfig(), SCORED_AT)}
    assert after["good"].stats["conversion_rate"] == pytest.approx(0.9, abs=0.02)
    assert after["poor"].stats["conversion_rate"] == pytest.approx(0.5, abs=0.02)
    assert (after["poor"].score or 1.0) < (after["good"].score or 0.0)


async def test_an_http_route_sends_and_its_webhook_receipt_reaches_the_message(database: AsyncEngine) -> None:
    """A provider over HTTP (a real aiohttp server on loopback): the sender routes a message to
    it, the provider posts the receipt to our webhook, the message becomes delivered; a wrong
    secret is refused 401 and a route without an HTTP connector 404."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from controller.api.app import make_app
    from tests.test_api import controller_config

    sent: list[dict[str, Any]] = []

    async def accept(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return web.json_response({"messages": [{"status": "0", "message-id": f"prov-{len(sent)}"}]})

    provider = web.Application()
    provider.router.add_post("/sms", accept)
    runner = web.AppRunner(provider)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    async with database.begin() as conn:
        await conn.execute(
            s.networks.insert().values(mcc_mnc="23420", country="GB", operator="Three", smsc_addresses=[])
        )
        await conn.execute(
            s.routes.insert().values(
                name="provider",
                prices={},
                enabled=True,
                connector={
                    "kind": "http",
                    "url": f"http://{host}:{port}/sms",
                    "auth": {"type": "bearer", "token": "t0ken"},
                    "body_template": {"to": "{to_digits}", "from": "{from}", "text": "{text}"},
                    "message_id_path": "messages.0.message-id",
                    "status_path": "messages.0.status",
                    "success_values": ["0"],
                    "receipt": {
                        "message_id_field": "messageId",
                        "status_field": "status",
                        "status_map": {"delivered": "DELIVRD", "failed": "UNDELIV"},
                        "secret": "hook-secret",
                    },
                },
            )
        )
    sender = Sender(database)
    await sender.start()
    client = TestClient(TestServer(make_app(database, controller_config(), sender)))
    await client.start_server()
    try:
        sender.use_table(table(1, choice("provider", 1.0, "primary")))
        outcome = await sender.send(MessageRequest(to=GB_MOBILE, sender="MyBank", text="Grüße 🚀"))
        assert outcome.route == "provider" and sent == [
            {"to": GB_MOBILE[1:], "from": "MyBank", "text": "Grüße 🚀"}
        ]
        hook = "/api/v1/receipts/provider"
        receipt = {"messageId": "prov-1", "status": "delivered"}
        wrong = await client.post(hook, json=receipt, headers={"X-Webhook-Secret": "guess"})
        assert wrong.status == 401
        taken = await client.post(hook, json=receipt, headers={"X-Webhook-Secret": "hook-secret"})
        assert taken.status == 200, await taken.text()
        assert (await taken.json())["message"] == outcome.id
        row = await message_row(database, outcome.id)
        assert row["status"] == "delivered" and row["receipts"][0]["status"] == "DELIVRD"
        unknown = await client.post("/api/v1/receipts/nowhere", json=receipt)
        assert unknown.status == 404
    finally:
        await client.close()
        await sender.stop()
        await runner.cleanup()
