"""simnet: scenario files and their errors, and the running network end to end: the project's
SMPP connector submits to the network's real SMSC ports, messages land in virtual modems (read
through python-gsmmodem-new in one test, from the modem's storage in the others), receipts come
back, and every message's ground truth is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from controller.sender import smpp_wire
from controller.sender.receipts import DeliveryReceipt, parse_receipt
from controller.sender.smpp import SmppConnector, SmppSettings, SmppSubmitted
from controller.submit import SubmitError
from hardware.sms_pdu import SmsDeliver, decode_deliver
from hardware.virtual_modem import Delivery, VirtualModem
from probe_agent.modem import ModemPort
from simnet.__main__ import main as simnet_main
from simnet.network import SimNetwork, TruthRecord
from simnet.scenario import Scenario, ScenarioError
from simnet.smsc import ReceivedSubmit, SmscServer

TIMEOUT_S = 5.0
ROOT = Path(__file__).resolve().parent.parent
FAST_LATENCY = {"median": 30, "sigma": 0.2, "min": 10, "max": 60}

VODAFONE = "+447785100102"
O2 = "+447802100101"
ORANGE = "+33607100105"

BASE: dict[str, Any] = {
    "networks": [
        {
            "mcc_mnc": "23415",
            "country": "GB",
            "operator": "vodafone UK",
            "number_ranges": ["+447785", "+447787"],
            "smsc_addresses": ["+447785016005"],
        },
        {
            "mcc_mnc": "23410",
            "country": "GB",
            "operator": "O2 - UK",
            "number_ranges": ["+447802"],
            "smsc_addresses": ["+447802000332"],
        },
        {
            "mcc_mnc": "20801",
            "country": "FR",
            "operator": "Orange F",
            "number_ranges": ["+33607"],
            "smsc_addresses": ["+33689004000"],
        },
    ],
    "pis": [
        {
            "id": "pi-gb-1",
            "handsets": [
                {
                    "modem": "vodafone",
                    "profile": "ec25",
                    "mcc_mnc": "23415",
                    "msisdn": VODAFONE,
                    "imsi": "234150000000102",
                    "iccid": "8944150000000001023",
                },
                {
                    "modem": "o2",
                    "profile": "sim800l",
                    "mcc_mnc": "23410",
                    "msisdn": O2,
                    "imsi": "234100000000101",
                    "iccid": "8944100000000001016",
                },
            ],
        },
        {
            "id": "pi-fr-1",
            "clock_shift_s": -1.5,
            "handsets": [
                {
                    "modem": "orange",
                    "profile": "e3372",
                    "mcc_mnc": "20801",
                    "msisdn": ORANGE,
                    "imsi": "208010000000105",
                    "iccid": "8933010000000001059",
                }
            ],
        },
    ],
}


def route(name: str, **profile: Any) -> dict[str, Any]:
    """A route with fast latencies and instant receipts, overridden by ``profile``."""
    changes = profile.pop("changes", [])
    values = {"latency_ms": FAST_LATENCY, "receipt_delay_ms": 10, **profile}
    return {"name": name, "system_id": name, "password": "pw", "profile": values, "changes": changes}


def scenario(*routes: dict[str, Any]) -> Scenario:
    data = copy.deepcopy(BASE)
    data["routes"] = list(routes)
    return Scenario.model_validate(data)


def toml_scalar(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_scalar(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_scalar(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for these scenarios: top-level arrays of tables with inline values."""
    lines = []
    for key, items in data.items():
        for item in items:
            lines.append(f"[[{key}]]")
            lines.extend(f"{k} = {toml_scalar(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


async def eventually(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Neither simnet's background work, the connector nor asyncio logs an error."""
    yield
    errors = [
        r
        for r in caplog.get_records("call") + caplog.get_records("teardown")
        if r.levelno >= logging.ERROR and r.name.startswith(("simnet", "controller", "asyncio"))
    ]
    assert not errors, "; ".join(r.getMessage() for r in errors)


class Esme:
    """The project's SMPP connector on one route, collecting the receipts it gets."""

    def __init__(self, name: str, settings: SmppSettings) -> None:
        self.connector = SmppConnector(name, settings, on_receipt=self.on_receipt)
        self.receipts: list[DeliveryReceipt] = []

    async def on_receipt(self, pdu: Any) -> None:
        self.receipts.append(parse_receipt(pdu))

    async def send(self, destination: str, text: str, source: str = "ProbeFleet") -> SmppSubmitted:
        return await asyncio.wait_for(
            self.connector.submit(source=source, destination=destination, text=text), TIMEOUT_S
        )

    def receipt_stats(self, message_ids: tuple[str, ...] | list[str]) -> dict[str, str]:
        return {r.message_id: r.stat for r in self.receipts if r.message_id in message_ids}


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, *routes: dict[str, Any], **kwargs: Any
) -> AsyncIterator[tuple[SimNetwork, dict[str, Esme]]]:
    """A network with these routes, and a bound connector on each."""
    network = SimNetwork(scenario(*routes), tmp_path / "simnet", **kwargs)
    esmes: dict[str, Esme] = {}
    async with network:
        try:
            for endpoint in network.routes:
                settings = SmppSettings(
                    host=endpoint.host,
                    port=endpoint.port,
                    system_id=endpoint.system_id,
                    password=endpoint.password,
                    reconnect_min_s=0.05,
                    reconnect_max_s=0.2,
                    response_timeout_s=2.0,
                    bind_timeout_s=2.0,
                )
                esmes[endpoint.name] = Esme(endpoint.name, settings)
                await esmes[endpoint.name].connector.start()
            await eventually(lambda: all(e.connector.health().bound for e in esmes.values()))
            yield network, esmes
        finally:
            for esme in esmes.values():
                await esme.connector.stop()


def stored(modem: VirtualModem) -> list[SmsDeliver]:
    """The parts the modem holds, decoded, in index order."""
    return [decode_deliver(pdu) for _, pdu in sorted(modem.stored().items())]


def records(network: SimNetwork, route: str) -> list[TruthRecord]:
    return [r for r in network.truth if r.route == route]


# --------------------------------------------------------------------------- scenario files


def test_default_scenario_has_the_five_routes_and_three_countries() -> None:
    default = Scenario.default()
    assert [r.name for r in default.routes] == ["direct", "aggregator", "grey", "fakedlr", "degrading"]
    assert {n.country for n in default.networks} == {"GB", "FR", "DE"}
    assert {"23410", "23415", "23420", "20801", "20810", "26201", "26202", "26203"} <= {
        n.mcc_mnc for n in default.networks
    }
    assert 3 <= len(default.pis) <= 4
    handsets = [h for pi in default.pis for h in pi.handsets]
    assert {h.mcc_mnc for h in handsets} == {n.mcc_mnc for n in default.networks}
    assert {h.profile for h in handsets} == {"sim800l", "ec25", "e3372"}
    routes = {r.name: r for r in default.routes}
    assert routes["direct"].profile.loss == 0 and routes["direct"].profile.smsc == "own"
    assert routes["grey"].profile.smsc != "own" and routes["grey"].profile.sender_rewrite >= 0.5
    assert routes["fakedlr"].profile.fake_receipt == 1.0 and 0.3 <= routes["fakedlr"].profile.loss <= 0.5
    [change] = routes["degrading"].changes
    assert change.at_share == 0.5
    degraded = routes["degrading"].profile.merged(change.profile)
    assert degraded.loss >= 0.5 and degraded.latency_ms.median >= 8000
    assert degraded.receipt_delay_ms == 2000 and degraded.max_submits_per_s == 50  # the rest kept
    for r in default.routes:
        for profile in (r.profile, *(r.profile.merged(c.profile) for c in r.changes)):
            assert profile.latency_ms.max is not None and profile.latency_ms.max <= 15_000


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["routes"][1]["profile"].update(loss=1.5), "routes.1.profile.loss"),
        (lambda d: d["pis"][0]["handsets"][1].update(mcc_mnc="99999"), "pis.0.handsets.1.mcc_mnc"),
        (lambda d: d["pis"][1]["handsets"][0].update(msisdn="+33699000000"), "pis.1.handsets.0.msisdn"),
        (lambda d: d["routes"][1].update(name="direct"), "routes.1.name"),
        (lambda d: d["pis"][1].update(id="pi-gb-1"), "pis.1.id"),
        (lambda d: d["pis"][0]["handsets"][1].update(modem="vodafone"), "pis.0.handsets.1.modem"),
        (lambda d: d["pis"][0]["handsets"][1].update(profile="nokia3310"), "pis.0.handsets.1.profile"),
        (lambda d: d["networks"][2].update(number_ranges=["+447999"]), "networks.2.number_ranges.0"),
        (lambda d: d["routes"][0]["changes"].append({"profile": {"loss": 1}}), "routes.0.changes.0"),
        (lambda d: d["routes"][0]["profile"].update(speed=3), "routes.0.profile.speed"),
    ],
)
def test_scenario_errors_name_the_file_and_the_field(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], field: str
) -> None:
    data = copy.deepcopy(BASE)
    data["routes"] = [route("direct"), route("grey")]
    change(data)
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(data))
    with pytest.raises(ScenarioError) as caught:
        Scenario.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert any(problem.startswith(f"{field}: ") for problem in caught.value.problems), caught.value.problems


