"""Correlation: which test case a received SMS belongs to, and what its delivery says about the route.

Every test text carries a token, a 6-digit OTP-like code plus a 4-character reference, so an
observation normally finds its test case by the token alone (``match_observation`` kind
``"token"``). Routes do alter texts: they strip Unicode, cut long messages, rewrite codes,
respace or recase. When the token did not survive, the observation is matched on the same SIM,
an arrival inside the test's window and the expected sender (kind ``"fuzzy"``, flagged
content-altered), and otherwise kept as unsolicited. ``decide`` then turns a test case and its
observation (or none by the deadline) into a ``Result``: delivered or late, latency corrected by
the agent's clock offset with an error bound, route and network legs from the SMSC timestamp,
sender kept or replaced (a local number in place of an alphanumeric sender is a SIM-box sign),
content intact or altered with a readable diff, SMSC known or foreign (a grey-route sign), and
whether the delivery receipt told the truth.

The module is pure: no database, no I/O, no clock reads (the caller passes ``decided_at``), so
ingest, the deadline sweep, the benchmarks and the tests all get the same decisions. Times are
timezone-aware, durations in milliseconds.
"""

from __future__ import annotations

import difflib
import math
import random
import re
import secrets
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import ClassVar, Literal, get_args

from hardware.sms_pdu import gsm7_encode, is_gsm7
from probe_agent.protocol import Observation

CODE_DIGITS = 6
REF_LENGTH = 4
#: No 0/O and no 1/I/L: a reference read off a handset screen cannot be misread.
REF_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"

Template = Literal["plain", "otp", "unicode", "long"]
TEMPLATES: tuple[Template, ...] = get_args(Template)
MatchKind = Literal["token", "fuzzy"]

#: How long past the deadline a token-less SMS may still be matched fuzzily. Longer windows
#: catch more late deliveries but risk taking other traffic on the SIM for a late test.
DEFAULT_GRACE_MS = 300_000.0
#: The SMSC timestamp has 1 s resolution and the SMSC's own clock: outside submit - 2 s ..
#: arrival + 2 s it says more about that clock than about the route, so the legs are not split.
SCTS_TOLERANCE_MS = 2_000.0
#: A candidate whose sender was replaced is matched only when the text still resembles the one
#: sent (or keeps its code or reference): otherwise any SMS on the SIM inside the window, an
#: operator's balance message say, would be taken for a SIM-box delivery.
MIN_SIMILARITY_REPLACED_SENDER = 0.5
#: Shortest digit string counted as a subscriber number rather than a short code (E.164 numbers
#: have at least 7 digits in practice; short codes at most 6).
MIN_SUBSCRIBER_DIGITS = 7
#: The longest alphanumeric sender a network carries (TS 23.040: 11 GSM characters).
MAX_ALPHANUMERIC_SENDER = 11

#: Receipt states that claim delivery, and those that claim failure (SMPP 3.4 appendix B, plus
#: the spelled-out words HTTP providers use). Others (ENROUTE, ACCEPTD, UNKNOWN) claim neither.
RECEIPT_DELIVERED = frozenset({"DELIVRD", "DELIVERED"})
RECEIPT_FAILED = frozenset(
    {"UNDELIV", "UNDELIVERABLE", "UNDELIVERED", "REJECTD", "REJECTED", "EXPIRED", "DELETED", "FAILED"}
)

_MS = timedelta(milliseconds=1)
_CODE_PATTERN = r"(?<![0-9])([0-9]{3})[ \u00a0-]?([0-9]{3})(?![0-9])"
_REF_PATTERN = r"(?<![a-z])ref[\s:.#-]*([a-z0-9]{4})(?![a-z0-9])"
#: Code, then at most 32 non-digits (the route may insert words or spaces), then ``Ref`` and the id.
_TOKEN_RE = re.compile(_CODE_PATTERN + r"[^0-9]{0,32}?" + _REF_PATTERN, re.IGNORECASE)
_CODE_RE = re.compile(_CODE_PATTERN)
_REF_RE = re.compile(_REF_PATTERN, re.IGNORECASE)
_NUMBER_RE = re.compile(r"\+?[0-9]+")
_WORD_RE = re.compile(r"\w+|\s+|[^\w\s]")
_ELLIPSIS = ".\u2026 "

