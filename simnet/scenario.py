"""simnet's scenario: the networks, the emulated Pis and their handsets, and the upstream routes
with their quality profiles, read from one TOML file.

A route's ``profile`` is what it does at the start; each of its ``changes`` names a moment (a
share of the run's duration, or seconds since the start) and only the fields that change there,
merged into the profile in force (nested tables merge field by field). ``python -m simnet check
FILE`` validates a file and names the failing field, as the agent's and controller's configs do.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import phonenumbers
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from hardware.modem_profiles import PROFILES, get_profile
from probe_agent.config import ConfigError, Strict, load_model
from probe_agent.protocol import ID_PATTERN

#: E.164 numbers and number prefixes (a range is a prefix of its numbers).
E164_PATTERN = r"^\+[1-9]\d{5,14}$"
E164_PREFIX_PATTERN = r"^\+[1-9]\d{0,14}$"
MCC_MNC_PATTERN = r"^\d{5,6}$"
#: ``system_id`` and ``password`` are C-Octet Strings of 16 and 9 octets, the NUL included.
MAX_SYSTEM_ID = 15
MAX_PASSWORD = 8

Share = Annotated[float, Field(ge=0.0, le=1.0)]
Loc = tuple[str | int, ...]


class ScenarioError(ConfigError):
    """A scenario file that cannot be used; ``problems`` names each failing field."""


def _fail(title: str, problems: list[tuple[Loc, str, Any]]) -> None:
    """Raise the problems as one ValidationError whose errors carry their own field paths (pydantic
    keeps them, prefixed with the validated model's place)."""
    if problems:
        raise ValidationError.from_exception_data(
            title,
            [
                InitErrorDetails(
                    type=PydanticCustomError("scenario", "{reason}", {"reason": reason}), loc=loc, input=value
                )
                for loc, reason, value in problems
            ],
        )


# --------------------------------------------------------------------------- quality profiles


class Latency(Strict):
    """Submit-to-handset latency: lognormal around a median, clamped (``max`` wins over ``min``)."""

    median: float = Field(1500.0, gt=0, description="Median latency, ms.")
    sigma: float = Field(
        0.3, ge=0, le=3, description="Spread: the lognormal's sigma (0: always the median; 0.5: ±65 %)."
    )
    min: float = Field(0.0, ge=0, description="No latency below this, ms.")
    max: float | None = Field(None, gt=0, description="No latency above this, ms; none: no upper bound.")


class ContentChanges(Strict):
    """What the route does to the text."""

    strip_unicode: Share = Field(
        0.0,
        description="Share of messages whose characters outside GSM 7-bit become their ASCII base letter "
        "(or '?'), as routes that only carry GSM 7-bit do.",
    )
    cut_to: int | None = Field(
        None, ge=1, description="Texts longer than this many characters are cut to it; none: never cut."
    )
    replace_code: Share = Field(
        0.0, description="Share of messages whose one-time code (the first run of 4-8 digits) is replaced."
    )


class RouteProfile(Strict):
    """A route's quality at one time. In a change, only the fields given apply."""

    latency_ms: Latency = Field(default_factory=Latency, description="Submit-to-handset latency, ms.")
    loss: Share = Field(0.0, description="Share of messages never delivered.")
    fake_receipt: Share = Field(
        0.0, description="Share of lost messages that still get a DELIVRD receipt (fake receipts)."
    )
    receipt_delay_ms: float = Field(
        500.0, ge=0, description="Receipt after the delivery (or, for a lost message, after its latency), ms."
    )
    lost_receipt: Literal["UNDELIV", "EXPIRED"] = Field(
        "UNDELIV", description="Receipt status of an honestly reported lost message."
    )
    sender_rewrite: Share = Field(
        0.0,
        description="Share of messages whose alphanumeric sender becomes a local mobile number of the "
        "destination's country, as a SIM box does.",
    )
    content: ContentChanges = Field(default_factory=ContentChanges, description="Changes to the text.")
    smsc: str = Field(
        "own",
        pattern=r"^(own|\+[1-9]\d{5,14})$",
        description="SMSC address the handset sees: 'own' (the destination network's first SMSC) or a "
        "foreign E.164 address, as grey routes show.",
    )
    handover_share: Share = Field(
        0.5,
        description="Share of the latency spent before the operator's SMSC has the message: the SCTS is "
        "the submit time plus this share of the latency.",
    )
    max_submits_per_s: float | None = Field(
        None, gt=0, description="Throughput limit: more submits per second are throttled; none: no limit."
    )
    error_rate: Share = Field(0.0, description="Share of submits refused with ESME_RSYSERR.")

    def merged(self, change: RouteProfile) -> RouteProfile:
        """This profile with the fields set in ``change`` (nested tables merged field by field)."""
        return RouteProfile.model_validate(
            _deep_merge(self.model_dump(), change.model_dump(exclude_unset=True))
        )


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class ProfileChange(Strict):
    """A change of a route's profile at one moment: ``at_share`` or ``after_s``, exactly one."""

    at_share: Share | None = Field(
        None, description="When: this share of the run's duration (never when the run has no duration)."
    )
    after_s: float | None = Field(None, ge=0, description="When: this many seconds after the start.")
    profile: RouteProfile = Field(description="The fields that change; the others stay as they were.")

    @model_validator(mode="after")
    def _one_moment(self) -> Self:
        if (self.at_share is None) == (self.after_s is None):
            raise ValueError("give exactly one of at_share and after_s")
        return self

    def moment_s(self, duration_s: float | None) -> float | None:
        """Seconds after the start, or None when it never happens (``at_share`` without a duration)."""
        if self.after_s is not None:
            return self.after_s
        if duration_s is None or self.at_share is None:
            return None
        return self.at_share * duration_s


class Route(Strict):
    """An upstream route: an SMSC the controller binds to, and how well it delivers."""

    name: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Route name, unique.")
    system_id: str = Field(
        min_length=1, max_length=MAX_SYSTEM_ID, description="system_id the controller binds with."
    )
    password: str = Field(max_length=MAX_PASSWORD, description="Bind password.")
    profile: RouteProfile = Field(default_factory=RouteProfile, description="Its quality at the start.")
    changes: list[ProfileChange] = Field(
        default_factory=list, description="Later changes of its quality, each merged into the one before."
    )


# --------------------------------------------------------------------------- networks and handsets


class Network(Strict):
    """A mobile operator's network in one country."""

    mcc_mnc: str = Field(pattern=MCC_MNC_PATTERN, description="MCC + MNC, e.g. 23415.")
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166 alpha-2 country code, e.g. GB.")
    operator: str = Field(min_length=1, description="Operator name as the handset shows it.")
    number_ranges: list[Annotated[str, Field(pattern=E164_PREFIX_PATTERN)]] = Field(
        min_length=1, description="E.164 prefixes of its mobile numbers, e.g. +447785."
    )
    smsc_addresses: list[Annotated[str, Field(pattern=E164_PATTERN)]] = Field(
        min_length=1, description="E.164 addresses of its own SMSCs; the first is the SIMs' default."
    )

    @field_validator("country")
    @classmethod
    def _known_country(cls, value: str) -> str:
        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value} is not a country phonenumbers knows")
        return value

    @model_validator(mode="after")
    def _numbers_of_the_country(self) -> Self:
        code = f"+{phonenumbers.country_code_for_region(self.country)}"
        problems: list[tuple[Loc, str, Any]] = [
            ((name, i), f"{number} is not a {self.country} number (country code {code})", number)
            for name, numbers in (
                ("number_ranges", self.number_ranges),
                ("smsc_addresses", self.smsc_addresses),
            )
            for i, number in enumerate(numbers)
            if not number.startswith(code)
        ]
        _fail("Network", problems)
        return self

    def owns(self, msisdn: str) -> bool:
        """Whether ``msisdn`` falls into one of its number ranges."""
        return any(msisdn.startswith(prefix) for prefix in self.number_ranges)