def test_a_valid_file_loads_and_the_check_command_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = copy.deepcopy(BASE)
    data["routes"] = [route("direct", changes=[{"after_s": 5, "profile": {"latency_ms": {"median": 90}}}])]
    path = tmp_path / "ok.toml"
    path.write_text(to_toml(data))
    loaded = Scenario.load(path)
    changed = loaded.routes[0].profile.merged(loaded.routes[0].changes[0].profile)
    assert changed.latency_ms.model_dump() == {**FAST_LATENCY, "median": 90}  # nested tables merge
    assert simnet_main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok: 3 networks in 2 countries")
    data["routes"][0]["profile"]["error_rate"] = -0.1
    path.write_text(to_toml(data))
    assert simnet_main(["check", str(path)]) == 2
    assert (
        "routes.0.profile.error_rate: Input should be greater than or equal to 0" in capsys.readouterr().err
    )


# --------------------------------------------------------------------------- the running network


async def test_direct_route_delivers_intact_into_the_right_handset_read_by_gsmmodem(tmp_path: Path) -> None:
    async with running(tmp_path, route("direct", handover_share=0.0)) as (network, esmes):
        modem = network.modem("pi-gb-1", "vodafone")
        deliveries: list[Delivery] = []
        real_deliver = modem.deliver

        def spy(*args: Any, **kwargs: Any) -> Delivery:
            deliveries.append(real_deliver(*args, **kwargs))
            return deliveries[-1]

        modem.deliver = spy  # type: ignore[method-assign]
        port = ModemPort(
            modem.port, profile="ec25", poll_interval_s=0.3, command_timeout_s=1.0, reconnect_initial_s=0.1
        )
        await port.start()
        try:
            assert await port.wait_connected(TIMEOUT_S)
            submitted = await esmes["direct"].send(VODAFONE, "Your code is 482913")
            sms = await asyncio.wait_for(anext(port.received().__aiter__()), TIMEOUT_S)
            port.ack(sms)
        finally:
            await port.stop()
        assert (sms.sender, sms.text, sms.smsc) == ("ProbeFleet", "Your code is 482913", "+447785016005")
        await eventually(lambda: len(records(network, "direct")) == 1)
        [record] = records(network, "direct")
        [delivery] = deliveries
        assert record.fate == "delivered" and record.message_id == submitted.message_ids[0]
        assert (record.pi, record.modem, record.destination) == ("pi-gb-1", "vodafone", VODAFONE)
        assert record.delivered_at is not None and record.delivered_at == delivery.urc_at
        assert abs((sms.arrived_at - record.delivered_at).total_seconds()) < 0.1
        assert (record.sender_sent, record.sender_delivered) == ("ProbeFleet", "ProbeFleet")
        assert record.text_sent == record.text_delivered == "Your code is 482913"
        assert record.smsc_address == "+447785016005" and record.profile_phase == 0
        assert sms.scts == record.scts and record.scts is not None
        assert record.scts <= record.delivered_at and record.scts == record.received_at.replace(microsecond=0)
        assert record.receipt_stat == "DELIVRD" and record.receipt_at is not None
        assert record.receipt_at >= record.delivered_at
        await eventually(lambda: bool(esmes["direct"].receipt_stats(submitted.message_ids)))
        assert esmes["direct"].receipt_stats(submitted.message_ids) == {submitted.message_ids[0]: "DELIVRD"}
        assert network.modem("pi-gb-1", "o2").stored() == {}
    lines = [json.loads(line) for line in (tmp_path / "simnet" / "truth.jsonl").read_text().splitlines()]
    assert lines == [record.to_json()]
    assert datetime.fromisoformat(lines[0]["delivered_at"]).utcoffset() is not None