_TEMPLATES: dict[Template, str] = {
    "plain": "probe-fleet delivery check {code}. Ref {ref}. No reply needed.",
    "otp": "Your verification code is {code}. Ref {ref}. Do not share it with anyone.",
    # Cyrillic, Polish diacritics and an emoji (outside the BMP): none of them is GSM 7-bit.
    "unicode": "Ваш код {code}. Ref {ref}. Zażółć gęślą jaźń \U0001f4f1",
    "long": (
        "Your code is {code}. Ref {ref}. This is a long delivery test from probe-fleet. It does not "
        "fit in one SMS, so the network splits it into parts and the handset joins them again in "
        "order. Every part has to arrive for the text to match what was sent. End of test."
    ),
}


# --- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """The correlation token of one test: an OTP-like code and a short reference."""

    code: str
    ref: str

    def __post_init__(self) -> None:
        if len(self.code) != CODE_DIGITS or not self.code.isascii() or not self.code.isdigit():
            raise ValueError(f"token code {self.code!r} is not {CODE_DIGITS} digits")
        if len(self.ref) != REF_LENGTH or any(c not in REF_ALPHABET for c in self.ref):
            raise ValueError(f"token ref {self.ref!r} is not {REF_LENGTH} characters of {REF_ALPHABET}")

    def __str__(self) -> str:
        """As stored in ``test_cases.token``: ``483920-K7Q2``."""
        return f"{self.code}-{self.ref}"

    @classmethod
    def parse(cls, stored: str) -> Token:
        """The token of its stored form (``483920-K7Q2``); ValueError if malformed."""
        code, sep, ref = stored.partition("-")
        if not sep:
            raise ValueError(f"stored token {stored!r} has no '-'")
        return cls(code, ref)


def new_token(rng: random.Random | None = None) -> Token:
    """A fresh token; pass a seeded ``random.Random`` for reproducible tests.

    10^6 codes times 31^4 references make a collision with a live token negligible; the unique
    constraint on ``test_cases.token`` catches the rest.
    """
    r = rng if rng is not None else secrets.SystemRandom()
    code = f"{r.randrange(10**CODE_DIGITS):0{CODE_DIGITS}d}"
    return Token(code, "".join(r.choice(REF_ALPHABET) for _ in range(REF_LENGTH)))


def render(token: Token, template: Template) -> str:
    """The test text of ``template`` carrying ``token``; ValueError for an unknown template."""
    try:
        pattern = _TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}") from None
    return pattern.format(code=token.code, ref=token.ref)


def expected_parts(text: str) -> int:
    """Parts a text needs: GSM 7-bit 160 septets alone or 153 per part, else UCS-2 70 or 67."""
    if is_gsm7(text):
        units, single, per_part = len(gsm7_encode(text)), 160, 153
    else:
        units, single, per_part = len(text.encode("utf-16-le")) // 2, 70, 67
    return 1 if units <= single else math.ceil(units / per_part)


def find_tokens(text: str | None) -> list[Token]:
    """Tokens in a received text, in order, without duplicates.

    Tolerates what routes do around a token: a space or hyphen inside the code, spaces or
    punctuation added or removed before the reference, its case changed. A token is only
    reported when both a 6-digit code and a ``Ref`` followed by a valid reference are there.
    """
    found: list[Token] = []
    for m in _TOKEN_RE.finditer(text or ""):
        ref = m.group(3).upper()
        if all(c in REF_ALPHABET for c in ref):
            token = Token(m.group(1) + m.group(2), ref)
            if token not in found:
                found.append(token)
    return found


