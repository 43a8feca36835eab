"""The fleet: agents and their probes (read-only: ingest keeps them from MQTT) and the networks
they test (edited by operators: country, operator name, the SMSCs a genuine route delivers
through)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from controller.api.errors import conflict, not_found
from controller.api.inputs import Text, path_text
from controller.api.ops import Call, In, Operation, Out, string_param
from controller.api.paging import Order, Page, PageQuery, where_given
from controller.storage import schema as s
from probe_agent.protocol import ID_PATTERN, MCC_MNC_PATTERN, MccMnc

#: Probe events shown with a probe, newest first.
RECENT_EVENTS = 50
IMSI_PATTERN = r"^[0-9]{1,16}$"
COUNTRY_PATTERN = r"^[A-Z]{2}$"
SMSC_PATTERN = r"^\+?[0-9]{3,20}$"

Smsc = Annotated[str, Field(pattern=SMSC_PATTERN)]


class AgentOut(Out):
    """A probe agent (a Pi), as its status, health and clock measurements left it."""

    id: str = Field(description="Agent id.")
    state: str = Field(description="online, offline (stopped cleanly) or lost (its last will).")
    session: str | None = Field(description="Id of the agent process that set the state.")
    version: str | None = Field(description="Agent software version.")
    started_at: datetime | None = Field(description="When that process started.")
    status_at: datetime = Field(description="When the state was last set.")
    last_seen_at: datetime = Field(description="When anything was last heard from the agent.")
    dropped: int = Field(description="Observations the agent reports it dropped.")
    invalid_payloads: int = Field(description="Payloads from the agent that failed validation.")
    health: dict[str, Any] | None = Field(description="The last health payload.")
    clock_offset_ms: float | None = Field(description="Agent clock minus controller clock, ms.")
    clock_error_ms: float | None = Field(description="Error bound of that offset, ms.")
    clock_measured_at: datetime | None = Field(description="When the offset was measured.")


class ProbeOut(Out):
    """A probe: one SIM, in whichever modem and agent last reported it."""

    imsi: str = Field(description="IMSI of the SIM (the probe's key).")
    iccid: str | None = Field(description="ICCID of the SIM.")
    msisdn: str | None = Field(description="The SIM's number.")
    mcc_mnc: str | None = Field(description="Network of the SIM.")
    agent_id: str | None = Field(description="Agent holding the SIM.")
    modem_id: str | None = Field(description="Modem holding the SIM.")
    connected: bool = Field(description="Whether the modem is up and the agent online.")
    registration: str | None = Field(description="Network registration state.")
    signal_dbm: int | None = Field(description="Signal strength, dBm.")
    state: dict[str, Any] | None = Field(description="The last modem state payload.")
    updated_at: datetime = Field(description="When the probe was last updated.")


class ProbeEventOut(Out):
    """Something that happened to a probe: its SIM moved, its modem's SIM changed."""

    id: int = Field(description="Event id.")
    at: datetime = Field(description="When it was noticed.")
    kind: str = Field(description="sim_moved, sim_changed, ...")
    imsi: str | None = Field(description="The SIM.")
    agent_id: str | None = Field(description="The agent it happened on.")
    modem_id: str | None = Field(description="The modem it happened on.")
    detail: dict[str, Any] | list[Any] | None = Field(description="What changed.")


class AgentDetail(AgentOut):
    """An agent with its probes."""

    probes: list[ProbeOut] = Field(description="Probes last seen on this agent.")


class ProbeDetail(ProbeOut):
    """A probe with its recent events."""

    events: list[ProbeEventOut] = Field(description=f"Up to {RECENT_EVENTS} events, newest first.")


class NetworkOut(Out):
    """A destination network."""

    mcc_mnc: str = Field(description="MCC-MNC of the network.")
    country: str | None = Field(description="ISO 3166 alpha-2 country code.")
    operator: str | None = Field(description="Operator name.")
    smsc_addresses: list[str] = Field(description="The operator's known SMSC addresses.")


