"""The simnet SMSC over loopback TCP, driven by a bare ESME built on ``smpp_wire``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import gsm0338  # noqa: F401  (registers the "gsm03.38" codec)
import pytest

from controller.sender import smpp_wire
from controller.sender.receipts import is_receipt, normalise_message_id, parse_receipt
from simnet.smsc import ReceiptFormat, ReceivedSubmit, SmscBehaviour, SmscServer

TIMEOUT_S = 5.0
ROK, RINVBNDSTS, RSYSERR, RINVCMDID = 0x00, 0x04, 0x08, 0x03
RBINDFAIL, RINVPASWD, RINVSYSID, RMSGQFUL, RTHROTTLED = 0x0D, 0x0E, 0x0F, 0x14, 0x58


class Esme:
    """A few lines of ESME: send a request, read until its response; other PDUs queue up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.sequencer = smpp_wire.Sequencer()
        self.inbox: list[Any] = []

    @classmethod
    async def connect(cls, port: int) -> Esme:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def read(self) -> Any:
        return await asyncio.wait_for(smpp_wire.read_pdu(self.reader), TIMEOUT_S)

    async def request(self, command: str, **fields: Any) -> Any:
        pdu = smpp_wire.make(command, self.sequencer, **fields)
        smpp_wire.write_pdu(self.writer, pdu)
        return await self.response_to(pdu.sequence)

    async def response_to(self, sequence: int) -> Any:
        while True:
            pdu = await self.read()
            if pdu.is_response() and pdu.sequence == sequence:
                return pdu
            self.inbox.append(pdu)

    async def bind(self, command: str = "bind_transceiver", **fields: Any) -> Any:
        fields.setdefault("system_id", "probe")
        fields.setdefault("password", "secret")
        return await self.request(command, **fields)

    async def submit(self, text: str = "hello", **fields: Any) -> Any:
        fields.setdefault("source_addr", "PROBE")
        fields.setdefault("destination_addr", "447700900123")
        fields.setdefault("short_message", text.encode("gsm03.38"))
        return await self.request("submit_sm", **fields)

    async def next_request(self, command: str = "deliver_sm", *, ack: bool = True) -> Any:
        """The next request the SMSC sends (queued or read), acknowledged unless ``ack`` is false."""
        while True:
            if self.inbox:
                pdu = self.inbox.pop(0)
            else:
                pdu = await self.read()
            if pdu.command == command:
                break
        if ack and command == "deliver_sm":
            smpp_wire.write_pdu(
                self.writer, smpp_wire.make("deliver_sm_resp", self.sequencer, sequence=pdu.sequence)
            )
        return pdu

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture(autouse=True)
def no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The SMSC's background work, and asyncio's default handler, log no error."""
    yield
    errors = [
        r
        for r in caplog.get_records("call") + caplog.get_records("teardown")
        if r.levelno >= logging.ERROR and r.name.startswith(("simnet", "controller", "asyncio"))
    ]
    assert not errors, "; ".join(r.getMessage() for r in errors)


@pytest.fixture
async def smsc() -> AsyncIterator[SmscServer]:
    async with SmscServer(name="test-smsc") as server:
        yield server


@pytest.fixture
async def esme(smsc: SmscServer) -> AsyncIterator[Esme]:
    client = await Esme.connect(smsc.port)
    yield client
    await client.close()


async def eventually(condition: Any, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- binds


@pytest.mark.parametrize("command", ["bind_transceiver", "bind_transmitter", "bind_receiver"])
async def test_bind_ok(smsc: SmscServer, esme: Esme, command: str) -> None:
    resp = await esme.bind(command)
    assert resp.command == f"{command}_resp"
    assert resp.status == ROK
    assert resp.system_id == b"test-smsc"
    assert smsc.binds == 1
    assert smsc.sessions == 1


@pytest.mark.parametrize(
    ("fields", "status"),
    [({"password": "wrong"}, RINVPASWD), ({"system_id": "nobody"}, RINVSYSID)],
)
async def test_bind_refused_for_wrong_credentials(
    smsc: SmscServer, esme: Esme, fields: Any, status: int
) -> None:
    resp = await esme.bind(**fields)
    assert resp.status == status
    assert resp.length == 16  # no body, as SMPP 3.4 says for an error response
    assert smsc.binds == 0 and smsc.sessions == 0
    # still open: the right credentials bind on the same connection
    assert (await esme.bind()).status == ROK


async def test_refuse_bind_answers_a_bodyless_bindfail(smsc: SmscServer, esme: Esme) -> None:
    smsc.behaviour.refuse_bind = True
    resp = await esme.bind()
    assert (resp.status, resp.length) == (RBINDFAIL, 16)
    smsc.behaviour.refuse_bind = False
    assert (await esme.bind()).status == ROK


async def test_submit_before_bind_and_on_a_receiver(smsc: SmscServer, esme: Esme) -> None:
    assert (await esme.submit()).status == RINVBNDSTS
    await esme.bind("bind_receiver")
    assert (await esme.submit()).status == RINVBNDSTS
    assert smsc.submits == []


async def test_enquire_link_and_unbind(smsc: SmscServer, esme: Esme) -> None:
    assert (await esme.request("enquire_link")).command == "enquire_link_resp"  # before bind too
    await esme.bind()
    assert (await esme.request("enquire_link")).status == ROK
    assert (await esme.request("unbind")).command == "unbind_resp"
    with pytest.raises(asyncio.IncompleteReadError):
        await esme.read()
    await eventually(lambda: smsc.sessions == 0)


# --------------------------------------------------------------------------- submits


async def test_submit_gsm7_with_extension_characters(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    text = "Price: €5 [ok] {x} ^~|\\ @£$"
    resp = await esme.submit(text, source_addr_ton=5, source_addr_npi=0, registered_delivery=0)
    assert resp.status == ROK
    [submit] = smsc.submits
    assert resp.message_id.decode() == submit.message_id
    assert submit.text == text
    assert submit.system_id == "probe"
    assert (submit.source_addr, submit.source_addr_ton, submit.destination_addr) == (
        "PROBE",
        5,
        "447700900123",
    )
    assert submit.received_at.tzinfo is not None
    assert submit.udh is None and submit.concat is None


async def test_submit_ucs2_with_emoji(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    text = "Привет 👋🏽 test"
    await esme.submit(short_message=text.encode("utf-16-be"), data_coding=8)
    assert smsc.submits[0].text == text
    assert smsc.submits[0].data_coding == 8


async def test_message_payload_and_latin1(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    long_text = "x" * 300
    await esme.submit(short_message=None, message_payload=long_text.encode("gsm03.38"))
    await esme.submit(short_message="café".encode("latin-1"), data_coding=3)
    assert smsc.submits[0].text == long_text
    assert smsc.submits[0].message_payload is not None
    assert smsc.submits[1].text == "café"


async def test_two_part_udh_messages_8_and_16_bit_references(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    parts = [
        b"\x05\x00\x03\x2a\x02\x01" + "first half ".encode("gsm03.38"),
        b"\x05\x00\x03\x2a\x02\x02" + "second €".encode("gsm03.38"),
    ]
    for part in parts:
        assert (await esme.submit(short_message=part, esm_class=0x40)).status == ROK
    await esme.submit(
        short_message=b"\x06\x08\x04\x12\x34\x02\x02" + "end".encode("utf-16-be"),
        esm_class=0x40,
        data_coding=8,
    )
    first, second, wide = smsc.submits
    assert first.concat == (0x2A, 2, 1) and first.udh == parts[0][:6] and first.text == "first half "
    assert second.concat == (0x2A, 2, 2) and second.text == "second €"
    assert (
        wide.concat == (0x1234, 2, 2) and wide.udh == b"\x06\x08\x04\x12\x34\x02\x02" and wide.text == "end"
    )


async def test_message_ids_are_unique_hex(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    ids = [(await esme.submit()).message_id.decode() for _ in range(5)]
    assert len(set(ids)) == 5
    for message_id in ids:
        int(message_id, 16)
        assert not message_id.isdigit()


async def test_on_submit_hook_runs_sync_and_async() -> None:
    seen: list[str] = []

    async def hook(submit: ReceivedSubmit) -> None:
        await asyncio.sleep(0)
        seen.append(submit.text)

    async with SmscServer(on_submit=hook) as server:
        client = await Esme.connect(server.port)
        await client.bind()
        for text in ("one", "two", "three"):
            await client.submit(text)
        await eventually(lambda: len(seen) == 3)
        assert seen == ["one", "two", "three"]
        server.on_submit = lambda submit: seen.append("sync " + submit.text)
        await client.submit("four")
        await eventually(lambda: seen[-1] == "sync four")
        await client.close()


# --------------------------------------------------------------------------- behaviour


async def test_throttle_every_third(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.throttle_every = 3
    statuses = [(await esme.submit()).status for _ in range(6)]
    assert statuses == [ROK, ROK, RTHROTTLED, ROK, ROK, RTHROTTLED]
    assert len(smsc.submits) == 4
    smsc.behaviour.throttle_every = 1
    throttled = await esme.submit()
    assert (throttled.status, throttled.length) == (RTHROTTLED, 16)  # no body, so no message id


async def test_queue_full_and_system_error(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.queue_full_every = 2
    assert [(await esme.submit()).status for _ in range(2)] == [ROK, RMSGQFUL]
    smsc.behaviour.queue_full_every = None
    smsc.behaviour.error_every = 1
    resp = await esme.submit()
    assert (resp.status, resp.length) == (RSYSERR, 16)


async def test_behaviour_given_at_construction() -> None:
    async with SmscServer(
        system_id="route-a", password="pw", behaviour=SmscBehaviour(error_every=2)
    ) as server:
        client = await Esme.connect(server.port)
        assert (await client.bind(system_id="route-a", password="pw")).status == ROK
        assert [(await client.submit()).status for _ in range(4)] == [ROK, RSYSERR] * 2
        await client.close()


async def test_max_submits_per_s(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.max_submits_per_s = 3
    statuses = [(await esme.submit()).status for _ in range(6)]
    assert statuses[:3] == [ROK] * 3
    assert RTHROTTLED in statuses[3:]
    smsc.behaviour.max_submits_per_s = None
    assert (await esme.submit()).status == ROK


async def test_drop_after_submits_closes_once(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.drop_after_submits = 2
    assert (await esme.submit("one")).status == ROK
    with pytest.raises(asyncio.IncompleteReadError):
        await esme.submit("two")  # no response: the connection closes
    assert smsc.behaviour.drop_after_submits is None
    assert [s.text for s in smsc.submits] == ["one"]
    await eventually(lambda: smsc.sessions == 0)
    again = await Esme.connect(smsc.port)
    await again.bind()
    assert [(await again.submit()).status for _ in range(3)] == [ROK] * 3
    await again.close()


async def test_accepted_but_unanswered_submit_still_gets_its_receipt(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.response_delay_ms = 5_000
    pdu = smpp_wire.make(
        "submit_sm",
        esme.sequencer,
        source_addr="A",
        destination_addr="1",
        short_message=b"a",
        registered_delivery=1,
    )
    smpp_wire.write_pdu(esme.writer, pdu)
    await eventually(lambda: len(smsc.submits) == 1)
    await esme.close()  # the link goes before the response: the SMSC took the message all the same
    await eventually(lambda: smsc.sessions == 0)
    again = await Esme.connect(smsc.port)
    await again.bind()
    receipt = parse_receipt(await again.next_request())
    assert receipt.message_id == smsc.submits[0].message_id
    await again.close()


async def test_response_delay(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    smsc.behaviour.response_delay_ms = 300
    started = time.monotonic()
    # two submits in flight at once: both answered after ~one delay, not two
    first = smpp_wire.make(
        "submit_sm", esme.sequencer, source_addr="A", destination_addr="1", short_message=b"a"
    )
    second = smpp_wire.make(
        "submit_sm", esme.sequencer, source_addr="A", destination_addr="1", short_message=b"b"
    )
    smpp_wire.write_pdu(esme.writer, first)
    smpp_wire.write_pdu(esme.writer, second)
    await esme.response_to(first.sequence)
    await esme.response_to(second.sequence)
    elapsed_s = time.monotonic() - started
    assert 0.29 <= elapsed_s < 0.55  # answered one after the other would take 0.6 s


async def test_unreadable_pdu_gets_generic_nack_and_the_session_stays(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    raw = bytearray(smpp_wire.encode(smpp_wire.make("enquire_link", esme.sequencer, sequence=77)))
    raw[4:8] = struct.pack(">L", 0x00000999)  # a command id SMPP does not have
    esme.writer.write(bytes(raw))
    nack = await esme.response_to(77)
    assert (nack.command, nack.status) == ("generic_nack", RINVCMDID)
    assert (await esme.request("enquire_link")).status == ROK
    assert (await esme.submit()).status == ROK


async def test_impossible_length_closes_the_session(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    esme.writer.write(struct.pack(">LLLL", 8, 0x15, 0, 1))
    with pytest.raises(asyncio.IncompleteReadError):
        await esme.read()


# --------------------------------------------------------------------------- receipts


FORMATS = [
    ReceiptFormat(),
    ReceiptFormat(date_digits=12, id_in_text="decimal", tlvs=False, err_style="hex"),
    ReceiptFormat(date_digits=10, id_in_text="hex", tlvs=False),
    ReceiptFormat(date_digits=12, id_in_text="decimal", tlvs=True, err_style="hex"),
]


@pytest.mark.parametrize(
    "fmt", FORMATS, ids=lambda f: f"{f.date_digits}-{f.id_in_text}-{f.tlvs}-{f.err_style}"
)
async def test_receipts_in_each_format_parse_back(smsc: SmscServer, esme: Esme, fmt: ReceiptFormat) -> None:
    smsc.behaviour.receipt_format = fmt
    await esme.bind()
    resp = await esme.submit("Hello receipts, a long text", registered_delivery=1)
    message_id = resp.message_id.decode()
    pdu = await esme.next_request()
    assert is_receipt(pdu)
    assert pdu.esm_class == 0x04
    receipt = parse_receipt(pdu)
    assert normalise_message_id(message_id) in (receipt.message_id, *receipt.message_id_alternatives)
    assert receipt.source == ("tlv" if fmt.tlvs else "text")
    assert receipt.stat == "DELIVRD"
    assert receipt.text == "Hello receipts, a lo"
    assert receipt.submit_date is not None and receipt.done_date is not None
    text = pdu.short_message.decode()
    dates = re.findall(r"(?:submit|done) date:(\d+)", text)
    assert [len(d) for d in dates] == [fmt.date_digits] * 2
    received_at = smsc.submits[0].received_at.replace(microsecond=0)
    if fmt.date_digits == 10:
        received_at = received_at.replace(second=0)
    assert receipt.submit_date == received_at
    assert pdu.source_addr == b"447700900123" and pdu.destination_addr == b"PROBE"
    if fmt.id_in_text == "decimal":
        assert f"id:{int(message_id, 16)} " in text
    await eventually(lambda: smsc.pending_receipts == 0)


async def test_receipt_status_and_error(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    resp = await esme.submit(registered_delivery=0)
    assert await smsc.send_receipt(
        resp.message_id.decode(), stat="UNDELIV", err="177", fmt=ReceiptFormat(err_style="hex")
    )
    receipt = parse_receipt(await esme.next_request())
    assert (receipt.stat, receipt.err, receipt.message_state) == ("UNDELIV", "0B1", 5)


async def test_no_receipt_unless_asked(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    await esme.submit(registered_delivery=0)
    smsc.behaviour.receipts = False
    await esme.submit(registered_delivery=1)
    smsc.behaviour.receipts = True
    smsc.behaviour.receipt_status = "UNDELIV"
    await esme.submit(registered_delivery=2)  # receipt on failure only
    receipt = parse_receipt(await esme.next_request())
    assert receipt.message_id == smsc.submits[2].message_id
    assert receipt.stat == "UNDELIV"
    assert esme.inbox == []


async def test_receipt_delay(smsc: SmscServer, esme: Esme) -> None:
    smsc.behaviour.receipt_delay_ms = 200
    await esme.bind()
    started = time.monotonic()
    await esme.submit(registered_delivery=1)
    await esme.next_request()
    assert time.monotonic() - started >= 0.19


async def test_unacknowledged_receipt_is_resent_after_rebind(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind()
    resp = await esme.submit(registered_delivery=1)
    first = await esme.next_request(ack=False)
    await esme.close()
    await eventually(lambda: smsc.sessions == 0)

    again = await Esme.connect(smsc.port)
    await again.bind()
    resent = await again.next_request()  # acknowledged this time
    assert parse_receipt(resent).message_id == parse_receipt(first).message_id == resp.message_id.decode()
    await eventually(lambda: smsc.pending_receipts == 0)
    await again.close()

    third = await Esme.connect(smsc.port)
    await third.bind()
    assert (await third.request("enquire_link")).status == ROK
    await asyncio.sleep(0.05)
    assert third.inbox == []
    await third.close()


async def test_receipt_ack_timeout_resends_on_the_next_bind(smsc: SmscServer, esme: Esme) -> None:
    smsc.behaviour.receipt_ack_timeout_ms = 50
    await esme.bind()
    await esme.submit(registered_delivery=1)
    await esme.next_request(ack=False)
    await asyncio.sleep(0.1)  # the ack is late: the session stays, the receipt waits for a bind
    other = await Esme.connect(smsc.port)
    await other.bind("bind_receiver")
    resent = await other.next_request()
    assert parse_receipt(resent).message_id == smsc.submits[0].message_id
    await other.close()


async def test_receipt_waits_for_a_receiver(smsc: SmscServer, esme: Esme) -> None:
    await esme.bind("bind_transmitter")
    resp = await esme.submit(registered_delivery=1)
    await eventually(lambda: smsc.pending_receipts == 1)
    assert not await smsc.send_receipt(resp.message_id.decode())
    receiver = await Esme.connect(smsc.port)
    await receiver.bind("bind_receiver")
    receipt = parse_receipt(await receiver.next_request())
    assert receipt.message_id == resp.message_id.decode()
    await receiver.close()


async def test_mobile_originated_deliver(smsc: SmscServer, esme: Esme) -> None:
    assert not await smsc.deliver("447700900123", "PROBE", "no one bound")
    await esme.bind()
    assert await smsc.deliver("447700900123", "PROBE", "Reply €")
    assert await smsc.deliver("447700900123", "PROBE", "Ответ 👍")
    gsm = await esme.next_request()
    ucs2 = await esme.next_request()
    assert not is_receipt(gsm)
    assert (gsm.short_message.decode("gsm03.38"), gsm.data_coding) == ("Reply €", 0)
    assert (ucs2.short_message.decode("utf-16-be"), ucs2.data_coding) == ("Ответ 👍", 8)


async def test_stop_unbinds_sessions() -> None:
    server = SmscServer()
    await server.start()
    client = await Esme.connect(server.port)
    await client.bind()

    async def answer_unbind() -> None:
        unbind = await client.next_request("unbind")
        smpp_wire.write_pdu(
            client.writer, smpp_wire.make("unbind_resp", client.sequencer, sequence=unbind.sequence)
        )

    answering = asyncio.create_task(answer_unbind())
    await server.stop()
    await answering
    assert server.sessions == 0
    with pytest.raises(asyncio.IncompleteReadError):
        await client.read()
    await client.close()
