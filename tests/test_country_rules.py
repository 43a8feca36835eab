"""Per-country rules: sender types, quiet hours at the right local hours in summer and winter,
the bundled file, and malformed files named by their field."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import controller.sender
from controller.sender.rules import QuietHours, RulesFile, RuleViolation, load_rules, sender_type

RULES = load_rules()


def utc(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("sender", "kind"),
    [
        ("MyBank", "alphanumeric"),
        ("ACME Co.", "alphanumeric"),
        ("Bank24", "alphanumeric"),
        ("ABCDEFGHIJK", "alphanumeric"),
        ("123", "short_code"),
        ("36111", "short_code"),
        ("12345678", "short_code"),
        ("123456789", "numeric"),
        ("+447700900123", "numeric"),
        ("4915123456789", "numeric"),
    ],
)
def test_sender_type(sender: str, kind: str) -> None:
    assert sender_type(sender) == kind


@pytest.mark.parametrize(
    "sender", ["", "12", "123\n", "ABCDEFGHIJKL", "+12345", "1234567890123456", "My*Bank", "  "]
)
def test_sender_type_refused(sender: str) -> None:
    with pytest.raises(ValueError, match="is none of") as info:
        sender_type(sender)
    assert isinstance(info.value, RuleViolation)
    assert info.value.field == "from"


def test_bundled_file_loads() -> None:
    assert {"US", "CA", "FR", "DE", "GB"} <= set(RULES.countries)
    assert RULES.default.sender_types == {"alphanumeric", "numeric", "short_code"}
    assert all(rules.note for rules in RULES.countries.values())
    bundled = Path(controller.sender.__file__).parent / "country_rules.toml"
    assert load_rules(bundled) == RULES


@pytest.mark.parametrize("region", ["US", "CA", "us"])
def test_no_alphanumeric_senders_in_north_america(region: str) -> None:
    at = utc(2026, 7, 15, 16)
    with pytest.raises(RuleViolation) as info:
        RULES.check(region, "MyBank", promotional=False, at=at)
    assert info.value.field == "from"
    assert info.value.reason.startswith(f"alphanumeric senders are not delivered in {region.upper()} (")
    RULES.check(region, "+12025550123", promotional=False, at=at)
    RULES.check(region, "55555", promotional=True, at=at)


@pytest.mark.parametrize("region", ["DE", "GB", "FR", "NL"])
def test_alphanumeric_delivered_elsewhere(region: str) -> None:
    RULES.check(region, "MyBank", promotional=False, at=utc(2026, 7, 19, 3))


# FR: Paris is UTC+2 in summer (CEST), UTC+1 in winter (CET); 2026-07-15 and 2026-01-14 are
# Wednesdays, 2026-07-19 a Sunday.
@pytest.mark.parametrize(
    ("at", "quiet"),
    [
        (utc(2026, 7, 15, 17, 59), False),  # 19:59 CEST
        (utc(2026, 7, 15, 18, 0), True),  # 20:00 CEST
        (utc(2026, 7, 15, 5, 59), True),  # 07:59 CEST
        (utc(2026, 7, 15, 6, 0), False),  # 08:00 CEST
        (utc(2026, 1, 14, 18, 59), False),  # 19:59 CET
        (utc(2026, 1, 14, 19, 0), True),  # 20:00 CET
        (utc(2026, 1, 14, 6, 59), True),  # 07:59 CET
        (utc(2026, 1, 14, 7, 0), False),  # 08:00 CET
        (utc(2026, 1, 14, 23, 30), True),  # 00:30 CET Thursday
    ],
)
def test_fr_evening_quiet_hours(at: datetime, quiet: bool) -> None:
    if quiet:
        with pytest.raises(RuleViolation) as info:
            RULES.check("FR", "MyShop", promotional=True, at=at)
        assert info.value.field == "promotional"
        assert (
            info.value.reason == "promotional traffic is not sent in FR between 20:00 and 08:00 Europe/Paris"
        )
    else:
        RULES.check("FR", "MyShop", promotional=True, at=at)
    RULES.check("FR", "MyShop", promotional=False, at=at)  # transactional: any time


@pytest.mark.parametrize(
    ("at", "reason"),
    [
        (utc(2026, 7, 19, 10, 0), "on Sunday (Europe/Paris)"),  # Sunday 12:00 CEST
        (utc(2026, 7, 18, 22, 30), "between 20:00 and 08:00 Europe/Paris"),  # Sunday 00:30 CEST
        (utc(2026, 1, 18, 18, 59), "on Sunday (Europe/Paris)"),  # Sunday 19:59 CET
        (utc(2026, 7, 20, 5, 0), "between 20:00 and 08:00 Europe/Paris"),  # Monday 07:00 CEST
    ],
)
def test_fr_sunday(at: datetime, reason: str) -> None:
    with pytest.raises(RuleViolation, match=re.escape(reason)):
        RULES.check("FR", "MyShop", promotional=True, at=at)


@pytest.mark.parametrize(
    "at",
    [
        utc(2026, 7, 18, 10, 0),  # Saturday 12:00 CEST
        utc(2026, 7, 20, 6, 0),  # Monday 08:00 CEST
        utc(2026, 1, 19, 7, 0),  # Monday 08:00 CET
    ],
)
def test_fr_open_hours(at: datetime) -> None:
    RULES.check("FR", "36111", promotional=True, at=at)


def test_check_in_other_offsets_and_naive_refused() -> None:
    paris_summer = timezone(timedelta(hours=2))
    with pytest.raises(RuleViolation):
        RULES.check("FR", "MyShop", promotional=True, at=datetime(2026, 7, 15, 21, 0, tzinfo=paris_summer))
    with pytest.raises(ValueError, match="timezone-aware"):
        RULES.check("FR", "MyShop", promotional=True, at=datetime(2026, 7, 15, 12, 0))


def test_unlisted_country_uses_default() -> None:
    RULES.check("JP", "MyShop", promotional=True, at=utc(2026, 7, 19, 23))


def test_window_with_days_across_midnight() -> None:
    window = QuietHours(start="22:00", end="06:00", days=["sat"])
    assert window.contains(datetime(2026, 7, 18, 23, 0))  # Saturday 23:00
    assert window.contains(datetime(2026, 7, 19, 5, 59))  # Sunday 05:59: Saturday's window
    assert not window.contains(datetime(2026, 7, 19, 23, 0))  # Sunday 23:00
    assert not window.contains(datetime(2026, 7, 18, 5, 0))  # Saturday 05:00: Friday's
    assert window.describe("Europe/Berlin") == "between 22:00 and 06:00 on Saturday Europe/Berlin"


def test_rules_in_a_custom_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[default]
timezone = "UTC"
note = "anything"

[countries.XA]
sender_types = ["short_code"]
timezone = "Asia/Kolkata"
note = "test"
promotional_quiet_hours = [{start = "21:00", end = "24:00"}, {start = "00:00", end = "09:00"}]
""",
    )
    rules = load_rules(path)
    assert isinstance(rules, RulesFile)
    rules.check("XA", "12345", promotional=True, at=utc(2026, 1, 14, 12, 0))  # 17:30 IST
    with pytest.raises(RuleViolation, match="between 21:00 and 24:00 Asia/Kolkata"):
        rules.check("XA", "12345", promotional=True, at=utc(2026, 1, 14, 16, 0))  # 21:30 IST
    with pytest.raises(RuleViolation, match="numeric senders are not delivered in XA"):
        rules.check("XA", "+919876543210", promotional=False, at=utc(2026, 1, 14, 12, 0))