def _codes(text: str) -> set[str]:
    return {m.group(1) + m.group(2) for m in _CODE_RE.finditer(text)}


def _refs(text: str) -> set[str]:
    return {m.group(1).upper() for m in _REF_RE.finditer(text)}


# --- inputs -----------------------------------------------------------------------------------


def _require_aware(name: str, when: datetime | None) -> None:
    if when is not None and when.utcoffset() is None:
        raise ValueError(f"{name} {when.isoformat()} is naive: give it a time zone (UTC)")


@dataclass(frozen=True, kw_only=True)
class TestCase:
    """A submitted test, as correlation needs it (a row of ``test_cases``)."""

    __test__: ClassVar[bool] = False  # not a pytest class

    id: int
    token: Token
    route: str
    mcc_mnc: str
    imsi: str
    msisdn: str
    sender: str
    text: str
    submitted_at: datetime
    deadline_at: datetime
    #: The submit failed (refused, or its outcome unknown): only its token can still match it,
    #: since nothing is known to have been sent for a match by SIM and time to rest on.
    submit_error: str | None = None

    def __post_init__(self) -> None:
        _require_aware("submitted_at", self.submitted_at)
        _require_aware("deadline_at", self.deadline_at)


@dataclass(frozen=True, kw_only=True)
class Receipt:
    """A delivery receipt of the test's message, as the route reported it."""

    status: str
    received_at: datetime
    done_at: datetime | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        _require_aware("received_at", self.received_at)
        _require_aware("done_at", self.done_at)


# --- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """The test case an observation belongs to, how it was found, and why."""

    case: TestCase
    kind: MatchKind
    reason: str
    #: True for a fuzzy match: the token did not survive, so the route changed the text. A token
    #: match may still have changed text around the token; ``decide`` measures that.
    content_altered: bool
    #: Several test cases fitted equally; the earliest submitted unmatched one was taken.
    ambiguous: bool = False
    #: The test case already had an observation: the route delivered the message twice.
    duplicate: bool = False
    #: A token match for a test case that had only a fuzzy match: the token's observation is the
    #: delivery, the earlier one is set aside.
    supersedes: bool = False


def arrival_at(observation: Observation) -> datetime:
    """When the SMS arrived in true time: ``urc_at`` minus the agent's clock offset (if known)."""
    offset_ms = observation.clock.offset_ms
    return observation.urc_at if offset_ms is None else observation.urc_at - offset_ms * _MS


def _digits(number: str) -> str:
    digits = number.strip().lstrip("+")
    return digits[2:] if digits.startswith("00") else digits


def _same_sim(observation: Observation, case: TestCase) -> bool | None:
    """Whether the SMS came in on the test's SIM; None when the agent could not tell."""
    if observation.sim.imsi:
        return observation.sim.imsi == case.imsi
    if observation.sim.msisdn:  # no IMSI read from the SIM: its number is the next best identity
        return _digits(observation.sim.msisdn) == _digits(case.msisdn)
    return None


def _may_carry(case: TestCase, tokens: Collection[Token]) -> bool:
    """False when the text holds tokens and none shares the case's code or reference: the SMS
    belongs to another test, whose token came through."""
    return not tokens or any(t.code == case.token.code or t.ref == case.token.ref for t in tokens)


def _resembles(case: TestCase, text: str | None) -> bool:
    if not text:
        return False
    if case.token.code in _codes(text) or case.token.ref in _refs(text):
        return True
    ratio = difflib.SequenceMatcher(None, case.text.casefold(), text.casefold(), autojunk=False).ratio()
    return ratio >= MIN_SIMILARITY_REPLACED_SENDER


