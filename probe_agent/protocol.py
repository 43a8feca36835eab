"""The MQTT wire contract: every topic, built and parsed here only, and its one payload model.

The controller imports this module; nothing here imports the controller. Payloads are JSON with
RFC 3339 UTC times (the SMSC timestamp keeps the zone the SMSC gave) and ``_ms`` durations.
Receivers ignore unknown fields, so v1 grows only by adding optional fields; a breaking change
publishes a ``v2`` tree beside this one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

CONTRACT_MAJOR = 1
DEFAULT_PREFIX = f"pf/v{CONTRACT_MAJOR}"
#: Agent and modem ids become topic levels: no MQTT wildcards, separators or spaces.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Commands an agent answers on ``request/{cmd}``.
COMMANDS = ("time", "reload", "modem-reset", "rescan", "storage")

Id = Annotated[str, Field(pattern=ID_PATTERN)]


class Payload(BaseModel):
    """Base of every payload: unknown fields are ignored, so v1 can grow additively."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> bytes:
        """The payload as it goes on the wire."""
        return self.model_dump_json(exclude_none=False).encode()


class ClockState(Payload):
    """What the agent knows of its own clock, carried by every observation and in health."""

    offset_ms: float | None = Field(
        None, description="Estimated local clock minus true time, ms; subtract it to correct."
    )
    error_ms: float | None = Field(None, description="Bound on the offset's error, ms.")
    source: Literal["chrony", "controller", "none"] = Field(
        "none", description="Where the estimate comes from."
    )
    since_sync_s: float | None = Field(None, description="Seconds since the estimate was last updated.")


class AgentStatus(Payload):
    """``agents/{agent}/status``, retained: online on connect, offline on a clean stop, lost as
    the last will. ``session`` is per process, so a late will of an old connection can be told
    from the live one."""

    state: Literal["online", "offline", "lost"] = Field(description="Availability of the agent.")
    agent: Id = Field(description="Agent id.")
    session: str = Field(max_length=64, description="Id of this agent process; changes on every start.")
    version: str = Field(max_length=64, description="Agent software version.")
    started_at: AwareDatetime = Field(description="When this process started (UTC).")
    at: AwareDatetime | None = Field(None, description="When this status was published; none for a will.")
    uptime_s: float | None = Field(None, description="Seconds since start when published.")
    dropped: int = Field(0, description="Observations dropped by the full spool since it was created.")


class ModemState(Payload):
    """``agents/{agent}/modems/{modem}/state``, retained, on every change."""

    agent: Id = Field(description="Agent id.")
    modem: Id = Field(description="Modem id, unique on its agent.")
    port: str = Field(description="Serial port path (the stable udev name).")
    profile: str | None = Field(None, description="Modem model profile.")
    connected: bool = Field(description="Port open and modem initialised.")
    registration: str | None = Field(
        None, max_length=32, description="registered_home, registered_roaming, searching, ..."
    )
    operator: str | None = Field(None, description="Network name the modem is registered on.")
    mcc_mnc: str | None = Field(None, max_length=6, description="MCC+MNC of that network.")
    expected_mcc_mnc: str | None = Field(None, description="From the agent's config.")
    imsi: str | None = Field(None, max_length=16, description="IMSI of the SIM.")
    iccid: str | None = Field(None, max_length=22, description="ICCID of the SIM.")
    msisdn: str | None = Field(None, max_length=16, description="As configured, else as the SIM reports it.")
    signal_rssi: int | None = Field(None, description="27.007 RSSI 0..31.")
    signal_dbm: int | None = Field(None, description="Signal strength, dBm.")
    storage_memory: str | None = Field(None, description="Storage new SMS land in (SM, ME, ...).")
    storage_used: int | None = Field(None, description="Messages in it (read ones are deleted).")
    storage_total: int | None = Field(None, description="Its capacity in messages.")
    last_error: str | None = Field(None, description="Last problem the port met, in words.")
    last_error_at: AwareDatetime | None = Field(None, description="When (UTC).")
    reconnects: int = Field(0, description="Times the port re-opened or re-initialised the modem.")
    events: list[str] = Field(default_factory=list, description="Recent recovery events, newest last.")
    updated_at: AwareDatetime | None = Field(None, description="When this state was read (UTC).")


