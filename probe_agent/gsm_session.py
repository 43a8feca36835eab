"""The one adapter to python-gsmmodem-new: its AT session, with the line reader made safe.

The library does the serial session, command/response matching and modem set-up well. Three
things it gets wrong for a probe are owned here, small:

* its read loop decodes every line as strict UTF-8, so one garbage byte on the line kills the
  reader thread silently; ours decodes with replacement and reports any crash as fatal;
* it treats a URC that arrives while a command waits for its answer as part of that answer, so
  ``+CMTI`` lines are lost under load; ours routes URC lines to the URC handler whatever is
  pending;
* it takes no timestamp; ours stamps each chunk the moment ``read()`` returns it, which is the
  arrival time the agent reports (the bench measures its error against the virtual modem).

Everything SMS-specific (raw PDU reads, decoding, reassembly) lives above this, in ``modem``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import serial
from gsmmodem.modem import GsmModem

from hardware.modem_profiles import PROFILES
from probe_agent.clock import wall_ns

log = logging.getLogger(__name__)

#: Line starts that are never part of a command's answer: new-message indications and the
#: status/noise URCs of the supported models (banners, signal, mode, storage full).
_PROFILE_URCS = {line.split(":")[0] for p in PROFILES.values() for line in (*p.noise, *p.banner)} | {
    p.storage_full_urc.split(":")[0] for p in PROFILES.values() if p.storage_full_urc
}
URC_PREFIXES: tuple[str, ...] = tuple(
    sorted(
        {"+CMTI:", "+CMT:", "+CDSI:", "+CIEV:", "RING", "+CLIP:", "NO CARRIER"}
        | (_PROFILE_URCS - {"+CPIN", "+CFUN"})  # banner lines that also answer AT+CPIN? / AT+CFUN?
    )
)

#: Called from the reader thread with one unsolicited line and the ns wall-clock stamp of the
#: read that completed it. Must be quick: it runs on the only thread reading the port.
UrcHandler = Callable[[str, int], None]
FatalHandler = Callable[[BaseException], None]


class GsmSession(GsmModem):  # type: ignore[misc]
    """``gsmmodem.GsmModem`` with a robust, timestamping line reader and URC routing."""

    alive: bool  # set by the library's SerialComms; typed here for mypy

    def __init__(
        self,
        port: str,
        *,
        on_urc: UrcHandler,
        on_fatal: FatalHandler,
        command_timeout_s: float = 5.0,
        cnmi: str = "2,1,0,0,0",
        baudrate: int = 115200,
    ) -> None:
        super().__init__(port, baudrate, AT_CNMI=cnmi, requestDelivery=False)
        self._on_urc = on_urc
        self.fatalErrorCallback = on_fatal
        # Something must be set or the library skips +CNMI; our URC handler does the work.
        self.smsReceivedCallback = self._unused_callback
        self.command_timeout_s = command_timeout_s
        self._pending_cmt: tuple[str, int] | None = None
        self._stamp_ns = 0
        #: Lines dropped as line noise (undecodable bytes), for the modem state.
        self.noise_lines = 0

    @staticmethod
    def _unused_callback(sms: Any) -> None:
        log.warning("library SMS callback called unexpectedly: %r", sms)

    def write(
        self,
        data: str,
        waitForResponse: bool = True,
        timeout: float | None = None,
        parseError: bool = True,
        writeTerm: str = "\r",
        expectedResponseTermSeq: str | None = None,
    ) -> list[str] | None:
        """The library's write, with our command timeout as the default."""
        result: list[str] | None = super().write(
            data,
            waitForResponse=waitForResponse,
            timeout=self.command_timeout_s if timeout is None else timeout,
            parseError=parseError,
            writeTerm=writeTerm,
            expectedResponseTermSeq=expectedResponseTermSeq,
        )
        return result

    def _readLoop(self) -> None:
        """Read whatever is waiting, split CR LF lines, stamp, dispatch; never die silently."""
        try:
            buffer = b""
            port: serial.Serial = self.serial
            while self.alive:
                chunk = port.read(port.in_waiting or 1)
                if not chunk:
                    continue
                self._stamp_ns = wall_ns()
                buffer += chunk
                while True:
                    line_bytes, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    if line_bytes:
                        self._handleLineRead(self._decode(line_bytes))
                term = self._expectResponseTermSeq
                if term and buffer.endswith(bytes(term)):
                    text, buffer = self._decode(buffer), b""
                    self._handleLineRead(text, checkForResponseTerm=False)
        except Exception as exc:  # serial errors (unplug) and anything unexpected alike
            self.alive = False
            try:
                self.serial.close()
            except Exception:
                log.debug("closing a dead port failed", exc_info=True)
            self.fatalErrorCallback(exc)

    def _decode(self, raw: bytes) -> str:
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text:
            # Bytes that are no AT text: keep the readable tail (a line glued to noise).
            self.noise_lines += 1
            text = text.rsplit("\ufffd", 1)[1].strip()
        return text

    def _handleLineRead(self, line: str, checkForResponseTerm: bool = True) -> None:
        if not line:
            return
        if self._pending_cmt is not None:
            (header, stamp), self._pending_cmt = self._pending_cmt, None
            self._on_urc(f"{header}\n{line}", stamp)  # stamped at its header, like a +CMTI
            return
        if line.startswith(URC_PREFIXES):
            if line.startswith("+CMT:"):
                self._pending_cmt = (line, self._stamp_ns)  # the PDU follows on the next line
            else:
                self._on_urc(line, self._stamp_ns)
            return
        if self._responseEvent and not self._responseEvent.is_set():
            super()._handleLineRead(line, checkForResponseTerm)
        else:
            self._on_urc(line, self._stamp_ns)

    def close_quietly(self) -> None:
        """Close the port and stop the reader, whatever state they are in."""
        self.alive = False
        ser = getattr(self, "serial", None)
        if ser is not None:
            try:
                ser.cancel_read()  # wake the reader now instead of after its 1 s read timeout
            except Exception:
                log.debug("cancelling the read failed", exc_info=True)
        thread = getattr(self, "rxThread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        if ser is not None:
            try:
                ser.close()
            except Exception:
                log.debug("closing the port failed", exc_info=True)