async def test_grey_route_rewrites_the_sender_and_shows_a_foreign_smsc(tmp_path: Path) -> None:
    grey = route("grey", sender_rewrite=1.0, smsc="+37069900123", content={"strip_unicode": 1.0})
    async with running(tmp_path, grey) as (network, esmes):
        await esmes["grey"].send(ORANGE, "Votre code: 1234 ✓ ça, très bien")
        await esmes["grey"].send(ORANGE, "numeric sender kept", source="+447700900123")
        await eventually(lambda: len(records(network, "grey")) == 2)
        parts = stored(network.modem("pi-fr-1", "orange"))
    first, second = records(network, "grey")
    assert first.sender_sent == "ProbeFleet"
    assert first.sender_delivered is not None and first.sender_delivered.startswith("+33607")
    assert len(first.sender_delivered) == len(ORANGE) and first.sender_delivered != ORANGE
    assert first.text_delivered == "Votre code: 1234 ? ca, très bien"  # è is GSM 7-bit; ç, ✓ are not
    assert first.smsc_address == "+37069900123"
    assert second.sender_delivered == "+447700900123"  # only alphanumeric senders are replaced
    assert [(p.sender.value, p.sender.type_name, p.smsc and p.smsc.value, p.text) for p in parts] == [
        (first.sender_delivered, "international", "+37069900123", first.text_delivered),
        ("+447700900123", "international", "+37069900123", "numeric sender kept"),
    ]