def match_observation(
    observation: Observation,
    candidates: Iterable[TestCase],
    *,
    grace_ms: float = DEFAULT_GRACE_MS,
    matched: Collection[int] = (),
    fuzzy_matched: Collection[int] = (),
) -> Match | None:
    """The test case ``observation`` belongs to, or None: an unsolicited SMS.

    1. ``token``: a candidate's token (code and reference) is in the text, whatever the SIM.
    2. ``fuzzy``: among unmatched candidates on the same SIM whose window, from submit (less the
       agent clock's error bound) to deadline plus ``grace_ms``, holds the corrected arrival:
       the one whose sender came through; else the only one in the window, if its sender was
       replaced but the text still resembles it. Ties go to the earliest submitted. A text
       holding another test's token (sharing neither code nor reference) matches no one here.

    ``matched`` holds ids of test cases that already have an observation, ``fuzzy_matched``
    those of them matched without their token: a token match for one of those supersedes the
    fuzzy one (the token is the stronger evidence) instead of being a duplicate. A test case
    whose submit failed (``submit_error``) is matched by its token only.
    """
    cases = list(candidates)
    tokens = set(find_tokens(observation.text))
    by_token = sorted((c for c in cases if c.token in tokens), key=lambda c: (c.submitted_at, c.id))
    if by_token:
        case = by_token[0]
        reasons = [f"token {case.token} found in the text"]
        if _same_sim(observation, case) is False:
            reasons.append(f"on another SIM (IMSI {observation.sim.imsi}, sent to {case.imsi})")
        supersedes = case.id in fuzzy_matched
        duplicate = case.id in matched and not supersedes
        if supersedes:
            reasons.append("replaces an earlier match without the token (fuzzy) of this test case")
        elif duplicate:
            reasons.append("the test case already had an observation: delivered twice")
        if case.submit_error is not None:
            reasons.append(f"delivered although its submit was reported failed ({case.submit_error})")
        return Match(
            case,
            "token",
            "; ".join(reasons),
            content_altered=False,
            duplicate=duplicate,
            supersedes=supersedes,
        )

    arrival = arrival_at(observation)
    slack = (observation.clock.error_ms or 0.0) * _MS
    grace = grace_ms * _MS
    in_window = sorted(
        (
            c
            for c in cases
            if c.id not in matched
            and c.submit_error is None
            and _same_sim(observation, c) is True
            and _may_carry(c, tokens)
            and c.submitted_at - slack <= arrival <= c.deadline_at + grace
        ),
        key=lambda c: (c.submitted_at, c.id),
    )
    if not in_window:
        return None
    same_sender = [c for c in in_window if check_sender(c.sender, observation.sender).kept]
    if same_sender:
        case = same_sender[0]
        after_s = (arrival - case.submitted_at).total_seconds()
        reason = (
            f"no token; same SIM, arrived {after_s:.1f} s after submit inside the window, "
            f"sender {observation.sender!r} as sent"
        )
        ambiguous = len(same_sender) > 1
        if ambiguous:
            reason += (
                f"; ambiguous: {len(same_sender)} test cases fit "
                f"({', '.join(str(c.id) for c in same_sender)}), took the earliest submitted unmatched "
                f"one ({case.id})"
            )
        return Match(case, "fuzzy", reason, content_altered=True, ambiguous=ambiguous)
    if len(in_window) == 1 and _resembles(in_window[0], observation.text):
        case = in_window[0]
        reason = (
            f"no token; same SIM, the only test case in the window, text resembles it; "
            f"sender replaced ({case.sender!r} -> {observation.sender!r})"
        )
        return Match(case, "fuzzy", reason, content_altered=True)
    return None


# --- checks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderCheck:
    """The sender as received against the one sent."""

    #: None when the SMS carried no sender.
    kept: bool | None
    replaced_by: str | None
    #: An alphanumeric sender arrived as a subscriber number: the route went through a SIM box.
    sim_box: bool


