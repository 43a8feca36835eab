"""The virtual modem at the AT level, spoken to over its pty with pyserial (no library): the
27.007 / 27.005 answers the agent relies on, each profile's quirks, and every fault on demand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial

from hardware.modem_profiles import PROFILES
from hardware.sms_pdu import decode_deliver
from hardware.virtual_modem import REG_HOME, REG_SEARCHING, SimCard, StorageFullError, VirtualModem


class At:
    """A bare AT client: write a command, read until a final result code."""

    FINAL = ("OK", "ERROR", "+CME ERROR", "+CMS ERROR", "COMMAND NOT SUPPORT")

    def __init__(self, port: str) -> None:
        self.ser = serial.Serial(port, 115200, timeout=0.05)
        self.buffer = b""

    def lines(self, wait_s: float = 0.3) -> list[str]:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self.buffer += self.ser.read(4096)
        out = [x.decode("utf-8", "replace") for x in self.buffer.split(b"\r\n") if x]
        self.buffer = b""
        return out

    def __call__(self, command: str, timeout_s: float = 2.0) -> list[str]:
        self.ser.write(command.encode() + b"\r")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.buffer += self.ser.read(4096)
            lines = [x.decode("utf-8", "replace") for x in self.buffer.split(b"\r\n") if x]
            if lines and lines[-1].startswith(self.FINAL) and self.buffer.endswith(b"\r\n"):
                self.buffer = b""
                return [x for x in lines if x.rstrip("\r") != command]  # drop the echo
        raise TimeoutError(f"no final result for {command!r}: {self.buffer!r}")


@pytest.fixture
def at_client() -> Iterator[Callable[[VirtualModem], At]]:
    clients: list[At] = []

    def open_(modem: VirtualModem) -> At:
        client = At(modem.port)
        client.lines(0.1)  # the power-on banner
        clients.append(client)
        return client

    yield open_
    for c in clients:
        c.ser.close()


def test_port_is_a_stable_link_to_a_pty(make_modem: Callable[..., VirtualModem], tmp_path: Path) -> None:
    modem = make_modem(link=tmp_path / "ttyUSB-modem")
    assert modem.port == str(tmp_path / "ttyUSB-modem")
    assert os.path.islink(modem.port) and os.readlink(modem.port) == modem.pts
    assert modem.pts is not None and modem.pts.startswith("/dev/pts/")


def test_basic_answers(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    at = at_client(make_modem(sim=SimCard(msisdn="+447700900777")))
    assert at("ATE0") == ["OK"]
    assert at("AT+CSQ") == ["+CSQ: 20,99", "OK"]
    assert at("AT+CREG?") == ["+CREG: 0,1", "OK"]
    assert at("AT+CIMI") == ["234150000000001", "OK"]
    assert at("AT+CCID") == ["+CCID: 8944150000000000019", "OK"]
    assert at("AT+CNUM") == ['+CNUM: "","+447700900777",145', "OK"]
    assert at("AT+CSCA?") == ['+CSCA: "+447785016005",145', "OK"]
    assert at("AT+COPS?") == ['+COPS: 0,0,"Vodafone UK",7', "OK"]
    assert at("AT+COPS=3,2") == ["OK"]
    assert at("AT+COPS?") == ['+COPS: 0,2,"23415",7', "OK"]
    assert at("AT+CPMS?") == ['+CPMS: "SM",0,30,"SM",0,30,"SM",0,30', "OK"]
    assert at("AT+CMGF=0;+CNMI=2,1,0,0,0") == ["OK"]
    assert at("AT+CNMI?") == ["+CNMI: 2,1,0,0,0", "OK"]
    assert at("AT+NOPE") == ["ERROR"]


def test_echo_is_on_after_reset(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem()
    at = At(modem.port)
    at.lines(0.05)
    at.ser.write(b"AT\r")
    assert b"AT\r" in at.ser.read(16)


def test_cmee_modes(make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]) -> None:
    modem = make_modem()
    modem.remove_sim()
    at = at_client(modem)
    assert at("AT+CIMI")[-1] == "ERROR"
    at("AT+CMEE=1")
    assert at("AT+CIMI")[-1] == "+CME ERROR: 10"
    at("AT+CMEE=2")
    assert at("AT+CIMI")[-1] == "+CME ERROR: SIM not inserted"


def test_pin_required_wrong_and_right(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    at = at_client(make_modem(sim=SimCard(pin="1234")))
    at("AT+CMEE=1")
    assert at("AT+CPIN?") == ["+CPIN: SIM PIN", "OK"]
    assert at("AT+CIMI")[-1] == "+CME ERROR: 11"
    assert at('AT+CPIN="0000"')[-1] == "+CME ERROR: 16"
    assert at('AT+CPIN="1234"') == ["OK"]
    assert at("AT+CPIN?") == ["+CPIN: READY", "OK"]
    assert at("AT+CIMI")[0] == "234150000000001"


def test_three_wrong_pins_lock_the_sim(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    at = at_client(make_modem(sim=SimCard(pin="1234")))
    at("AT+CMEE=1")
    for _ in range(3):
        at('AT+CPIN="9999"')
    assert at("AT+CPIN?") == ["+CPIN: SIM PUK", "OK"]
    assert at('AT+CPIN="1234"')[-1] == "+CME ERROR: 12"


def test_deliver_stores_raises_cmti_and_reads_in_both_modes(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    at("AT+CNMI=2,1,0,0,0")
    before = time.time_ns()
    delivery = modem.deliver("+447700900123", "hello €")
    assert delivery.urc_ns is not None and before <= delivery.urc_ns <= time.time_ns()
    assert delivery.indices == (1,)
    assert at.lines(0.1) == ['+CMTI: "SM",1']
    header, pdu, ok = at("AT+CMGR=1")
    assert header == f"+CMGR: 0,,{len(bytes.fromhex(pdu)) - 8}" and ok == "OK"
    assert decode_deliver(pdu).text == "hello €"
    assert at("AT+CMGR=1")[0].startswith("+CMGR: 1,,"), "a read message is REC READ"
    at("AT+CMGF=1")
    header, text, _ = at("AT+CMGR=1")
    assert header.startswith('+CMGR: "REC READ","+447700900123",,"') and text == "hello €"
    assert at('AT+CMGL="ALL"')[1] == "hello €"
    assert at("AT+CMGD=1") == ["OK"]
    assert modem.stored() == {}
    assert at("AT+CMGR=1")[-1] == "+CMS ERROR: 321"


def test_cmgl_and_cmgd_flags(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    modem.store_silently("+1555", "one")
    modem.store_silently("+1555", "two")
    listing = at("AT+CMGL=0")
    assert [x.split(",")[0] for x in listing if x.startswith("+CMGL")] == ["+CMGL: 1", "+CMGL: 2"]
    assert at("AT+CMGL=0") == ["OK"], "listing marks them read"
    modem.store_silently("+1555", "three")
    assert at("AT+CMGD=1,1") == ["OK"]  # delete all read: 1 and 2, keep unread 3
    assert list(modem.stored()) == [3]
    assert at("AT+CMGD=1,4") == ["OK"]
    assert modem.stored() == {}


def test_direct_delivery_with_cmt(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    at("AT+CNMI=2,2,0,0,0")
    delivery = modem.deliver("+1555", "direct")
    header, pdu = at.lines(0.1)
    assert header == f"+CMT: ,{len(bytes.fromhex(pdu)) - 8}" and pdu == delivery.pdus[0]
    assert delivery.indices == () and modem.stored() == {}


def test_long_message_is_stored_in_parts(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem()
    delivery = modem.deliver("+1555", "x" * 400, ref_bits=16)
    assert delivery.indices == (1, 2, 3)
    parts = [decode_deliver(p) for p in modem.stored().values()]
    assert [p.concat.seq for p in parts if p.concat] == [1, 2, 3]
    assert {p.concat.ref_bits for p in parts if p.concat} == {16}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_identity_and_quirks(
    name: str, make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    profile = PROFILES[name]
    modem = make_modem(name, boot_delay_s=0.2)
    at = At(modem.port)
    banner = at.lines(0.4)
    assert [x for x in banner if x in profile.banner] == list(profile.banner)
    at("ATE0")
    assert at("AT+CGMI") == [profile.manufacturer, "OK"]
    assert at("AT+CGMM") == [profile.model, "OK"]
    assert at("ATI") == [*profile.ati, "OK"]
    assert at(f"AT{profile.iccid_command}")[0] == f"{profile.iccid_prefix}8944150000000000019"
    storages = ",".join(f'"{s}"' for s in profile.storages)
    assert at("AT+CPMS=?") == [f"+CPMS: ({storages}),({storages}),({storages})", "OK"]
    assert at("AT+CLAC")[-1] == ("OK" if profile.has_clac else profile.unsupported)
    delivery = modem.deliver("+1555", "hi")
    assert delivery.indices == (profile.first_index,)
    at.ser.close()


def test_sim800_writes_its_sync_bytes_before_the_banner(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem("sim800l", boot_delay_s=0.2)
    raw = serial.Serial(modem.port, 115200, timeout=0.4).read(200)
    assert raw.startswith(b"\x00IIII\xff\xff\xff\xff\r\nRDY\r\n")


def test_storage_full_refuses_and_tells(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem("e3372")
    at = at_client(modem)
    at("ATE0")
    assert modem.fill_storage() == 50
    with pytest.raises(StorageFullError):
        modem.deliver("+1555", "no room")
    assert '^SMMEMFULL:"SM"' in at.lines(0.1)
    assert at("AT+CPMS?")[0] == '+CPMS: "SM",50,50,"SM",50,50,"SM",50,50'


def test_writing_to_full_storage_answers_cms_322(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    at.ser.write(b"AT+CMGW=20\r")
    assert at.ser.read(8) == b"\r\n> "
    at.ser.write(b"0011000B914477009001F20000AA0548656C6C6F\x1a")
    assert at.lines(0.2) == ["+CMGW: 1", "OK"]
    modem.fill_storage()
    at.ser.write(b"AT+CMGW=20\r")
    assert at.ser.read(8) == b"\r\n> "
    at.ser.write(b"0011000B914477009001F20000AA0548656C6C6F\x1a")
    assert at.lines(0.2) == ["+CMS ERROR: 322"]
    at.ser.write(b"AT+CMGW=20\r")
    at.ser.read(8)
    at.ser.write(b"00\x1b")  # ESC cancels the entry
    assert at.lines(0.2) == ["OK"]


def test_ec25_reports_full_storage_only_when_asked(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem("ec25")
    at = at_client(modem)
    at("ATE0")
    modem.fill_storage()
    with pytest.raises(StorageFullError):
        modem.deliver("+1555", "x")
    assert at.lines(0.1) == []
    at('AT+QINDCFG="smsfull",1')
    with pytest.raises(StorageFullError):
        modem.deliver("+1555", "x")
    assert at.lines(0.1) == ['+QIND: "smsfull","SM"']


def test_registration_lost_and_regained(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    at("AT+CREG=1")
    modem.set_registration(REG_SEARCHING)
    assert at.lines(0.1) == ["+CREG: 2"]
    assert at("AT+COPS?") == ["+COPS: 0", "OK"]
    modem.set_registration(REG_HOME)
    assert at.lines(0.1) == ["+CREG: 1"]
    assert at("AT+CREG?") == ["+CREG: 1,1", "OK"]


def test_hang_and_resume(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    modem.hang()
    with pytest.raises(TimeoutError):
        at("AT", timeout_s=0.3)
    modem.resume()
    assert at("AT")[-1] == "OK"


def test_unplug_and_replug_keep_the_path_and_storage(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem("ec25")
    modem.store_silently("+1555", "kept on the SIM")
    ser = serial.Serial(modem.port, 115200, timeout=0.2)
    modem.unplug()
    assert not os.path.exists(modem.port)
    with pytest.raises(serial.SerialException):
        for _ in range(5):
            ser.read(1)
    modem.boot_delay_s = 0.2
    modem.replug()
    assert os.path.islink(modem.port) and os.readlink(modem.port) == modem.pts
    at = At(modem.port)
    assert "RDY" in at.lines(0.4)
    assert at("AT+CMGL=4")[1] == next(iter(modem.stored().values()))


def test_garbage_slow_and_read_errors(
    make_modem: Callable[..., VirtualModem], at_client: Callable[[VirtualModem], At]
) -> None:
    modem = make_modem()
    at = at_client(modem)
    at("ATE0")
    modem.inject_garbage(b"\xff\xfe\x00junk")
    assert at.ser.read(64).startswith(b"\xff\xfe\x00junk")
    modem.set_response_delay(0.3)
    start = time.monotonic()
    assert at("AT")[-1] == "OK"
    assert time.monotonic() - start >= 0.3
    modem.set_response_delay(0)
    modem.store_silently("+1555", "x")
    modem.fail_reads(2, code=500)
    assert at("AT+CMGR=1")[-1] == "+CMS ERROR: 500"
    assert at("AT+CMGR=1")[-1] == "+CMS ERROR: 500"
    assert at("AT+CMGR=1")[-1] == "OK"


def test_cli_runs_until_terminated(tmp_path: Path) -> None:
    link = tmp_path / "ttyGSM-cli"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hardware.virtual_modem", "--profile", "e3372", "--link", str(link)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"virtual modem (e3372) on {link}" in line
        at = At(str(link))
        at.lines(0.1)
        assert at("AT+CGMM")[-2:] == ["E3372", "OK"] or at("AT+CGMM")[-1] == "OK"
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
    assert not link.exists()


def test_cli_rejects_an_unknown_profile() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hardware.virtual_modem", "--profile", "nokia3310"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "unknown modem profile 'nokia3310'" in proc.stderr