async def test_fake_receipts_for_messages_that_never_arrived(tmp_path: Path) -> None:
    async with running(tmp_path, route("fakedlr", loss=1.0, fake_receipt=1.0)) as (network, esmes):
        sent = [await esmes["fakedlr"].send(O2, f"lost {i}") for i in range(3)]
        ids = [s.message_ids[0] for s in sent]
        await eventually(lambda: len(esmes["fakedlr"].receipt_stats(ids)) == 3)
        await eventually(lambda: len(records(network, "fakedlr")) == 3)
        assert esmes["fakedlr"].receipt_stats(ids) == dict.fromkeys(ids, "DELIVRD")
        assert network.modem("pi-gb-1", "o2").stored() == {}
    for record in records(network, "fakedlr"):
        assert (record.fate, record.fake_receipt, record.receipt_stat) == ("lost", True, "DELIVRD")
        assert record.delivered_at is None and record.text_delivered is None


async def test_a_change_after_s_takes_effect(tmp_path: Path) -> None:
    changing = route("degrading", changes=[{"after_s": 0.6, "profile": {"loss": 1.0}}])
    async with running(tmp_path, changing) as (network, esmes):
        before = await esmes["degrading"].send(VODAFONE, "before")
        await eventually(lambda: len(records(network, "degrading")) == 1)
        await eventually(lambda: network.started_at is not None and _elapsed(network) > 0.7, 3.0)
        after = await esmes["degrading"].send(VODAFONE, "after")
        await eventually(lambda: len(records(network, "degrading")) == 2)
        assert [p.text for p in stored(network.modem("pi-gb-1", "vodafone"))] == ["before"]
        ids = before.message_ids + after.message_ids
        await eventually(lambda: len(esmes["degrading"].receipt_stats(ids)) == 2)
        assert esmes["degrading"].receipt_stats(ids) == {ids[0]: "DELIVRD", ids[1]: "UNDELIV"}
    first, second = records(network, "degrading")
    assert (first.fate, first.profile_phase) == ("delivered", 0)
    assert (second.fate, second.profile_phase, second.fake_receipt) == ("lost", 1, False)


def _elapsed(network: SimNetwork) -> float:
    assert network.started_at is not None
    return (datetime.now(network.started_at.tzinfo) - network.started_at).total_seconds()


async def test_at_share_changes_need_a_duration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    halfway = route("degrading", changes=[{"at_share": 0.01, "profile": {"loss": 1.0}}])
    async with running(tmp_path, halfway) as (network, esmes):
        await asyncio.sleep(0.1)
        await esmes["degrading"].send(VODAFONE, "never degraded")
        await eventually(lambda: len(records(network, "degrading")) == 1)
    assert records(network, "degrading")[0].fate == "delivered"
    assert "1 profile change(s) by at_share never happen" in caplog.text
    async with running(tmp_path, halfway, duration_s=5.0) as (network, esmes):
        await asyncio.sleep(0.1)  # past 1 % of 5 s
        await esmes["degrading"].send(VODAFONE, "degraded")
        await eventually(lambda: len(records(network, "degrading")) == 1)
    assert (records(network, "degrading")[0].fate, records(network, "degrading")[0].profile_phase) == (
        "lost",
        1,
    )


