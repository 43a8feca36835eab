"""The bundled sender: one connector per route, routing decisions from the current table,
failover, the message journal and delivery receipts.

Two ways in. ``submit`` (the scheduler's ``Submitter``) sends a test on exactly its route: a
test measures that route, so it never fails over. ``send`` takes traffic: the number is checked
and placed on its network (``numbers``), the country's rules applied (``rules``), a route picked
by weight from the routing table (``choose``) and, when it refuses the message, the next route
in failover order tried, all parts of a message on one route. Every message is journaled before
it is sent (``messages``); an idempotency key is claimed once, so a retried request sends
nothing twice.

A new routing table (``use_table``) swaps the picker: messages in flight keep their decision.
Routes are re-read by ``sync_routes`` (the service calls it periodically): a connector whose
settings changed is replaced, one whose route was disabled or deleted is stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.sender import messages
from controller.sender.choose import Decision, NoRoute, RoutePicker
from controller.sender.connectors import (
    Connector,
    Health,
    SmppRouteConnector,
    build_connector,
    parse_connector,
)
from controller.sender.http import HttpSettings
from controller.sender.numbers import KnownNetwork, NumberError, NumberPlan
from controller.sender.receipts import DeliveryReceipt, ReceiptError, parse_receipt
from controller.sender.rules import RulesFile, RuleViolation, load_rules
from controller.sender.smpp_wire import Pdu
from controller.storage import schema as s
from controller.submit import SubmitError, SubmitRequest, Submitted
from probe_agent.logs import bind
from probe_agent.protocol import RoutingTable

log = logging.getLogger(__name__)


class SendRefused(ValueError):
    """The message itself is wrong (a 4xx): ``field`` names what to fix."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class SendUnavailable(RuntimeError):
    """Nothing can carry the message now (no routing table, no usable route): try later."""


@dataclass(frozen=True, kw_only=True)
class MessageRequest:
    """One message of traffic."""

    to: str
    sender: str
    text: str
    idempotency_key: str | None = None
    #: Promotional traffic is held to the country's quiet hours; transactional (OTP) is not.
    promotional: bool = False
    #: The region of numbers given in national format.
    default_region: str | None = None


@dataclass(frozen=True)
class SendOutcome:
    """What became of a message: ``created`` is False when an idempotency key found it."""

    id: int
    created: bool
    status: str
    route: str | None
    reason: str
    error: str | None = None


@dataclass
class _Route:
    settings: SmppRouteConnector | HttpSettings
    connector: Connector


@dataclass
class SenderStats:
    """Counters since start, for health and tests."""

    receipts: int = 0
    unreadable_receipts: int = 0
    unknown_receipts: int = 0
    failovers: int = 0
    invalid_connectors: dict[str, str] = field(default_factory=dict)


