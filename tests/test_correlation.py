"""Correlation: tokens, matching an SMS to its test case, and the result of each test.

Every expectation is computed by hand from the times and texts below: submit at 10:00:00.000Z,
deadline ten minutes later, an agent clock 250 ms fast, an SMSC stamping in +02:00.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from controller.correlation import (
    DEFAULT_GRACE_MS,
    REF_ALPHABET,
    TEMPLATES,
    Receipt,
    TestCase,
    Token,
    arrival_at,
    check_sender,
    compare_content,
    decide,
    expected_parts,
    find_tokens,
    judge_receipt,
    match_observation,
    new_token,
    render,
    smsc_known,
)
from hardware.sms_pdu import is_gsm7
from probe_agent.protocol import Observation

SUBMIT = datetime(2026, 3, 2, 10, 0, 0, tzinfo=UTC)
DEADLINE = SUBMIT + timedelta(minutes=10)
TOKEN = Token("483920", "K7Q2")
IMSI = "262011234567890"
HOME_SMSC = "+491770610000"
CEST = timezone(timedelta(hours=2))
OTP = "Your verification code is 483920. Ref K7Q2. Do not share it with anyone."


def make_case(**overrides: Any) -> TestCase:
    fields: dict[str, Any] = {
        "id": 1,
        "token": TOKEN,
        "route": "direct-de",
        "mcc_mnc": "26201",
        "imsi": IMSI,
        "msisdn": "+491701234567",
        "sender": "ProbeFleet",
        "text": render(TOKEN, "otp"),
        "submitted_at": SUBMIT,
        "deadline_at": DEADLINE,
    }
    fields.update(overrides)
    return TestCase(**fields)


def make_obs(**overrides: Any) -> Observation:
    urc_at = overrides.pop("urc_at", SUBMIT + timedelta(seconds=4))
    fields: dict[str, Any] = {
        "id": "obs-1",
        "agent": "pi-de-1",
        "modem": "m0",
        "sim": {"imsi": IMSI, "msisdn": "+491701234567", "mcc_mnc": "26201"},
        "sender": "ProbeFleet",
        "sender_type": "alphanumeric",
        "text": OTP,
        "smsc": HOME_SMSC,
        "scts": None,
        "urc_at": urc_at,
        "completed_at": urc_at,
        "parts": 1,
        "total_parts": 1,
        "partial": False,
        "origin": "cmti",
        "pdus": ["0791947107160000040DD0D0B29C0E"],
        "clock": {"offset_ms": 0.0, "error_ms": 5.0, "source": "controller", "since_sync_s": 30.0},
        "software_version": "0.1.0",
    }
    fields.update(overrides)
    return Observation.model_validate(fields)


# --- tokens -----------------------------------------------------------------------------------


def test_new_token_is_a_six_digit_code_and_an_unambiguous_ref() -> None:
    tokens = [new_token(random.Random(seed)) for seed in range(300)]
    for token in tokens:
        assert len(token.code) == 6 and token.code.isdigit()
        assert len(token.ref) == 4 and not set(token.ref) & set("0O1IL")
        assert Token.parse(str(token)) == token
    assert len({str(t) for t in tokens}) == 300
    assert new_token(random.Random(7)) == new_token(random.Random(7))
    assert str(TOKEN) == "483920-K7Q2"
    assert "O" not in REF_ALPHABET and "0" not in REF_ALPHABET


@pytest.mark.parametrize(
    ("code", "ref"), [("48392", "K7Q2"), ("48392a", "K7Q2"), ("483920", "K0Q2"), ("483920", "k7q2")]
)
def test_malformed_token_is_refused(code: str, ref: str) -> None:
    with pytest.raises(ValueError):
        Token(code, ref)


def test_every_template_carries_a_findable_token() -> None:
    for template in TEMPLATES:
        assert find_tokens(render(TOKEN, template)) == [TOKEN], template
    assert render(TOKEN, "otp") == OTP
    for template in ("plain", "otp"):
        text = render(TOKEN, template)
        assert is_gsm7(text) and expected_parts(text) == 1
    unicode = render(TOKEN, "unicode")
    assert not is_gsm7(unicode)
    assert any(ord(c) > 0xFFFF for c in unicode), "an emoji outside the BMP"
    assert any("\u0400" <= c <= "\u04ff" for c in unicode), "Cyrillic"
    long = render(TOKEN, "long")
    assert is_gsm7(long) and len(long) > 160
    assert expected_parts(long) == 2  # 259 septets: two parts of at most 153
    with pytest.raises(ValueError, match="unknown template"):
        render(TOKEN, "fancy")  # type: ignore[arg-type]


def test_expected_parts_counts_septets_and_ucs2_units() -> None:
    assert expected_parts("a" * 160) == 1
    assert expected_parts("a" * 161) == 2
    assert expected_parts("€" * 80) == 1  # extension character: two septets each, 160
    assert expected_parts("€" * 81) == 2
    assert expected_parts("Ж" * 70) == 1
    assert expected_parts("Ж" * 71) == 2
    assert expected_parts("\U0001f4f1" * 35) == 1  # surrogate pairs: 70 UCS-2 units
    assert expected_parts("\U0001f4f1" * 36) == 2


@pytest.mark.parametrize(
    "text",
    [
        "Your verification code is 483 920. ref k7q2.",
        "YOUR VERIFICATION CODE IS 483920.REF:K7Q2",
        "code 483-920  (do not share)  Ref  K7Q2 !",
        "483920RefK7q2",
        "Hi! 483920. Ref K7Q2. Second copy: 483920 Ref K7Q2",
    ],
)
def test_find_tokens_despite_spacing_and_case(text: str) -> None:
    assert find_tokens(text) == [TOKEN]


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Your code is 483920. Do not share it.",  # code without a reference
        "Ref K7Q2 only",  # reference without a code
        "483920 Ref K0Q2",  # 0 is not in the alphabet
        "1483920 Ref K7Q2",  # seven digits are no code
        "483920 Ref K7Q2X",  # five characters are no reference
        "483920 Reference K7Q2",
        "Ref K7Q2, your code is 483920",  # reference before the code
    ],
)
def test_find_tokens_never_invents_one(text: str | None) -> None:
    assert find_tokens(text) == []


def test_find_tokens_reports_a_rewritten_code_as_found() -> None:
    assert find_tokens("code 111111. Ref K7Q2 and 222 222 ref abcd") == [
        Token("111111", "K7Q2"),
        Token("222222", "ABCD"),
    ]


# --- matching ---------------------------------------------------------------------------------


def test_token_match_whatever_the_sender_and_window() -> None:
    case = make_case()
    other = make_case(id=2, token=Token("111111", "ZZZZ"))
    obs = make_obs(sender="+491709876543", urc_at=DEADLINE + timedelta(hours=2))
    m = match_observation(obs, [other, case])
    assert m is not None
    assert (m.case.id, m.kind, m.content_altered) == (1, "token", False)
    assert not m.ambiguous and not m.duplicate
    assert "483920-K7Q2" in m.reason


def test_token_found_despite_case_and_spacing_change() -> None:
    obs = make_obs(text="Your verification code is 483920.  ref  k7q2. Do not share it with anyone.")
    m = match_observation(obs, [make_case()])
    assert m is not None and m.kind == "token"
    result = decide(m.case, obs, match=m, decided_at=DEADLINE)
    assert result.content_intact is False
    assert {"case_changed", "whitespace_changed"} <= set(result.flags)
    assert "fuzzy_match" not in result.flags
    assert result.content_diff == (
        "Your verification code is 483920.[- Ref K7Q2-]{+  ref  k7q2+}. Do not share it with anyone."
    )


def test_token_match_on_another_sim_and_twice() -> None:
    obs = make_obs(sim={"imsi": "262019999999999"})
    m = match_observation(obs, [make_case()], matched={1})
    assert m is not None and m.kind == "token" and m.duplicate
    assert "another SIM" in m.reason and "twice" in m.reason
    flags = decide(m.case, obs, match=m, decided_at=DEADLINE).flags
    assert "other_sim" in flags and "duplicate" in flags


def test_fuzzy_match_on_sim_window_and_sender() -> None:
    wanted = make_case(id=3)
    elsewhere = make_case(id=4, token=Token("555555", "MMMM"), imsi="262010000000001")
    expired = make_case(
        id=5,
        token=Token("666666", "NNNN"),
        submitted_at=SUBMIT - timedelta(hours=1),
        deadline_at=SUBMIT - timedelta(minutes=50),
    )
    obs = make_obs(text="Your verification code is ******. Do not share it with anyone.")
    m = match_observation(obs, [elsewhere, expired, wanted])
    assert m is not None
    assert (m.case.id, m.kind, m.content_altered, m.ambiguous) == (3, "fuzzy", True, False)
    assert "no token" in m.reason and "4.0 s after submit" in m.reason
    result = decide(m.case, obs, match=m, decided_at=DEADLINE)
    assert result.delivered and result.match_kind == "fuzzy" and result.content_intact is False
    assert {"fuzzy_match", "content_altered", "code_missing", "ref_missing"} <= set(result.flags)
    assert result.sender_kept is True


def test_fuzzy_match_window_edges_with_grace_and_clock_error() -> None:
    case = make_case()
    text = "Your verification code is ******."
    grace = timedelta(milliseconds=DEFAULT_GRACE_MS)
    inside = make_obs(text=text, urc_at=DEADLINE + grace)
    beyond = make_obs(text=text, urc_at=DEADLINE + grace + timedelta(milliseconds=1))
    assert match_observation(inside, [case]) is not None
    assert match_observation(beyond, [case]) is None
    assert match_observation(beyond, [case], grace_ms=DEFAULT_GRACE_MS + 1) is not None
    # 100 ms after submit on the agent's clock, but that clock is 250 ms fast: 150 ms before submit.
    early = {"text": text, "urc_at": SUBMIT + timedelta(milliseconds=100)}
    tight = make_obs(**early, clock={"offset_ms": 250.0, "error_ms": 100.0, "source": "controller"})
    loose = make_obs(**early, clock={"offset_ms": 250.0, "error_ms": 200.0, "source": "controller"})
    assert arrival_at(tight) == SUBMIT - timedelta(milliseconds=150)
    assert match_observation(tight, [case]) is None
    assert match_observation(loose, [case]) is not None


def test_fuzzy_match_with_sender_replaced_when_one_case_fits() -> None:
    obs = make_obs(
        sender="+491709876543",
        sender_type="international",
        text="Your verification code is ******. Do not share it with anyone.",
    )
    m = match_observation(obs, [make_case()])
    assert m is not None and m.kind == "fuzzy" and m.content_altered
    assert "sender replaced" in m.reason and "'ProbeFleet' -> '+491709876543'" in m.reason
    result = decide(m.case, obs, match=m, decided_at=DEADLINE)
    assert result.sender_kept is False and result.sim_box and "fuzzy_match" in result.flags
    # The same text with a whole other token in it belongs to another test.
    other = obs.model_copy(update={"text": "Your verification code is 111111. Ref K7Q3."})
    assert match_observation(other, [make_case()]) is None


def test_two_cases_in_window_and_sender_replaced_is_unsolicited() -> None:
    first = make_case(id=1)
    second = make_case(id=2, token=Token("222222", "BBBB"), submitted_at=SUBMIT + timedelta(seconds=1))
    obs = make_obs(sender="+491709876543", text="Your verification code is ******.")
    assert match_observation(obs, [first, second]) is None
    assert match_observation(obs, [first]) is not None


@pytest.mark.parametrize(
    "overrides",
    [
        # Operator traffic in the window, from another sender, not resembling the test.
        {"sender": "Telekom", "text": "Ihr Guthaben beträgt 4,20 EUR. Aufladen unter *100#"},
        # Someone else's token.
        {"sender": "ProbeFleet", "text": "Your verification code is 777777. Ref PPPP."},
        # Our sender, but before the test was submitted.
        {"sender": "ProbeFleet", "text": "hello", "urc_at": SUBMIT - timedelta(seconds=5)},
        # Our sender on another SIM.
        {"sender": "ProbeFleet", "text": "hello", "sim": {"imsi": "262010000000001"}},
        # No identity of the SIM at all: nothing to match on.
        {"sender": "ProbeFleet", "text": "hello", "sim": {}},
    ],
)
def test_unsolicited_sms_matches_nothing(overrides: dict[str, Any]) -> None:
    assert match_observation(make_obs(**overrides), [make_case()]) is None


def test_ambiguity_takes_the_earliest_submitted_unmatched_case() -> None:
    later = make_case(id=7, token=Token("777777", "PPPP"), submitted_at=SUBMIT + timedelta(seconds=60))
    earlier = make_case(id=5, token=Token("555555", "MMMM"))
    obs = make_obs(text="Your code: ******", urc_at=SUBMIT + timedelta(seconds=90))
    m = match_observation(obs, [later, earlier])
    assert m is not None and m.kind == "fuzzy" and m.ambiguous
    assert m.case.id == 5
    assert "ambiguous: 2 test cases fit (5, 7), took the earliest submitted unmatched one (5)" in m.reason
    m = match_observation(obs, [later, earlier], matched={5})
    assert m is not None and m.case.id == 7 and not m.ambiguous


def test_sim_known_only_by_number_still_matches() -> None:
    obs = make_obs(text="code ******", sim={"msisdn": "00491701234567"})
    m = match_observation(obs, [make_case()])
    assert m is not None and m.kind == "fuzzy"


# --- timing -----------------------------------------------------------------------------------


def test_latency_corrected_by_agent_offset_and_legs_from_scts_in_its_zone() -> None:
    # Agent clock 250 ms fast: the URC at 10:00:04.750 agent time was 10:00:04.500 true time.
    # The SMSC stamped 12:00:02+02:00 = 10:00:02Z.
    obs = make_obs(
        urc_at=datetime(2026, 3, 2, 10, 0, 4, 750_000, tzinfo=UTC),
        completed_at=datetime(2026, 3, 2, 10, 0, 5, 950_000, tzinfo=UTC),
        scts=datetime(2026, 3, 2, 12, 0, 2, tzinfo=CEST),
        clock={"offset_ms": 250.0, "error_ms": 12.0, "source": "controller", "since_sync_s": 60.0},
    )
    result = decide(make_case(), obs, decided_at=DEADLINE, controller_error_ms=3.0)
    assert result.arrived_at == datetime(2026, 3, 2, 10, 0, 4, 500_000, tzinfo=UTC)
    assert result.latency_ms == pytest.approx(4500.0)
    assert result.latency_error_ms == pytest.approx(15.0)
    assert result.route_leg_ms == pytest.approx(2000.0)
    assert result.network_leg_ms == pytest.approx(2500.0)
    assert result.last_part_ms == pytest.approx(1200.0)
    assert result.delivered and not result.late
    assert result.match_kind == "token" and result.content_intact is True and result.content_diff is None
    assert result.sender_kept is True and result.smsc == HOME_SMSC


def test_unknown_offset_leaves_latency_uncorrected_and_unbounded() -> None:
    urc_at = SUBMIT + timedelta(milliseconds=4750)
    no_offset = make_obs(urc_at=urc_at, clock={"source": "none"})
    result = decide(make_case(), no_offset, decided_at=DEADLINE, controller_error_ms=3.0)
    assert result.latency_ms == pytest.approx(4750.0)
    assert result.latency_error_ms is None
    assert any("offset unknown" in n for n in result.notes)
    no_error = make_obs(urc_at=urc_at, clock={"offset_ms": 250.0, "source": "chrony"})
    result = decide(make_case(), no_error, decided_at=DEADLINE)
    assert result.latency_ms == pytest.approx(4500.0)
    assert result.latency_error_ms is None
    assert any("error unknown" in n for n in result.notes)


@pytest.mark.parametrize(
    ("scts", "route_leg_ms", "note"),
    [
        (None, None, "no SMSC timestamp"),
        (datetime(2026, 3, 2, 11, 59, 58, tzinfo=CEST), -2000.0, None),  # submit - 2 s: still usable
        (datetime(2026, 3, 2, 11, 59, 57, tzinfo=CEST), None, "3.0 s before submit"),
        (datetime(2026, 3, 2, 12, 0, 6, tzinfo=CEST), 6000.0, None),  # arrival + 2 s: still usable
        (datetime(2026, 3, 2, 12, 0, 7, tzinfo=CEST), None, "3.0 s after arrival"),
        (datetime(2026, 3, 2, 12, 0, 2, 500_000, tzinfo=CEST), None, "sub-second"),
    ],
)
def test_scts_is_used_only_when_plausible(
    scts: datetime | None, route_leg_ms: float | None, note: str | None
) -> None:
    result = decide(make_case(), make_obs(scts=scts), decided_at=DEADLINE)  # arrival 10:00:04Z
    assert result.latency_ms == pytest.approx(4000.0)
    if route_leg_ms is None:
        assert result.route_leg_ms is None and result.network_leg_ms is None
        assert note is not None and any(note in n for n in result.notes)
    else:
        assert result.route_leg_ms == pytest.approx(route_leg_ms)
        assert result.network_leg_ms == pytest.approx(4000.0 - route_leg_ms)


def test_late_arrival_is_delivered_late_not_lost() -> None:
    obs = make_obs(urc_at=DEADLINE + timedelta(seconds=30))
    m = match_observation(obs, [make_case()])
    assert m is not None and m.kind == "token"
    result = decide(m.case, obs, match=m, decided_at=DEADLINE + timedelta(seconds=31))
    assert result.delivered and result.late and "late" in result.flags
    assert result.latency_ms == pytest.approx(630_000.0)
    on_time = decide(make_case(), make_obs(urc_at=DEADLINE), decided_at=DEADLINE)
    assert not on_time.late and "late" not in on_time.flags


# --- what the route did -----------------------------------------------------------------------


def test_grey_route_local_number_foreign_smsc_and_slower() -> None:
    known = [HOME_SMSC, "+491770610001"]
    direct = decide(make_case(), make_obs(), decided_at=DEADLINE, known_smscs=known)
    grey_obs = make_obs(
        id="obs-2",
        sender="+491709876543",
        sender_type="international",
        smsc="+447785016005",
        urc_at=SUBMIT + timedelta(seconds=45),
    )
    grey = decide(make_case(), grey_obs, decided_at=DEADLINE, known_smscs=known)
    assert not direct.grey_route and direct.smsc_known is True and direct.sender_kept is True
    assert grey.grey_route
    assert grey.sender_kept is False and grey.sender_received == "+491709876543" and grey.sim_box
    assert grey.smsc == "+447785016005" and grey.smsc_known is False
    assert {"sender_replaced", "sim_box", "foreign_smsc"} <= set(grey.flags)
    assert grey.latency_ms == pytest.approx(45_000.0)
    assert direct.latency_ms == pytest.approx(4_000.0)  # the same test over the direct route
    assert grey.content_intact is True  # the token and text came through


@pytest.mark.parametrize(
    ("sent", "received", "received_type", "kept", "sim_box"),
    [
        ("ProbeFleet", "ProbeFleet", "alphanumeric", True, False),
        ("ProbeFleet", "PROBEFLEET", "alphanumeric", True, False),
        ("ProbeFleetTest", "ProbeFleetT", "alphanumeric", True, False),  # cut to 11 characters
        ("ProbeFleet", "InfoSMS", "alphanumeric", False, False),
        ("ProbeFleet", "+491709876543", "international", False, True),
        ("ProbeFleet", "01709876543", "national", False, True),
        ("ProbeFleet", "491709876543", "unknown", False, True),
        ("ProbeFleet", "12345", "unknown", False, False),  # a short code, not a SIM
        ("+491701111111", "01701111111", "national", True, False),
        ("+491701111111", "00491701111111", "unknown", True, False),
        ("+491701111111", "+491702222222", "international", False, False),
        ("ProbeFleet", None, None, None, False),
    ],
)
def test_sender_kept_replaced_and_sim_box(
    sent: str, received: str | None, received_type: str | None, kept: bool | None, sim_box: bool
) -> None:
    check = check_sender(sent, received, received_type)
    assert (check.kept, check.sim_box) == (kept, sim_box)
    assert check.replaced_by == (received if kept is False else None)


def test_unicode_stripped_by_the_route() -> None:
    case = make_case(text=render(TOKEN, "unicode"))
    received = "??? ??? 483920. Ref K7Q2. Za???? g??l? ja?? ?"
    result = decide(case, make_obs(text=received, alphabet="gsm7"), decided_at=DEADLINE)
    assert result.match_kind == "token" and result.content_intact is False
    assert "unicode_stripped" in result.flags and "content_altered" in result.flags
    assert result.content_diff is not None
    assert "[-Ваш-]{+???+}" in result.content_diff and "[-\U0001f4f1-]{+?+}" in result.content_diff
    # Transliterated and the emoji dropped is stripping too.
    check = compare_content(case.text, "Vash kod 483920. Ref K7Q2. Zazolc gesla jazn", TOKEN)
    assert check.flags == ("unicode_stripped",)


def test_text_cut_by_the_route() -> None:
    long = render(TOKEN, "long")
    case = make_case(text=long)
    result = decide(case, make_obs(text=long[:153]), decided_at=DEADLINE)
    assert result.match_kind == "token" and result.content_intact is False
    assert "truncated" in result.flags
    assert result.content_diff == long[:153] + "[-" + long[153:] + "-]"
    assert (result.parts, result.parts_expected) == (1, 2)
    with_ellipsis = compare_content(long, long[:150] + "...", TOKEN)
    assert with_ellipsis.flags == ("truncated",)
    assert with_ellipsis.diff is not None and with_ellipsis.diff.endswith("-]{+ ...+}")  # cut after "the "


def test_missing_parts_are_flagged() -> None:
    long = render(TOKEN, "long")
    obs = make_obs(text=long[:153], parts=1, total_parts=2, partial=True, missing_parts=[2])
    result = decide(make_case(text=long), obs, decided_at=DEADLINE)
    assert "parts_missing" in result.flags and "truncated" in result.flags


def test_code_replaced_by_the_route() -> None:
    obs = make_obs(text="Your verification code is 111111. Ref K7Q2. Do not share it with anyone.")
    m = match_observation(obs, [make_case()])
    assert m is not None and m.kind == "fuzzy"  # the code is half the token
    result = decide(m.case, obs, match=m, decided_at=DEADLINE)
    assert {"code_replaced", "fuzzy_match", "content_altered"} <= set(result.flags)
    assert "text_edited" not in result.flags and "ref_missing" not in result.flags
    assert result.content_diff == (
        "Your verification code is [-483920-]{+111111+}. Ref K7Q2. Do not share it with anyone."
    )


def test_other_content_changes_are_named() -> None:
    assert compare_content(OTP, OTP, TOKEN) == compare_content(OTP, OTP)
    assert compare_content(OTP, OTP).intact is True and compare_content(OTP, OTP).flags == ()
    added = compare_content(OTP, OTP + " Sent via FreeSMS", TOKEN)
    assert added.flags == ("text_added",) and added.diff == OTP + "{+ Sent via FreeSMS+}"
    edited = compare_content(OTP, OTP.replace("verification", "login"), TOKEN)
    assert edited.flags == ("text_edited",)
    removed = compare_content(OTP, OTP.replace("483920", "").replace("Ref K7Q2", ""), TOKEN)
    assert {"code_missing", "ref_missing"} <= set(removed.flags)
    undecodable = compare_content(OTP, None, TOKEN)
    assert (undecodable.intact, undecodable.diff, undecodable.flags) == (None, None, ("undecodable",))


def test_smsc_known_or_foreign() -> None:
    assert smsc_known("491770610000", [HOME_SMSC]) is True
    assert smsc_known("+447785016005", [HOME_SMSC]) is False
    assert smsc_known("+447785016005", None) is None
    assert smsc_known("+447785016005", []) is None
    assert smsc_known(None, [HOME_SMSC]) is None


# --- receipts and no delivery -----------------------------------------------------------------


def _receipt(status: str, after_s: float) -> Receipt:
    return Receipt(status=status, received_at=SUBMIT + timedelta(seconds=after_s))


def test_nothing_by_the_deadline_is_not_delivered() -> None:
    result = decide(make_case(), None, decided_at=DEADLINE)
    assert not result.delivered and not result.late
    assert result.latency_ms is None and result.match_kind is None and result.observation_id is None
    assert result.receipt_honest is None and result.receipt_status is None
    assert result.flags == () and "nothing arrived by the deadline" in result.notes
    with pytest.raises(ValueError, match="deadline has not passed"):
        decide(make_case(), None, decided_at=DEADLINE - timedelta(seconds=1))


def test_fake_receipt_claims_delivery_of_what_never_arrived() -> None:
    result = decide(make_case(), None, decided_at=DEADLINE, receipts=[_receipt("DELIVRD", 2)])
    assert result.receipt_status == "DELIVRD" and result.receipt_honest is False
    assert "fake_receipt" in result.flags
    honest = decide(make_case(), None, decided_at=DEADLINE, receipts=[_receipt("UNDELIV", 2)])
    assert honest.receipt_honest is True and honest.flags == ()


def test_wrong_receipt_claims_failure_of_what_arrived() -> None:
    for status in ("UNDELIV", "REJECTD", "EXPIRED"):
        result = decide(make_case(), make_obs(), decided_at=DEADLINE, receipts=[_receipt(status, 2)])
        assert result.receipt_status == status and result.receipt_honest is False
        assert "wrong_receipt" in result.flags
    honest = decide(make_case(), make_obs(), decided_at=DEADLINE, receipts=[_receipt("DELIVRD", 2)])
    assert honest.receipt_honest is True
    assert "wrong_receipt" not in honest.flags and "fake_receipt" not in honest.flags


def test_the_final_receipt_is_judged() -> None:
    assert judge_receipt([], delivered=True).honest is None
    enroute_only = judge_receipt([_receipt("ENROUTE", 1)], delivered=False)
    assert (enroute_only.status, enroute_only.honest, enroute_only.flag) == ("ENROUTE", None, None)
    # A final state wins over a later intermediate one; the latest final one counts.
    check = judge_receipt([_receipt("DELIVRD", 3), _receipt("ENROUTE", 5)], delivered=False)
    assert (check.status, check.honest, check.flag) == ("DELIVRD", False, "fake_receipt")
    check = judge_receipt([_receipt("DELIVRD", 3), _receipt("UNDELIV", 4)], delivered=False)
    assert (check.status, check.honest) == ("UNDELIV", True)
    assert judge_receipt([_receipt("delivered", 3)], delivered=True).honest is True  # HTTP spelling


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        make_case(submitted_at=datetime(2026, 3, 2, 10, 0, 0))
    with pytest.raises(ValueError, match="naive"):
        Receipt(status="DELIVRD", received_at=datetime(2026, 3, 2, 10, 0, 0))
    with pytest.raises(ValueError, match="naive"):
        decide(make_case(), None, decided_at=datetime(2026, 3, 2, 11, 0, 0))