async def test_error_rate_one_refuses_every_submit(tmp_path: Path) -> None:
    async with running(tmp_path, route("broken", error_rate=1.0)) as (network, esmes):
        with pytest.raises(SubmitError, match="ESME_RSYSERR") as caught:
            await esmes["broken"].send(VODAFONE, "refused")
        assert caught.value.retryable
        assert network.server("broken").submits == []
    [record] = records(network, "broken")
    assert (record.fate, record.message_id, record.error) == ("refused", None, "ESME_RSYSERR")
    assert (record.destination, record.text_sent, record.sender_sent) == (VODAFONE, "refused", "ProbeFleet")


async def test_unknown_destination_gets_undeliv(tmp_path: Path) -> None:
    async with running(tmp_path, route("direct")) as (network, esmes):
        submitted = await esmes["direct"].send("+447785999999", "nobody there")
        await eventually(lambda: bool(esmes["direct"].receipt_stats(submitted.message_ids)))
        assert esmes["direct"].receipt_stats(submitted.message_ids) == {submitted.message_ids[0]: "UNDELIV"}
        await eventually(lambda: len(records(network, "direct")) == 1)
    [record] = records(network, "direct")
    assert (record.fate, record.receipt_stat, record.pi, record.delivered_at) == (
        "no_handset",
        "UNDELIV",
        None,
        None,
    )


async def test_a_long_message_is_delivered_once_as_a_whole(tmp_path: Path) -> None:
    text = "".join(f"part of a long message {i:03d}. " for i in range(14))  # ~400 characters: 3 parts
    async with running(tmp_path, route("direct")) as (network, esmes):
        submitted = await esmes["direct"].send(O2, text)
        assert submitted.parts == 3
        await eventually(lambda: len(esmes["direct"].receipt_stats(submitted.message_ids)) == 3)
        parts = stored(network.modem("pi-gb-1", "o2"))
    [record] = records(network, "direct")
    assert (record.fate, record.parts, record.text_sent, record.text_delivered) == (
        "delivered",
        3,
        text,
        text,
    )
    assert record.message_ids == list(submitted.message_ids)
    assert esmes["direct"].receipt_stats(submitted.message_ids) == dict.fromkeys(
        submitted.message_ids, "DELIVRD"
    )
    assert len(parts) > 1 and len({p.concat.ref for p in parts if p.concat}) == 1
    assert "".join(p.text for p in parts) == text


async def test_full_storage_is_recorded_not_a_crash(tmp_path: Path) -> None:
    async with running(tmp_path, route("direct")) as (network, esmes):
        network.modem("pi-fr-1", "orange").fill_storage()
        submitted = await esmes["direct"].send(ORANGE, "no room")
        await eventually(lambda: bool(esmes["direct"].receipt_stats(submitted.message_ids)))
        assert esmes["direct"].receipt_stats(submitted.message_ids) == {submitted.message_ids[0]: "UNDELIV"}
        await esmes["direct"].send(VODAFONE, "still running")
        await eventually(lambda: len(records(network, "direct")) == 2)
    full, fine = records(network, "direct")
    assert (full.fate, full.delivered_at, full.receipt_stat) == ("storage_full", None, "UNDELIV")
    assert full.error is not None and "full" in full.error
    assert fine.fate == "delivered"


async def test_content_changes_and_stop_records_what_is_in_flight(tmp_path: Path) -> None:
    mangling = route("mangler", content={"replace_code": 1.0, "cut_to": 20})
    slow = route("slow", latency_ms={"median": 60_000, "sigma": 0})
    async with running(tmp_path, mangling, slow) as (network, esmes):
        await esmes["mangler"].send(VODAFONE, "Code 123456 for your account, valid 10 min")
        await esmes["slow"].send(VODAFONE, "never due")
        await eventually(lambda: len(records(network, "mangler")) == 1)
    [mangled] = records(network, "mangler")
    assert mangled.text_delivered is not None and len(mangled.text_delivered) == 20
    assert mangled.text_delivered.startswith("Code ") and mangled.text_delivered[5:11].isdigit()
    assert mangled.text_delivered[5:11] != "123456" and mangled.text_delivered[11:] == " for your"
    [stopped] = records(network, "slow")
    assert (stopped.fate, stopped.delivered_at, stopped.latency_ms) == ("stopped", None, 60_000)
    await network.stop()  # again: nothing happens


