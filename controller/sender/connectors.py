"""A route's connector: its settings as stored with the route, and the interface the sender uses.

A route row's ``connector`` JSON names its kind and carries that kind's settings, validated here
(one model per kind, ``extra="forbid"``), so a typo in a stored route is a clear error naming the
field rather than a connector that silently ignores it. Every connector kind offers the same
small interface (:class:`Connector`); the sender never looks behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import Field, ValidationError

from controller.sender.smpp import ConnectorHealth, SmppConnector, SmppSettings
from controller.sender.smpp_wire import Pdu


class SmppRouteConnector(SmppSettings):
    """An SMPP 3.4 route (``kind = "smpp"``)."""

    kind: Literal["smpp"] = Field(description="The connector kind: smpp.")


ConnectorSettings = SmppRouteConnector


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

    def health(self) -> ConnectorHealth:
        """Bound or not, counters, throughput, the last error."""
        ...


def parse_connector(route: str, data: dict[str, Any]) -> ConnectorSettings:
    """The settings stored with ``route``; ``ValueError`` naming the field when they are wrong."""
    try:
        return SmppRouteConnector.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"connector.{'.'.join(str(p) for p in e['loc']) or 'kind'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"route {route!r}: {problems}") from exc


def build_connector(
    route: str,
    settings: ConnectorSettings,
    *,
    on_receipt: Callable[[Pdu], Awaitable[None]] | None = None,
) -> Connector:
    """The connector for ``settings`` (not started)."""
    smpp = SmppSettings.model_validate(settings.model_dump(exclude={"kind"}))
    return SmppConnector(route, smpp, on_receipt=on_receipt)


__all__ = ["Accepted", "Connector", "ConnectorSettings", "build_connector", "parse_connector"]
