"""A virtual GSM modem on a pseudo-terminal, speaking enough 3GPP TS 27.007 / 27.005 AT commands
for python-gsmmodem-new and the probe agent, with the quirks of real models and faults on demand.

It stands in for a USB modem and its SIM: the real library opens ``.port`` (a symlink to the pty,
as a udev rule would give) and cannot tell the difference. ``deliver()`` is the network handing
an SMS to the SIM; it returns the instant the URC was written, the ground truth for latency.

Run one by hand: ``python -m hardware.virtual_modem --profile sim800l --link /tmp/ttyGSM0``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import select
import signal
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from hardware.modem_profiles import ModemProfile, get_profile
from hardware.sms_pdu import decode_deliver, encode_deliver, is_hex_pdu, tpdu_length

log = logging.getLogger(__name__)

#: 3GPP TS 27.005 §3.2.5 message service failure codes used here.
CMS_MEMORY_FAILURE = 320
CMS_INVALID_INDEX = 321
CMS_MEMORY_FULL = 322
CMS_INVALID_PDU = 304
CMS_UNKNOWN = 500
#: 3GPP TS 27.007 §9.2 equipment error codes used here.
CME_SIM_NOT_INSERTED = 10
CME_SIM_PIN_REQUIRED = 11
CME_SIM_PUK_REQUIRED = 12
CME_INCORRECT_PASSWORD = 16
CME_TEXT = {
    CME_SIM_NOT_INSERTED: "SIM not inserted",
    CME_SIM_PIN_REQUIRED: "SIM PIN required",
    CME_SIM_PUK_REQUIRED: "SIM PUK required",
    CME_INCORRECT_PASSWORD: "incorrect password",
    3: "operation not allowed",
    4: "operation not supported",
}
#: +CREG <stat> values (TS 27.007 §7.2).
REG_NOT_SEARCHING, REG_HOME, REG_SEARCHING, REG_DENIED, REG_UNKNOWN, REG_ROAMING = range(6)
#: +CMGL / +CMGR <stat> values in PDU mode, and their text-mode names.
STAT_NAMES = {0: "REC UNREAD", 1: "REC READ", 2: "STO UNSENT", 3: "STO SENT", 4: "ALL"}
PIN_ATTEMPTS = 3
CTRL_Z, ESC_CANCEL = 0x1A, 0x1B  # end and cancel of a PDU typed after the "> " prompt (27.005 §3.5.3)

_COMMAND = re.compile(r"^([+^][A-Z0-9_]+|[A-Z&][0-9]*)(=\?|\?|=)?(.*)$", re.IGNORECASE)


class StorageFullError(RuntimeError):
    """The network could not store an SMS on the SIM: receiving storage is full (CMS 322)."""

    code = CMS_MEMORY_FULL


@dataclass
class SimCard:
    """The SIM in the modem and the network it registers on."""

    imsi: str = "234150000000001"
    iccid: str = "8944150000000000019"
    msisdn: str | None = "+447700900001"
    pin: str | None = None
    smsc: str = "+447785016005"
    operator: str = "Vodafone UK"
    mcc_mnc: str = "23415"


@dataclass(frozen=True)
class Delivery:
    """What ``deliver()`` did: when the URC went out (None while hung) and where parts are."""

    urc_at: datetime | None
    urc_ns: int | None
    indices: tuple[int, ...]
    memory: str
    pdus: tuple[str, ...]


@dataclass
class _Stored:
    pdu: str
    stat: int = 0  # REC UNREAD


@dataclass
class _Faults:
    hung: bool = False
    response_delay_s: float = 0.0
    read_errors: int = 0
    read_error_code: int = CMS_UNKNOWN
    answer_noise: str | None = None


@dataclass
class _Settings:
    echo: bool = True
    cmee: int = 0
    text_mode: bool = False
    cnmi: tuple[int, ...] = (0, 0, 0, 0, 0)
    creg_urc: int = 0
    full_urc: bool = False
    cops_format: int = 0
    mem: list[str] = field(default_factory=lambda: ["SM", "SM", "SM"])


class VirtualModem:
    """An AT-command modem on a pty: start it, point the real library at ``.port``."""

    def __init__(
        self,
        profile: str | ModemProfile = "generic",
        *,
        link: str | os.PathLike[str] | None = None,
        sim: SimCard | None = None,
        sim_present: bool = True,
        signal_rssi: int = 20,
        registration: int = REG_HOME,
        noise_interval_s: float | None = None,
        boot_delay_s: float = 0.0,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.sim = sim or SimCard()
        self.sim_present = sim_present
        self.signal_rssi = signal_rssi
        self.registration = registration
        self.noise_interval_s = noise_interval_s
        #: Power-on to banner; commands get no answer until then, as a booting modem gives none.
        #: Zero: booted before anyone opens the port (which flushes the banner), the usual case.
        self.boot_delay_s = boot_delay_s
        self._booting = False
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if link is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="vmodem-")
            link = Path(self._tmpdir.name) / "ttyGSM0"
        self.link = Path(link)
        self._settings = _Settings(mem=[self.profile.storages[0]] * 3)
        self._faults = _Faults()
        self._pin_unlocked = self.sim.pin is None
        self._pin_attempts = PIN_ATTEMPTS
        self._storage: dict[str, dict[int, _Stored]] = {m: {} for m in self.profile.storages}
        self._state_lock = threading.RLock()
        self._tx_lock = threading.RLock()
        self._master: int | None = None
        self._slave: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._noise_thread: threading.Thread | None = None
        self._running = False
        self._plugged = False
        self._next_ref = random.randrange(256)
        #: Every command line received, for tests and logs.
        self.commands: list[str] = []
        #: Called with each command line once its answer is written (tests time races with it).
        self.on_answered: Callable[[str], None] | None = None
        self._table = self._handlers()
        #: Set while a +CMGW waits for its PDU after the "> " prompt.
        self._pdu_entry: int | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> str:
        """The stable path to open (a symlink that survives unplug/replug, like a udev name)."""
        return str(self.link)

    @property
    def pts(self) -> str | None:
        """The pty device behind ``port`` while plugged in."""
        return os.ttyname(self._slave) if self._slave is not None else None

    def start(self) -> VirtualModem:
        """Open the pty, write the power-on banner and start answering."""
        self._running = True
        self._plug()
        self._thread = threading.Thread(target=self._io_loop, name=f"vmodem-{self.link.name}", daemon=True)
        self._thread.start()
        if self.noise_interval_s:
            self._noise_thread = threading.Thread(target=self._noise_loop, daemon=True)
            self._noise_thread.start()
        return self

    def stop(self) -> None:
        """Stop answering, close the pty and remove the link."""
        self._running = False
        os.write(self._wake_w, b"x")
        if self._thread:
            self._thread.join(timeout=5)
        self._unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._tmpdir:
            self._tmpdir.cleanup()

    def __enter__(self) -> VirtualModem:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        with self._tx_lock:
            self._master, self._slave = master, slave
            tmp = self.link.with_name(self.link.name + ".new")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(os.ttyname(slave))
            tmp.replace(self.link)
            self._plugged = True
        self._reset_settings()
        self._boot()

    def _boot(self) -> None:
        self._booting = True
        if self.boot_delay_s:
            threading.Timer(self.boot_delay_s, self._boot_banner).start()
        else:
            self._boot_banner()

    def _boot_banner(self) -> None:
        self._booting = False
        if self.profile.boot_bytes:
            self._raw_write(self.profile.boot_bytes)
        self._write_lines(self.profile.banner)

    def _unplug(self) -> None:
        with self._tx_lock:
            self._plugged = False
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = None
            with contextlib.suppress(FileNotFoundError):
                if self.link.is_symlink():
                    self.link.unlink()

    def _reset_settings(self) -> None:
        with self._state_lock:
            mem = self._settings.mem
            self._settings = _Settings(mem=mem)

    # --- the network side --------------------------------------------------------------------

    def deliver(
        self,
        sender: str,
        text: str,
        *,
        smsc: str | None = None,
        scts: datetime | None = None,
        encoding: str = "auto",
        flash: bool = False,
        pid: int = 0,
        ref_bits: int = 8,
    ) -> Delivery:
        """Hand an SMS to the SIM: store every part and raise ``+CMTI`` (or ``+CMT``).

        Long texts become concatenated parts; raises StorageFullError if they do not fit.
        """
        with self._state_lock:
            ref = self._next_ref
            self._next_ref = (self._next_ref + 1) % (256 if ref_bits == 8 else 65536)
        pdus = encode_deliver(
            sender,
            text,
            smsc=smsc or self.sim.smsc,
            scts=scts,
            encoding=encoding,
            flash=flash,
            pid=pid,
            ref=ref,
            ref_bits=ref_bits,
        )
        return self._deliver_pdus(pdus)

    def deliver_pdu(self, pdu: str) -> Delivery:
        """Inject one raw SMS-DELIVER PDU (hex with SMSC prefix), e.g. an external test vector."""
        bytes.fromhex(pdu)  # a clear ValueError for non-hex before anything is stored
        return self._deliver_pdus([pdu.upper()])

    def _deliver_pdus(self, pdus: list[str]) -> Delivery:
        mt = self._settings.cnmi[1]
        direct = mt == 2
        announce = mt != 0  # +CNMI mt=0 (the default after ATZ): stored, no indication
        memory = self._settings.mem[2]
        indices: list[int] = []
        full = False
        with self._state_lock:  # never write while holding it: the I/O thread locks the other way
            if not direct:
                store = self._storage[memory]
                free = self._free_slots(memory)
                full = len(free) < len(pdus)
                if not full:
                    for index, pdu in zip(free, pdus, strict=False):
                        store[index] = _Stored(pdu)
                        indices.append(index)
        if full:
            full_urc = self.profile.storage_full_urc
            if full_urc and (self._settings.full_urc or not self.profile.storage_full_urc_enable):
                self._write_lines([full_urc])
            raise StorageFullError(f"{memory} storage full, {len(pdus)} part(s) refused")
        urc_ns = None
        for i, pdu in enumerate(pdus):
            if not announce:
                continue
            lines = [f"+CMT: ,{tpdu_length(pdu)}", pdu] if direct else [f'+CMTI: "{memory}",{indices[i]}']
            written = self._write_lines(lines)
            urc_ns = written if urc_ns is None else urc_ns
        urc_at = datetime.fromtimestamp(urc_ns / 1e9, UTC) if urc_ns else None
        return Delivery(urc_at, urc_ns, tuple(indices), memory, tuple(pdus))

    def _free_slots(self, memory: str) -> list[int]:
        first = self.profile.first_index
        store = self._storage[memory]
        return [i for i in range(first, first + self.profile.capacity[memory]) if i not in store]

    def stored(self, memory: str | None = None) -> dict[int, str]:
        """What the storage holds now: index → PDU."""
        with self._state_lock:
            store = self._storage[memory or self._settings.mem[2]]
            return {i: s.pdu for i, s in sorted(store.items())}

    def store_silently(self, sender: str, text: str, **kwargs: object) -> list[int]:
        """Store an SMS without a URC, as one that arrived while nothing was listening."""
        pdus = encode_deliver(sender, text, smsc=self.sim.smsc, **kwargs)  # type: ignore[arg-type]
        memory = self._settings.mem[2]
        with self._state_lock:
            store = self._storage[memory]
            free = self._free_slots(memory)
            if len(free) < len(pdus):
                raise StorageFullError(f"{memory} storage full")
            for index, pdu in zip(free, pdus, strict=False):
                store[index] = _Stored(pdu)
            return free[: len(pdus)]

    # --- faults ------------------------------------------------------------------------------

    def fill_storage(self) -> int:
        """Fill every free slot of the receiving storage with old messages; returns how many."""
        memory = self._settings.mem[2]
        count = 0
        with self._state_lock:
            store = self._storage[memory]
            for index in self._free_slots(memory):
                pdu = encode_deliver("+447700900999", f"old message {index}", smsc=self.sim.smsc)
                store[index] = _Stored(pdu[0], stat=1)
                count += 1
        return count

    def set_registration(self, stat: int) -> None:
        """Lose (``REG_SEARCHING``) or regain (``REG_HOME``) the network; URC when enabled."""
        self.registration = stat
        if self._settings.creg_urc:
            self._write_lines([f"+CREG: {stat}"])

    def reboot(self) -> None:
        """Restart by itself (a brown-out): settings back to defaults, the SIM locked again if it
        has a PIN, the power-on banner; storage is kept, as SIM and flash keep it."""
        with self._state_lock:
            self._pin_unlocked = self.sim.pin is None
            self._settings = _Settings(mem=[self.profile.storages[0]] * 3)
        self._boot()

    def hang(self) -> None:
        """Stop answering commands and raising URCs, as a wedged firmware does."""
        self._faults.hung = True

    def resume(self) -> None:
        """Answer again after ``hang()``."""
        self._faults.hung = False

    def unplug(self) -> None:
        """Pull the USB stick: the pty closes and the port path disappears."""
        self._unplug()

    def replug(self) -> None:
        """Plug it back: a new pty behind the same port path, the power-on banner again."""
        self._plug()
        os.write(self._wake_w, b"x")

    def inject_garbage(self, data: bytes | None = None) -> None:
        """Line noise: bytes that are no valid response, not UTF-8, between two lines."""
        noise = data if data is not None else bytes(random.choice(range(0x80, 0x100)) for _ in range(12))
        with self._tx_lock:
            self._raw_write(noise)

    def fail_reads(self, count: int, code: int = CMS_UNKNOWN) -> None:
        """The next ``count`` ``AT+CMGR`` answer ``+CMS ERROR: code``."""
        self._faults.read_errors = count
        self._faults.read_error_code = code

    def set_response_delay(self, seconds: float) -> None:
        """Answer every command this much later (a slow or busy modem)."""
        self._faults.response_delay_s = seconds

    def remove_sim(self) -> None:
        """Take the SIM out: +CPIN and SIM commands answer CME ERROR 10."""
        self.sim_present = False

    def insert_sim(self) -> None:
        """Put the SIM back (locked again if it has a PIN)."""
        self._pin_unlocked = self.sim.pin is None
        self.sim_present = True

    def noise_in_answers(self, line: str | None) -> None:
        """Put ``line`` (plain ASCII a parser must skip) before every final result; None stops."""
        self._faults.answer_noise = line

    def emit_noise(self) -> None:
        """Write the profile's unsolicited noise lines once."""
        self._write_lines(self.profile.noise)

    # --- I/O ---------------------------------------------------------------------------------

    def _raw_write(self, data: bytes) -> int | None:
        """Write to the line; the wall-clock instant just before the write (the reader cannot
        see the bytes earlier, so a latency measured against it is never negative)."""
        with self._tx_lock:
            if self._master is None or not self._plugged:
                return None
            stamp = time.time_ns()
            try:
                os.write(self._master, data)
            except OSError:
                return None
            return stamp

    def _write_lines(self, lines: tuple[str, ...] | list[str]) -> int | None:
        """Write unsolicited lines (framed by CR LF as with ATV1); the time they went out."""
        if not lines or self._faults.hung:
            return None
        data = "".join(f"\r\n{line}\r\n" for line in lines).encode()
        return self._raw_write(data)

    def _io_loop(self) -> None:
        buffer = bytearray()
        while self._running:
            master = self._master
            fds = [self._wake_r] + ([master] if master is not None else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.5)
            except (OSError, ValueError):
                time.sleep(0.01)
                continue
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if master is None or master not in ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                # No process holds the pty open: wait for the library to (re)open it.
                time.sleep(0.02)
                continue
            if not data:
                continue
            if self._faults.hung:
                buffer.clear()
                continue
            if self._settings.echo:
                self._raw_write(data)
            buffer.extend(data)
            while True:
                if self._pdu_entry is not None:  # after the "> " prompt: a PDU ends with Ctrl-Z
                    end = next((i for i, b in enumerate(buffer) if b in (CTRL_Z, ESC_CANCEL)), None)
                    if end is None:
                        break
                    entry, cancelled = bytes(buffer[:end]), buffer[end] == ESC_CANCEL
                    buffer = buffer[end + 1 :]
                    self._finish_pdu_entry(entry.decode("ascii", "replace").strip(), cancelled)
                    continue
                if b"\r" not in buffer:
                    break
                line, _, rest = bytes(buffer).partition(b"\r")
                buffer = bytearray(rest.lstrip(b"\n"))
                text = line.decode("ascii", errors="replace").strip()
                if text:
                    self._handle_line(text)

    def _noise_loop(self) -> None:
        assert self.noise_interval_s
        while self._running:
            time.sleep(self.noise_interval_s)
            if self._running and self.profile.noise:
                self._write_lines([random.choice(self.profile.noise)])

    def _handle_line(self, line: str) -> None:
        self.commands.append(line)
        with self._tx_lock:
            if self._faults.response_delay_s:
                time.sleep(self._faults.response_delay_s)
            if self._faults.hung or self._booting:
                return
            try:
                body, final = self._execute_line(line)
                if final == "> ":
                    self._raw_write(b"\r\n> ")
                    return
            except _AtError as err:
                body, final = [], err.result
            except Exception:  # a bug here must not kill the modem: answer ERROR and log it
                log.exception("virtual modem failed on %r", line)
                body, final = [], "ERROR"
            if self._faults.answer_noise is not None:
                body = [*body, self._faults.answer_noise]
            out = "".join(f"\r\n{b}" for b in body)
            out += ("\r\n" if body else "") + f"\r\n{final}\r\n"
            self._raw_write(out.encode())
        if self.on_answered is not None:
            self.on_answered(line)

    # --- AT interpreter ----------------------------------------------------------------------

    def _execute_line(self, line: str) -> tuple[list[str], str]:
        if not line.upper().startswith("AT"):
            raise _AtError("ERROR")
        if line.upper().startswith("AT+CMGW="):  # PDU mode: the PDU follows after a prompt
            self._require_sim()
            self._pdu_entry = _int(line[8:].split(",")[0], 1, 255)
            return [], "> "
        rest = line[2:]
        body: list[str] = []
        # Basic commands (E0, Z, V1...) may precede one extended command; ';' chains extended ones.
        while rest:
            if rest[0] in "+^":
                for part in rest.split(";"):
                    if part:
                        body += self._extended(part if part[0] in "+^" else "+" + part)
                break
            m = re.match(r"([A-Z&])(\d*)", rest, re.IGNORECASE)
            if not m:
                raise _AtError("ERROR")
            body += self._basic(m.group(1).upper(), m.group(2))
            rest = rest[m.end() :]
        return body, "OK"

    def _basic(self, cmd: str, arg: str) -> list[str]:
        if cmd == "E":
            self._settings.echo = arg != "0"
        elif cmd == "Z" or (cmd == "&" and arg == ""):
            self._reset_settings()
        elif cmd == "I":
            return list(self.profile.ati)
        elif cmd not in ("V", "Q", "&"):
            raise _AtError(self.profile.unsupported)
        return []

    def _cme(self, code: int) -> _AtError:
        if self._settings.cmee == 0:
            return _AtError("ERROR")
        if self._settings.cmee == 2:
            return _AtError(f"+CME ERROR: {CME_TEXT.get(code, 'unknown')}")
        return _AtError(f"+CME ERROR: {code}")

    def _require_sim(self) -> None:
        if not self.sim_present:
            raise self._cme(CME_SIM_NOT_INSERTED)
        if not self._pin_unlocked:
            raise self._cme(CME_SIM_PUK_REQUIRED if self._pin_attempts == 0 else CME_SIM_PIN_REQUIRED)

    def _extended(self, part: str) -> list[str]:
        m = _COMMAND.match(part)
        if not m:
            raise _AtError("ERROR")
        name, op, arg = m.group(1).upper(), m.group(2) or "", m.group(3)
        handler = self._table.get(name)
        if handler is None:
            raise _AtError(self.profile.unsupported)
        return handler(op, arg)

    def _handlers(self) -> dict[str, Callable[[str, str], list[str]]]:
        p = self.profile
        fixed = {
            "+CGMI": [p.manufacturer],
            "+CGMM": [p.model],
            "+CGMR": [p.revision],
            "+GMI": [p.manufacturer],
            "+GMM": [p.model],
            "+CGSN": ["867000000000000"],
        }
        handlers: dict[str, Callable[[str, str], list[str]]] = {
            name: _fixed_answer(lines) for name, lines in fixed.items()
        }
        handlers.update(
            {
                "+CMEE": self._at_cmee,
                "+CPIN": self._at_cpin,
                "+CFUN": self._at_cfun,
                "+CREG": self._at_creg,
                "+COPS": self._at_cops,
                "+CSQ": lambda op, arg: [f"+CSQ: {self.signal_rssi},99"],
                "+CIMI": self._at_cimi,
                p.iccid_command: self._at_iccid,
                "+CNUM": self._at_cnum,
                "+CSCA": self._at_csca,
                "+CPMS": self._at_cpms,
                "+CMGF": self._at_cmgf,
                "+CNMI": self._at_cnmi,
                "+CMGR": self._at_cmgr,
                "+CMGL": self._at_cmgl,
                "+CMGD": self._at_cmgd,
                "+CNMA": lambda op, arg: [],
                "+CSMP": lambda op, arg: [],
                "+CLIP": lambda op, arg: [],
                "+CRC": lambda op, arg: [],
                "+CVHU": lambda op, arg: [],
                "+CSMS": lambda op, arg: ["+CSMS: 0,1,1,1"] if op == "?" else [],
            }
        )
        if p.storage_full_urc_enable:
            name = p.storage_full_urc_enable.split("=")[0]
            handlers[name] = self._at_enable_full_urc
        if p.has_clac:
            handlers["+CLAC"] = lambda op, arg: [*sorted(handlers), "+CLAC"]
        return handlers

    def _at_enable_full_urc(self, op: str, arg: str) -> list[str]:
        expected = self.profile.storage_full_urc_enable or ""
        if op == "=" and expected.endswith(arg.replace(" ", "")):
            self._settings.full_urc = True
        return []

    def _at_cmee(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return [f"+CMEE: {self._settings.cmee}"]
        if op == "=":
            self._settings.cmee = _int(arg, 0, 2)
        return []

    def _at_cpin(self, op: str, arg: str) -> list[str]:
        if not self.sim_present:
            raise self._cme(CME_SIM_NOT_INSERTED)
        if op == "?":
            if self._pin_unlocked:
                return ["+CPIN: READY"]
            return ["+CPIN: SIM PUK" if self._pin_attempts == 0 else "+CPIN: SIM PIN"]
        if op == "=":
            pin = arg.split(",")[0].strip('"')
            if self._pin_unlocked:
                return []
            if self._pin_attempts == 0:
                raise self._cme(CME_SIM_PUK_REQUIRED)
            if pin != self.sim.pin:
                self._pin_attempts -= 1
                raise self._cme(CME_INCORRECT_PASSWORD)
            self._pin_unlocked = True
            self._pin_attempts = PIN_ATTEMPTS
        return []

    def _at_cfun(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return ["+CFUN: 1"]
        if op == "=" and arg.replace(" ", "") == "1,1":  # reset after the OK
            threading.Timer(0.01, self.reboot).start()
        return []

    def _at_creg(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return [f"+CREG: {self._settings.creg_urc},{self.registration}"]
        if op == "=":
            self._settings.creg_urc = _int(arg, 0, 2)
        return []

    def _at_cops(self, op: str, arg: str) -> list[str]:
        if op == "?":
            if self.registration not in (REG_HOME, REG_ROAMING) or not self.sim_present:
                return ["+COPS: 0"]
            fmt = self._settings.cops_format
            name = self.sim.mcc_mnc if fmt == 2 else self.sim.operator
            act = "" if self.profile.access_technology is None else f",{self.profile.access_technology}"
            return [f'+COPS: 0,{fmt},"{name}"{act}']
        if op == "=":
            fields = arg.split(",")
            if fields[0] == "3" and len(fields) > 1:
                self._settings.cops_format = _int(fields[1], 0, 2)
        if op == "=?":
            return [f'+COPS: (2,"{self.sim.operator}","","{self.sim.mcc_mnc}"),,(0-4),(0-2)']
        return []

    def _at_cimi(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        return [self.sim.imsi]

    def _at_iccid(self, op: str, arg: str) -> list[str]:
        if not self.sim_present:
            raise self._cme(CME_SIM_NOT_INSERTED)
        return [f"{self.profile.iccid_prefix}{self.sim.iccid}"]

    def _at_cnum(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        if not self.sim.msisdn:
            return []
        toa = 145 if self.sim.msisdn.startswith("+") else 129
        return [f'+CNUM: "","{self.sim.msisdn}",{toa}']

    def _at_csca(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        if op == "?":
            toa = 145 if self.sim.smsc.startswith("+") else 129
            return [f'+CSCA: "{self.sim.smsc}",{toa}']
        if op == "=":
            self.sim.smsc = arg.split(",")[0].strip('"')
        return []

    def _at_cpms(self, op: str, arg: str) -> list[str]:
        storages = ",".join(f'"{s}"' for s in self.profile.storages)
        if op == "=?":
            return [f"+CPMS: ({storages}),({storages}),({storages})"]
        self._require_sim()
        with self._state_lock:
            if op == "=":
                wanted = [m.strip().strip('"').upper() for m in arg.split(",") if m.strip()]
                if not wanted or any(m not in self.profile.storages for m in wanted):
                    raise _AtError(f"+CMS ERROR: {CMS_MEMORY_FAILURE}")
                for i, mem in enumerate(wanted[:3]):
                    self._settings.mem[i] = mem
                return ["+CPMS: " + ",".join(self._usage(m) for m in self._settings.mem)]
            return ["+CPMS: " + ",".join(f'"{m}",{self._usage(m)}' for m in self._settings.mem)]

    def _usage(self, memory: str) -> str:
        return f"{len(self._storage[memory])},{self.profile.capacity[memory]}"

    def _at_cmgf(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return [f"+CMGF: {int(self._settings.text_mode)}"]
        if op == "=?":
            return ["+CMGF: (0,1)"]
        self._settings.text_mode = _int(arg, 0, 1) == 1
        return []

    def _at_cnmi(self, op: str, arg: str) -> list[str]:
        if op == "?":
            return ["+CNMI: " + ",".join(str(v) for v in self._settings.cnmi)]
        if op == "=?":
            return ["+CNMI: (0-2),(0-3),(0,2),(0-2),(0,1)"]
        values = [_int(v, 0, 3) if v.strip() else 0 for v in arg.split(",")]
        self._settings.cnmi = tuple(values + [0] * (5 - len(values)))
        return []

    def _at_cmgr(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        index = _int(arg, 0, 100000)
        with self._state_lock:
            if self._faults.read_errors > 0:
                self._faults.read_errors -= 1
                raise _AtError(f"+CMS ERROR: {self._faults.read_error_code}")
            stored = self._storage[self._settings.mem[0]].get(index)
            if stored is None:
                if self.profile.empty_read_error is None:
                    return []
                raise _AtError(f"+CMS ERROR: {self.profile.empty_read_error}")
            lines = self._format_message("+CMGR: ", None, stored)
            if stored.stat == 0:
                stored.stat = 1
            return lines

    def _at_cmgl(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        if op == "=?":
            return ["+CMGL: (0-4)"]
        wanted = arg.strip().strip('"').upper() or ("REC UNREAD" if self._settings.text_mode else "0")
        stat_filter = next((k for k, v in STAT_NAMES.items() if v == wanted), None)
        if stat_filter is None:
            stat_filter = _int(wanted, 0, 4)
        lines: list[str] = []
        with self._state_lock:
            for index, stored in sorted(self._storage[self._settings.mem[0]].items()):
                if stat_filter in (4, stored.stat):
                    lines += self._format_message("+CMGL: ", index, stored)
                    if stored.stat == 0:
                        stored.stat = 1
        return lines

    def _format_message(self, prefix: str, index: int | None, stored: _Stored) -> list[str]:
        lead = f"{index}," if index is not None else ""
        if not self._settings.text_mode:
            return [f"{prefix}{lead}{stored.stat},,{tpdu_length(stored.pdu)}", stored.pdu]
        sms = decode_deliver(stored.pdu)
        scts = sms.scts.strftime("%y/%m/%d,%H:%M:%S")
        offset = sms.scts.utcoffset()
        quarters = int(offset.total_seconds() // 900) if offset else 0
        return [
            f'{prefix}{lead}"{STAT_NAMES[stored.stat]}","{sms.sender.value}",,"{scts}{quarters:+03d}"',
            sms.text,
        ]

    def _finish_pdu_entry(self, pdu: str, cancelled: bool) -> None:
        """+CMGW's PDU arrived: store it as a sent-to-storage message, or refuse (full: 322)."""
        self._pdu_entry = None
        if cancelled:
            self._raw_write(b"\r\nOK\r\n")
            return
        memory = self._settings.mem[1]
        with self._state_lock:
            free = self._free_slots(memory)
            if not is_hex_pdu(pdu):
                answer = f"+CMS ERROR: {CMS_INVALID_PDU}"
            elif not free:
                answer = f"+CMS ERROR: {CMS_MEMORY_FULL}"
            else:
                self._storage[memory][free[0]] = _Stored(pdu.upper(), stat=2)  # STO UNSENT
                answer = f"+CMGW: {free[0]}\r\n\r\nOK"
        self._raw_write(f"\r\n{answer}\r\n".encode())

    def _at_cmgd(self, op: str, arg: str) -> list[str]:
        self._require_sim()
        if op == "=?":
            return ["+CMGD: (1-255),(0-4)"]
        fields = [f.strip() for f in arg.split(",")]
        index = _int(fields[0], 0, 100000)
        flag = _int(fields[1], 0, 4) if len(fields) > 1 and fields[1] else 0
        with self._state_lock:
            store = self._storage[self._settings.mem[0]]
            if flag == 0:
                store.pop(index, None)
            else:
                # 1: read, 2: read+sent, 3: read+sent+unsent, 4: all (TS 27.005 §3.5.4)
                doomed = {1: {1}, 2: {1, 3}, 3: {1, 2, 3}, 4: {0, 1, 2, 3}}[flag]
                for i in [i for i, s in store.items() if s.stat in doomed]:
                    del store[i]
        return []


class _AtError(Exception):
    def __init__(self, result: str) -> None:
        super().__init__(result)
        self.result = result


def _fixed_answer(lines: list[str]) -> Callable[[str, str], list[str]]:
    return lambda op, arg: list(lines)


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip().strip('"'))
    except ValueError:
        raise _AtError("ERROR") from None
    if not low <= value <= high:
        raise _AtError("ERROR")
    return value


@contextlib.contextmanager
def running(profile: str = "generic", **kwargs: object) -> Iterator[VirtualModem]:
    """A started virtual modem for the length of a ``with`` block."""
    modem = VirtualModem(profile, **kwargs)  # type: ignore[arg-type]
    modem.start()
    try:
        yield modem
    finally:
        modem.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI: run one virtual modem until Ctrl-C and print its port."""
    parser = argparse.ArgumentParser(prog="python -m hardware.virtual_modem", description=__doc__)
    parser.add_argument(
        "--profile", default="generic", help="modem model profile (sim800l, ec25, e3372, generic)"
    )
    parser.add_argument("--link", help="stable symlink to create for the pty, e.g. /tmp/ttyGSM0")
    parser.add_argument("--pin", help="SIM PIN the modem asks for")
    args = parser.parse_args(argv)
    try:
        modem = VirtualModem(args.profile, link=args.link, sim=SimCard(pin=args.pin))
    except ValueError as exc:
        parser.error(str(exc))
    modem.start()
    print(f"virtual modem ({modem.profile.name}) on {modem.port} -> {modem.pts}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        modem.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