class Handset(Strict):
    """A modem with its SIM, plugged into an emulated Pi."""

    modem: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Modem id, unique on its Pi.")
    profile: str = Field(description="Modem model: " + ", ".join(sorted(PROFILES)) + ".")
    imsi: str = Field(pattern=r"^\d{6,15}$", description="The SIM's IMSI; starts with its network's MCC-MNC.")
    iccid: str = Field(pattern=r"^89\d{16,20}$", description="The SIM's ICCID.")
    msisdn: str = Field(pattern=E164_PATTERN, description="The SIM's number, E.164; in its network's ranges.")
    mcc_mnc: str = Field(pattern=MCC_MNC_PATTERN, description="Its network (one of the scenario's networks).")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        return get_profile(value).name  # ValueError naming the known profiles


class Pi(Strict):
    """An emulated Raspberry Pi running one probe agent."""

    id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Agent id, unique, e.g. pi-gb-1.")
    clock_shift_s: float = Field(
        0.0, description="How far this Pi's clock is off, seconds (the demo passes it to the agent)."
    )
    handsets: list[Handset] = Field(min_length=1, description="Its modems.")

    @model_validator(mode="after")
    def _unique_modems(self) -> Self:
        _fail(
            "Pi", _repeated([h.modem for h in self.handsets], lambda i: ("handsets", i, "modem"), "modem id")
        )
        return self


