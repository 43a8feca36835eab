"""Destination numbers: E.164 normalisation of real numbers, non-mobile types refused with the
type named, the network from portability over prefix over carrier name, and file errors with
their line."""

from __future__ import annotations

from pathlib import Path

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from controller.sender.numbers import KnownNetwork, NumberError, NumberPlan, operator_key

NETWORKS = [
    KnownNetwork("26201", "DE", "Telekom Deutschland GmbH"),
    KnownNetwork("26202", "DE", "Vodafone GmbH"),
    KnownNetwork("26203", "DE", "Telefónica Germany (O2)"),
    KnownNetwork("23420", "GB", "Hutchison 3G UK Ltd (Three)"),
    KnownNetwork("20810", "FR", "SFR"),
    KnownNetwork("310260", "US", "T-Mobile USA"),
]
VODAFONE_DE = "+491721234567"  # phonenumbers: carrier "Vodafone"


def example(region: str, kind: int = PhoneNumberType.MOBILE) -> str:
    number = phonenumbers.example_number_for_type(region, kind)
    assert number is not None
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("region", ["DE", "GB", "FR", "US", "CA", "IN", "NL", "ES", "BR", "JP"])
def test_example_mobiles_resolve(region: str) -> None:
    e164 = example(region)
    dest = NumberPlan(NETWORKS).resolve(e164)
    assert dest.e164 == e164
    assert dest.region == region
    assert dest.number_type in {"mobile", "fixed_line_or_mobile"}


def test_nanp_numbers_are_fixed_line_or_mobile_and_accepted() -> None:
    dest = NumberPlan(NETWORKS).resolve(example("US"))
    assert dest.number_type == "fixed_line_or_mobile"


def test_german_landline_refused_with_its_type() -> None:
    landline = example("DE", PhoneNumberType.FIXED_LINE)
    with pytest.raises(NumberError) as info:
        NumberPlan(NETWORKS).resolve(landline, field="recipient")
    assert info.value.field == "recipient"
    assert "not a mobile number" in info.value.reason
    assert "fixed_line" in info.value.reason and "DE" in info.value.reason
    assert str(info.value).startswith("recipient: ")


@pytest.mark.parametrize("kind", [PhoneNumberType.PREMIUM_RATE, PhoneNumberType.TOLL_FREE])
def test_premium_and_toll_free_refused(kind: int) -> None:
    name = {PhoneNumberType.PREMIUM_RATE: "premium_rate", PhoneNumberType.TOLL_FREE: "toll_free"}[kind]
    with pytest.raises(NumberError, match=name):
        NumberPlan(NETWORKS).resolve(example("DE", kind))


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("", "empty"),
        ("hello", "invalid number"),
        ("+49 1", "invalid number"),
        ("+491591234567", "not a valid number"),  # 0159 numbers have one digit more
        ("+999 1234567", "invalid number"),
        ("01721234567", "invalid number"),  # national format without a region
        ("+" + "1" * 70, "too long"),
    ],
)
def test_invalid_numbers(raw: str, words: str) -> None:
    with pytest.raises(NumberError, match=words) as info:
        NumberPlan(NETWORKS).resolve(raw)
    assert info.value.field == "to"


def test_unknown_default_region() -> None:
    with pytest.raises(NumberError, match="unknown region 'XX'"):
        NumberPlan(NETWORKS).resolve("01721234567", default_region="XX")


def test_non_geographic_number_has_no_region() -> None:
    number = phonenumbers.example_number_for_non_geo_entity(800)  # international freephone
    assert number is not None
    with pytest.raises(NumberError, match=r"unknown region .*\+800"):
        NumberPlan(NETWORKS).resolve(phonenumbers.format_number(number, PhoneNumberFormat.E164))


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("+49 172 123-4567", None),
        ("0049 172 1234567", None),
        ("0049-172-1234567", "US"),  # "00" works even where the IDD is 011
        ("0172 1234567", "DE"),
        ("(0172) 123 45 67", "de"),
        ("  +49.172.1234567  ", None),
    ],
)
def test_formats_normalise_to_e164(raw: str, region: str | None) -> None:
    dest = NumberPlan(NETWORKS).resolve(raw, default_region=region)
    assert dest.e164 == VODAFONE_DE
    assert dest.region == "DE"
    assert dest.mcc_mnc == "26202"
    assert dest.network_source == "carrier"
    assert dest.carrier == "Vodafone"