def _is_subscriber_number(sender: str, sender_type: str | None) -> bool:
    if sender_type in ("alphanumeric", "abbreviated", "network_specific"):
        return False
    return bool(_NUMBER_RE.fullmatch(sender.strip())) and len(_digits(sender)) >= MIN_SUBSCRIBER_DIGITS


def check_sender(sent: str, received: str | None, received_type: str | None = None) -> SenderCheck:
    """Whether the sender came through. Case does not count; an alphanumeric sender cut to 11
    characters is kept; a number is kept in international or national form (``+44 7700...`` as
    ``07700...``)."""
    if received is None:
        return SenderCheck(kept=None, replaced_by=None, sim_box=False)
    sent_s, got_s = sent.strip(), received.strip()
    sent_numeric, got_numeric = bool(_NUMBER_RE.fullmatch(sent_s)), bool(_NUMBER_RE.fullmatch(got_s))
    if sent_numeric and got_numeric:
        want, got = _digits(sent_s), _digits(got_s)
        national = got_s.startswith("0") and not got_s.startswith("00")
        kept = want == got or (national and len(got) >= MIN_SUBSCRIBER_DIGITS and want.endswith(got[1:]))
    elif not sent_numeric and not got_numeric:
        want, got = sent_s.casefold(), got_s.casefold()
        kept = want == got or (len(want) > MAX_ALPHANUMERIC_SENDER and got == want[:MAX_ALPHANUMERIC_SENDER])
    else:
        kept = False
    sim_box = not kept and not sent_numeric and _is_subscriber_number(got_s, received_type)
    return SenderCheck(kept=kept, replaced_by=None if kept else received, sim_box=sim_box)


@dataclass(frozen=True)
class ContentCheck:
    """The text as received against the one sent."""

    #: None when the text could not be decoded.
    intact: bool | None
    #: Word-level diff, ``[-removed-]{+added+}``; None when intact or undecodable.
    diff: str | None
    #: What changed: ``truncated``, ``unicode_stripped``, ``code_replaced``, ``code_missing``,
    #: ``ref_replaced``, ``ref_missing``, ``case_changed``, ``whitespace_changed``,
    #: ``text_added``, ``text_edited`` (any other change), ``undecodable``.
    flags: tuple[str, ...]


@lru_cache(maxsize=4096)
def _is_gsm_char(char: str) -> bool:
    return is_gsm7(char)


def _non_gsm(text: str) -> set[str]:
    return {c for c in text if not _is_gsm_char(c)}


def _squash(text: str) -> str:
    return "".join(text.split())


def _cut_tail(sent_part: str, received_part: str) -> bool:
    """Whether ``received_part`` is ``sent_part`` cut short (maybe ending in an ellipsis)."""
    kept = received_part.rstrip(_ELLIPSIS)
    return len(kept) < len(sent_part.rstrip()) and sent_part.startswith(kept)


