"""The campaign form of the web UI, mapped onto the API's own model of a campaign
(``controller.api.campaigns.CampaignIn``, whose definition is ``controller.campaigns.CampaignDefinition``):
what the browser posts becomes that model, and every error pydantic or the store reports goes
next to the field it is about.

A form keeps what the user typed (strings, and lists of strings for the checkbox groups), so a
form shown again with its errors loses nothing. The few things a browser cannot post as the
model wants are read here: numbers (finite, or the field is refused before pydantic sees it),
probes as IMSIs separated by spaces or commas, allowed hours as ``HH:MM-HH:MM`` windows. Every
other rule, and the words of its message, is the model's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from controller.api.campaigns import CampaignIn
from controller.api.errors import error_text
from controller.campaign_store import CampaignRefused
from controller.campaigns import CampaignDefinition

#: Every field of the form, in the order of the page, with its label (units included).
LABELS: dict[str, str] = {
    "name": "Name",
    "routes": "Routes",
    "networks": "Networks",
    "probes": "Probes (IMSIs)",
    "templates": "Templates",
    "sender": "Sender id",
    "cadence_s": "Cadence (seconds)",
    "jitter_s": "Jitter (seconds)",
    "allowed_hours": "Allowed hours (HH:MM-HH:MM)",
    "timezone": "Time zone",
    "daily_budget_per_route": "Daily budget per route (route price units)",
    "daily_budget_per_network": "Daily budget per network (route price units)",
    "deadline_s": "Delivery deadline (seconds)",
    "paused": "Create it paused",
}
#: The checkbox groups: each posts a list.
GROUPS = ("routes", "networks", "templates")
#: Numbers: seconds or price units, finite; optional ones may be left empty.
NUMBERS = ("cadence_s", "jitter_s", "daily_budget_per_route", "daily_budget_per_network", "deadline_s")
OPTIONAL_NUMBERS = ("daily_budget_per_route", "daily_budget_per_network", "deadline_s")
#: What the form says about a field beyond the model's description.
HOW = {
    "probes": "Separate them by spaces, commas or new lines.",
    "allowed_hours": "Write windows such as 08:00-20:00, separated by commas; 22:00-06:00 wraps past "
    "midnight.",
    "daily_budget_per_route": "Empty: no budget.",
    "daily_budget_per_network": "Empty: no budget.",
    "deadline_s": "Leave it empty for that.",
}
#: Pydantic's "should match pattern" in words, per field.
PATTERN_WORDS = {
    "networks": "not an MCC-MNC (5 or 6 digits)",
    "probes": "not an IMSI (6 to 15 digits)",
}
#: Where an error about the definition as a whole goes (its only one: no target given).
WHOLE_DEFINITION = "networks"
#: The summary's key for errors that belong to no field.
FORM = "form"

_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})\s*[-\u2013]\s*(\d{1,2}):(\d{2})$")
_SEPARATORS = re.compile(r"[\s,;]+")


def _hint(name: str) -> str:
    info = CampaignDefinition.model_fields.get(name)
    words = [info.description] if info is not None and info.description else []
    if name in HOW:
        words.append(HOW[name])
    return " ".join(words)


#: The hint under each field: the model's description, and how to write it here.
HINTS: dict[str, str] = {name: _hint(name) for name in LABELS}
HINTS["name"] = "Unique; up to 128 characters."
HINTS["paused"] = "A paused campaign sends nothing until resumed."


@dataclass
class CampaignForm:
    """The form's values as typed and its errors by field (``form`` for the rest)."""

    values: dict[str, Any]
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        """An error on a field (or on the form, when it is no field of it)."""
        self.errors.setdefault(name if name in LABELS else FORM, []).append(message)

    def error(self, name: str) -> str:
        """The field's errors, as one text ("" when none)."""
        return "; ".join(self.errors.get(name, []))

    def summary(self) -> list[tuple[str | None, str, str]]:
        """Every error as (id of its field's control, label, message), in the order of the page;
        an error of the whole form has no field (None)."""
        order = [*LABELS, FORM]
        return [
            (anchor(name) if name in LABELS else None, LABELS.get(name, "Form"), message)
            for name in sorted(self.errors, key=order.index)
            for message in self.errors[name]
        ]


def anchor(name: str) -> str:
    """The id of the control a summary link moves to (a group's first checkbox)."""
    return f"f-{name}-1" if name in GROUPS else f"f-{name}"