class Sender:
    """Sends through the routes' connectors, as the routing table says."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        rules: RulesFile | None = None,
        prefix_file: Path | None = None,
        portability_file: Path | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.rules = rules if rules is not None else load_rules()
        self.stats = SenderStats()
        self._prefix_file = prefix_file
        self._portability_file = portability_file
        self._clock = clock
        self._routes: dict[str, _Route] = {}
        self._table: RoutingTable | None = None
        self._picker: RoutePicker | None = None
        self._plan = NumberPlan(())
        self._plan_key: tuple[Any, ...] | None = None
        self._sync_lock = asyncio.Lock()
        # A receipt can come before its submit's answer is written: the two writes take turns, so
        # one of them always sees the other (in separate transactions, both could miss it).
        self._journal_lock = asyncio.Lock()

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the routes and networks and start the connectors."""
        await self.sync_routes()

    async def stop(self) -> None:
        """Stop every connector (unbinding cleanly)."""
        routes, self._routes = self._routes, {}
        await asyncio.gather(*(r.connector.stop() for r in routes.values()), return_exceptions=True)

    async def sync_routes(self) -> None:
        """Bring the connectors in line with the routes table (and the number plan with the
        networks table): start new ones, replace changed ones, stop removed or disabled ones."""
        async with self._sync_lock:
            async with self.engine.connect() as conn:
                routes = list(
                    await conn.execute(select(s.routes.c.name, s.routes.c.connector, s.routes.c.enabled))
                )
                networks = list(
                    await conn.execute(
                        select(s.networks.c.mcc_mnc, s.networks.c.country, s.networks.c.operator)
                    )
                )
            known = tuple(KnownNetwork(n.mcc_mnc, n.country or "", n.operator or "") for n in networks)
            plan_key = (known, _modified(self._prefix_file), _modified(self._portability_file))
            if plan_key != self._plan_key:  # a portability file can be large: read it when it changed
                self._plan = await asyncio.to_thread(
                    NumberPlan.load,
                    known,
                    prefix_file=self._prefix_file,
                    portability_file=self._portability_file,
                )
                self._plan_key = plan_key
            wanted: dict[str, SmppRouteConnector | HttpSettings] = {}
            for row in routes:
                if not row.enabled or not row.connector:
                    continue
                try:
                    wanted[row.name] = parse_connector(row.name, dict(row.connector))
                except ValueError as exc:
                    if self.stats.invalid_connectors.get(row.name) != str(exc):
                        bind(log, route=row.name).error("route not connected: %s", exc)
                    self.stats.invalid_connectors[row.name] = str(exc)
                    continue
                self.stats.invalid_connectors.pop(row.name, None)
            for name in [n for n in self._routes if n not in wanted or wanted[n] != self._routes[n].settings]:
                old = self._routes.pop(name)
                bind(log, route=name).info("stopping the connector (route changed, disabled or deleted)")
                await old.connector.stop()
            for name, settings in wanted.items():
                if name in self._routes:
                    continue
                connector = build_connector(name, settings, on_receipt=self._receipt_handler(name))
                await connector.start()
                self._routes[name] = _Route(settings, connector)
                bind(log, route=name).info("connector started (%s)", settings.kind)
            if self._table is not None:
                self._picker = RoutePicker(self._table, enabled=set(self._routes))

    def connector(self, route: str) -> Connector | None:
        """The running connector of ``route``, if any."""
        found = self._routes.get(route)
        return found.connector if found is not None else None

    def use_table(self, table: RoutingTable) -> None:
        """Route by ``table`` from now on; messages in flight keep their decision."""
        if self._table is not None and table.version == self._table.version:
            return
        self._table = table
        self._picker = RoutePicker(table, enabled=set(self._routes))
        log.info("sender routing by table version %d", table.version)

    def health(self) -> list[Health]:
        """Every connector's health, by route name."""
        return [self._routes[name].connector.health() for name in sorted(self._routes)]

    # -- tests: pinned ---------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> Submitted:
        """Send a test on its route, never another; ``SubmitError`` when it was not taken."""
        route = self._routes.get(request.route)
        if route is None:
            why = self.stats.invalid_connectors.get(request.route, "no connector is configured for it")
            raise SubmitError(f"route {request.route!r} cannot send: {why}")
        decision = {"route": request.route, "reason": f"pinned to {request.route} (test of that route)"}
        async with self.engine.begin() as conn:
            message, _ = await messages.create(
                conn,
                {
                    "created_at": self._clock(),
                    "kind": "test",
                    "test_case_id": request.test_case_id,
                    "destination": request.msisdn,
                    "sender": request.sender,
                    "text": request.text,
                    "route": request.route,
                    "decision": decision,
                    "status": "accepted",
                },
            )
        try:
            accepted = await route.connector.submit(
                source=request.sender, destination=request.msisdn, text=request.text
            )
        except SubmitError as exc:
            await self._record_failure(message, decision, exc.reason)
            raise
        except asyncio.CancelledError:
            # The caller gave up (the scheduler's submit timeout, a stop): the route may still
            # send it, so say so rather than leave the message "accepted" for ever.
            why = "submit interrupted (timed out or stopped) before the route answered: it may still be sent"
            await asyncio.shield(self._record_failure(message, decision, why))
            raise
        async with self._journal_lock, self.engine.begin() as conn:
            await messages.record_submit(
                conn,
                message,
                route=request.route,
                decision=decision,
                message_ids=accepted.message_ids,
                submitted_at=accepted.submitted_at,
                acked_at=accepted.acked_at,
            )
        # A long test's receipts come per part; its result judges the first part's.
        return Submitted(
            message_id=accepted.message_ids[0], submitted_at=accepted.submitted_at, acked_at=accepted.acked_at
        )

    async def _record_failure(self, message: int, decision: dict[str, Any], error: str) -> None:
        async with self.engine.begin() as conn:
            await messages.record_failure(conn, message, decision=decision, error=error)

    # -- traffic: routed --------------------------------------------------------------------------

    async def send(self, request: MessageRequest) -> SendOutcome:
        """Check, route and send one message. ``SendRefused`` for a wrong message,
        ``SendUnavailable`` when no route can take it now, ``messages.IdempotencyConflict`` for a
        key used before with another message."""
        now = self._clock()
        try:
            destination = self._plan.resolve(request.to, default_region=request.default_region, field="to")
        except NumberError as exc:
            raise SendRefused(exc.field, exc.reason) from exc
        try:
            self.rules.check(destination.region, request.sender, promotional=request.promotional, at=now)
        except RuleViolation as exc:
            raise SendRefused(exc.field, exc.reason) from exc
        if destination.mcc_mnc is None:
            raise SendRefused(
                "to",
                f"the network of {destination.e164} is unknown: add its prefix to the prefix or "
                "portability file, or its operator to the networks",
            )
        picker = self._picker
        if picker is None:
            raise SendUnavailable("no routing table yet: the controller has not built one")
        try:
            decision = picker.pick(destination.mcc_mnc)
        except NoRoute as exc:
            raise SendUnavailable(str(exc)) from exc
        record = _decision_record(decision, [])
        async with self.engine.begin() as conn:
            message, created = await messages.create(
                conn,
                {
                    "idempotency_key": request.idempotency_key,
                    "created_at": now,
                    "kind": "api",
                    "destination": destination.e164,
                    "region": destination.region,
                    "mcc_mnc": destination.mcc_mnc,
                    "sender": request.sender,
                    "text": request.text,
                    "decision": record,
                    "status": "accepted",
                },
            )
            if not created:
                row = (await conn.execute(select(s.messages).where(s.messages.c.id == message))).one()
                return SendOutcome(
                    message,
                    False,
                    row.status,
                    row.route,
                    (row.decision or {}).get("reason", ""),
                    row.error,
                )
        return await self._send_routed(message, request, destination.e164, decision, picker)

    async def _send_routed(
        self, message: int, request: MessageRequest, to: str, decision: Decision, picker: RoutePicker
    ) -> SendOutcome:
        attempts: list[dict[str, Any]] = []
        route_name: str | None = decision.route
        while route_name is not None:
            rlog = bind(log, route=route_name, message_id=message)
            route = self._routes.get(route_name)
            error: str | None = None
            if route is None:
                error = "no connector"
            elif not route.connector.health().bound:
                error = "not bound (the link to the route is down)"
            else:
                try:
                    accepted = await route.connector.submit(
                        source=request.sender, destination=to, text=request.text
                    )
                except SubmitError as exc:
                    error = exc.reason
                else:
                    record = _decision_record(decision, attempts, route=route_name)
                    async with self._journal_lock, self.engine.begin() as conn:
                        await messages.record_submit(
                            conn,
                            message,
                            route=route_name,
                            decision=record,
                            message_ids=accepted.message_ids,
                            submitted_at=accepted.submitted_at,
                            acked_at=accepted.acked_at,
                        )
                    return SendOutcome(message, True, "submitted", route_name, record["reason"])
            attempts.append({"route": route_name, "error": error, "at": self._clock().isoformat()})
            failed = {a["route"] for a in attempts}
            route_name = picker.next_after(decision, failed)
            if route_name is not None:
                self.stats.failovers += 1
            rlog.warning(
                "route did not take the message (%s); %s",
                error,
                f"failing over to {route_name}" if route_name else "no route left to fail over to",
            )
        record = _decision_record(decision, attempts)
        error = "; ".join(f"{a['route']}: {a['error']}" for a in attempts)
        async with self.engine.begin() as conn:
            await messages.record_failure(conn, message, decision=record, error=error)
        return SendOutcome(message, True, "failed", None, record["reason"], error)

    # -- receipts ---------------------------------------------------------------------------------

    def _receipt_handler(self, route: str) -> Callable[[Pdu], Any]:
        async def handle(pdu: Pdu) -> None:
            await self.receipt_pdu(route, pdu)

        return handle

    async def receipt_pdu(self, route: str, pdu: Pdu) -> None:
        """A receipt as the route's SMSC sent it: parsed, stored, applied to its message and to
        the test result it may judge. An unreadable one is logged and counted, never raised."""
        rlog = bind(log, route=route)
        try:
            receipt = parse_receipt(pdu)
        except ReceiptError as exc:
            self.stats.unreadable_receipts += 1
            rlog.warning("unreadable delivery receipt: %s", exc)
            return
        await self.receipt(route, receipt)

    async def receipt(self, route: str, receipt: DeliveryReceipt) -> int | None:
        """A parsed receipt of ``route`` (SMPP, or an HTTP provider's webhook): stored, applied to
        its message (returned; None when unknown, kept all the same) and to the test result it
        may judge."""
        rlog = bind(log, route=route)
        async with self._journal_lock, self.engine.begin() as conn:
            message, outcome = await messages.apply_receipt(conn, route, receipt, received_at=self._clock())
        self.stats.receipts += 1
        if message is None:
            self.stats.unknown_receipts += 1
            rlog.info(
                "receipt %s for message id %s of no known message (kept)", receipt.stat, receipt.message_id
            )
        else:
            rlog.info("receipt %s for message %s", receipt.stat, message)
        if outcome.rejudged:
            rlog.info("receipt re-judged %d test result(s)", outcome.rejudged)
        return message


def _modified(path: Path | None) -> float | None:
    """When ``path`` last changed (None: no file)."""
    return None if path is None else path.stat().st_mtime


def _decision_record(
    decision: Decision, attempts: list[dict[str, Any]], *, route: str | None = None
) -> dict[str, Any]:
    """The decision as stored with the message: the pick, its reason, the failovers taken."""
    reason = decision.reason
    if route is not None and route != decision.route:
        reason = (
            f"failed over to {route} after {', '.join(a['route'] for a in attempts)}; first choice: {reason}"
        )
    return {
        "route": route or decision.route,
        "chosen": decision.route,
        "role": decision.role,
        "reason": reason,
        "table_version": decision.table_version,
        "failover": list(decision.failover),
        "attempts": attempts,
    }


__all__ = ["MessageRequest", "SendOutcome", "SendRefused", "SendUnavailable", "Sender", "SenderStats"]