def compare_content(sent: str, received: str | None, token: Token | None = None) -> ContentCheck:
    """Whether the text arrived as sent, a readable diff when not, and what kind of change it was.

    With ``token``, the code and reference are checked on their own: a route that rewrites the
    code (``code_replaced``) is told apart from one that edits the words around it.
    """
    if received is None:
        return ContentCheck(intact=None, diff=None, flags=("undecodable",))
    if received == sent:
        return ContentCheck(intact=True, diff=None, flags=())
    flags: set[str] = set()
    spans: list[tuple[int, int]] = []
    if token is not None:
        for flag, value, found, pattern in (
            ("code", token.code, _codes(received), _CODE_RE),
            ("ref", token.ref, _refs(received), _REF_RE),
        ):
            if value in found:
                continue
            flags.add(f"{flag}_replaced" if found else f"{flag}_missing")
            spans += [m.span() for m in pattern.finditer(sent)]
    if _cut_tail(sent, received):
        # The common case on its own: a prefix of the text, maybe with an ellipsis for the rest.
        kept = len(received.rstrip(_ELLIPSIS))
        added = received[kept:]
        cut = f"{sent[:kept]}[-{sent[kept:]}-]" + (f"{{+{added}+}}" if added else "")
        return ContentCheck(intact=False, diff=cut, flags=tuple(sorted({*flags, "truncated"})))

    a, b = _WORD_RE.findall(sent), _WORD_RE.findall(received)
    starts = [0]
    for word in a:
        starts.append(starts[-1] + len(word))
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    diff: list[str] = []
    for index, (tag, i1, i2, j1, j2) in enumerate(ops):
        sa, sb = "".join(a[i1:i2]), "".join(b[j1:j2])
        if tag == "equal":
            diff.append(sa)
            continue
        diff.append((f"[-{sa}-]" if sa else "") + (f"{{+{sb}+}}" if sb else ""))
        last = index == len(ops) - 1
        if last and tag in ("delete", "replace") and _cut_tail(sa, sb):
            flags.add("truncated")
        elif _squash(sa) == _squash(sb):
            flags.add("whitespace_changed")
        elif _squash(sa).casefold() == _squash(sb).casefold():
            flags.add("case_changed")
            if sa.casefold() != sb.casefold():
                flags.add("whitespace_changed")
        elif _non_gsm(sa) - set(sb) and not _non_gsm(sb) - set(sa):
            flags.add("unicode_stripped")  # non-GSM characters lost, none brought in
        elif any(s < starts[i2] and starts[i1] < e for s, e in spans):
            pass  # the code or reference changed: already flagged
        elif tag == "insert":
            flags.add("text_added")
        else:
            flags.add("text_edited")
    return ContentCheck(intact=False, diff="".join(diff), flags=tuple(sorted(flags)))


def smsc_known(smsc: str | None, known: Collection[str] | None) -> bool | None:
    """Whether the SMSC seen is one of the network's; None when either is unknown."""
    if not smsc or not known:
        return None
    return _digits(smsc) in {_digits(k) for k in known}


@dataclass(frozen=True)
class ReceiptCheck:
    """The receipt that counts and whether it told the truth."""

    status: str | None
    #: None without a final receipt (none at all, or only ENROUTE / ACCEPTD / UNKNOWN).
    honest: bool | None
    #: ``fake_receipt`` (claimed delivered, nothing arrived) or ``wrong_receipt`` (claimed failed,
    #: it arrived); None when honest or not judged.
    flag: str | None


def judge_receipt(receipts: Sequence[Receipt], delivered: bool) -> ReceiptCheck:
    """Judge the latest final receipt (else the latest one) against what actually arrived."""
    if not receipts:
        return ReceiptCheck(status=None, honest=None, flag=None)
    final = [r for r in receipts if r.status.upper() in RECEIPT_DELIVERED | RECEIPT_FAILED]
    receipt = max(final or receipts, key=lambda r: r.received_at)
    status = receipt.status.upper()
    if status in RECEIPT_DELIVERED:
        return ReceiptCheck(receipt.status, delivered, None if delivered else "fake_receipt")
    if status in RECEIPT_FAILED:
        return ReceiptCheck(receipt.status, not delivered, "wrong_receipt" if delivered else None)
    return ReceiptCheck(receipt.status, None, None)


@dataclass(frozen=True)
class Timing:
    """The legs of one delivery, ms."""

    #: Arrival corrected by the agent's clock offset.
    arrived_at: datetime
    #: Submit to arrival.
    latency_ms: float
    #: Bound on the latency's error: agent clock error plus the controller's; None when unknown.
    latency_error_ms: float | None
    #: Submit to SMSC timestamp, and SMSC timestamp to arrival; None when the SCTS is unusable.
    #: They add up to ``latency_ms``; each carries the SCTS's 1 s resolution on top of the error.
    route_leg_ms: float | None
    network_leg_ms: float | None
    #: First part to last part on the handset.
    last_part_ms: float
    notes: tuple[str, ...]


