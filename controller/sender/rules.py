"""Per-country sending rules: which sender types a country delivers, and when promotional traffic
must not be sent. Checked before a message is routed, so a message that the destination's
networks would block or rewrite is refused with its reason instead of failing silently.

The rules live in a small TOML file (the bundled ``country_rules.toml`` by default), one table
per ISO 3166 alpha-2 country and a ``default`` for every other country. Quiet hours are wall
clock times in the country's time zone (so DST is followed), ``end`` after ``start`` on the same
day, or before it for a window across midnight (20:00-08:00), ``24:00`` for the end of the day.
A window with ``days`` applies on those days only; a window across midnight belongs to the day it
starts on (Saturday 20:00 to Sunday 08:00 is Saturday's).
"""

from __future__ import annotations

import re
import tomllib
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

SenderType = Literal["alphanumeric", "numeric", "short_code"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]

DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ALL_SENDER_TYPES: frozenset[SenderType] = frozenset({"alphanumeric", "numeric", "short_code"})
BUNDLED = "country_rules.toml"

#: Alphanumeric sender ids travel GSM 7-bit packed in 11 characters at most (3GPP TS 23.040);
#: we keep to ASCII letters, digits, space and a little punctuation, which every network passes.
_ALPHANUMERIC = re.compile(r"^[A-Za-z0-9 .\-_&']{1,11}$")
_SHORT_CODE = re.compile(r"^[0-9]{3,8}$")
#: A long number: "+" and 7 to 15 digits (E.164), or 9 to 15 digits (shorter ones are short codes).
_NUMERIC = re.compile(r"^(\+[0-9]{7,15}|[0-9]{9,15})$")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$")


class RuleViolation(ValueError):
    """A message the destination country's rules refuse; ``field`` names the request field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def sender_type(sender: str) -> SenderType:
    """The kind of a sender id: ``alphanumeric`` (a letter in it, at most 11 characters),
    ``short_code`` (3 to 8 digits) or ``numeric`` (a long number, "+" allowed, up to 15 digits).
    Anything else is a :class:`RuleViolation` (a ValueError) on field "from"."""
    if _SHORT_CODE.fullmatch(sender):
        return "short_code"
    if _NUMERIC.fullmatch(sender):
        return "numeric"
    if any(c.isalpha() for c in sender) and _ALPHANUMERIC.fullmatch(sender):
        return "alphanumeric"
    raise RuleViolation(
        "from",
        f"sender {sender!r} is none of: alphanumeric (a letter, at most 11 of A-Z a-z 0-9 space . - _ & '), "
        "short code (3 to 8 digits), number (+ and up to 15 digits)",
    )


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class QuietHours(BaseModel):
    """A window, in the country's local time, in which promotional traffic is not sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: str = Field(description='Local start time "HH:MM" (inclusive).')
    end: str = Field(
        description='Local end time "HH:MM" (exclusive); before start: the window crosses midnight; '
        '"24:00": the end of the day.'
    )
    days: list[Day] | None = Field(
        None,
        min_length=1,
        description="Days the window starts on (mon ... sun); none: every day.",
    )

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.fullmatch(value):
            raise ValueError(f'{value!r} is not a time "HH:MM" (00:00 to 24:00)')
        return value

    @field_validator("start")
    @classmethod
    def _start_in_day(cls, value: str) -> str:
        if value == "24:00":
            raise ValueError('a window cannot start at "24:00"; use "00:00" of the next day')
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError(f"start and end are both {self.start}: an empty window")
        return self

    def contains(self, local: datetime) -> bool:
        """Whether a local wall-clock time falls in the window."""
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        start, end = _minutes(self.start), _minutes(self.end)
        days = self.days
        if start < end:
            return start <= minute < end and (days is None or DAYS[day] in days)
        # Across midnight: the evening of a listed day, or the morning after one.
        if minute >= start and (days is None or DAYS[day] in days):
            return True
        return minute < end and (days is None or DAYS[(day - 1) % 7] in days)

    def describe(self, timezone: str) -> str:
        """The window in words: "between 20:00 and 08:00 Europe/Paris", "on Sunday (Europe/Paris)"."""
        on = ""
        if self.days is not None:
            on = " on " + ", ".join(_DAY_NAMES[DAYS.index(d)] for d in sorted(self.days, key=DAYS.index))
        if self.start == "00:00" and self.end == "24:00":
            return f"{on.strip() or 'at any time'} ({timezone})"
        return f"between {self.start} and {self.end}{on} {timezone}"


class CountryRules(BaseModel):
    """One country's rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sender_types: set[SenderType] = Field(
        default_factory=lambda: set(ALL_SENDER_TYPES),
        min_length=1,
        description="Sender id types the country's networks deliver unchanged.",
    )
    promotional_quiet_hours: list[QuietHours] = Field(
        default_factory=list, description="Windows (local time) in which promotional traffic is not sent."
    )
    timezone: str = Field(description="IANA time zone the quiet hours are in, e.g. Europe/Paris.")
    note: str = Field(description="Where the rules come from, briefly.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class RulesFile(BaseModel):
    """The rules file: rules per country, and a default for every country not listed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    countries: dict[Country, CountryRules] = Field(
        default_factory=dict, description="Rules per ISO 3166 alpha-2 country code (upper case)."
    )
    default: CountryRules = Field(description="Rules for countries not listed.")

    def rules_for(self, region: str) -> CountryRules:
        """The rules of a country (ISO alpha-2), the default when it is not listed."""
        return self.countries.get(region.upper(), self.default)

    def check(self, region: str, sender: str, *, promotional: bool, at: datetime) -> None:
        """Raise :class:`RuleViolation` when a message from ``sender`` to a number of ``region``
        must not be sent at ``at`` (timezone-aware): field "from" for a sender type the country
        does not deliver, "promotional" for promotional traffic in quiet hours."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        region = region.upper()
        rules = self.rules_for(region)
        kind = sender_type(sender)
        if kind not in rules.sender_types:
            allowed = ", ".join(sorted(rules.sender_types))
            raise RuleViolation("from", f"{kind} senders are not delivered in {region} (allowed: {allowed})")
        if promotional and rules.promotional_quiet_hours:
            local = at.astimezone(ZoneInfo(rules.timezone))
            for window in rules.promotional_quiet_hours:
                if window.contains(local):
                    raise RuleViolation(
                        "promotional",
                        f"promotional traffic is not sent in {region} {window.describe(rules.timezone)}",
                    )


def load_rules(path: Path | None = None) -> RulesFile:
    """The rules from a TOML file, or the bundled ``country_rules.toml`` when ``path`` is None.
    A malformed file is a ValueError naming the file and the failing field."""
    if path is None:
        name = BUNDLED
        text = (
            resources.files(__package__ or "controller.sender").joinpath(BUNDLED).read_text(encoding="utf-8")
        )
    else:
        name = str(path)
        text = path.read_text(encoding="utf-8")
    try:
        return RulesFile.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{name}: not valid TOML: {e}") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '(file)'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"{name}: {problems}") from None