class NetworkIn(In):
    """A new network."""

    mcc_mnc: MccMnc = Field(description="MCC-MNC: 3-digit country code and 2- or 3-digit network code.")
    country: str | None = Field(None, pattern=COUNTRY_PATTERN, description="ISO 3166 alpha-2, e.g. GB.")
    operator: Text | None = Field(None, max_length=128, description="Operator name.")
    smsc_addresses: list[Smsc] = Field(
        default_factory=list,
        max_length=64,
        description="Known SMSC addresses (digits, optional +); an SMS through another is a grey-route sign.",
    )


class NetworkUpdate(In):
    """Changes to a network: only the fields given are changed."""

    country: str | None = Field(None, pattern=COUNTRY_PATTERN, description="ISO 3166 alpha-2; null clears.")
    operator: Text | None = Field(None, max_length=128, description="Operator name; null clears.")
    smsc_addresses: list[Smsc] | None = Field(
        None, max_length=64, description="Known SMSC addresses, replacing the old list; null clears."
    )


class AgentsQuery(PageQuery):
    """Filters of the agent list."""

    state: Literal["online", "offline", "lost"] | None = Field(None, description="Only agents in this state.")


class ProbesQuery(PageQuery):
    """Filters of the probe list."""

    agent: str | None = Field(None, pattern=ID_PATTERN, description="Only probes on this agent.")
    mcc_mnc: MccMnc | None = Field(None, description="Only SIMs of this network.")
    connected: bool | None = Field(None, description="Only connected (true) or disconnected (false) probes.")


class AgentPage(Page[AgentOut]):
    """A page of agents."""


class ProbePage(Page[ProbeOut]):
    """A page of probes."""


class NetworkPage(Page[NetworkOut]):
    """A page of networks."""


async def list_agents(call: Call) -> AgentPage:
    """Agents, by id."""
    query = call.query(AgentsQuery)
    statement = where_given(select(s.agents), (s.agents.c.state, query.state))
    return await call.list_page(AgentPage, statement, Order((s.agents.c.id,)), query, AgentOut.from_row)


async def get_agent(call: Call) -> AgentDetail:
    """One agent and the probes last seen on it."""
    agent_id = path_text(call.request, "agent_id", "agent", ID_PATTERN)
    async with call.engine.connect() as conn:
        row = (await conn.execute(select(s.agents).where(s.agents.c.id == agent_id))).first()
        if row is None:
            raise not_found(f"no agent {agent_id!r}", "agent_id")
        probes = await conn.execute(
            select(s.probes).where(s.probes.c.agent_id == agent_id).order_by(s.probes.c.imsi)
        )
        return AgentDetail.from_row(row, probes=[ProbeOut.from_row(p) for p in probes])


async def list_probes(call: Call) -> ProbePage:
    """Probes, by IMSI."""
    query = call.query(ProbesQuery)
    p = s.probes.c
    statement = where_given(
        select(s.probes),
        (p.agent_id, query.agent),
        (p.mcc_mnc, query.mcc_mnc),
        (p.connected, query.connected),
    )
    return await call.list_page(ProbePage, statement, Order((p.imsi,)), query, ProbeOut.from_row)


async def get_probe(call: Call) -> ProbeDetail:
    """One probe and its recent events."""
    imsi = path_text(call.request, "imsi", "probe", IMSI_PATTERN)
    async with call.engine.connect() as conn:
        row = (await conn.execute(select(s.probes).where(s.probes.c.imsi == imsi))).first()
        if row is None:
            raise not_found(f"no probe {imsi!r}", "imsi")
        events = await conn.execute(
            select(s.probe_events)
            .where(s.probe_events.c.imsi == imsi)
            .order_by(s.probe_events.c.at.desc(), s.probe_events.c.id.desc())
            .limit(RECENT_EVENTS)
        )
        return ProbeDetail.from_row(row, events=[ProbeEventOut.from_row(e) for e in events])


async def list_networks(call: Call) -> NetworkPage:
    """Networks, by MCC-MNC."""
    query = call.query(PageQuery)
    order = Order((s.networks.c.mcc_mnc,))
    return await call.list_page(NetworkPage, select(s.networks), order, query, NetworkOut.from_row)


def _mcc_mnc(call: Call) -> str:
    return path_text(call.request, "mcc_mnc", "network", MCC_MNC_PATTERN)


