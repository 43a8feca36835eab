"""Published SMS-DELIVER PDUs (tests/vectors/sms_deliver.json, each with its source named:
3GPP/Wikipedia examples, oFono, Android, ModemManager, node-pdu, python-gsmmodem test vectors,
real network captures), decoded by our codec and, end to end, injected raw into a virtual modem
and read by the real library through the modem port."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hardware.sms_pdu import decode_deliver, encode_smsc
from hardware.virtual_modem import VirtualModem
from probe_agent.modem import ModemPort
from probe_agent.received import ReceivedSms

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "vectors" / "sms_deliver.json").read_text()
)


def test_there_are_enough_vectors_with_sources() -> None:
    assert len(VECTORS) >= 10
    assert all(v["source"] and v["pdu"] for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_decodes_as_published(vector: dict[str, Any]) -> None:
    sms = decode_deliver(vector["pdu"], has_smsc=vector["has_smsc"])
    e = vector["expected"]
    if "smsc" in e:
        assert (sms.smsc.value if sms.smsc else None) == e["smsc"]
    if "sender" in e:
        assert sms.sender.value == e["sender"]
    if "sender_type" in e:
        assert sms.sender.type_name == e["sender_type"]
    if "text" in e:
        assert sms.text == e["text"]
    if "data_hex" in e:
        assert sms.units.hex().upper() == e["data_hex"].upper()
    if "scts" in e:
        assert sms.scts == datetime.fromisoformat(e["scts"])
        assert sms.scts.utcoffset() == datetime.fromisoformat(e["scts"]).utcoffset()
    if "dcs" in e:
        assert sms.coding.dcs == e["dcs"]
    if "pid" in e:
        assert sms.pid == e["pid"]
    if "message_class" in e:
        assert sms.coding.message_class == e["message_class"]
    if "concat" in e:
        got = sms.concat
        expected = e["concat"]
        assert (got is None) == (expected is None)
        if got and expected:
            assert (got.ref, got.total, got.seq, got.ref_bits) == (
                expected["ref"],
                expected["total"],
                expected["seq"],
                expected["ref_bits"],
            )


async def _receive(port: ModemPort, count: int, timeout_s: float = 10.0) -> list[ReceivedSms]:
    out: list[ReceivedSms] = []

    async def collect() -> None:
        async for sms in port.received():
            out.append(sms)
            if len(out) >= count:
                return

    await asyncio.wait_for(collect(), timeout_s)
    for sms in out:
        port.ack(sms)
    return out


async def test_vectors_injected_raw_come_out_of_the_modem_port(
    make_modem: Callable[..., VirtualModem],
) -> None:
    """Every single-part vector goes through the real library on a pty, as a modem would hand it."""
    singles = [v for v in VECTORS if not v["expected"].get("concat") or v["expected"]["concat"]["total"] == 1]
    modem = make_modem("ec25")
    port = ModemPort(modem.port, profile="ec25")
    await port.start()
    try:
        assert await port.wait_connected()
        for vector in singles:
            pdu = vector["pdu"] if vector["has_smsc"] else encode_smsc(None).hex() + vector["pdu"]
            delivery = modem.deliver_pdu(pdu)
            [sms] = await _receive(port, 1)
            e = vector["expected"]
            assert sms.decode_error is None, vector["name"]
            assert sms.pdus == (pdu.upper(),)
            if "sender" in e:
                assert sms.sender == e["sender"], vector["name"]
            if "text" in e:
                assert sms.text == e["text"], vector["name"]
            if "smsc" in e and vector["has_smsc"]:
                assert sms.smsc == e["smsc"], vector["name"]
            if "scts" in e:
                assert sms.scts == datetime.fromisoformat(e["scts"]), vector["name"]
            assert delivery.urc_ns is not None
            assert abs(sms.arrived_at.timestamp() * 1e9 - delivery.urc_ns) < 100e6
        for _ in range(100):  # every message is deleted once taken
            if not modem.stored("ME"):
                break
            await asyncio.sleep(0.02)
        assert modem.stored("ME") == {}
    finally:
        await port.stop()
