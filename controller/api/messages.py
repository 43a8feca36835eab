"""Messages through the bundled sender, conversion feedback, and the connectors' health.

``POST /messages`` checks, routes and sends one message and answers with its id and the route
that took it (201; 200 when its idempotency key found an earlier one, which is not sent again).
``POST /conversions`` is the conversion feedback of OTP and 2FA traffic (did the user use the
code?): it feeds the route's conversion rate in its score. A controller without a sender answers
503 on sending and on the connectors' health.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import AwareDatetime, Field
from sqlalchemy import select

from controller.api.errors import ApiError, bad_request, conflict, not_found
from controller.api.inputs import ROUTE_NAME_PATTERN, path_text
from controller.api.ops import Call, In, Operation, Out, id_param, json_response, string_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.sender import messages
from controller.sender.http import HttpConnector, WebhookError
from controller.sender.sender import MessageRequest, Sender, SendRefused, SendUnavailable
from controller.storage import schema as s

SENDER = web.AppKey("sender", Sender)
#: A client's idempotency key, also accepted in this header (the body's wins).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: Longest text taken: 10 GSM parts.
MAX_TEXT = 1_530


class MessageIn(In):
    """A message to send."""

    to: str = Field(
        min_length=1, max_length=32, description="Recipient, E.164 (+...) or national with region."
    )
    from_: str = Field(
        alias="from", min_length=1, max_length=16, description="Sender id: alphanumeric or a number."
    )
    text: str = Field(min_length=1, max_length=MAX_TEXT, description="The text; long texts go in parts.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=128, description="The same key never sends twice."
    )
    promotional: bool = Field(False, description="Promotional traffic keeps the country's quiet hours.")
    region: str | None = Field(
        None, pattern=r"^[A-Z]{2}$", description="Region of a number in national format (ISO 3166 alpha-2)."
    )


class ReceiptItem(Out):
    """A delivery receipt of one part."""

    message_id: str = Field(description="The route's id of the part.")
    status: str = Field(description="DELIVRD, UNDELIV, EXPIRED, ...")
    error: str | None = Field(description="The route's error code, if any.")
    done_at: datetime | None = Field(description="When the route says it was done.")
    received_at: datetime = Field(description="When the receipt reached the controller.")


class MessageOut(Out):
    """A message and what became of it."""

    id: int = Field(description="Message id.")
    created_at: datetime = Field(description="When the sender took it.")
    kind: str = Field(description="api (traffic) or test (a test case's submit).")
    test_case_id: int | None = Field(description="The test case it carried, for tests.")
    destination: str = Field(description="Recipient, E.164.")
    region: str | None = Field(description="Recipient's region.")
    mcc_mnc: str | None = Field(description="Recipient's network.")
    sender: str = Field(description="Sender id.")
    text: str = Field(description="The text.")
    route: str | None = Field(description="The route that took it.")
    status: str = Field(description="accepted, submitted, delivered, undeliverable or failed.")
    decision: dict[str, Any] = Field(description="Routing decision: route, reason, table version, attempts.")
    parts: int | None = Field(description="Parts it went in.")
    message_ids: list[str] | None = Field(description="The route's id of each part.")
    submitted_at: datetime | None = Field(description="When it left for the route.")
    acked_at: datetime | None = Field(description="When the route accepted it.")
    error: str | None = Field(description="Why no route took it.")
    receipt_status: str | None = Field(description="The latest receipt's status.")
    receipts: list[ReceiptItem] = Field(default_factory=list, description="Receipts, in arrival order.")


class MessagesQuery(PageQuery):
    """Filters of the message list."""

    to: str | None = Field(None, max_length=16, description="Only messages to this number (E.164).")
    status: Literal["accepted", "submitted", "delivered", "undeliverable", "failed"] | None = Field(
        None, description="Only messages in this state."
    )
    route: str | None = Field(None, max_length=64, description="Only messages the route took.")
    kind: Literal["api", "test"] | None = Field(None, description="Only traffic or only tests.")


class MessagePage(Page[MessageOut]):
    """A page of messages, newest first."""


class ConversionIn(In):
    """Whether a message's recipient converted (used the code, completed the sign-in)."""

    message_id: int = Field(ge=1, description="The message id (from POST /messages).")
    converted: bool = Field(description="True when the recipient converted.")
    at: AwareDatetime | None = Field(None, description="When it happened; now when left out.")