def _repeated(values: list[str], loc: Any, what: str) -> list[tuple[Loc, str, Any]]:
    """A problem for each value that repeats an earlier one."""
    seen: set[str] = set()
    problems: list[tuple[Loc, str, Any]] = []
    for i, value in enumerate(values):
        if value in seen:
            problems.append((loc(i), f"{what} {value!r} repeated", value))
        seen.add(value)
    return problems


# --------------------------------------------------------------------------- the scenario


class Scenario(Strict):
    """A simulated mobile network: what exists and how the routes behave."""

    description: str = Field("", description="What this scenario is for.")
    networks: list[Network] = Field(min_length=1, description="The mobile networks.")
    pis: list[Pi] = Field(default_factory=list, description="The emulated Pis and their handsets.")
    routes: list[Route] = Field(default_factory=list, description="The upstream routes.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        networks = {n.mcc_mnc: n for n in self.networks}
        problems = _repeated(
            [n.mcc_mnc for n in self.networks], lambda i: ("networks", i, "mcc_mnc"), "network"
        )
        problems += _repeated([p.id for p in self.pis], lambda i: ("pis", i, "id"), "pi id")
        problems += _repeated([r.name for r in self.routes], lambda i: ("routes", i, "name"), "route name")
        places = [(i, j, h) for i, pi in enumerate(self.pis) for j, h in enumerate(pi.handsets)]
        for key in ("msisdn", "imsi", "iccid"):
            values = [getattr(h, key) for _, _, h in places]
            problems += _repeated(
                values, lambda k, key=key: ("pis", places[k][0], "handsets", places[k][1], key), key
            )
        for i, j, handset in places:
            loc: Loc = ("pis", i, "handsets", j)
            network = networks.get(handset.mcc_mnc)
            if network is None:
                problems.append(
                    ((*loc, "mcc_mnc"), f"no network {handset.mcc_mnc} in networks", handset.mcc_mnc)
                )
                continue
            if not network.owns(handset.msisdn):
                problems.append(
                    (
                        (*loc, "msisdn"),
                        f"{handset.msisdn} is in none of {network.operator}'s number_ranges "
                        f"({', '.join(network.number_ranges)})",
                        handset.msisdn,
                    )
                )
            if not handset.imsi.startswith(network.mcc_mnc):
                problems.append(
                    ((*loc, "imsi"), f"an IMSI of network {network.mcc_mnc} starts with it", handset.imsi)
                )
        _fail("Scenario", problems)
        return self

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read and validate a scenario file; ScenarioError names the file and each failing field."""
        try:
            return load_model(path, cls)
        except ConfigError as exc:
            raise ScenarioError(exc.path, exc.problems) from None

    @classmethod
    def default(cls) -> Self:
        """The packaged default scenario (``simnet/scenarios/default.toml``)."""
        with resources.as_file(default_path()) as path:
            return cls.load(path)

    def network(self, mcc_mnc: str) -> Network:
        """The network with this MCC-MNC; KeyError when none."""
        for network in self.networks:
            if network.mcc_mnc == mcc_mnc:
                return network
        raise KeyError(mcc_mnc)

    def summary(self) -> str:
        """One line: how much of everything there is."""
        countries = sorted({n.country for n in self.networks})
        handsets = sum(len(p.handsets) for p in self.pis)
        return (
            f"{len(self.networks)} networks in {len(countries)} countries ({', '.join(countries)}), "
            f"{len(self.pis)} pis, {handsets} handsets, {len(self.routes)} routes "
            f"({', '.join(r.name for r in self.routes)})"
        )


def default_path() -> Traversable:
    """Where the packaged default scenario is."""
    return resources.files("simnet") / "scenarios" / "default.toml"


__all__ = [
    "ContentChanges",
    "Handset",
    "Latency",
    "Network",
    "Pi",
    "ProfileChange",
    "Route",
    "RouteProfile",
    "Scenario",
    "ScenarioError",
    "default_path",
]