class Health(Payload):
    """``agents/{agent}/health``, retained at QoS 0, every heartbeat."""

    agent: Id = Field(description="Agent id.")
    at: AwareDatetime = Field(description="When measured (UTC).")
    spool_depth: int = Field(description="Observations waiting for the broker's acknowledgement.")
    dropped: int = Field(description="Observations dropped by the full spool since it was created.")
    reconnects: int = Field(description="Broker reconnects since start.")
    clock: ClockState = Field(description="The agent's clock estimate.")
    load_1m: float | None = Field(None, description="1-minute load average of the Pi.")
    memory_used_pct: float | None = Field(None, description="Memory in use on the Pi, %.")
    rss_mb: float | None = Field(None, description="Resident memory of the agent process, MB.")
    disk_free_mb: float | None = Field(None, description="Free space where the spool lives, MB.")
    modems_connected: int = Field(0, description="Modems open and initialised.")
    modems_total: int = Field(0, description="Modems configured.")


class SimIdentity(Payload):
    """The SIM an observation came in on."""

    imsi: str | None = Field(None, max_length=16, description="IMSI.")
    iccid: str | None = Field(None, max_length=22, description="ICCID.")
    msisdn: str | None = Field(None, max_length=16, description="The SIM's number, E.164.")
    mcc_mnc: str | None = Field(None, max_length=6, description="Network it was registered on.")


class Observation(Payload):
    """``agents/{agent}/sms``, QoS 1 from the durable spool: one received SMS, parts joined."""

    id: str = Field(
        min_length=1,
        max_length=64,
        description="Stable id (same SMS read twice, same id): remove duplicates by it.",
    )
    agent: Id = Field(description="Agent id.")
    modem: Id = Field(description="Modem id.")
    sim: SimIdentity = Field(description="The SIM it arrived on.")
    sender: str | None = Field(
        max_length=32, description="As received: +digits when international, or the alphanumeric name."
    )
    sender_type: str | None = Field(description="Type of number: international, national, alphanumeric, ...")
    sender_toa: int | None = Field(None, description="Type-of-address octet as received.")
    text: str | None = Field(description="Decoded text of all parts; none when undecodable.")
    smsc: str | None = Field(max_length=24, description="SMSC address from the PDU.")
    scts: AwareDatetime | None = Field(
        description="SMSC timestamp, in the zone the SMSC gave (1 s resolution)."
    )
    urc_at: AwareDatetime = Field(description="When the first part's indication came off the port (UTC).")
    completed_at: AwareDatetime = Field(description="When the last part's did (UTC).")
    parts: int = Field(description="Parts received.")
    total_parts: int = Field(description="Parts the concatenation header announced (1 if none).")
    partial: bool = Field(description="Parts missing past the timeout, or undecodable parts.")
    missing_parts: list[int] = Field(default_factory=list, description="Part numbers never received.")
    dcs: int | None = Field(None, description="TP-DCS of the first part.")
    alphabet: str | None = Field(None, description="gsm7, ucs2 or 8bit.")
    message_class: int | None = Field(None, description="Message class 0..3 when the DCS gives one.")
    flash: bool = Field(False, description="Class 0: shown at once, not stored by a handset.")
    pid: int | None = Field(None, description="TP-PID of the first part.")
    silent: bool = Field(False, description="PID 0x40: a type-0 SMS a handset would not show.")
    replace_type: int | None = Field(None, description="1..7 for the replace-short-message PIDs.")
    concat_ref: int | None = Field(None, description="Concatenation reference.")
    concat_ref_bits: int | None = Field(None, description="8 or 16: the reference's size.")
    origin: Literal["cmti", "cmt", "startup", "sweep"] = Field(
        description="How it was read: indicated, routed directly, or found in storage."
    )
    stored_before_start: bool = Field(False, description="Found in storage when the agent started.")
    pdus: list[str] = Field(description="Raw PDU (hex, with SMSC prefix) of every part, in order.")
    decode_error: str | None = Field(None, description="Why a PDU could not be decoded; its hex is in pdus.")
    notes: list[str] = Field(
        default_factory=list, description="Decoder remarks, e.g. an unsupported shift table."
    )
    signal_dbm: int | None = Field(None, description="Signal when it was read, dBm.")
    clock: ClockState = Field(description="The agent's clock estimate when it read the SMS.")
    software_version: str = Field(description="Agent software version.")