class ConversionOut(Out):
    """A conversion report as stored."""

    id: int = Field(description="Report id.")
    message_id: int = Field(description="The message.")
    route: str = Field(description="The route that carried the message.")
    mcc_mnc: str = Field(description="The network it went to.")
    converted: bool = Field(description="Converted or not.")
    at: datetime = Field(description="When it happened.")


class ReceiptAccepted(Out):
    """A provider's delivery receipt, taken."""

    message_id: str = Field(description="The provider's message id it is for.")
    status: str = Field(description="Its state as an SMPP stat word (DELIVRD, UNDELIV, ...).")
    message: int | None = Field(
        description="Our message it belongs to; null when not known (kept all the same)."
    )


class ConnectorOut(Out):
    """One connector's health."""

    route: str = Field(description="Route name.")
    kind: str = Field(description="smpp or http.")
    bound: bool = Field(description="Connected (SMPP: bound) and usable.")
    in_flight: int = Field(description="Submits sent and unanswered.")
    queued: int = Field(0, description="Submits waiting for the window or the link.")
    submitted: int = Field(description="Submits sent (resends included).")
    acknowledged: int = Field(description="Submits the route accepted.")
    errors: int = Field(description="Submits refused.")
    throttled: int = Field(description="Throttling answers.")
    submit_per_s: float = Field(description="Submits per second, recently.")
    last_error: str | None = Field(description="The last problem, in words.")


class ConnectorList(Out):
    """Every connector of this controller's sender."""

    items: list[ConnectorOut] = Field(description="By route name.")


def _sender(call: Call) -> Sender:
    sender = call.request.app.get(SENDER)
    if sender is None:
        raise ApiError(503, "this controller has no sender (enable [sender] in its config)")
    return sender


def _message_id(call: Call) -> int:
    raw = call.request.match_info["id"]
    if not raw.isdigit() or not 0 < int(raw) < 2**31:
        raise bad_request("id: a positive integer", "id")
    return int(raw)


async def send_message(call: Call) -> web.Response:
    """Send a message: checked, routed by the table, failed over when a route refuses it."""
    body = call.body(MessageIn)
    key = body.idempotency_key or call.request.headers.get(IDEMPOTENCY_HEADER) or None
    if key is not None and len(key) > 128:
        raise bad_request("idempotency key: at most 128 characters", "idempotency_key")
    request = MessageRequest(
        to=body.to,
        sender=body.from_,
        text=body.text,
        idempotency_key=key,
        promotional=body.promotional,
        default_region=body.region,
    )
    try:
        outcome = await _sender(call).send(request)
    except SendRefused as exc:
        raise bad_request(str(exc), exc.field) from None
    except SendUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    except messages.IdempotencyConflict as exc:
        raise conflict(str(exc), "idempotency_key") from None
    found = await _get(call, outcome.id)
    return json_response(found, 201 if outcome.created else 200)


async def _get(call: Call, message: int) -> MessageOut:
    async with call.engine.connect() as conn:
        found = await messages.get(conn, message)
    if found is None:
        raise not_found(f"no message {message}", "id")
    return MessageOut.model_validate(found)


async def get_message(call: Call) -> MessageOut:
    """One message with its receipts."""
    return await _get(call, _message_id(call))


