"""Destination numbers: E.164 normalisation, number type, and the destination network (MCC-MNC).

The sender routes per destination network, so every recipient number is resolved to an MCC-MNC
before a route is picked. Sources, best first:

1. ``portability``: a number-portability file (CSV ``number,mcc_mnc``). A ported number keeps its
   digits but moves to another network, which only such a list knows: it wins over everything.
2. ``prefix``: an operator prefix file (CSV ``prefix,mcc_mnc``, E.164 prefixes without "+"), the
   longest matching prefix wins (``49170`` before ``4917``).
3. ``carrier``: phonenumbers' carrier name for the number range, matched by operator name to a
   known network of the number's region (see :func:`operator_key`). This is the range holder,
   so a ported number resolves to its original network: supply a portability file where it
   matters.

Only mobile numbers are accepted: an SMS to a landline, a premium-rate or a toll-free number is
refused with its type named, before anything is sent.
"""

from __future__ import annotations

import csv
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType, carrier

from probe_agent.protocol import MCC_MNC_PATTERN

NetworkSource = Literal["portability", "prefix", "carrier"]

_MCC_MNC = re.compile(MCC_MNC_PATTERN)
_DIGITS = re.compile(r"^[0-9]{1,15}$")
#: Separators people write in numbers; dropped before parsing.
_SEPARATORS = str.maketrans("", "", " \t-./()\u00a0")
#: Legal forms and generic words dropped from operator names before comparing them.
_NOISE_WORDS = frozenset(
    {
        "ab", "ag", "as", "bv", "co", "corp", "gmbh", "inc", "kg", "limited", "llc", "ltd", "nv",
        "oy", "plc", "sa", "sas", "spa", "srl",
        "cellular", "mobil", "mobile", "wireless",
    }
)  # fmt: skip
_PUNCTUATION = str.maketrans("", "", string.punctuation)
#: Longest input we hand to phonenumbers (E.164 has at most 15 digits; room for separators).
_MAX_INPUT = 64

#: Number types, by phonenumbers' constant, in words for Destination and the error messages.
_TYPE_NAMES = {
    PhoneNumberType.FIXED_LINE: "fixed_line",
    PhoneNumberType.MOBILE: "mobile",
    PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_line_or_mobile",
    PhoneNumberType.TOLL_FREE: "toll_free",
    PhoneNumberType.PREMIUM_RATE: "premium_rate",
    PhoneNumberType.SHARED_COST: "shared_cost",
    PhoneNumberType.VOIP: "voip",
    PhoneNumberType.PERSONAL_NUMBER: "personal_number",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.UAN: "uan",
    PhoneNumberType.VOICEMAIL: "voicemail",
    PhoneNumberType.UNKNOWN: "unknown",
}
#: Types an SMS can be delivered to. FIXED_LINE_OR_MOBILE is needed because some plans do not
#: tell the two apart: every NANP number (US, CA, ...) is of that type, mobiles included.
_SMS_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})
_PARSE_ERRORS = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code, or a national number without a region",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the international prefix",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}