async def test_same_seed_same_fates(tmp_path: Path) -> None:
    lossy = route("lossy", loss=0.5, latency_ms={"median": 20, "sigma": 0.5, "min": 5, "max": 40})
    runs = []
    for attempt in range(2):
        async with running(tmp_path / str(attempt), lossy, seed=7) as (network, esmes):
            for i in range(12):
                await esmes["lossy"].send(VODAFONE, f"message {i}")
            await eventually(lambda: len(records(network, "lossy")) == 12)
        by_text = sorted(records(network, "lossy"), key=lambda r: r.text_sent)
        runs.append([(r.text_sent, r.fate, round(r.latency_ms or 0, 6)) for r in by_text])
    assert runs[0] == runs[1]
    assert {fate for _, fate, _ in runs[0]} == {"delivered", "lost"}


async def test_describe_lists_routes_handsets_pis_and_networks(tmp_path: Path) -> None:
    async with running(tmp_path, route("direct")) as (network, _):
        described = json.loads(json.dumps(network.describe()))
    [endpoint] = described["routes"]
    assert endpoint == {
        "name": "direct",
        "host": "127.0.0.1",
        "port": network.routes[0].port,
        "system_id": "direct",
        "password": "pw",
    }
    assert endpoint["port"] > 0
    orange = next(h for h in described["handsets"] if h["modem"] == "orange")
    assert orange["port"] == str(tmp_path / "simnet" / "modems" / "pi-fr-1" / "orange")
    assert (orange["pi"], orange["profile"], orange["msisdn"], orange["mcc_mnc"]) == (
        "pi-fr-1",
        "e3372",
        ORANGE,
        "20801",
    )
    assert {"imsi", "iccid", "operator", "country"} <= orange.keys()
    assert described["pis"][1] == {"id": "pi-fr-1", "clock_shift_s": -1.5, "modems": ["orange"]}
    assert [n["mcc_mnc"] for n in described["networks"]] == ["23415", "23410", "20801"]


# --------------------------------------------------------------------------- SmscServer.check_submit


async def test_smsc_check_submit_refuses_with_the_status_it_returns(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[ReceivedSubmit] = []

    def check(submit: ReceivedSubmit) -> int | None:
        seen.append(submit)
        if submit.text == "boom":
            raise RuntimeError("a broken check accepts")
        return 0x45 if submit.text.startswith("refuse") else None  # ESME_RSUBMITFAIL

    async with SmscServer(check_submit=check) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        sequencer = smpp_wire.Sequencer()

        async def request(command: str, **fields: Any) -> Any:
            smpp_wire.write_pdu(writer, smpp_wire.make(command, sequencer, **fields))
            return await asyncio.wait_for(smpp_wire.read_pdu(reader), TIMEOUT_S)

        await request("bind_transceiver", system_id="probe", password="secret")
        answers = [
            await request("submit_sm", source_addr="A", destination_addr="1", short_message=text.encode())
            for text in ("refuse me", "fine", "boom")
        ]
        writer.close()
    assert [a.status for a in answers] == [0x45, 0, 0]
    assert [s.text for s in server.submits] == ["fine", "boom"]
    assert all(s.message_id for s in server.submits) and [s.message_id for s in seen] == ["", "", ""]
    assert "check_submit failed; submit accepted" in caplog.text
    caplog.clear()  # that error was the point


# --------------------------------------------------------------------------- the command line


def test_cli_writes_simnet_json_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["routes"] = [route("direct")]
    path = tmp_path / "scenario.toml"
    path.write_text(to_toml(data))
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "simnet", "run", "--scenario", str(path), "--workdir", str(workdir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 20
        while not (workdir / "simnet.json").exists():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "simnet.json never appeared"
            time.sleep(0.05)
        described = json.loads((workdir / "simnet.json").read_text())
        assert described["routes"][0]["port"] > 0
        assert len(described["handsets"]) == 3
        assert all(Path(h["port"]).is_symlink() for h in described["handsets"])
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "simnet stopped" in stderr
    assert not any(Path(h["port"]).exists() for h in described["handsets"])