def _number_text(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if value != int(value) or abs(value) >= 1e15 else str(int(value))


def _windows_text(windows: list[Any]) -> str:
    return ", ".join(f"{w.start:%H:%M}-{w.end:%H:%M}" for w in windows)


def blank() -> CampaignForm:
    """A new campaign's form, with the model's defaults."""
    fields = CampaignDefinition.model_fields
    defaults = {name: info.get_default(call_default_factory=True) for name, info in fields.items()}
    return CampaignForm(
        values={
            "name": "",
            "routes": [],
            "networks": [],
            "probes": "",
            "templates": list(defaults["templates"]),
            "sender": defaults["sender"],
            "cadence_s": "",
            "jitter_s": _number_text(defaults["jitter_s"]),
            "allowed_hours": "",
            "timezone": defaults["timezone"],
            "daily_budget_per_route": "",
            "daily_budget_per_network": "",
            "deadline_s": "",
            "paused": False,
        }
    )


def stored(name: str, definition: CampaignDefinition) -> CampaignForm:
    """The form of a stored campaign."""
    return CampaignForm(
        values={
            "name": name,
            "routes": list(definition.routes),
            "networks": list(definition.networks),
            "probes": ", ".join(definition.probes),
            "templates": list(definition.templates),
            "sender": definition.sender,
            "cadence_s": _number_text(definition.cadence_s),
            "jitter_s": _number_text(definition.jitter_s),
            "allowed_hours": _windows_text(definition.allowed_hours),
            "timezone": definition.timezone,
            "daily_budget_per_route": _number_text(definition.daily_budget_per_route),
            "daily_budget_per_network": _number_text(definition.daily_budget_per_network),
            "deadline_s": _number_text(definition.deadline_s),
            "paused": False,
        }
    )


def posted(form: MultiMapping[Any]) -> CampaignForm:
    """The form as the browser posted it."""
    values: dict[str, Any] = {}
    for name in LABELS:
        if name in GROUPS:
            values[name] = [v for v in form.getall(name, []) if isinstance(v, str)]
        elif name == "paused":
            values[name] = form.get("paused") == "1"
        else:
            value = form.get(name, "")
            values[name] = value if isinstance(value, str) else ""
    return CampaignForm(values=values)


def _windows(text: str, form: CampaignForm) -> list[dict[str, str]] | None:
    windows = []
    for part in filter(None, (p.strip() for p in re.split(r"[,;\n]+", text))):
        match = _WINDOW.match(part)
        if match is None:
            form.add("allowed_hours", f"{part!r} is not a window: write HH:MM-HH:MM, such as 08:00-20:00")
            return None
        h1, m1, h2, m2 = match.groups()
        windows.append({"start": f"{int(h1):02d}:{m1}", "end": f"{int(h2):02d}:{m2}"})
    return windows


def _message(error: ErrorDetails, name: str, rest: tuple[int | str, ...]) -> str:
    text = error_text(error)
    if error["type"] == "string_pattern_mismatch" and name in PATTERN_WORDS:
        text = PATTERN_WORDS[name]
    if rest and isinstance(rest[0], int):
        if name == "allowed_hours":
            where = " ".join(str(part) for part in rest[1:])
            return f"window {rest[0] + 1}{' ' + where if where else ''}: {text}"
        return f"{error.get('input')!r}: {text}"
    return text


def validate(form: CampaignForm) -> CampaignIn | None:
    """The campaign the form describes, or None with ``form.errors`` saying why not (every
    problem at once, each on its field)."""
    values = form.values
    definition: dict[str, Any] = {
        "routes": values["routes"],
        "networks": values["networks"],
        "templates": values["templates"],
        "sender": values["sender"].strip(),
        "probes": [p for p in _SEPARATORS.split(values["probes"]) if p],
    }
    if values["timezone"].strip():
        definition["timezone"] = values["timezone"].strip()
    windows = _windows(values["allowed_hours"], form)
    if windows is not None:
        definition["allowed_hours"] = windows
    for name in NUMBERS:
        text = values[name].strip()
        if not text:
            if name in OPTIONAL_NUMBERS:
                definition[name] = None
            continue
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            form.add(name, f"{text[:32]!r} is not a number: write it in digits, such as 300 or 0.5")
            continue
        definition[name] = number
    locally_refused = set(form.errors)
    try:
        campaign = CampaignIn.model_validate(
            {"name": values["name"].strip(), "definition": definition, "paused": values["paused"]}
        )
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            if loc[:1] == ("definition",):
                loc = loc[1:]
            name = str(loc[0]) if loc else WHOLE_DEFINITION
            if name not in locally_refused:
                form.add(name, _message(error, name, loc[1:]))
        return None
    return None if form.errors else campaign


def refused(form: CampaignForm, exc: CampaignRefused) -> None:
    """The store's refusal (a taken name, a route that does not exist) on its field."""
    form.add(exc.field.removeprefix("definition."), exc.problem)


__all__ = [
    "FORM",
    "GROUPS",
    "HINTS",
    "LABELS",
    "CampaignForm",
    "anchor",
    "blank",
    "posted",
    "refused",
    "stored",
    "validate",
]
