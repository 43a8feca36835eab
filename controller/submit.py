"""The submit interface between the scheduler and the bundled sender.

The scheduler (``controller.schedule``) decides what to send and when; the sender owns the
routes' connectors (SMPP, HTTP) and does the sending. They meet here: one request in, the route's
message id and the submit times out, or a ``SubmitError`` saying why not and whether trying
again may help. The route is pinned: a test measures that route, so the sender must not fail
over to another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class SubmitRequest:
    """One test message to submit, on exactly this route."""

    test_case_id: int
    #: The route under test, by name; never replaced by another.
    route: str
    #: The destination probe's number, E.164 as stored for the probe.
    msisdn: str
    #: Sender id: alphanumeric (up to 11 characters) or a number.
    sender: str
    text: str


@dataclass(frozen=True, kw_only=True)
class Submitted:
    """A submit the route accepted; times are aware and converted to UTC."""

    #: The route's id of the message, which its delivery receipts carry.
    message_id: str
    #: When the message left for the route (the start of the measured latency).
    submitted_at: datetime
    #: When the route acknowledged it (SMPP submit_sm_resp, the HTTP response).
    acked_at: datetime

    def __post_init__(self) -> None:
        for name in ("submitted_at", "acked_at"):
            when: datetime = getattr(self, name)
            if when.utcoffset() is None:
                raise ValueError(f"{name} {when.isoformat()} is naive: give it a time zone (UTC)")
            object.__setattr__(self, name, when.astimezone(UTC))
        if self.acked_at < self.submitted_at:
            raise ValueError("acked_at is before submitted_at")


class SubmitError(Exception):
    """The route (or the sender) refused or could not take the submit.

    ``retryable`` is true when the same submit may succeed later (throttled, connector down,
    timeout before anything was sent) and false when it will not (invalid number, rejected
    sender, route disabled).
    """

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class Submitter(Protocol):
    """What the scheduler needs from the sender."""

    async def submit(self, request: SubmitRequest) -> Submitted:
        """Submit ``request`` on its route; ``SubmitError`` when it was not accepted."""
        ...


class NoSender:
    """The submitter of a controller without a sender: every submit is refused, saying why, so
    planned tests show up as failed with a reason rather than silently waiting."""

    async def submit(self, request: SubmitRequest) -> Submitted:
        """Refuse ``request``."""
        raise SubmitError(f"route {request.route!r}: no sender is connected to this controller")
