"""A route's connector: its settings as stored with the route, and the interface the sender uses.

A route row's ``connector`` JSON names its kind and carries that kind's settings, validated here
(one model per kind, ``extra="forbid"``), so a typo in a stored route is a clear error naming the
field rather than a connector that silently ignores it. Every connector kind offers the same
small interface (:class:`Connector`); the sender never looks behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, TypeAdapter, ValidationError

from controller.sender.http import HttpConnector, HttpHealth, HttpSettings
from controller.sender.smpp import ConnectorHealth, SmppConnector, SmppSettings
from controller.sender.smpp_wire import Pdu


class SmppRouteConnector(SmppSettings):
    """An SMPP 3.4 route (``kind = "smpp"``)."""

    kind: Literal["smpp"] = Field(description="The connector kind: smpp.")


#: A route's connector settings, by ``kind``: ``smpp`` or ``http``.
ConnectorSettings = Annotated[SmppRouteConnector | HttpSettings, Field(discriminator="kind")]
CONNECTOR_SETTINGS: TypeAdapter[SmppRouteConnector | HttpSettings] = TypeAdapter(ConnectorSettings)
#: A connector's health, whatever its kind.
Health = ConnectorHealth | HttpHealth


class Accepted(Protocol):
    """What a connector returns for a message the route accepted (every part)."""

    @property
    def message_ids(self) -> tuple[str, ...]: ...
    @property
    def submitted_at(self) -> datetime: ...
    @property
    def acked_at(self) -> datetime: ...
    @property
    def parts(self) -> int: ...


class Connector(Protocol):
    """One route's link to its provider."""

    name: str

    async def start(self) -> None:
        """Connect (and keep connected) in the background."""

    async def stop(self) -> None:
        """Disconnect; what is still queued fails as retryable."""

    async def submit(self, *, source: str, destination: str, text: str) -> Accepted:
        """Send one message (all its parts); ``SubmitError`` when the route did not take it."""
        ...

    def health(self) -> Health:
        """Bound or not, counters, throughput, the last error."""
        ...


def validate_connector(data: dict[str, Any]) -> SmppRouteConnector | HttpSettings:
    """The settings in ``data``, validated by the model its ``kind`` names, so errors are located
    as the JSON has them (``port``, not ``smpp.port``); ``ValidationError`` otherwise."""
    kind = data.get("kind")
    if kind == "smpp":
        return SmppRouteConnector.model_validate(data)
    if kind == "http":
        return HttpSettings.model_validate(data)
    return CONNECTOR_SETTINGS.validate_python(data)  # names the missing or unknown kind


def parse_connector(route: str, data: dict[str, Any]) -> SmppRouteConnector | HttpSettings:
    """The settings stored with ``route``; ``ValueError`` naming the field when they are wrong."""
    try:
        return validate_connector(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"connector.{'.'.join(str(p) for p in e['loc']) or 'kind'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"route {route!r}: {problems}") from exc


def build_connector(
    route: str,
    settings: SmppRouteConnector | HttpSettings,
    *,
    on_receipt: Callable[[Pdu], Awaitable[None]] | None = None,
) -> Connector:
    """The connector for ``settings`` (not started); an HTTP provider's receipts come through
    the API's webhook instead of ``on_receipt``."""
    if isinstance(settings, HttpSettings):
        return HttpConnector(route, settings)
    smpp = SmppSettings.model_validate(settings.model_dump(exclude={"kind"}))
    return SmppConnector(route, smpp, on_receipt=on_receipt)


__all__ = [
    "CONNECTOR_SETTINGS",
    "Accepted",
    "Connector",
    "ConnectorSettings",
    "Health",
    "SmppRouteConnector",
    "build_connector",
    "parse_connector",
    "validate_connector",
]