def measure_timing(case: TestCase, observation: Observation, *, controller_error_ms: float = 0.0) -> Timing:
    """Latency and legs of ``observation`` for ``case``; ``controller_error_ms`` bounds the
    controller's own timestamps (its clock, the submit time's uncertainty)."""
    notes: list[str] = []
    clock = observation.clock
    arrived = arrival_at(observation)
    latency_ms = (arrived - case.submitted_at) / _MS
    error_ms: float | None = None
    if clock.offset_ms is None:
        notes.append("agent clock offset unknown: latency not corrected, error unbounded")
    elif clock.error_ms is None:
        notes.append("agent clock error unknown: latency error unbounded")
    else:
        error_ms = clock.error_ms + controller_error_ms

    route_leg_ms = network_leg_ms = None
    scts = observation.scts
    if scts is None:
        notes.append("no SMSC timestamp: legs not split")
    elif scts.microsecond:
        notes.append("SMSC timestamp has sub-second digits, not from a PDU: legs not split")
    else:
        before_submit_ms = (case.submitted_at - scts) / _MS
        after_arrival_ms = (scts - arrived) / _MS
        if before_submit_ms > SCTS_TOLERANCE_MS:
            notes.append(f"SMSC timestamp {before_submit_ms / 1000:.1f} s before submit: legs not split")
        elif after_arrival_ms > SCTS_TOLERANCE_MS:
            notes.append(f"SMSC timestamp {after_arrival_ms / 1000:.1f} s after arrival: legs not split")
        else:
            route_leg_ms = (scts - case.submitted_at) / _MS
            network_leg_ms = (arrived - scts) / _MS
    last_part_ms = (observation.completed_at - observation.urc_at) / _MS
    return Timing(arrived, latency_ms, error_ms, route_leg_ms, network_leg_ms, last_part_ms, tuple(notes))


# --- the result -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Result:
    """What one test case says about its route; fields named as the ``results`` columns."""

    test_case_id: int
    route: str
    mcc_mnc: str
    observation_id: str | None
    match_kind: MatchKind | None
    delivered: bool
    #: Arrived after the deadline: delivered, but late.
    late: bool
    arrived_at: datetime | None
    latency_ms: float | None
    latency_error_ms: float | None
    route_leg_ms: float | None
    network_leg_ms: float | None
    last_part_ms: float | None
    sender_sent: str
    sender_received: str | None
    sender_kept: bool | None
    sim_box: bool
    content_intact: bool | None
    content_diff: str | None
    smsc: str | None
    smsc_known: bool | None
    receipt_status: str | None
    receipt_honest: bool | None
    parts: int | None
    parts_expected: int
    #: Everything notable, for scoring: ``late``, ``fuzzy_match``, ``content_altered`` and the
    #: content flags, ``sender_replaced``, ``sim_box``, ``foreign_smsc``, ``fake_receipt``,
    #: ``wrong_receipt``, ``parts_missing``, ``other_sim``, ``duplicate``,
    #: ``delivered_after_failed_submit``.
    flags: tuple[str, ...]
    #: Why things are as they are, in words (match reason, unusable SCTS, unknown clock).
    notes: tuple[str, ...]
    decided_at: datetime

    @property
    def grey_route(self) -> bool:
        """A SIM-box sender or a foreign SMSC: the route left the operator's own interconnect."""
        return self.sim_box or self.smsc_known is False


