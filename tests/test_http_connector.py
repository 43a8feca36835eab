"""The HTTP connector against a real aiohttp server on loopback acting as the provider (a
Vonage-like JSON API and a simple form-encoded one): ids at nested paths, the three kinds of
credentials, refusals inside a 2xx, throttling with Retry-After, 5xx and timeouts retried then
failed as retryable, Unicode intact; the settings' validation; receipts posted to the webhook."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from controller.sender.http import (
    MISSING,
    HttpConnector,
    HttpSettings,
    WebhookError,
    parse_retry_after,
    parse_webhook,
    resolve_path,
)
from controller.submit import SubmitError

TO = "+447700900123"
SENDER = "ProbeFleet"
UNICODE_TEXT = 'Grüße, тест 你好 🚀 ½€ "quotes" & a+b=c'

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the provider received it."""

    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: bytes
    at: float


class Provider:
    """A provider on loopback: a handler per path, every request recorded."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        self.release = asyncio.Event()
        self.base = ""

    def on(self, path: str, handler: Handler) -> str:
        self.handlers[path] = handler
        return self.base + path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.headers),
                dict(request.query),
                body,
                time.monotonic(),
            )
        )
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.json_response({"error": "no such path"}, status=404)
        return await handler(request, body)


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    server = Provider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.base = f"http://{host}:{port}"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[HttpSettings], Awaitable[HttpConnector]]]:
    started: list[HttpConnector] = []

    async def factory(settings: HttpSettings) -> HttpConnector:
        connector = HttpConnector("http-test", settings)
        await connector.start()
        started.append(connector)
        return connector

    yield factory
    for connector in started:
        await connector.stop()


def vonage(url: str, **extra: Any) -> HttpSettings:
    """A Vonage-like JSON API: the id and the status inside ``messages[0]``."""
    return HttpSettings.model_validate(
        {
            "kind": "http",
            "url": url,
            "body_template": {
                "to": "{to_digits}",
                "from": "{from}",
                "text": "{text}",
                "client-ref": "{reference}",
            },
            "message_id_path": "messages.0.message-id",
            "status_path": "messages.0.status",
            "success_values": ["0"],
            "error_path": "messages.0.error-text",
            "backoff_s": 0.01,
            "backoff_max_s": 2,
            **extra,
        }
    )


def simple_form(url: str, **extra: Any) -> HttpSettings:
    """A plain form-encoded API answering ``{"id": 123}`` or ``{"error": "..."}``."""
    return HttpSettings.model_validate(
        {
            "kind": "http",
            "url": url,
            "body": "form",
            "body_template": {"to": "{to}", "from": "{from}", "message": "{text}"},
            "message_id_path": "id",
            "error_path": "error",
            "backoff_s": 0.01,
            "backoff_max_s": 2,
            **extra,
        }
    )


def vonage_ok(message_id: str = "0A0000001234ABCD") -> web.Response:
    return web.json_response(
        {"message-count": "1", "messages": [{"to": TO[1:], "message-id": message_id, "status": "0"}]}
    )


async def test_the_id_is_read_at_a_nested_path(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        assert request.content_type == "application/json"
        return vonage_ok()

    connector = await connect(vonage(provider.on("/sms/json", sms)))
    accepted = await connector.submit(source=SENDER, destination=TO, text="hello")

    assert accepted.message_ids == ("0A0000001234ABCD",)
    assert accepted.parts == 1
    assert accepted.submitted_at.tzinfo is UTC and accepted.acked_at.tzinfo is UTC
    assert accepted.submitted_at <= accepted.acked_at
    [seen] = provider.seen
    assert json.loads(seen.body) == {
        "to": TO[1:],
        "from": SENDER,
        "text": "hello",
        "client-ref": accepted.reference,
    }
    health = connector.health()
    assert (health.kind, health.bound, health.submitted, health.acknowledged, health.errors) == (
        "http",
        True,
        1,
        1,
        0,
    )
    assert health.in_flight == 0 and health.submit_per_s > 0


async def test_a_numeric_id_becomes_text(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def send(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"id": 123456789}, status=201)

    connector = await connect(simple_form(provider.on("/send", send)))
    accepted = await connector.submit(source=SENDER, destination=TO, text="hi")
    assert accepted.message_ids == ("123456789",)


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        (
            {"type": "basic", "username": "key", "password": "s3cret-pw"},
            "Authorization",
            "Basic a2V5OnMzY3JldC1wdw==",
        ),
        ({"type": "bearer", "token": "tok-123456"}, "Authorization", "Bearer tok-123456"),
        ({"type": "header", "name": "X-API-Key", "value": "k-987654"}, "X-API-Key", "k-987654"),
    ],
    ids=["basic", "bearer", "header"],
)
async def test_credentials_reach_the_provider(
    provider: Provider,
    connect: Callable[[HttpSettings], Awaitable[HttpConnector]],
    auth: dict[str, str],
    header: str,
    expected: str,
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        if request.headers.get(header) != expected:
            return web.json_response({"error": "unauthorised"}, status=401)
        return vonage_ok()

    connector = await connect(vonage(provider.on("/sms", sms), auth=auth))
    accepted = await connector.submit(source=SENDER, destination=TO, text="hi")
    assert accepted.message_ids == ("0A0000001234ABCD",)


async def test_wrong_credentials_are_refused_and_never_logged(
    provider: Provider,
    connect: Callable[[HttpSettings], Awaitable[HttpConnector]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        # A careless provider echoing the credentials it did not like.
        given = request.headers.get("Authorization", "")
        return web.json_response({"messages": [{"error-text": f"bad credentials {given}"}]}, status=401)

    caplog.set_level(logging.DEBUG)
    connector = await connect(
        vonage(provider.on("/sms", sms), auth={"type": "bearer", "token": "wrong-token"})
    )
    with pytest.raises(SubmitError) as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")

    assert not raised.value.retryable
    assert "401" in raised.value.reason and "bad credentials" in raised.value.reason
    assert "wrong-token" not in raised.value.reason
    assert "wrong-token" not in caplog.text
    assert len(provider.seen) == 1
    health = connector.health()
    assert not health.bound, "the route cannot send anything with these credentials"
    assert health.last_error is not None and "wrong-token" not in health.last_error


async def test_an_error_in_a_2xx_answer_is_a_permanent_refusal(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"messages": [{"status": "2", "error-text": "Missing to param"}]})

    async def send(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"id": None, "error": "Invalid sender id"})

    json_api = await connect(vonage(provider.on("/sms", sms)))
    with pytest.raises(SubmitError) as raised:
        await json_api.submit(source=SENDER, destination=TO, text="hi")
    assert not raised.value.retryable
    assert "Missing to param" in raised.value.reason and "'2'" in raised.value.reason

    form_api = await connect(simple_form(provider.on("/send", send)))
    with pytest.raises(SubmitError) as raised:
        await form_api.submit(source=SENDER, destination=TO, text="hi")
    assert not raised.value.retryable
    assert "Invalid sender id" in raised.value.reason
    assert len(provider.seen) == 2, "a refusal is not retried"
    assert form_api.health().bound, "the provider answered: it is reachable"


async def test_an_answer_without_the_id_names_the_path(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        return web.json_response({"messages": [{"status": "0"}]})

    async def text(request: web.Request, body: bytes) -> web.Response:
        return web.Response(text="OK")

    connector = await connect(vonage(provider.on("/sms", sms)))
    with pytest.raises(SubmitError, match=r"messages\.0\.message-id") as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")
    assert not raised.value.retryable

    plain = await connect(simple_form(provider.on("/text", text)))
    with pytest.raises(SubmitError, match="not JSON") as raised:
        await plain.submit(source=SENDER, destination=TO, text="hi")
    assert not raised.value.retryable


async def test_throttling_waits_as_retry_after_says_then_succeeds(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    answers = iter(
        [
            web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "1"}),
            vonage_ok("0B"),
        ]
    )

    async def sms(request: web.Request, body: bytes) -> web.Response:
        return next(answers)

    connector = await connect(vonage(provider.on("/sms", sms)))
    accepted = await connector.submit(source=SENDER, destination=TO, text="hi")

    assert accepted.message_ids == ("0B",)
    first, second = provider.seen
    assert second.at - first.at >= 0.9, "Retry-After: 1 was honoured, not the 10 ms back-off"
    assert json.loads(first.body)["client-ref"] == json.loads(second.body)["client-ref"] == accepted.reference
    health = connector.health()
    assert (health.throttled, health.submitted, health.acknowledged, health.errors) == (1, 2, 1, 0)
    assert health.bound


async def test_a_throttling_status_value_in_a_2xx_is_retried(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    answers = iter(
        [web.json_response({"messages": [{"status": "1", "error-text": "Throttled"}]}), vonage_ok()]
    )

    async def sms(request: web.Request, body: bytes) -> web.Response:
        return next(answers)

    connector = await connect(vonage(provider.on("/sms", sms), throttle_values=["1"]))
    accepted = await connector.submit(source=SENDER, destination=TO, text="hi")
    assert accepted.message_ids == ("0A0000001234ABCD",)
    assert connector.health().throttled == 1


async def test_a_retry_after_longer_than_the_longest_pause_fails_at_once(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "3600"})

    connector = await connect(vonage(provider.on("/sms", sms)))
    with pytest.raises(SubmitError, match="3600 s") as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")
    assert raised.value.retryable
    assert len(provider.seen) == 1


async def test_server_errors_are_retried_then_fail_as_retryable(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        return web.Response(status=503, text="maintenance")

    connector = await connect(vonage(provider.on("/sms", sms), max_retries=2))
    with pytest.raises(SubmitError) as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")

    assert raised.value.retryable
    assert "503" in raised.value.reason and "3 attempts" in raised.value.reason
    assert len(provider.seen) == 3
    health = connector.health()
    assert (health.bound, health.submitted, health.errors, health.acknowledged) == (False, 3, 3, 0)
    assert health.last_error is not None and "maintenance" in health.last_error


async def test_a_timeout_is_retryable(
    provider: Provider, connect: Callable[[HttpSettings], Awaitable[HttpConnector]]
) -> None:
    async def sms(request: web.Request, body: bytes) -> web.Response:
        await asyncio.wait_for(provider.release.wait(), 5)
        return vonage_ok()

    connector = await connect(vonage(provider.on("/sms", sms), timeout_s=0.2, max_retries=1))
    with pytest.raises(SubmitError, match=r"within 0\.2 s") as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")
    assert raised.value.retryable
    assert len(provider.seen) == 2
    assert not connector.health().bound


async def test_a_refused_connection_is_retryable(
    connect: Callable[[HttpSettings], Awaitable[HttpConnector]],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    connector = await connect(vonage(f"http://127.0.0.1:{port}/sms?api_key=key-in-the-url", max_retries=1))
    with pytest.raises(SubmitError, match="failed") as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")
    assert raised.value.retryable
    assert "key-in-the-url" not in raised.value.reason


async def test_a_stopped_connector_refuses_as_retryable(provider: Provider) -> None:
    connector = HttpConnector("http-test", vonage(provider.base + "/sms"))
    with pytest.raises(SubmitError, match="not running") as raised:
        await connector.submit(source=SENDER, destination=TO, text="hi")
    assert raised.value.retryable
    assert not connector.health().bound
    assert provider.seen == []


@pytest.mark.parametrize(("method", "body"), [("POST", "json"), ("POST", "form"), ("GET", "form")])
async def test_unicode_text_and_the_plus_arrive_intact(
    provider: Provider,
    connect: Callable[[HttpSettings], Awaitable[HttpConnector]],
    method: str,
    body: str,
) -> None:
    received: dict[str, str] = {}

    async def send(request: web.Request, raw: bytes) -> web.Response:
        if request.method == "GET":
            received.update(request.query)
        elif request.content_type == "application/json":
            received.update(json.loads(raw.decode("utf-8")))
        else:
            form = await request.post()
            received.update({key: str(value) for key, value in form.items()})
        return web.json_response({"id": "m-1"})

    url = provider.on("/send", send) + "?account=acme"
    connector = await connect(simple_form(url, method=method, body=body))
    accepted = await connector.submit(source=SENDER, destination=TO, text=UNICODE_TEXT)

    assert accepted.message_ids == ("m-1",)
    assert received["message"] == UNICODE_TEXT
    assert received["to"] == TO
    assert received["from"] == SENDER
    if method == "GET":
        assert received["account"] == "acme"


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ({"to": "{recipient}"}, ["body_template", "'to'", "{recipient}"]),
        ({"text": "{text"}, ["body_template", "'text'"]),
        ({"to": "{to!r}"}, ["body_template", "'to'"]),
    ],
)
def test_a_bad_template_is_a_validation_error_naming_the_field(
    template: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(ValidationError) as raised:
        HttpSettings.model_validate(
            {
                "kind": "http",
                "url": "https://sms.example/send",
                "body_template": template,
                "message_id_path": "id",
            }
        )
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"url": "ftp://sms.example/send"}, "url"),
        ({"status_path": "status"}, "success_values"),
        ({"retryable_statuses": [429]}, "share"),
        ({"message_id_path": "messages..id"}, "message_id_path"),
        ({"auth": {"type": "token", "token": "x"}}, "auth"),
        ({"receipt": {"message_id_field": "id", "status_field": "s", "status_map": {"ok": "DONE"}}}, "DONE"),
    ],
)
def test_other_bad_settings_name_the_field(change: dict[str, Any], word: str) -> None:
    data = {
        "kind": "http",
        "url": "https://sms.example/send",
        "body_template": {"to": "{to}"},
        "message_id_path": "id",
    }
    with pytest.raises(ValidationError, match=word):
        HttpSettings.model_validate({**data, **change})


def test_paths_and_retry_after() -> None:
    answer = {"messages": [{"message-id": "a"}, {"message-id": 2}], "a.b": 1}
    assert resolve_path(answer, "messages.1.message-id") == 2
    assert resolve_path(answer, "a.b") == 1
    for missing in ("messages.2.message-id", "messages.x", "nothing", "messages.0.message-id.deeper"):
        assert resolve_path(answer, missing) is MISSING
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# -- receipts on the webhook ----------------------------------------------------------------------


DONE_AT = datetime(2026, 11, 26, 12, 0, 5, tzinfo=UTC)
STATUS_MAP = {"delivered": "DELIVRD", "failed": "UNDELIV", "expired": "EXPIRED", "rejected": "REJECTD"}


def with_receipts(**receipt: Any) -> HttpSettings:
    return vonage(
        "https://sms.example/send",
        receipt={
            "message_id_field": "messageId",
            "status_field": "status",
            "status_map": STATUS_MAP,
            "error_field": "err-code",
            "done_at_field": "message-timestamp",
            **receipt,
        },
    )


@pytest.mark.parametrize(
    ("status", "stat"),
    [("delivered", "DELIVRD"), ("failed", "UNDELIV"), ("Expired", "EXPIRED"), ("ENROUTE", "ENROUTE")],
)
def test_a_json_receipt_is_read_and_its_status_mapped(status: str, stat: str) -> None:
    body = json.dumps(
        {
            "messageId": "0A0000001234ABCD",
            "status": status,
            "err-code": 0,
            "message-timestamp": "2026-11-26T12:00:05Z",
        }
    ).encode()
    receipt = parse_webhook(with_receipts(), {}, body, "application/json; charset=utf-8")

    assert receipt.message_id == "0A0000001234ABCD"
    assert receipt.message_id_alternatives == ()
    assert receipt.stat == stat
    assert receipt.err == "0"
    assert receipt.done_date == DONE_AT
    assert (receipt.submit_date, receipt.dlvrd, receipt.sub, receipt.text, receipt.message_state) == (
        None,
        None,
        None,
        None,
        None,
    )
    assert receipt.source == "text"
    assert receipt.raw_text == body.decode()


def test_a_nested_json_receipt() -> None:
    settings = with_receipts(
        message_id_field="results.0.id",
        status_field="results.0.state.name",
        error_field=None,
        done_at_field="results.0.doneAt",
    )
    body = json.dumps(
        {"results": [{"id": 42, "state": {"name": "rejected"}, "doneAt": "2026-11-26T13:00:05+01:00"}]}
    )
    receipt = parse_webhook(settings, {}, body.encode(), "application/json")
    assert (receipt.message_id, receipt.stat, receipt.err, receipt.done_date) == (
        "42",
        "REJECTD",
        None,
        DONE_AT,
    )


@pytest.mark.parametrize("done_at", [str(int(DONE_AT.timestamp())), str(int(DONE_AT.timestamp() * 1000))])
def test_a_form_receipt_with_a_unix_time(done_at: str) -> None:
    body = f"messageId=m-1&status=failed&err-code=34&message-timestamp={done_at}&note=caf%C3%A9".encode()
    receipt = parse_webhook(with_receipts(), {}, body, "application/x-www-form-urlencoded")
    assert (receipt.message_id, receipt.stat, receipt.err, receipt.done_date) == (
        "m-1",
        "UNDELIV",
        "34",
        DONE_AT,
    )
    assert receipt.raw_text == body.decode()


def test_a_receipt_without_the_optional_fields() -> None:
    receipt = parse_webhook(
        with_receipts(), {}, b'{"messageId": "m-2", "status": "delivered"}', "application/json"
    )
    assert (receipt.stat, receipt.err, receipt.done_date) == ("DELIVRD", None, None)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b'{"status": "delivered"}', "application/json", 400, ["messageId"]),
        (b"messageId=m-1", "application/x-www-form-urlencoded", 400, ["status"]),
        (b'{"messageId": "m-1", "status": "buffered"}', "application/json", 400, ["status", "'buffered'"]),
        (
            b'{"messageId": "m-1", "status": "delivered", "message-timestamp": "yesterday"}',
            "application/json",
            400,
            ["message-timestamp"],
        ),
        (b"{not json", "application/json", 400, ["JSON"]),
        (b"<dlr/>", "application/xml", 415, ["application/xml"]),
    ],
)
def test_a_bad_receipt_is_refused_naming_what_is_wrong(
    body: bytes, content_type: str, status: int, words: list[str]
) -> None:
    with pytest.raises(WebhookError) as raised:
        parse_webhook(with_receipts(), {}, body, content_type)
    assert raised.value.status == status
    for word in words:
        assert word in raised.value.reason


def test_the_shared_secret_is_checked() -> None:
    settings = with_receipts(secret="hook-secret-1", secret_header="X-Hook-Token")
    body = b'{"messageId": "m-1", "status": "delivered"}'
    for headers in ({}, {"X-Hook-Token": "wrong"}, {"X-Webhook-Secret": "hook-secret-1"}):
        with pytest.raises(WebhookError) as raised:
            parse_webhook(settings, headers, body, "application/json")
        assert raised.value.status == 401
        assert "hook-secret-1" not in raised.value.reason
    receipt = parse_webhook(settings, {"x-hook-token": "hook-secret-1"}, body, "application/json")
    assert receipt.stat == "DELIVRD"


def test_receipts_are_counted_and_a_route_without_receipts_refuses_them() -> None:
    connector = HttpConnector("http-test", with_receipts())
    connector.receipt({}, b'{"messageId": "m-1", "status": "delivered"}', "application/json")
    assert connector.health().receipts == 1
    with pytest.raises(WebhookError) as raised:
        parse_webhook(vonage("https://sms.example/send"), {}, b"{}", "application/json")
    assert raised.value.status == 404