BASE = '[default]\ntimezone = "UTC"\nnote = "n"\n'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            BASE + '[countries.FR]\ntimezone = "Europe/Pariss"\nnote = "n"\n',
            "countries.FR.timezone: .*Europe/Pariss",
        ),
        (
            BASE + '[countries.FR]\ntimezone = "Europe/Paris"\nnote = "n"\n'
            '[[countries.FR.promotional_quiet_hours]]\nstart = "8pm"\nend = "08:00"\n',
            r"countries.FR.promotional_quiet_hours.0.start: .*'8pm'",
        ),
        (
            BASE + '[countries.FR]\ntimezone = "Europe/Paris"\nnote = "n"\n'
            '[[countries.FR.promotional_quiet_hours]]\nstart = "08:00"\nend = "08:00"\n',
            r"countries.FR.promotional_quiet_hours.0: .*empty window",
        ),
        (
            BASE + '[countries.FR]\ntimezone = "Europe/Paris"\nnote = "n"\nsender = 1\n',
            "countries.FR.sender: ",
        ),
        (
            BASE + '[countries.FR]\ntimezone = "Europe/Paris"\nnote = "n"\nsender_types = ["alpha"]\n',
            "sender_types",
        ),
        (BASE + '[countries.fr]\ntimezone = "Europe/Paris"\nnote = "n"\n', "countries.fr"),
        ('[default]\nnote = "n"\n', "default.timezone: Field required"),
        ("[countries.FR]\n", "default: Field required"),
        ("[default\n", "not valid TOML"),
    ],
)
def test_malformed_file_names_the_field(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=words) as info:
        load_rules(path)
    assert str(info.value).startswith(f"{path}: ")