async def get_network(call: Call) -> NetworkOut:
    """One network."""
    mcc_mnc = _mcc_mnc(call)
    async with call.engine.connect() as conn:
        row = (await conn.execute(select(s.networks).where(s.networks.c.mcc_mnc == mcc_mnc))).first()
    if row is None:
        raise not_found(f"no network {mcc_mnc}", "mcc_mnc")
    return NetworkOut.from_row(row)


async def create_network(call: Call) -> NetworkOut:
    """Add a network; its MCC-MNC must be new."""
    body = call.body(NetworkIn)
    values = body.model_dump()
    try:
        async with call.engine.begin() as conn:
            if await conn.scalar(select(s.networks.c.mcc_mnc).where(s.networks.c.mcc_mnc == body.mcc_mnc)):
                raise conflict(f"network {body.mcc_mnc} exists: change it with PATCH", "mcc_mnc")
            await conn.execute(insert(s.networks).values(values))
    except IntegrityError:  # created by another request meanwhile
        raise conflict(f"network {body.mcc_mnc} exists: change it with PATCH", "mcc_mnc") from None
    return NetworkOut.model_validate(values)


async def update_network(call: Call) -> NetworkOut:
    """Change the fields given of a network."""
    mcc_mnc = _mcc_mnc(call)
    changes = call.body(NetworkUpdate).model_dump(exclude_unset=True)
    if "smsc_addresses" in changes and changes["smsc_addresses"] is None:
        changes["smsc_addresses"] = []
    async with call.engine.begin() as conn:
        if changes:
            await conn.execute(update(s.networks).where(s.networks.c.mcc_mnc == mcc_mnc).values(changes))
        row = (await conn.execute(select(s.networks).where(s.networks.c.mcc_mnc == mcc_mnc))).first()
    if row is None:
        raise not_found(f"no network {mcc_mnc}", "mcc_mnc")
    return NetworkOut.from_row(row)


async def delete_network(call: Call) -> None:
    """Remove a network (its results and probes stay; they refer to it by MCC-MNC only)."""
    mcc_mnc = _mcc_mnc(call)
    async with call.engine.begin() as conn:
        deleted = await conn.execute(delete(s.networks).where(s.networks.c.mcc_mnc == mcc_mnc))
    if deleted.rowcount == 0:
        raise not_found(f"no network {mcc_mnc}", "mcc_mnc")


_AGENT = {"agent_id": string_param("Agent id.", ID_PATTERN)}
_PROBE = {"imsi": string_param("IMSI of the probe's SIM.", IMSI_PATTERN)}
_NETWORK = {"mcc_mnc": string_param("MCC-MNC of the network.", MCC_MNC_PATTERN)}

OPERATIONS = (
    Operation("GET", "/agents", list_agents, "List agents", "fleet", AgentPage, query=AgentsQuery),
    Operation(
        "GET",
        "/agents/{agent_id}",
        get_agent,
        "Get an agent with its probes",
        "fleet",
        AgentDetail,
        errors=(404,),
        path_params=_AGENT,
    ),
    Operation("GET", "/probes", list_probes, "List probes", "fleet", ProbePage, query=ProbesQuery),
    Operation(
        "GET",
        "/probes/{imsi}",
        get_probe,
        "Get a probe with its recent events",
        "fleet",
        ProbeDetail,
        errors=(404,),
        path_params=_PROBE,
    ),
    Operation("GET", "/networks", list_networks, "List networks", "networks", NetworkPage, query=PageQuery),
    Operation(
        "POST",
        "/networks",
        create_network,
        "Add a network",
        "networks",
        NetworkOut,
        status=201,
        body=NetworkIn,
        role="operator",
        errors=(409,),
    ),
    Operation(
        "GET",
        "/networks/{mcc_mnc}",
        get_network,
        "Get a network",
        "networks",
        NetworkOut,
        errors=(404,),
        path_params=_NETWORK,
    ),
    Operation(
        "PATCH",
        "/networks/{mcc_mnc}",
        update_network,
        "Change a network",
        "networks",
        NetworkOut,
        body=NetworkUpdate,
        role="operator",
        errors=(404,),
        path_params=_NETWORK,
    ),
    Operation(
        "DELETE",
        "/networks/{mcc_mnc}",
        delete_network,
        "Remove a network",
        "networks",
        status=204,
        role="operator",
        errors=(404,),
        path_params=_NETWORK,
    ),
)
