"""Campaigns: what to test, where, how often and within what budget.

A campaign's definition is one pydantic model, stored as JSON in ``campaigns.definition`` and
accepted as-is by the REST API, so the API's validation messages are the model's. The scheduler
(``controller.schedule``) turns a definition into test cases.
"""

from __future__ import annotations

import re
from datetime import time
from typing import Annotated, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.correlation import MAX_ALPHANUMERIC_SENDER, TEMPLATES, Template
from probe_agent.protocol import MccMnc

_SENDER_RE = re.compile(rf"^(?:\+?[0-9]{{3,15}}|[A-Za-z0-9 ._&-]{{1,{MAX_ALPHANUMERIC_SENDER}}})$")
_IMSI_RE = r"^[0-9]{6,15}$"
Imsi = Annotated[str, Field(pattern=_IMSI_RE)]
RouteName = Annotated[str, Field(min_length=1, max_length=64)]


class HourWindow(BaseModel):
    """Hours of the day when tests may be sent, in the campaign's time zone; ``end`` before
    ``start`` wraps past midnight (22:00-06:00)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: time = Field(description="First minute sends are allowed, HH:MM.")
    end: time = Field(description="Sends stop at this time, HH:MM (exclusive).")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window is empty")
        return self

    def contains(self, moment: time) -> bool:
        """Whether a wall-clock time falls inside the window."""
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class CampaignDefinition(BaseModel):
    """A campaign: every route x every target (networks or probes) tested once per cadence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[RouteName] = Field(min_length=1, description="Routes under test, by name.")
    networks: list[MccMnc] = Field(
        default_factory=list,
        description="Destination networks (MCC-MNC); each round picks one online probe of each.",
    )
    probes: list[Imsi] = Field(
        default_factory=list, description="Destination probes by IMSI, in addition to the networks."
    )
    cadence_s: float = Field(
        ge=1.0, le=7 * 86400.0, description="Each route x target pair is tested once per cadence, seconds."
    )
    jitter_s: float = Field(
        0.0,
        ge=0.0,
        description="Each send moves by up to this many seconds either way, so tests are not predictable.",
    )
    templates: list[Template] = Field(
        default_factory=lambda: list[Template](["otp"]),
        min_length=1,
        description=f"Message templates used in turn: {', '.join(TEMPLATES)}.",
    )
    sender: str = Field(
        "ProbeFleet",
        description="Sender id: alphanumeric (up to 11 characters) or a number (3-15 digits).",
    )
    allowed_hours: list[HourWindow] = Field(
        default_factory=list,
        description="When sends are allowed, in the campaign's time zone; empty: always.",
    )
    timezone: str = Field("UTC", description="IANA time zone of the allowed hours, e.g. Europe/London.")
    daily_budget_per_route: float | None = Field(
        None, ge=0.0, description="Most a route may cost per UTC day in this campaign (route price units)."
    )
    daily_budget_per_network: float | None = Field(
        None, ge=0.0, description="Most tests to one network may cost per UTC day in this campaign."
    )
    deadline_s: float | None = Field(
        None,
        gt=0.0,
        le=86400.0,
        description="Override of the delivery deadline, seconds; none: the controller's.",
    )

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        if not _SENDER_RE.match(value):
            raise ValueError(
                f"not a sender id: up to {MAX_ALPHANUMERIC_SENDER} letters, digits, space . _ & - "
                "or a number of 3 to 15 digits"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        if value not in available_timezones() and value != "UTC":
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/London)")
        return value

    @field_validator("routes", "networks", "probes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(
                "listed more than once: " + ", ".join(sorted({v for v in value if value.count(v) > 1}))
            )
        return value

    @model_validator(mode="after")
    def _has_targets(self) -> Self:
        if not self.networks and not self.probes:
            raise ValueError("give at least one network or probe to test")
        return self

    @property
    def zone(self) -> ZoneInfo:
        """The time zone of the allowed hours."""
        try:
            return ZoneInfo(self.timezone)
        except ZoneInfoNotFoundError as exc:  # validated above; only a broken tzdata gets here
            raise ValueError(f"unknown time zone {self.timezone!r}") from exc
