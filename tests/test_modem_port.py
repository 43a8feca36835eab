"""The agent's modem port: the real python-gsmmodem-new on real ptys against the virtual modem
(no mocked serial). Every profile, every encoding, long messages in any order, bursts, messages
stored before start-up, and every fault the virtual modem can play, survived."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Callable

import pytest

from hardware.sms_pdu import encode_deliver
from hardware.virtual_modem import REG_HOME, REG_SEARCHING, SimCard, StorageFullError, VirtualModem
from probe_agent.modem import ModemPort, ModemState
from probe_agent.received import Origin, ReceivedSms

FAST = {"poll_interval_s": 0.3, "command_timeout_s": 1.0, "reconnect_initial_s": 0.1, "reconnect_max_s": 0.5}


async def receive(port: ModemPort, count: int, timeout_s: float = 10.0) -> list[ReceivedSms]:
    """The next ``count`` messages, each acknowledged (so deleted from the SIM), or fail."""
    out: list[ReceivedSms] = []
    iterator = port.received().__aiter__()

    async def collect() -> None:
        while len(out) < count:
            out.append(await anext(iterator))

    await asyncio.wait_for(collect(), timeout_s)
    for sms in out:
        port.ack(sms)
    return out


async def wait_until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``check`` until it holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def wait_state(
    port: ModemPort, check: Callable[[ModemState], bool], timeout_s: float = 10.0
) -> ModemState:
    """Poll ``state()`` until ``check`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = await port.state()
        if check(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"state never matched: {state}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def open_port() -> AsyncIterator[Callable[..., ModemPort]]:
    ports: list[ModemPort] = []

    def factory(modem: VirtualModem, **kwargs: object) -> ModemPort:
        options = {**FAST, **kwargs}
        port = ModemPort(modem.port, **options)  # type: ignore[arg-type]
        ports.append(port)
        return port

    yield factory
    for port in ports:
        await port.stop()


@pytest.mark.parametrize("profile", ["generic", "sim800l", "ec25", "e3372"])
async def test_each_profile_connects_reports_state_and_receives(
    profile: str, make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem(profile, sim=SimCard(msisdn="+447700900555"), noise_interval_s=0.05)
    port = open_port(modem, profile=None if profile == "generic" else profile)
    await port.start()
    assert await port.wait_connected()
    state = await port.state(refresh=True)
    assert state.connected and state.imsi == "234150000000001"
    assert state.iccid == "8944150000000000019" and state.msisdn == "+447700900555"
    assert state.operator == "Vodafone UK" and state.mcc_mnc == "23415"
    assert state.registration == "registered_home" and state.signal_rssi == 20 and state.signal_dbm == -73
    assert state.manufacturer == modem.profile.manufacturer and state.model == modem.profile.model
    assert state.storage_total is not None and state.storage_used == 0
    delivery = modem.deliver("+447700900123", "Your code is 123456")
    [sms] = await receive(port, 1)
    assert (sms.sender, sms.sender_type, sms.text) == (
        "+447700900123",
        "international",
        "Your code is 123456",
    )
    assert sms.smsc == "+447785016005" and sms.origin is Origin.CMTI and not sms.partial
    assert sms.storage == ((delivery.memory, delivery.indices[0]),)
    assert delivery.urc_ns is not None
    assert abs(sms.arrived_at.timestamp() * 1e9 - delivery.urc_ns) < 50e6
    await wait_until(lambda: modem.stored(delivery.memory) == {})


async def test_encodings_classes_and_pids(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.deliver("MyBank", "Kurs €/$ [1.08] {ok} ~^\\| §")
    modem.deliver("+4915112345678", "Grüße 😀👍🏽")
    modem.deliver("+33612345678", "flash", flash=True)
    modem.deliver("+33612345678", "", pid=0x40)
    modem.deliver("+33612345678", "replace me", pid=0x41)
    a, b, c, d, e = await receive(port, 5)
    assert (a.sender, a.sender_type, a.text, a.alphabet) == (
        "MyBank",
        "alphanumeric",
        "Kurs €/$ [1.08] {ok} ~^\\| §",
        "gsm7",
    )
    assert (b.text, b.alphabet) == ("Grüße 😀👍🏽", "ucs2")
    b.text.encode("utf-8") if b.text else None
    assert c.flash and c.message_class == 0
    assert d.silent and d.pid == 0x40 and d.text == ""
    assert e.replace_type == 1


@pytest.mark.parametrize("ref_bits", [8, 16])
@pytest.mark.parametrize("parts", [2, 3, 4, 5])
async def test_long_messages_any_order_with_duplicates(
    parts: int, ref_bits: int, make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("ec25")
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    target_units = (parts - 1) * 66 + 20  # UCS2 units: parts-1 full parts and a short last one
    text = ""
    for ch in itertools.cycle("Grüße 😀 part "):
        if len(text.encode("utf-16-be")) // 2 + len(ch.encode("utf-16-be")) // 2 > target_units:
            break
        text += ch
    pdus = encode_deliver("+447700900123", text, ref=0xBEEF, ref_bits=ref_bits)
    assert len(pdus) == parts
    order = pdus[:]
    random.Random(parts * ref_bits).shuffle(order)
    for pdu in [*order, order[0]]:  # every part, shuffled, and one of them twice
        modem.deliver_pdu(pdu)
    [sms] = await receive(port, 1)
    assert sms.text == text and sms.parts == parts and sms.total_parts == parts and not sms.partial
    assert sms.pdus == tuple(pdus), "parts come back in part order with their raw PDUs"
    assert sms.concat_ref == (0xBEEF if ref_bits == 16 else 0xEF) and sms.concat_ref_bits == ref_bits
    assert sms.arrived_at <= sms.completed_at
    await asyncio.sleep(0.3)
    assert port._out is not None and port._out.empty(), "the duplicate part yields nothing"


async def test_missing_part_gives_a_flagged_partial_message(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem, part_timeout_s=0.5)
    await port.start()
    assert await port.wait_connected()
    pdus = encode_deliver("+1555", "A" * 153 + "B" * 153 + "C" * 10, ref=9)
    modem.deliver_pdu(pdus[0])
    modem.deliver_pdu(pdus[2])
    [sms] = await receive(port, 1, timeout_s=5)
    assert sms.partial and sms.missing_parts == (2,) and sms.parts == 2 and sms.total_parts == 3
    assert sms.text == "A" * 153 + "C" * 10


async def test_partial_messages_are_flushed_on_stop(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem()
    port = ModemPort(modem.port, **FAST)  # type: ignore[arg-type]
    await port.start()
    assert await port.wait_connected()
    modem.deliver_pdu(encode_deliver("+1555", "x" * 300, ref=3)[0])
    await asyncio.sleep(0.3)
    await port.stop()
    rest = [sms async for sms in port.received()]
    assert len(rest) == 1 and rest[0].partial and rest[0].missing_parts == (2,)


async def test_burst_of_fifty_without_loss(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("sim800l")
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    sent = {f"burst {i:02d} {'😀' if i % 5 == 0 else ''}" for i in range(50)}
    for text in sorted(sent):
        modem.deliver("+447700900123", text)
    got = await receive(port, 50, timeout_s=30)
    assert {s.text for s in got} == sent
    assert all(s.origin is Origin.CMTI for s in got), [
        (s.text, s.origin) for s in got if s.origin is not Origin.CMTI
    ]
    await wait_state(port, lambda s: s.storage_used == 0)


async def test_messages_stored_before_start_are_read_and_flagged(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("ec25")
    modem.store_silently("+1555", "arrived while the agent was down")
    modem.store_silently("+1555", "x" * 200, ref=5)  # a two-part one too
    port = open_port(modem)
    await port.start()
    got = await receive(port, 2)
    assert sorted(s.text or "" for s in got) == sorted(["arrived while the agent was down", "x" * 200])
    assert all(s.stored_before_start for s in got)
    await wait_until(lambda: modem.stored() == {})


async def test_message_stays_on_the_sim_until_the_consumer_takes_it(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    """At least once: a consumer killed before it stored a message finds it again on restart."""
    modem = make_modem("ec25")
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    delivery = modem.deliver("+1555", "not yet persisted")
    iterator = port.received().__aiter__()
    first = await asyncio.wait_for(anext(iterator), 5)
    await asyncio.sleep(0.5)  # polls and sweeps happen meanwhile: it is neither deleted nor re-yielded
    assert list(modem.stored(delivery.memory)) == list(delivery.indices)
    assert port._out is not None and port._out.empty()
    await port.stop()  # the consumer "dies" before taking it
    again = open_port(modem)
    await again.start()
    [sms] = await receive(again, 1)
    assert sms.text == first.text == "not yet persisted" and sms.pdus == first.pdus
    assert sms.stored_before_start
    await wait_until(lambda: modem.stored(delivery.memory) == {})


async def test_the_same_pdu_stored_twice_is_passed_on_once_and_both_copies_deleted(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    pdu = encode_deliver("+1555", "delivered twice by the network")[0]
    modem.deliver_pdu(pdu)
    modem.deliver_pdu(pdu)
    [sms] = await receive(port, 1)
    assert sms.text == "delivered twice by the network"
    await wait_until(lambda: modem.stored() == {} and modem.stored("ME") == {})
    await asyncio.sleep(0.3)
    assert port._out is not None and port._out.empty()


async def test_direct_delivery_with_cmt(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem, direct_delivery=True)
    await port.start()
    assert await port.wait_connected()
    delivery = modem.deliver("+1555", "not stored")
    [sms] = await receive(port, 1)
    assert sms.text == "not stored" and sms.origin is Origin.CMT and sms.storage == ()
    assert delivery.indices == () and modem.stored() == {} and modem.stored("ME") == {}


async def test_broken_pdu_is_yielded_with_its_error_not_dropped(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    broken = "0791448720003023040B914477009001F20000FF20921263400001E8"  # month 0xFF in the SCTS
    modem.deliver_pdu(broken)
    modem.deliver("+1555", "after the broken one")
    bad, good = await receive(port, 2)
    assert bad.text is None and bad.decode_error and "SCTS" in bad.decode_error and bad.pdus == (broken,)
    assert good.text == "after the broken one"


# --- faults ------------------------------------------------------------------------------------


async def test_full_storage_is_emptied_and_nothing_is_lost(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("e3372")
    port = open_port(modem, profile="e3372", poll_interval_s=30)
    await port.start()
    assert await port.wait_connected()
    filled = modem.fill_storage()
    with pytest.raises(StorageFullError):
        modem.deliver("+1555", "refused while full")  # raises ^SMMEMFULL: the port empties storage
    old = await receive(port, filled, timeout_s=20)
    assert {s.text for s in old} == {f"old message {i}" for i in range(0, filled)}
    assert all(s.origin is Origin.SWEEP for s in old), [s.origin for s in old]
    await wait_until(lambda: modem.stored() == {} and modem.stored("ME") == {})
    state = await wait_state(port, lambda s: s.storage_used == 0)
    assert any("storage full" in e for e in state.events)
    modem.deliver("+1555", "fits again")
    [sms] = await receive(port, 1)
    assert sms.text == "fits again"


async def test_full_storage_found_by_polling_without_a_urc(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("sim800l")  # the SIM800 says nothing when its storage fills
    port = open_port(modem, profile="sim800l")
    await port.start()
    assert await port.wait_connected()
    filled = modem.fill_storage()
    got = await receive(port, filled, timeout_s=20)
    assert len({s.text for s in got}) == filled
    await wait_state(port, lambda s: s.storage_used == 0)


async def test_registration_lost_and_regained_is_visible(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.set_registration(REG_SEARCHING)
    state = await wait_state(port, lambda s: s.registration == "searching")
    assert state.operator is None and state.mcc_mnc is None
    modem.set_registration(REG_HOME)
    await wait_state(port, lambda s: s.registration == "registered_home" and s.mcc_mnc == "23415")


async def test_hung_modem_is_reinitialised(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.hang()
    state = await wait_state(port, lambda s: not s.connected)
    assert state.last_error and "not answering" in state.last_error
    modem.resume()
    state = await wait_state(port, lambda s: s.connected and s.reconnects >= 1)
    assert any("reconnected" in e for e in state.events)
    modem.deliver("+1555", "after the hang")
    [sms] = await receive(port, 1)
    assert sms.text == "after the hang"


async def test_message_stored_during_a_hang_is_read_after_recovery(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.hang()
    delivery = modem.deliver("+1555", "its URC was never written")
    assert delivery.urc_ns is None
    await wait_state(port, lambda s: not s.connected)
    modem.resume()
    [sms] = await receive(port, 1, timeout_s=15)
    assert sms.text == "its URC was never written" and sms.origin is Origin.SWEEP


async def test_unplugged_port_is_reopened(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("ec25")
    port = open_port(modem, profile="ec25")
    await port.start()
    assert await port.wait_connected()
    modem.unplug()
    state = await wait_state(port, lambda s: not s.connected)
    assert any("port lost" in e or "not answering" in e for e in state.events)
    await asyncio.sleep(1.0)  # it keeps retrying with backoff while the port is gone
    assert "cannot open modem" in ((await port.state()).last_error or "")
    modem.replug()
    await wait_state(port, lambda s: s.connected and s.reconnects >= 1)
    modem.deliver("+1555", "after the replug")
    [sms] = await receive(port, 1)
    assert sms.text == "after the replug"


async def test_garbage_on_the_line_is_survived(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    for i in range(5):
        modem.inject_garbage()
        modem.deliver("+1555", f"through the noise {i}")
        modem.inject_garbage(b"\x00\xff\xfe\r\n\xc3(\r\n")
    got = await receive(port, 5)
    assert [s.text for s in got] == [f"through the noise {i}" for i in range(5)]
    state = await wait_state(port, lambda s: s.line_noise > 0)
    assert state.connected


async def test_read_errors_are_retried_with_the_urc_time_kept(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.fail_reads(3)
    delivery = modem.deliver("+1555", "read on the second try")
    [sms] = await receive(port, 1)
    assert sms.text == "read on the second try" and sms.origin is Origin.CMTI
    assert delivery.urc_ns is not None and abs(sms.arrived_at.timestamp() * 1e9 - delivery.urc_ns) < 50e6
    assert "CMS 500" in ((await port.state()).last_error or "")


async def test_message_stored_right_after_a_sweep_listing_is_read_at_once(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    """The race a sweep has: a message stored after AT+CMGL answered, its +CMTI after that."""
    modem = make_modem()
    modem.store_silently("+1555", "waiting on the SIM")
    listings: list[str] = []
    deliveries = []

    def deliver_after_listing(line: str) -> None:
        if line == "AT+CMGL=4":
            listings.append(line)
            if len(listings) == 2:  # the start-up sweep lists SM, then ME where new ones land
                deliveries.append(modem.deliver("+1555", "stored just after the listing"))

    modem.on_answered = deliver_after_listing
    port = open_port(modem, poll_interval_s=30)
    await port.start()
    got = await receive(port, 2, timeout_s=5)
    assert {s.text for s in got} == {"waiting on the SIM", "stored just after the listing"}
    [late] = [s for s in got if s.text == "stored just after the listing"]
    assert late.origin is Origin.CMTI, "read at once with its URC time, not at the next poll"
    urc_ns = deliveries[0].urc_ns
    assert urc_ns is not None and 0 <= late.arrived_at.timestamp() * 1e9 - urc_ns < 50e6


async def test_slow_modem_still_delivers(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem, command_timeout_s=2.0)
    await port.start()
    assert await port.wait_connected()
    modem.set_response_delay(0.2)
    delivery = modem.deliver("+1555", "slowly")
    [sms] = await receive(port, 1)
    assert sms.text == "slowly" and delivery.urc_ns is not None
    assert abs(sms.arrived_at.timestamp() * 1e9 - delivery.urc_ns) < 50e6, (
        "the stamp is the URC's, not the read's"
    )
    assert (sms.completed_at - sms.arrived_at).total_seconds() < 1


async def test_sim_removed_mid_session_is_reported_and_recovered(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.remove_sim()
    modem.deliver("+1555", "its read fails: no SIM")  # stored, announced, CME 10 on the read
    state = await wait_state(port, lambda s: "SIM not inserted" in (s.last_error or ""))
    assert not state.connected
    modem.insert_sim()
    [sms] = await receive(port, 1, timeout_s=15)
    assert sms.text == "its read fails: no SIM"
    assert (await port.state()).connected


async def test_modem_that_restarts_by_itself_is_reinitialised(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    """A brown-out: echo back on, +CNMI and +CMEE forgotten, the SIM locked again."""
    modem = make_modem("sim800l", sim=SimCard(pin="1234"))
    port = open_port(modem, pin="1234", profile="sim800l")
    await port.start()
    assert await port.wait_connected()
    modem.reboot()
    state = await wait_state(port, lambda s: s.reconnects >= 1 and s.connected)
    assert any("restarted by itself" in e for e in state.events)
    modem.deliver("+1555", "after the brown-out")
    [sms] = await receive(port, 1)
    assert sms.text == "after the brown-out" and sms.origin is Origin.CMTI


async def test_ascii_noise_inside_answers_is_skipped(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.noise_in_answers("zz noise zz")
    for i in range(3):
        modem.deliver("+1555", f"read through noisy answers {i}")
    got = await receive(port, 3)
    assert [s.text for s in got] == [f"read through noisy answers {i}" for i in range(3)]
    state = await port.state(refresh=True)
    assert state.signal_rssi == 20 and state.mcc_mnc == "23415" and state.connected


async def test_unannounced_message_is_found_by_polling(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    """Its +CMTI was lost (or never sent): the poll sees storage in use and sweeps."""
    modem = make_modem()
    port = open_port(modem)
    await port.start()
    assert await port.wait_connected()
    modem.store_silently("+1555", "nobody announced me")
    [sms] = await receive(port, 1, timeout_s=10)
    assert sms.text == "nobody announced me" and sms.origin is Origin.SWEEP


async def test_full_storage_held_by_a_slow_consumer_is_not_swept_in_a_loop(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("e3372")
    port = open_port(modem, profile="e3372")
    await port.start()
    assert await port.wait_connected()
    modem.fill_storage()
    iterator = port.received().__aiter__()
    first = await asyncio.wait_for(anext(iterator), 10)  # taken, never acknowledged: all 50 held
    await asyncio.sleep(1.0)
    before = sum(1 for c in modem.commands if c == "AT+CMGL=4")
    await asyncio.sleep(1.5)
    after = sum(1 for c in modem.commands if c == "AT+CMGL=4")
    assert after - before <= 4, "no busy loop while the consumer holds everything"
    state = await port.state()
    assert any("awaits the consumer" in e for e in state.events)
    port.ack(first)


# --- SIM and PIN -------------------------------------------------------------------------------


async def test_pin_is_entered(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem("sim800l", sim=SimCard(pin="4321"))
    port = open_port(modem, pin="4321", profile="sim800l")
    await port.start()
    assert await port.wait_connected()
    assert (await port.state()).imsi == "234150000000001"


async def test_wrong_pin_is_reported_and_never_retried(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    modem = make_modem(sim=SimCard(pin="4321"))
    port = open_port(modem, pin="0000")
    await port.start()
    state = await wait_state(port, lambda s: s.last_error is not None)
    assert "incorrect SIM PIN" in (state.last_error or "") and not state.connected
    await asyncio.sleep(1.0)
    assert sum(1 for c in modem.commands if c.startswith("AT+CPIN=")) == 1, "one try only: three lock the SIM"


async def test_missing_pin_and_missing_sim(
    make_modem: Callable[..., VirtualModem], open_port: Callable[..., ModemPort]
) -> None:
    locked = make_modem(sim=SimCard(pin="4321"))
    port = open_port(locked)
    await port.start()
    state = await wait_state(port, lambda s: s.last_error is not None)
    assert "PIN required" in (state.last_error or "")
    empty = make_modem(sim_present=False)
    port2 = open_port(empty)
    await port2.start()
    state = await wait_state(port2, lambda s: "SIM not inserted" in (s.last_error or ""))
    assert not state.connected