class CommandRequest(Payload):
    """``agents/{agent}/request/{cmd}``: ``transaction`` is echoed in the response."""

    transaction: str = Field(min_length=1, max_length=128, description="Echoed in the response.")
    data: dict[str, Any] = Field(default_factory=dict, description="Arguments of the command.")


class CommandResponse(Payload):
    """``agents/{agent}/response/{cmd}``: the fixed envelope."""

    transaction: str | None = Field(description="The request's, when it could be read.")
    status: Literal["ok", "error"] = Field(description="ok or error.")
    data: dict[str, Any] | None = Field(None, description="The result when ok.")
    error: str | None = Field(None, description="What went wrong when error.")


class TimeRequestData(Payload):
    """``data`` of the ``time`` command: the controller's send time, and optionally the offset it
    computed from the previous exchange, which the agent then reports as its estimate."""

    t1: AwareDatetime = Field(description="Controller clock when it sent the request.")
    offset_ms: float | None = Field(None, description="Offset the controller measured last time, ms.")
    error_ms: float | None = Field(None, description="Its error bound, ms.")


class TimeResponseData(Payload):
    """``data`` of the ``time`` response: NTP's t1 echoed, t2 received, t3 sent (agent clock)."""

    t1: AwareDatetime = Field(description="The request's t1, echoed.")
    t2: AwareDatetime = Field(description="Agent clock when the request arrived.")
    t3: AwareDatetime = Field(description="Agent clock when the response left.")


class ControllerStatus(Payload):
    """``controller/status``, retained: agents republish their state when it comes online."""

    state: Literal["online", "lost", "offline"] = Field(description="Availability of the controller.")
    session: str = Field(description="Id of the controller process.")
    at: AwareDatetime | None = Field(None, description="When published; none for a will.")


#: An MCC-MNC: 3-digit country code and 2- or 3-digit network code, as the networks table keys them.
MCC_MNC_PATTERN = r"^[0-9]{5,6}$"
MccMnc = Annotated[str, Field(pattern=MCC_MNC_PATTERN)]


class RouteChoice(Payload):
    """One route's place in one network's routing: its share of traffic and why."""

    route: str = Field(min_length=1, max_length=64, description="Route name, as the routes table has it.")
    weight: float = Field(
        ge=0.0, le=1.0, description="Share of this network's traffic to send on the route (weights sum to 1)."
    )
    score: float | None = Field(
        None, ge=0.0, le=1.0, description="Composite score (1 best); none while the route is unknown."
    )
    role: Literal["primary", "backup", "exploration", "excluded"] = Field(
        description="primary: carries the traffic; backup: failover order; exploration: a small share "
        "so it keeps being measured; excluded: no traffic (disabled, or too bad)."
    )
    reason: str = Field(max_length=500, description="Why the route sits here, in words.")


class RoutingTable(Payload):
    """``controller/routing-table``, retained: per destination network, routes best first."""

    version: int = Field(ge=1, description="Increases by one with every change of the table.")
    created_at: AwareDatetime = Field(description="When this version was built.")
    exploration_share: float = Field(
        ge=0.0, le=1.0, description="Share of each network's traffic kept for routes being explored."
    )
    networks: dict[MccMnc, list[RouteChoice]] = Field(
        default_factory=dict, description="Per MCC-MNC, the routes best first (failover order)."
    )