class NumberError(ValueError):
    """A destination number that cannot be sent to; ``field`` names the request field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Destination:
    """A resolved recipient: E.164, region, number type and, when known, its network."""

    e164: str
    region: str
    number_type: str
    mcc_mnc: str | None
    network_source: NetworkSource | None
    carrier: str | None


@dataclass(frozen=True, slots=True)
class KnownNetwork:
    """A network the controller knows (its ``networks`` table): MCC-MNC, ISO country, operator."""

    mcc_mnc: str
    country: str
    operator: str


def operator_key(name: str) -> str:
    """An operator name reduced for comparison: casefolded, punctuation removed (``T-Mobile`` ->
    ``tmobile``, ``AT&T`` -> ``att``), legal forms (GmbH, Ltd, S.A., ...) and the generic words
    mobile / mobil / wireless / cellular dropped, the rest joined by single spaces. So
    "Vodafone" matches "Vodafone GmbH" and "Orange" matches "Orange S.A."; an empty key matches
    nothing."""
    words = name.casefold().translate(_PUNCTUATION).split()
    return " ".join(w for w in words if w not in _NOISE_WORDS)


def _read_csv(path: Path, first: str) -> Iterable[tuple[int, str, str]]:
    """(line number, key, mcc_mnc) of a two-column CSV; blank lines, ``#`` comments and a header
    row ``<first>,mcc_mnc`` before the data are skipped. A malformed line is a ValueError naming
    file and line."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header_allowed = True
        for row in reader:
            line_no = reader.line_num
            cells = [c.strip() for c in row]
            if not cells or cells == [""] or cells[0].startswith("#"):
                continue
            if header_allowed and [c.casefold() for c in cells] == [first, "mcc_mnc"]:
                header_allowed = False
                continue
            header_allowed = False
            if len(cells) != 2:
                raise ValueError(f"{path}:{line_no}: expected 2 columns ({first},mcc_mnc), got {len(cells)}")
            key, mcc_mnc = cells
            if not _MCC_MNC.fullmatch(mcc_mnc):
                raise ValueError(f"{path}:{line_no}: mcc_mnc {mcc_mnc!r} is not 5 or 6 digits")
            yield line_no, key, mcc_mnc