def test_operator_key() -> None:
    assert operator_key("Vodafone GmbH") == operator_key("Vodafone") == "vodafone"
    assert operator_key("T-Mobile") == "tmobile"
    assert operator_key("Orange S.A.") == "orange"
    assert operator_key("AT&T Mobility") == "att mobility"
    assert operator_key("Mobile Ltd") == ""


def test_carrier_match_by_leading_words_and_region() -> None:
    plan = NumberPlan(NETWORKS)
    assert plan.carrier_network("DE", "Vodafone") == "26202"
    assert plan.carrier_network("DE", "Vodafone D2") == "26202"  # longer than the operator's name
    assert plan.carrier_network("US", "T-Mobile") == "310260"  # "tmobile" leads "tmobile usa"
    assert plan.carrier_network("DE", "T-Mobile") is None  # not the name in the networks table
    assert plan.carrier_network("GB", "Vodafone") is None  # another region


def test_carrier_match_ambiguous_leading_words() -> None:
    plan = NumberPlan([KnownNetwork("23401", "GB", "Acme North"), KnownNetwork("23402", "GB", "Acme South")])
    assert plan.carrier_network("GB", "Acme") is None
    assert plan.carrier_network("GB", "Acme North") == "23401"


def test_operator_with_several_mncs_takes_the_lowest() -> None:
    plan = NumberPlan([KnownNetwork("26209", "DE", "Vodafone"), KnownNetwork("26202", "DE", "Vodafone GmbH")])
    assert plan.resolve(VODAFONE_DE).mcc_mnc == "26202"


def test_unknown_network() -> None:
    dest = NumberPlan([]).resolve(VODAFONE_DE)
    assert dest.mcc_mnc is None and dest.network_source is None
    assert dest.carrier == "Vodafone"


def test_longest_prefix_wins(tmp_path: Path) -> None:
    prefixes = write(tmp_path, "prefixes.csv", "prefix,mcc_mnc\n49,26201\n49172,26203\n+4917212,26207\n")
    plan = NumberPlan.load(NETWORKS, prefix_file=prefixes)
    dest = plan.resolve(VODAFONE_DE)
    assert (dest.mcc_mnc, dest.network_source) == ("26207", "prefix")
    assert plan.resolve("+491721934567").mcc_mnc == "26203"
    assert plan.resolve("+491701234567").mcc_mnc == "26201"
    assert plan.resolve(example("FR")).network_source == "carrier"  # no prefix: carrier name


def test_portability_overrides_prefix_and_carrier(tmp_path: Path) -> None:
    prefixes = write(tmp_path, "prefixes.csv", "49172,26202\n")
    ported = write(
        tmp_path, "ported.csv", "# ported out of Vodafone\nnumber,mcc_mnc\n\n+491721234567,26203\n"
    )
    plan = NumberPlan.load(NETWORKS, prefix_file=prefixes, portability_file=ported)
    dest = plan.resolve("0172 1234567", default_region="DE")
    assert (dest.mcc_mnc, dest.network_source) == ("26203", "portability")
    assert dest.carrier == "Vodafone"  # the range holder: phonenumbers knows no porting
    assert plan.resolve("+491721234568").network_source == "prefix"
    carrier_only = NumberPlan.load(NETWORKS, portability_file=ported)
    assert carrier_only.resolve(VODAFONE_DE).mcc_mnc == "26203"
    assert carrier_only.resolve("+491721234568").network_source == "carrier"


@pytest.mark.parametrize(
    ("name", "text", "line", "words"),
    [
        ("prefixes.csv", "49172,26202\n49173,2620\n", 2, "mcc_mnc '2620'"),
        ("prefixes.csv", "prefix,mcc_mnc\n49x,26202\n", 2, "prefix '49x'"),
        ("prefixes.csv", "49172,26202,extra\n", 1, "expected 2 columns"),
        ("ported.csv", "+491721234567\n", 1, "expected 2 columns"),
        ("ported.csv", "number,mcc_mnc\n+49172,26202\n", 2, "is not E.164"),
        ("ported.csv", "\n\n+49 172 1234567,26202\n", 3, "is not E.164"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, words: str
) -> None:
    path = write(tmp_path, name, text)
    kwargs = {"prefix_file": path} if name.startswith("prefix") else {"portability_file": path}
    with pytest.raises(ValueError, match=words) as info:
        NumberPlan.load(NETWORKS, **kwargs)
    assert f"{path}:{line}:" in str(info.value)
