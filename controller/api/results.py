"""Test cases and results, read-only, with filters: what was sent, when, on which route to which
network, and what came of it (the result, the observation that delivered it, the receipts).
Newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import Field, model_validator
from sqlalchemy import Select, String, cast, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.api.errors import not_found
from controller.api.inputs import MAX_ID, QueryTime, RouteName, path_id
from controller.api.ops import Call, Operation, Out, id_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.storage import schema as s
from probe_agent.protocol import MccMnc

FLAG_PATTERN = r"^[a-z][a-z_]{0,31}$"


class TestCaseOut(Out):
    """One test message: what was sent, where and when."""

    id: int = Field(description="Test case id.")
    token: str = Field(description="The correlation token in the text.")
    campaign_id: int | None = Field(description="Campaign that scheduled it.")
    route: str = Field(description="Route it was sent on.")
    imsi: str = Field(description="Destination probe (SIM).")
    msisdn: str = Field(description="Destination number.")
    mcc_mnc: str = Field(description="Destination network.")
    sender: str = Field(description="Sender id it was sent with.")
    text: str = Field(description="Text sent.")
    template: str | None = Field(description="Message template.")
    scheduled_at: datetime = Field(description="When it was due.")
    submitted_at: datetime | None = Field(description="When it was submitted to the route.")
    submit_acked_at: datetime | None = Field(description="When the route acknowledged the submit.")
    message_id: str | None = Field(description="The route's id of the message.")
    deadline_at: datetime = Field(description="Not delivered if nothing arrived by then.")
    status: str = Field(description="scheduled, submitted, done (a result exists), failed or skipped.")
    price: float | None = Field(description="What the route charges for it.")
    error: str | None = Field(description="Why it was skipped or its submit failed.")


class ResultOut(Out):
    """What came of a test case."""

    test_case_id: int = Field(description="The test case.")
    route: str = Field(description="Route.")
    mcc_mnc: str = Field(description="Destination network.")
    delivered: bool = Field(description="Whether it arrived on the probe.")
    late: bool = Field(description="Arrived after the deadline.")
    latency_ms: float | None = Field(description="Submit to arrival, clock-offset corrected, ms.")
    latency_error_ms: float | None = Field(description="Error bound of the latency, ms.")
    route_leg_ms: float | None = Field(description="Submit to the SMSC timestamp, ms.")
    network_leg_ms: float | None = Field(description="SMSC timestamp to the handset, ms.")
    sender_kept: bool | None = Field(description="Sender id arrived as sent.")
    sender_received: str | None = Field(description="Sender id as received.")
    content_intact: bool | None = Field(description="Text arrived unaltered.")
    content_diff: str | None = Field(description="How the text was altered.")
    smsc: str | None = Field(description="SMSC address seen on the handset.")
    smsc_known: bool | None = Field(description="Whether that SMSC is one of the network's.")
    receipt_status: str | None = Field(description="Delivery receipt status.")
    receipt_honest: bool | None = Field(description="Whether the receipt told the truth.")
    parts: int | None = Field(description="Parts received.")
    decided_at: datetime = Field(description="When the result was decided.")
    observation_id: str | None = Field(description="The observation that delivered it.")
    match_kind: str | None = Field(description="token, or fuzzy when the token did not survive.")
    arrived_at: datetime | None = Field(description="Arrival on the handset, corrected.")
    last_part_ms: float | None = Field(description="First URC to the last part complete, ms.")
    sender_sent: str | None = Field(description="Sender id as sent.")
    sim_box: bool | None = Field(description="A local number replaced an alphanumeric sender.")
    parts_expected: int | None = Field(description="Parts sent.")
    flags: list[str] = Field(description="late, content_altered, fake_receipt, ...")
    notes: list[str] = Field(description="Why things are as they are, in words.")


class ObservationOut(Out):
    """An SMS as a probe received it."""

    id: str = Field(description="The agent's observation id.")
    agent_id: str = Field(description="Agent that received it.")
    modem_id: str = Field(description="Modem that received it.")
    imsi: str | None = Field(description="SIM that received it.")
    sender: str | None = Field(description="Sender as received.")
    text: str | None = Field(description="Text as received.")
    smsc: str | None = Field(description="SMSC address from the PDU.")
    urc_at: datetime = Field(description="When the modem announced it (agent clock).")
    ingested_at: datetime = Field(description="When the controller stored it.")
    test_case_id: int | None = Field(description="The test case it matched.")
    match: str | None = Field(
        description="token, fuzzy, duplicate, superseded (a fuzzy match its token replaced), or none "
        "(unsolicited)."
    )
    payload: dict[str, Any] = Field(description="The observation as the agent sent it.")


class ReceiptOut(Out):
    """A delivery receipt from a route."""

    id: int = Field(description="Receipt id.")
    route: str = Field(description="Route.")
    message_id: str = Field(description="The route's message id.")
    status: str = Field(description="DELIVRD, UNDELIV, EXPIRED, ...")
    error: str | None = Field(description="Error code from the route.")
    done_at: datetime | None = Field(description="When the route says it was done.")
    received_at: datetime = Field(description="When the receipt arrived.")
    raw: Any = Field(None, description="The receipt as it arrived (JSON).")


class TestCaseDetail(TestCaseOut):
    """A test case with what came of it."""

    result: ResultOut | None = Field(description="Its result; null while it is pending.")
    observation: ObservationOut | None = Field(description="The observation that delivered it.")
    receipts: list[ReceiptOut] = Field(description="Delivery receipts for it, in arrival order.")


class TestCasesQuery(PageQuery):
    """Filters of the test case list (times on scheduled_at: from inclusive, to exclusive)."""

    route: RouteName | None = Field(None, description="Only tests on this route.")
    mcc_mnc: MccMnc | None = Field(None, description="Only tests to this network.")
    status: Literal["scheduled", "submitted", "done", "failed", "skipped"] | None = Field(
        None, description="Only tests in this state."
    )
    campaign: int | None = Field(None, ge=1, le=MAX_ID, description="Only tests of this campaign (id).")
    from_: QueryTime | None = Field(
        None, alias="from", description="Only tests scheduled at or after this time (RFC 3339, e.g. ...Z)."
    )
    to: QueryTime | None = Field(None, description="Only tests scheduled before this time (RFC 3339).")

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.from_ and self.to and self.to < self.from_:
            raise ValueError("'to' is before 'from'")
        return self


class ResultsQuery(PageQuery):
    """Filters of the result list (times on decided_at: since inclusive, until exclusive)."""

    route: RouteName | None = Field(None, description="Only results of this route.")
    mcc_mnc: MccMnc | None = Field(None, description="Only results of this network.")
    delivered: bool | None = Field(None, description="Only delivered (true) or undelivered (false) tests.")
    flag: str | None = Field(None, pattern=FLAG_PATTERN, description="Only results carrying this flag.")
    since: QueryTime | None = Field(
        None, description="Only results decided at or after this time (RFC 3339)."
    )
    until: QueryTime | None = Field(None, description="Only results decided before this time (RFC 3339).")

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.since and self.until and self.until < self.since:
            raise ValueError("'until' is before 'since'")
        return self


class TestCasePage(Page[TestCaseOut]):
    """A page of test cases."""


class ResultPage(Page[ResultOut]):
    """A page of results."""


def _test_cases(query: TestCasesQuery) -> Select[Any]:
    t = s.test_cases.c
    statement = where_given(
        select(s.test_cases),
        (t.route, query.route),
        (t.mcc_mnc, query.mcc_mnc),
        (t.status, query.status),
        (t.campaign_id, query.campaign),
    )
    if query.from_ is not None:
        statement = statement.where(t.scheduled_at >= query.from_)
    if query.to is not None:
        statement = statement.where(t.scheduled_at < query.to)
    return statement


async def list_test_cases(call: Call) -> TestCasePage:
    """Test cases, newest first."""
    query = call.query(TestCasesQuery)
    order = Order((s.test_cases.c.id,), descending=True)
    return await call.list_page(TestCasePage, _test_cases(query), order, query, TestCaseOut.from_row)


async def _observation(
    conn: AsyncConnection, case_id: int, observation_id: str | None
) -> ObservationOut | None:
    o = s.observations.c
    wanted = o.id == observation_id if observation_id else o.test_case_id == case_id
    row = (await conn.execute(select(s.observations).where(wanted).order_by(o.urc_at, o.id).limit(1))).first()
    return ObservationOut.from_row(row) if row else None


async def test_case_detail(conn: AsyncConnection, case_id: int) -> TestCaseDetail | None:
    """One test case with its result, the observation that delivered it and its receipts (the
    API's answer and the UI's test page); None when there is no such test case."""
    case = (await conn.execute(select(s.test_cases).where(s.test_cases.c.id == case_id))).first()
    if case is None:
        return None
    result = (await conn.execute(select(s.results).where(s.results.c.test_case_id == case_id))).first()
    observation = await _observation(conn, case_id, result.observation_id if result else None)
    receipts = []
    if case.message_id is not None:
        r = s.receipts.c
        receipts = [
            ReceiptOut.from_row(row)
            for row in await conn.execute(
                select(s.receipts)
                .where(r.route == case.route, r.message_id == case.message_id)
                .order_by(r.received_at, r.id)
            )
        ]
    return TestCaseDetail.from_row(
        case,
        result=ResultOut.from_row(result) if result else None,
        observation=observation,
        receipts=receipts,
    )


async def get_test_case(call: Call) -> TestCaseDetail:
    """One test case with its result, the observation that delivered it and its receipts."""
    case_id = path_id(call.request, "id", "test case")
    async with call.engine.connect() as conn:
        detail = await test_case_detail(conn, case_id)
    if detail is None:
        raise not_found(f"no test case {case_id}", "id")
    return detail


def results_query(query: ResultsQuery) -> Select[Any]:
    """The results the filters of ``query`` ask for (the API's list and the UI's route page)."""
    r = s.results.c
    statement = where_given(
        select(s.results), (r.route, query.route), (r.mcc_mnc, query.mcc_mnc), (r.delivered, query.delivered)
    )
    if query.flag is not None:
        # The flags are a JSON list of words; its text holds each one quoted, on every backend.
        statement = statement.where(cast(r.flags, String).contains(f'"{query.flag}"', autoescape=True))
    if query.since is not None:
        statement = statement.where(r.decided_at >= query.since)
    if query.until is not None:
        statement = statement.where(r.decided_at < query.until)
    return statement


async def list_results(call: Call) -> ResultPage:
    """Results, newest test first."""
    query = call.query(ResultsQuery)
    order = Order((s.results.c.test_case_id,), descending=True)
    return await call.list_page(ResultPage, results_query(query), order, query, ResultOut.from_row)


OPERATIONS = (
    Operation(
        "GET",
        "/test-cases",
        list_test_cases,
        "List test cases",
        "results",
        TestCasePage,
        query=TestCasesQuery,
    ),
    Operation(
        "GET",
        "/test-cases/{id}",
        get_test_case,
        "Get a test case with its result, observation and receipts",
        "results",
        TestCaseDetail,
        errors=(404,),
        path_params={"id": id_param("Test case id.")},
    ),
    Operation("GET", "/results", list_results, "List results", "results", ResultPage, query=ResultsQuery),
)