class NumberPlan:
    """Resolves raw recipient numbers to :class:`Destination` s. Immutable once built (a cache of
    carrier matches aside); lookups are dict hits (portability: one; prefixes: one per distinct
    prefix length, longest first)."""

    def __init__(
        self,
        networks: Iterable[KnownNetwork],
        *,
        prefixes: Mapping[str, str] | None = None,
        ported: Mapping[str, str] | None = None,
    ) -> None:
        """``prefixes``: E.164 prefix without "+" -> MCC-MNC; ``ported``: "+E164" -> MCC-MNC.
        Several known networks of one region with the same operator key (an operator with
        several MNCs): the carrier match takes the lowest MCC-MNC."""
        self._ported = dict(ported or {})
        self._prefixes = dict(prefixes or {})
        self._prefix_lengths = tuple(sorted({len(p) for p in self._prefixes}, reverse=True))
        exact: dict[tuple[str, str], str] = {}
        for net in sorted(networks, key=lambda n: n.mcc_mnc):
            key = operator_key(net.operator)
            if key:
                exact.setdefault((net.country.upper(), key), net.mcc_mnc)
        # Leading words of each operator key ("vodafone" of "vodafone d2"); None when two
        # different operators of a region share them, so a short carrier name never guesses.
        partial: dict[tuple[str, str], str | None] = {}
        for (country, key), mcc_mnc in exact.items():
            words = key.split()
            for n in range(1, len(words)):
                lead = (country, " ".join(words[:n]))
                partial[lead] = mcc_mnc if partial.get(lead, mcc_mnc) == mcc_mnc else None
        self._exact = exact
        self._partial = partial
        self._carrier_cache: dict[tuple[str, str], str | None] = {}

    @classmethod
    def load(
        cls,
        networks: Iterable[KnownNetwork],
        prefix_file: Path | None = None,
        portability_file: Path | None = None,
    ) -> NumberPlan:
        """A plan from the known networks and the optional prefix and portability CSV files."""
        prefixes: dict[str, str] = {}
        if prefix_file is not None:
            for line_no, prefix, mcc_mnc in _read_csv(prefix_file, "prefix"):
                prefix = prefix.removeprefix("+")
                if not _DIGITS.fullmatch(prefix):
                    raise ValueError(f"{prefix_file}:{line_no}: prefix {prefix!r} is not 1 to 15 digits")
                prefixes[prefix] = mcc_mnc
        ported: dict[str, str] = {}
        if portability_file is not None:
            for line_no, number, mcc_mnc in _read_csv(portability_file, "number"):
                digits = number.removeprefix("+")
                if not _DIGITS.fullmatch(digits) or len(digits) < 7:
                    raise ValueError(
                        f"{portability_file}:{line_no}: number {number!r} is not E.164 (7 to 15 digits)"
                    )
                ported["+" + digits] = mcc_mnc
        return cls(networks, prefixes=prefixes, ported=ported)

    def network(
        self, e164: str, region: str, carrier_name: str | None
    ) -> tuple[str | None, NetworkSource | None]:
        """The MCC-MNC of an E.164 number and where it came from; (None, None) when unknown."""
        mcc_mnc = self._ported.get(e164)
        if mcc_mnc is not None:
            return mcc_mnc, "portability"
        digits = e164[1:]
        for length in self._prefix_lengths:
            mcc_mnc = self._prefixes.get(digits[:length])
            if mcc_mnc is not None:
                return mcc_mnc, "prefix"
        if carrier_name:
            mcc_mnc = self.carrier_network(region, carrier_name)
            if mcc_mnc is not None:
                return mcc_mnc, "carrier"
        return None, None

    def carrier_network(self, region: str, carrier_name: str) -> str | None:
        """The known network of ``region`` whose operator is ``carrier_name``: the same
        :func:`operator_key`; else the one operator whose key starts with the carrier's words
        ("Vodafone" -> "Vodafone D2 GmbH"); else the longest operator key the carrier's words
        start with ("Vodafone Libertel" -> "Vodafone"). None when nothing or several match."""
        cache_key = (region, carrier_name)
        if cache_key in self._carrier_cache:
            return self._carrier_cache[cache_key]
        key = operator_key(carrier_name)
        mcc_mnc = self._exact.get((region, key)) or self._partial.get((region, key))
        if mcc_mnc is None and key:
            words = key.split()
            for n in range(len(words) - 1, 0, -1):
                mcc_mnc = self._exact.get((region, " ".join(words[:n])))
                if mcc_mnc is not None:
                    break
        # Bounded by the carrier names phonenumbers knows per region (a few thousand at most).
        self._carrier_cache[cache_key] = mcc_mnc
        return mcc_mnc

    def resolve(self, raw: str, *, default_region: str | None = None, field: str = "to") -> Destination:
        """Normalise, validate and place a recipient number; :class:`NumberError` when it cannot
        take an SMS. Accepts "+E.164", "00" international format and, with ``default_region``,
        the region's national format; spaces, dashes, dots and brackets are ignored."""
        text = raw.strip().translate(_SEPARATORS)
        if not text:
            raise NumberError(field, "empty number")
        if len(text) > _MAX_INPUT:
            raise NumberError(field, f"invalid number {raw[:24]!r}...: too long")
        # "00" is the international prefix in most of the world; phonenumbers only knows the
        # default region's own, so "0049..." with region US (whose prefix is 011) would fail.
        if text.startswith("00"):
            text = "+" + text[2:]
        if default_region is not None:
            default_region = default_region.upper()
            if default_region not in phonenumbers.SUPPORTED_REGIONS:
                raise NumberError(field, f"unknown region {default_region!r}")
        try:
            number = phonenumbers.parse(text, default_region)
        except NumberParseException as e:
            raise NumberError(
                field, f"invalid number {raw!r}: {_PARSE_ERRORS.get(e.error_type, str(e))}"
            ) from None
        if not phonenumbers.is_valid_number(number):
            raise NumberError(field, f"invalid number {raw!r}: not a valid number in its country's plan")
        region = phonenumbers.region_code_for_number(number)
        if region is None or region not in phonenumbers.SUPPORTED_REGIONS:
            # Non-geographic (+800, +882, ...): no country, no country rules, no known network.
            raise NumberError(field, f"unknown region for {raw!r} (country code +{number.country_code})")
        kind = phonenumbers.number_type(number)
        type_name = _TYPE_NAMES.get(kind, "unknown")
        if kind not in _SMS_TYPES:
            raise NumberError(field, f"not a mobile number: {raw!r} is a {type_name} number in {region}")
        e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
        carrier_name = carrier.name_for_number(number, "en") or None
        mcc_mnc, source = self.network(e164, region, carrier_name)
        return Destination(
            e164=e164,
            region=region,
            number_type=type_name,
            mcc_mnc=mcc_mnc,
            network_source=source,
            carrier=carrier_name,
        )