PAYLOADS: dict[str, type[Payload]] = {
    "status": AgentStatus,
    "modem_state": ModemState,
    "health": Health,
    "sms": Observation,
    "request": CommandRequest,
    "response": CommandResponse,
    "controller_status": ControllerStatus,
    "routing_table": RoutingTable,
}


@dataclass(frozen=True)
class Topic:
    """A parsed topic: its kind (a key of ``PAYLOADS``) and the ids in it."""

    kind: str
    agent: str | None = None
    modem: str | None = None
    command: str | None = None

    @property
    def model(self) -> type[Payload]:
        """The payload model of this topic."""
        return PAYLOADS[self.kind]


class Topics:
    """Builds and parses every topic under one prefix (default ``pf/v1``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix or prefix.startswith("/") or prefix.endswith("/") or any(c in prefix for c in "+#"):
            raise ValueError(f"invalid topic prefix {prefix!r}")
        self.prefix = prefix
        p = re.escape(prefix)
        seg = r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
        self._patterns = [
            (re.compile(rf"^{p}/agents/{seg}/status$"), "status"),
            (re.compile(rf"^{p}/agents/{seg}/modems/{seg}/state$"), "modem_state"),
            (re.compile(rf"^{p}/agents/{seg}/health$"), "health"),
            (re.compile(rf"^{p}/agents/{seg}/sms$"), "sms"),
            (re.compile(rf"^{p}/agents/{seg}/request/([a-z-]+)$"), "request"),
            (re.compile(rf"^{p}/agents/{seg}/response/([a-z-]+)$"), "response"),
            (re.compile(rf"^{p}/controller/status$"), "controller_status"),
            (re.compile(rf"^{p}/controller/routing-table$"), "routing_table"),
        ]

    def status(self, agent: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/status"

    def modem_state(self, agent: str, modem: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/modems/{_check(modem)}/state"

    def health(self, agent: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/health"

    def sms(self, agent: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/sms"

    def request(self, agent: str, command: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/request/{command}"

    def response(self, agent: str, command: str) -> str:
        return f"{self.prefix}/agents/{_check(agent)}/response/{command}"

    def controller_status(self) -> str:
        return f"{self.prefix}/controller/status"

    def routing_table(self) -> str:
        return f"{self.prefix}/controller/routing-table"

    def agent_requests(self, agent: str) -> str:
        """Subscription filter of the requests addressed to one agent."""
        return f"{self.prefix}/agents/{_check(agent)}/request/+"

    def parse(self, topic: str) -> Topic | None:
        """The kind and ids of a topic of this tree, or None for anything else."""
        for pattern, kind in self._patterns:
            m = pattern.match(topic)
            if not m:
                continue
            groups = m.groups()
            if kind == "modem_state":
                return Topic(kind, agent=groups[0], modem=groups[1])
            if kind in ("request", "response"):
                return Topic(kind, agent=groups[0], command=groups[1])
            if kind in ("controller_status", "routing_table"):
                return Topic(kind)
            return Topic(kind, agent=groups[0])
        return None


def _check(identifier: str) -> str:
    if not re.match(ID_PATTERN, identifier):
        raise ValueError(f"{identifier!r} cannot be a topic level (letters, digits, _ . - only)")
    return identifier


class InvalidPayload(ValueError):
    """A message that does not match its topic's model; carries the topic for the log."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"invalid payload on {topic}: {reason}")
        self.topic = topic
        self.reason = reason


def decode(topics: Topics, topic: str, payload: bytes) -> tuple[Topic, Payload]:
    """Parse a topic and validate its payload; InvalidPayload names what is wrong."""
    parsed = topics.parse(topic)
    if parsed is None:
        raise InvalidPayload(topic, "not a topic of this contract")
    try:
        return parsed, parsed.model.model_validate_json(payload)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'payload'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidPayload(topic, errors) from None


def utc_iso(when: datetime) -> str:
    """RFC 3339 with microseconds, as payloads carry times."""
    return when.isoformat(timespec="microseconds")