async def list_messages(call: Call) -> MessagePage:
    """Messages, newest first; search by number, state, route or kind."""
    query = call.query(MessagesQuery)
    m = s.messages.c
    statement = where_given(
        select(s.messages),
        (m.destination, query.to),
        (m.status, query.status),
        (m.route, query.route),
        (m.kind, query.kind),
    )
    return await call.list_page(
        MessagePage, statement, Order((m.id,), descending=True), query, MessageOut.from_row
    )


async def report_conversion(call: Call) -> ConversionOut:
    """Record whether a message's recipient converted; it counts in its route's score."""
    body = call.body(ConversionIn)
    now = datetime.now(UTC)
    async with call.engine.begin() as conn:
        row = (
            await conn.execute(
                select(s.messages.c.route, s.messages.c.mcc_mnc).where(s.messages.c.id == body.message_id)
            )
        ).first()
        if row is None:
            raise not_found(f"no message {body.message_id}", "message_id")
        if row.route is None or row.mcc_mnc is None:
            raise conflict(
                f"message {body.message_id} was not sent on a route to a known network", "message_id"
            )
        values = {
            "message_id": str(body.message_id),
            "route": row.route,
            "mcc_mnc": row.mcc_mnc,
            "converted": body.converted,
            "at": body.at or now,
            "received_at": now,
        }
        new_id = (
            await conn.execute(s.conversions.insert().values(values).returning(s.conversions.c.id))
        ).scalar_one()
    return ConversionOut.model_validate({**values, "id": new_id, "message_id": body.message_id})


async def list_connectors(call: Call) -> ConnectorList:
    """The health of every route connector of this controller's sender."""
    items = [ConnectorOut.model_validate(health, from_attributes=True) for health in _sender(call).health()]
    return ConnectorList(items=items)


async def receive_receipt(call: Call) -> ReceiptAccepted:
    """A delivery receipt posted by an HTTP provider (the webhook URL to give it), read as the
    route's ``receipt`` settings say; authenticated by the route's shared secret, not a token."""
    route = path_text(call.request, "route", "route", ROUTE_NAME_PATTERN)
    sender = _sender(call)
    connector = sender.connector(route)
    if not isinstance(connector, HttpConnector):
        raise not_found(f"route {route!r} has no HTTP connector on this controller", "route")
    body = await call.request.read()
    try:
        receipt = connector.receipt(call.request.headers, body, call.request.content_type)
    except WebhookError as exc:
        raise ApiError(exc.status, exc.reason) from None
    message = await sender.receipt(route, receipt)
    return ReceiptAccepted(message_id=receipt.message_id, status=receipt.stat, message=message)


_ID = {"id": id_param("Message id.")}

OPERATIONS = (
    Operation(
        "POST",
        "/receipts/{route}",
        receive_receipt,
        "Take a delivery receipt from an HTTP provider (its webhook)",
        "messages",
        ReceiptAccepted,
        role=None,
        errors=(401, 404, 415, 503),
        path_params={"route": string_param("Route name.", ROUTE_NAME_PATTERN)},
    ),
    Operation(
        "POST",
        "/messages",
        send_message,
        "Send a message through the bundled sender",
        "messages",
        MessageOut,
        status=201,
        body=MessageIn,
        role="operator",
        errors=(409, 503),
        other={200: MessageOut},
    ),
    Operation(
        "GET", "/messages", list_messages, "List messages", "messages", MessagePage, query=MessagesQuery
    ),
    Operation(
        "GET",
        "/messages/{id}",
        get_message,
        "Get a message with its receipts",
        "messages",
        MessageOut,
        errors=(404,),
        path_params=_ID,
    ),
    Operation(
        "POST",
        "/conversions",
        report_conversion,
        "Report whether a message's recipient converted",
        "messages",
        ConversionOut,
        status=201,
        body=ConversionIn,
        role="operator",
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/connectors",
        list_connectors,
        "Health of the route connectors",
        "messages",
        ConnectorList,
        errors=(503,),
    ),
)
