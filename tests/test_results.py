"""Observations, receipts and deadlines turned into results, through the controller's own ingest
on both databases (SQLite file, PostgreSQL): token matches, texts altered and senders replaced by
the route, unsolicited SMS, the deadline sweep, late and duplicate deliveries, fake and wrong
receipts, and the clock offset measured by the controller used when the agent knew none.

Observations are built as the agent publishes them (the agent's own path, from the modem to this
payload, is tested in tests/test_agent.py); they enter through ``Ingest.handle`` as MQTT messages
do, without a broker (tests/test_ingest.py covers the broker path).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.correlation import Token, render
from controller.ingest import Ingest
from controller.results import rejudge_receipts
from controller.storage import schema as s
from probe_agent.protocol import ClockState, Observation, SimIdentity, Topics

T = Topics()
SUBMIT = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
IMSI = "234150000000001"
MSISDN = "+447700900001"
OPERATOR_SMSC = "+447785016005"
FOREIGN_SMSC = "+8613800100500"


async def seed(engine: AsyncEngine, cases: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            s.networks.insert().values(
                mcc_mnc="23415", country="GB", operator="Vodafone UK", smsc_addresses=[OPERATOR_SMSC]
            )
        )
        await conn.execute(
            s.routes.insert(),
            [
                {"name": "direct", "connector": {}, "prices": {"23415": 0.03}, "enabled": True},
                {"name": "grey", "connector": {}, "prices": {"23415": 0.01}, "enabled": True},
            ],
        )
        await conn.execute(
            s.probes.insert().values(
                imsi=IMSI, msisdn=MSISDN, mcc_mnc="23415", connected=True, updated_at=SUBMIT
            )
        )
        await conn.execute(s.test_cases.insert(), cases)


def case(
    case_id: int, token: Token, *, route: str = "direct", sender: str = "MyBank", at: datetime = SUBMIT
) -> dict[str, Any]:
    return {
        "id": case_id,
        "token": str(token),
        "route": route,
        "imsi": IMSI,
        "msisdn": MSISDN,
        "mcc_mnc": "23415",
        "sender": sender,
        "text": render(token, "otp"),
        "template": "otp",
        "scheduled_at": at - timedelta(seconds=1),
        "submitted_at": at,
        "submit_acked_at": at + timedelta(milliseconds=40),
        "message_id": f"msg-{case_id}",
        "deadline_at": at + timedelta(minutes=10),
        "status": "submitted",
    }


def observation(
    obs_id: str,
    text: str,
    *,
    after_ms: float,
    sender: str = "MyBank",
    sender_type: str = "alphanumeric",
    smsc: str = OPERATOR_SMSC,
    clock: ClockState | None = None,
) -> Observation:
    urc = SUBMIT + timedelta(milliseconds=after_ms)
    return Observation(
        id=obs_id,
        agent="pi-uk-1",
        modem="modem-a",
        sim=SimIdentity(imsi=IMSI, msisdn=MSISDN, mcc_mnc="23415"),
        sender=sender,
        sender_type=sender_type,
        text=text,
        smsc=smsc,
        scts=(urc - timedelta(milliseconds=900)).replace(microsecond=0),
        urc_at=urc,
        completed_at=urc + timedelta(milliseconds=5),
        parts=1,
        total_parts=1,
        partial=False,
        origin="cmti",
        pdus=["00"],
        clock=clock if clock is not None else ClockState(offset_ms=250.0, error_ms=4.0, source="chrony"),
        software_version="0.1.0",
    )


async def ingest(engine: AsyncEngine, *observations: Observation, at: datetime | None = None) -> Ingest:
    ingest = Ingest(engine, T)
    acked: list[int] = []
    received = at or SUBMIT + timedelta(minutes=1)
    for obs in observations:
        await ingest.handle(T.sms(obs.agent), obs.to_json(), received, lambda: acked.append(1))
    await ingest.flush()
    assert len(acked) == len(observations), "every message is acknowledged after its commit"
    return ingest


async def result(engine: AsyncEngine, case_id: int) -> Any:
    async with engine.connect() as conn:
        return (
            await conn.execute(select(s.results).where(s.results.c.test_case_id == case_id))
        ).one_or_none()


async def marks(engine: AsyncEngine) -> dict[str, tuple[int | None, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(s.observations.c.id, s.observations.c.test_case_id, s.observations.c.match)
        )
        return {r.id: (r.test_case_id, r.match) for r in rows}


async def status(engine: AsyncEngine, case_id: int) -> str:
    async with engine.connect() as conn:
        return str(
            (
                await conn.execute(select(s.test_cases.c.status).where(s.test_cases.c.id == case_id))
            ).scalar_one()
        )


TOKEN_A = Token("483920", "K7Q2")
TOKEN_B = Token("105577", "ZP3M")


async def test_token_match_gives_an_intact_delivery_with_corrected_latency(database: AsyncEngine) -> None:
    await seed(database, [case(1, TOKEN_A), case(2, TOKEN_B)])
    await ingest(database, observation("o1", render(TOKEN_A, "otp"), after_ms=3_250.0))
    r = await result(database, 1)
    assert r is not None and r.delivered and not r.late
    # Arrival 3,250 ms after submit on the agent's clock, which runs 250 ms ahead: 3,000 ms.
    assert r.latency_ms == pytest.approx(3_000.0)
    assert r.latency_error_ms == pytest.approx(4.0)
    assert r.match_kind == "token" and r.observation_id == "o1"
    assert r.content_intact is True and r.sender_kept is True and r.smsc_known is True
    assert r.flags == [] and r.parts == 1 and r.parts_expected == 1
    assert r.route_leg_ms is not None and r.network_leg_ms is not None
    assert r.route_leg_ms + r.network_leg_ms == pytest.approx(r.latency_ms)
    assert await status(database, 1) == "done"
    assert await status(database, 2) == "submitted", "the other test is still waiting"
    assert await result(database, 2) is None
    assert (await marks(database))["o1"] == (1, "token")


async def test_altered_text_and_replaced_sender_match_fuzzily_and_are_flagged(database: AsyncEngine) -> None:
    """A grey route: the code rewritten (token gone), the alphanumeric sender replaced by a local
    mobile number (a SIM box), delivered through a foreign SMSC."""
    await seed(database, [case(1, TOKEN_A, route="grey")])
    sent = render(TOKEN_A, "otp")
    altered = sent.replace("483920", "000000").replace("K7Q2", "")
    await ingest(
        database,
        observation(
            "o1",
            altered,
            after_ms=9_000.0,
            sender="+447700912345",
            sender_type="international",
            smsc=FOREIGN_SMSC,
        ),
    )
    r = await result(database, 1)
    assert r is not None and r.delivered
    assert r.match_kind == "fuzzy"
    assert r.content_intact is False and r.content_diff
    assert "483920" in r.content_diff and "000000" in r.content_diff
    assert r.sender_kept is False and r.sender_received == "+447700912345" and r.sim_box is True
    assert r.smsc_known is False
    assert {"fuzzy_match", "content_altered", "sender_replaced", "sim_box", "foreign_smsc"} <= set(r.flags)
    assert (await marks(database))["o1"] == (1, "fuzzy")


async def test_sms_matching_no_test_is_kept_as_unsolicited(database: AsyncEngine) -> None:
    await seed(database, [case(1, TOKEN_A)])
    spam = observation("spam", "WIN a prize! Reply YES", after_ms=2_000.0, sender="PRIZES")
    ingest_ = await ingest(database, spam)
    assert (await marks(database))["spam"] == (None, "none")
    assert ingest_.stats.unsolicited == 1 and ingest_.stats.matched == 0
    assert await result(database, 1) is None and await status(database, 1) == "submitted"


async def test_deadline_sweep_then_a_late_delivery_replaces_not_delivered(database: AsyncEngine) -> None:
    await seed(database, [case(1, TOKEN_A), case(2, TOKEN_B, at=SUBMIT + timedelta(minutes=5))])
    async with database.begin() as conn:
        await conn.execute(
            s.receipts.insert().values(
                route="direct",
                message_id="msg-1",
                status="DELIVRD",
                received_at=SUBMIT + timedelta(seconds=4),
            )
        )
    ingest_ = Ingest(database, T)
    assert await ingest_.sweep(SUBMIT + timedelta(minutes=9)) == 0, "no deadline has passed yet"
    assert await ingest_.sweep(SUBMIT + timedelta(minutes=11)) == 1, "only the first test's deadline passed"
    r = await result(database, 1)
    assert r is not None and not r.delivered and r.latency_ms is None
    assert r.receipt_status == "DELIVRD" and r.receipt_honest is False and "fake_receipt" in r.flags
    assert await result(database, 2) is None
    assert await ingest_.sweep(SUBMIT + timedelta(minutes=12)) == 0, "decided once"

    await ingest(database, observation("late", render(TOKEN_A, "otp"), after_ms=13 * 60_000.0))
    r = await result(database, 1)
    assert r is not None and r.delivered and r.late and "late" in r.flags
    assert r.latency_ms == pytest.approx(13 * 60_000.0 - 250.0)
    assert r.receipt_honest is True and "fake_receipt" not in r.flags, "the receipt was right after all"


async def test_second_delivery_of_a_test_is_a_duplicate_and_keeps_the_first_result(
    database: AsyncEngine,
) -> None:
    await seed(database, [case(1, TOKEN_A)])
    await ingest(database, observation("o1", render(TOKEN_A, "otp"), after_ms=2_000.0))
    first = await result(database, 1)
    await ingest(database, observation("o2", render(TOKEN_A, "otp"), after_ms=30_000.0))
    assert (await marks(database)) == {"o1": (1, "token"), "o2": (1, "duplicate")}
    again = await result(database, 1)
    assert again is not None and first is not None
    assert again.observation_id == "o1" and again.latency_ms == first.latency_ms


async def test_the_same_observation_redelivered_by_the_broker_is_stored_once(database: AsyncEngine) -> None:
    await seed(database, [case(1, TOKEN_A)])
    obs = observation("o1", render(TOKEN_A, "otp"), after_ms=2_000.0)
    await ingest(database, obs)
    again = await ingest(database, obs)
    assert again.stats.stored == 0 and again.stats.matched == 0
    assert (await marks(database)) == {"o1": (1, "token")}


async def test_receipts_after_the_result_are_judged(database: AsyncEngine) -> None:
    await seed(database, [case(1, TOKEN_A), case(2, TOKEN_B)])
    await ingest(
        database,
        observation("o1", render(TOKEN_A, "otp"), after_ms=2_000.0),
        observation("o2", render(TOKEN_B, "otp"), after_ms=2_500.0),
    )
    async with database.begin() as conn:
        await conn.execute(
            s.receipts.insert(),
            [
                {"route": "direct", "message_id": "msg-1", "status": "UNDELIV", "received_at": SUBMIT},
                {"route": "direct", "message_id": "msg-2", "status": "DELIVRD", "received_at": SUBMIT},
                # The same message id from another route says nothing about this one.
                {"route": "grey", "message_id": "msg-2", "status": "UNDELIV", "received_at": SUBMIT},
            ],
        )
        outcome = await rejudge_receipts(conn, "direct", ["msg-1", "msg-2"])
    assert outcome.rejudged == 2
    wrong, right = await result(database, 1), await result(database, 2)
    assert wrong is not None and wrong.receipt_honest is False and "wrong_receipt" in wrong.flags
    assert right is not None and right.receipt_honest is True and right.receipt_status == "DELIVRD"


async def test_offset_measured_by_the_controller_corrects_an_agent_that_knows_none(
    database: AsyncEngine,
) -> None:
    await seed(database, [case(1, TOKEN_A)])
    async with database.begin() as conn:
        await conn.execute(
            s.agents.insert().values(
                id="pi-uk-1",
                state="online",
                status_at=SUBMIT,
                last_seen_at=SUBMIT,
                clock_offset_ms=-1_500.0,
                clock_error_ms=12.0,
                clock_measured_at=SUBMIT,
            )
        )
    await ingest(database, observation("o1", render(TOKEN_A, "otp"), after_ms=1_000.0, clock=ClockState()))
    r = await result(database, 1)
    assert r is not None
    # The agent's clock is 1.5 s behind: it stamped 1,000 ms, the truth is 2,500 ms.
    assert r.latency_ms == pytest.approx(2_500.0) and r.latency_error_ms == pytest.approx(12.0)


async def test_many_tests_in_one_batch_each_find_their_own(database: AsyncEngine) -> None:
    tokens = [Token(f"{100000 + i * 7919:06d}", "ABCD"[i % 4] * 4) for i in range(40)]
    await seed(database, [case(i + 1, t, at=SUBMIT + timedelta(seconds=i)) for i, t in enumerate(tokens)])
    observations = [
        observation(f"o{i}", render(t, "otp"), after_ms=1_000.0 * i + 3_000.0) for i, t in enumerate(tokens)
    ]
    ingest_ = await ingest(database, *reversed(observations))
    assert ingest_.stats.matched == 40
    assert await marks(database) == {f"o{i}": (i + 1, "token") for i in range(40)}
    for i in (0, 17, 39):
        r = await result(database, i + 1)
        assert r is not None and r.latency_ms == pytest.approx(3_000.0 - 250.0)


async def test_a_payload_speaking_for_another_agent_is_dead_lettered(database: AsyncEngine) -> None:
    """The broker's ACL only vouches for the topic: pi-uk-2 publishing an observation that claims
    to come from pi-uk-1 is refused, kept with its reason, and counted against pi-uk-2."""
    await seed(database, [case(1, TOKEN_A)])
    ingest_ = Ingest(database, T)
    forged = observation("forged", render(TOKEN_A, "otp"), after_ms=1_000.0)
    await ingest_.handle(T.sms("pi-uk-2"), forged.to_json(), SUBMIT, lambda: None)
    await ingest_.flush()
    assert await marks(database) == {} and await result(database, 1) is None
    async with database.connect() as conn:
        dead = (await conn.execute(select(s.dead_letters))).one()
        invalid = (await conn.execute(select(s.agents.c.id, s.agents.c.invalid_payloads))).all()
    assert "agent 'pi-uk-1'" in dead.error and dead.topic == T.sms("pi-uk-2")
    assert [tuple(r) for r in invalid] == [("pi-uk-2", 1)]


async def test_nul_characters_are_stored_on_every_database(database: AsyncEngine) -> None:
    """A UCS-2 SMS may carry U+0000, which PostgreSQL text columns refuse: the column gets U+FFFD,
    the payload keeps what arrived, and the batch is not lost."""
    await seed(database, [case(1, TOKEN_A)])
    await ingest(
        database,
        observation("nul", "spam\x00text", after_ms=1_000.0, sender="PRIZE\x00"),
        observation("o1", render(TOKEN_A, "otp"), after_ms=2_000.0),
    )
    async with database.connect() as conn:
        row = (await conn.execute(select(s.observations).where(s.observations.c.id == "nul"))).one()
    assert row.text == "spam\ufffdtext" and row.sender == "PRIZE\ufffd"
    assert row.payload["text"] == "spam\x00text"
    assert (await marks(database))["o1"] == (1, "token")


async def test_the_sweep_never_overwrites_a_delivery(database: AsyncEngine) -> None:
    """Another controller matched the SMS between this sweep's read and its write: the test is
    already done, so the sweep leaves its delivered result alone."""
    await seed(database, [case(1, TOKEN_A), case(2, TOKEN_B)])
    await ingest(database, observation("o1", render(TOKEN_A, "otp"), after_ms=2_000.0))
    async with database.begin() as conn:  # as if the other controller's status write were late
        await conn.execute(s.test_cases.update().where(s.test_cases.c.id == 1).values(status="submitted"))
    assert await Ingest(database, T).sweep(SUBMIT + timedelta(minutes=11)) == 2
    delivered, lost = await result(database, 1), await result(database, 2)
    assert delivered is not None and delivered.delivered and delivered.observation_id == "o1"
    assert lost is not None and not lost.delivered


@pytest.mark.parametrize("same_batch", [False, True], ids=["later-batch", "same-batch"])
async def test_a_token_match_supersedes_an_earlier_fuzzy_match(
    database: AsyncEngine, same_batch: bool
) -> None:
    """Tried: an SMS from the expected sender without the token arrives first (taken fuzzily for
    the test), then the test's own SMS with its token. The token is the stronger evidence: the
    result becomes the token delivery (intact, its latency), the earlier SMS is kept, marked
    superseded, and nothing is called a duplicate."""
    await seed(database, [case(1, TOKEN_A)])
    stray = observation("stray", "MyBank: your statement is ready", after_ms=1_000.0)
    real = observation("real", render(TOKEN_A, "otp"), after_ms=4_250.0)
    if same_batch:
        ingest_ = await ingest(database, stray, real)
    else:
        await ingest(database, stray)
        first = await result(database, 1)
        assert first is not None and first.match_kind == "fuzzy" and first.content_intact is False
        ingest_ = await ingest(database, real)
    r = await result(database, 1)
    assert r is not None and r.delivered and r.match_kind == "token" and r.observation_id == "real"
    assert r.content_intact is True and "duplicate" not in r.flags and "fuzzy_match" not in r.flags
    assert r.latency_ms == pytest.approx(4_000.0)
    assert any("replaces an earlier match without the token" in n for n in r.notes)
    assert (await marks(database)) == {"stray": (1, "superseded"), "real": (1, "token")}
    assert ingest_.stats.matched >= 1


@pytest.mark.parametrize(
    "error", ["submit timed out after 10 s: outcome unknown", "the controller stopped during the submit"]
)
async def test_a_delivery_of_a_failed_submit_is_a_delivery_not_unsolicited(
    database: AsyncEngine, error: str
) -> None:
    """Tried: the submit timed out (or the controller stopped mid-submit), so the test is
    ``failed``, yet the route had sent it and its SMS arrives: it is matched by its token and
    recorded as delivered, flagged; an SMS without the token is not matched to a failed test."""
    failed = case(1, TOKEN_A) | {"status": "failed", "error": error, "message_id": None}
    also_failed = case(2, TOKEN_B) | {"status": "failed", "error": error, "message_id": None}
    await seed(database, [failed, also_failed])
    tokenless = observation("tokenless", "MyBank code 999999", after_ms=1_500.0)
    await ingest(database, observation("o1", render(TOKEN_A, "otp"), after_ms=2_250.0), tokenless)
    r = await result(database, 1)
    assert r is not None and r.delivered and r.match_kind == "token"
    assert "delivered_after_failed_submit" in r.flags
    assert any(error in n for n in r.notes)
    assert await status(database, 1) == "done"
    assert await result(database, 2) is None and await status(database, 2) == "failed"
    assert (await marks(database)) == {"o1": (1, "token"), "tokenless": (None, "none")}