def decide(
    case: TestCase,
    observation: Observation | None,
    *,
    decided_at: datetime,
    match: Match | None = None,
    receipts: Sequence[Receipt] = (),
    known_smscs: Collection[str] | None = None,
    controller_error_ms: float = 0.0,
) -> Result:
    """The result of ``case``: with its observation (and the ``Match`` that found it; without one
    a token match is assumed), or with None once its deadline has passed (not delivered).

    ``known_smscs`` are the network's SMSC addresses (None or empty: unknown). The receipt is
    judged in both cases. ValueError when called without an observation before the deadline, or
    with another test case's match.
    """
    _require_aware("decided_at", decided_at)
    if match is not None and match.case.id != case.id:
        raise ValueError(f"the match is for test case {match.case.id}, not {case.id}")
    flags: list[str] = []
    notes: list[str] = []
    if observation is None:
        if decided_at < case.deadline_at:
            raise ValueError(f"test case {case.id} has no observation but its deadline has not passed")
        receipt = judge_receipt(receipts, delivered=False)
        if receipt.flag:
            flags.append(receipt.flag)
        notes.append("nothing arrived by the deadline")
        return Result(
            test_case_id=case.id,
            route=case.route,
            mcc_mnc=case.mcc_mnc,
            observation_id=None,
            match_kind=None,
            delivered=False,
            late=False,
            arrived_at=None,
            latency_ms=None,
            latency_error_ms=None,
            route_leg_ms=None,
            network_leg_ms=None,
            last_part_ms=None,
            sender_sent=case.sender,
            sender_received=None,
            sender_kept=None,
            sim_box=False,
            content_intact=None,
            content_diff=None,
            smsc=None,
            smsc_known=None,
            receipt_status=receipt.status,
            receipt_honest=receipt.honest,
            parts=None,
            parts_expected=expected_parts(case.text),
            flags=tuple(flags),
            notes=tuple(notes),
            decided_at=decided_at,
        )

    kind: MatchKind = match.kind if match is not None else "token"
    if match is not None:
        notes.append(match.reason)
    timing = measure_timing(case, observation, controller_error_ms=controller_error_ms)
    notes += timing.notes
    late = timing.arrived_at > case.deadline_at
    if late:
        flags.append("late")

    content = compare_content(case.text, observation.text, case.token)
    # A fuzzy match means the token did not survive: altered even when the text is undecodable.
    intact = False if kind == "fuzzy" else content.intact
    if kind == "fuzzy":
        flags.append("fuzzy_match")
    if intact is False:
        flags.append("content_altered")
    flags += content.flags

    sender = check_sender(case.sender, observation.sender, observation.sender_type)
    if sender.kept is False:
        flags.append("sender_replaced")
    if sender.sim_box:
        flags.append("sim_box")

    known = smsc_known(observation.smsc, known_smscs)
    if known is False:
        flags.append("foreign_smsc")

    receipt = judge_receipt(receipts, delivered=True)
    if receipt.flag:
        flags.append(receipt.flag)
    if observation.partial or observation.missing_parts:
        flags.append("parts_missing")
    if match is not None and match.duplicate:
        flags.append("duplicate")
    if case.submit_error is not None:
        flags.append("delivered_after_failed_submit")
    if _same_sim(observation, case) is False:
        flags.append("other_sim")

    return Result(
        test_case_id=case.id,
        route=case.route,
        mcc_mnc=case.mcc_mnc,
        observation_id=observation.id,
        match_kind=kind,
        delivered=True,
        late=late,
        arrived_at=timing.arrived_at,
        latency_ms=timing.latency_ms,
        latency_error_ms=timing.latency_error_ms,
        route_leg_ms=timing.route_leg_ms,
        network_leg_ms=timing.network_leg_ms,
        last_part_ms=timing.last_part_ms,
        sender_sent=case.sender,
        sender_received=observation.sender,
        sender_kept=sender.kept,
        sim_box=sender.sim_box,
        content_intact=intact,
        content_diff=content.diff,
        smsc=observation.smsc,
        smsc_known=known,
        receipt_status=receipt.status,
        receipt_honest=receipt.honest,
        parts=observation.parts,
        parts_expected=expected_parts(case.text),
        flags=tuple(flags),
        notes=tuple(notes),
        decided_at=decided_at,
    )
