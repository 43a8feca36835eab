"""The agent's clock estimate, and its side of the controller's NTP-style time exchange.

Every observation carries how far the agent's clock is believed to be off true time, so the
controller can correct latencies measured across two machines. The estimate comes from chrony
when chronyd runs and is synchronised (``chronyc -c tracking``), else from the controller's
``time`` command: the controller sends t1, the agent answers with t2 (request received) and t3
(reply sent) on its own clock, the controller stamps t4 and computes the offset, which it sends
back in its next request for the agent to report.

Sign convention, everywhere: ``offset_ms`` is the agent's clock minus true time; subtract it
from an agent timestamp to correct it.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from probe_agent.protocol import ClockState, TimeRequestData, TimeResponseData

log = logging.getLogger(__name__)

#: Added to the system clock in everything the agent stamps (``clock.shift_s`` in its config): an
#: emulated Pi whose clock is off, for simnet's demo and the end-to-end test. 0 on a real Pi.
_shift_ns = 0


def set_shift(seconds: float) -> None:
    """Make this process's wall clock ``seconds`` off the system's (emulation only)."""
    global _shift_ns
    _shift_ns = round(seconds * 1e9)


def wall_ns() -> int:
    """The agent's wall clock, ns since the Unix epoch: the one source of every stamp it takes."""
    return time.time_ns() + _shift_ns


def utc_now() -> datetime:
    """The agent's wall clock as a tz-aware UTC datetime."""
    return datetime.fromtimestamp(wall_ns() / 1e9, UTC)


#: chronyc answers from the local daemon in well under a millisecond; a second means it hangs
#: (chronyd wedged, or a remote socket timing out), and the heartbeat must not wait on it.
CHRONYC_TIMEOUT_S = 1.0

#: Leap statuses of a synchronised chronyd; "Not synchronised" (and "Invalid") give no estimate.
SYNCHRONISED_LEAP = frozenset({"Normal", "Insert second", "Delete second"})

#: Fields of ``chronyc -c tracking`` after the reference id and name, in order (chrony's
#: client.c, process_cmd_tracking; in CSV mode print_report prints each value raw and signed).
_TRACKING_TAIL = 12

_US = timedelta(microseconds=1)

#: Runs a command with a timeout (s) and returns its completed process; raises OSError when the
#: binary cannot be run and subprocess.TimeoutExpired when it overruns.
Runner = Callable[[Sequence[str], float], subprocess.CompletedProcess[str]]


def run_command(args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """The default runner: the real command, output captured as text."""
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, check=False)


def ntp_offset(t1: datetime, t2: datetime, t3: datetime, t4: datetime) -> tuple[float, float]:
    """``(offset_ms, round_trip_ms)`` of one exchange, NTP style.

    t1 controller sent, t2 agent received, t3 agent replied, t4 controller received. The offset
    ``((t2-t1)+(t3-t4))/2`` is the agent's clock minus the controller's; the round trip is
    ``(t4-t1)-(t3-t2)``, and the offset's error bound is half of it. Computed in whole
    microseconds, so the arithmetic is exact.
    """
    offset_us = (t2 - t1) // _US + (t3 - t4) // _US
    round_trip_us = (t4 - t1) // _US - (t3 - t2) // _US
    return offset_us / 2000, round_trip_us / 1000


@dataclass(frozen=True)
class ChronyTracking:
    """One ``chronyc -c tracking`` line. Times in seconds, frequencies in ppm, as chrony gives them."""

    ref_id: str
    name: str
    stratum: int
    ref_time: float  # seconds since the epoch of the last reference update; 0 before any
    system_time_s: float  # chrony's remaining correction: positive when the clock is slow
    last_offset_s: float
    rms_offset_s: float
    frequency_ppm: float
    residual_freq_ppm: float
    skew_ppm: float
    root_delay_s: float
    root_dispersion_s: float
    update_interval_s: float
    leap_status: str

    @property
    def synchronised(self) -> bool:
        """Whether chronyd is synchronised, so that its offset is an estimate at all."""
        return self.leap_status in SYNCHRONISED_LEAP

    @property
    def offset_ms(self) -> float:
        """Local clock minus true time: chrony's "System time" with the sign turned, since chrony
        reports the correction still to apply (positive = "slow of NTP time")."""
        return -self.system_time_s * 1000

    @property
    def error_ms(self) -> float:
        """Error bound of that offset: root dispersion plus half the root delay (chronyc(1))."""
        return (self.root_dispersion_s + self.root_delay_s / 2) * 1000


def parse_tracking(line: str) -> ChronyTracking:
    """Parse one line of ``chronyc -c tracking``; ValueError when it is not one.

    The fields are: reference id (hex), name or address, stratum, reference time (epoch
    seconds), system time, last offset, RMS offset, frequency, residual frequency, skew, root
    delay, root dispersion, update interval, leap status. The tail is read from the right, so a
    comma in the name field cannot shift it.
    """
    fields = line.strip().split(",")
    if len(fields) < 2 + _TRACKING_TAIL:
        raise ValueError(f"expected {2 + _TRACKING_TAIL} fields, got {len(fields)}")
    head, tail = fields[:-_TRACKING_TAIL], fields[-_TRACKING_TAIL:]
    numbers = [float(value) for value in tail[1:-1]]
    leap = tail[-1]
    if not leap:
        raise ValueError("empty leap status")
    return ChronyTracking(
        ref_id=head[0],
        name=",".join(head[1:]),
        stratum=int(tail[0]),
        ref_time=numbers[0],
        system_time_s=numbers[1],
        last_offset_s=numbers[2],
        rms_offset_s=numbers[3],
        frequency_ppm=numbers[4],
        residual_freq_ppm=numbers[5],
        skew_ppm=numbers[6],
        root_delay_s=numbers[7],
        root_dispersion_s=numbers[8],
        update_interval_s=numbers[9],
        leap_status=leap,
    )


@dataclass(frozen=True)
class _Estimate:
    offset_ms: float
    error_ms: float | None
    age_s: float  # seconds since the sync when it was read
    read_at: float  # monotonic time it was read


class Clock:
    """The agent's clock and what it knows of its offset.

    ``now`` is the clock the agent stamps with (tests shift it); ``chronyc`` is the binary to
    ask, or None / empty to not use chrony; ``monotonic`` measures the age of an estimate;
    ``runner`` runs chronyc (tests feed recorded output through it).
    """

    def __init__(
        self,
        now: Callable[[], datetime] | None = None,
        chronyc: str | None = "chronyc",
        monotonic: Callable[[], float] = time.monotonic,
        *,
        runner: Runner = run_command,
    ) -> None:
        self._now = now or utc_now
        self._chronyc = chronyc or None
        self._monotonic = monotonic
        self._runner = runner
        self._lock = threading.Lock()
        self._chrony: _Estimate | None = None
        self._controller: _Estimate | None = None
        self._chrony_status: str | None = None  # last one logged, so each change is logged once
        self.tracking: ChronyTracking | None = None
        """The last line chronyc gave, synchronised or not."""

    def now(self) -> datetime:
        """The agent's current time, tz-aware UTC."""
        value = self._now()
        if value.tzinfo is None:
            raise ValueError("the clock source returned a naive datetime")
        return value.astimezone(UTC)

    def answer(self, request: TimeRequestData, received_at: datetime) -> TimeResponseData:
        """Reply to the controller's ``time`` request received at ``received_at`` (agent clock).

        When the request carries the offset the controller computed from the previous exchange,
        it becomes the controller estimate; it is reported while chrony has none.
        """
        if request.offset_ms is not None:
            with self._lock:
                self._controller = _Estimate(request.offset_ms, request.error_ms, 0.0, self._monotonic())
            log.debug(
                "clock offset from the controller: %.3f ms (± %s ms)", request.offset_ms, request.error_ms
            )
        return TimeResponseData(t1=request.t1, t2=received_at, t3=self.now())

    def refresh(self) -> None:
        """Read chrony's tracking, when configured; never raises.

        Blocks for up to CHRONYC_TIMEOUT_S: from a coroutine, use ``refresh_async``.
        """
        if self._chronyc is None:
            return
        args = [self._chronyc, "-c", "tracking"]
        try:
            proc = self._runner(args, CHRONYC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._no_chrony(f"chronyc timed out after {CHRONYC_TIMEOUT_S:g} s")
            return
        except (OSError, ValueError) as exc:  # ValueError: output that is not text
            self._no_chrony(f"chronyc cannot run: {exc}")
            return
        output = (proc.stdout or "").strip()
        if proc.returncode != 0:
            said = output or (proc.stderr or "").strip()
            self._no_chrony(f"chronyc exited {proc.returncode}: {said.splitlines()[0] if said else ''}")
            return
        try:
            tracking = parse_tracking(output.splitlines()[-1] if output else "")
        except ValueError as exc:
            self._no_chrony(f"chronyc output not understood ({exc}): {output[:200]!r}")
            return
        self.tracking = tracking
        if not tracking.synchronised:
            self._no_chrony(f"chronyd is not synchronised (leap status {tracking.leap_status!r})")
            return
        age_s = max(0.0, self.now().timestamp() - tracking.ref_time)
        with self._lock:
            self._chrony = _Estimate(tracking.offset_ms, tracking.error_ms, age_s, self._monotonic())
        if self._chrony_status != "synchronised":
            log.debug(
                "clock estimate from chrony: %.3f ms (± %.3f ms), reference %s",
                tracking.offset_ms,
                tracking.error_ms,
                tracking.name or tracking.ref_id,
            )
            self._chrony_status = "synchronised"

    async def refresh_async(self) -> None:
        """``refresh`` in a worker thread, so the event loop never waits on chronyc."""
        await asyncio.to_thread(self.refresh)

    def state(self) -> ClockState:
        """The current estimate: chrony's when synchronised, else the controller's, else none."""
        with self._lock:
            if self._chrony is not None:
                return self._state(self._chrony, "chrony")
            if self._controller is not None:
                return self._state(self._controller, "controller")
        return ClockState(offset_ms=None, error_ms=None, source="none", since_sync_s=None)

    def _state(self, estimate: _Estimate, source: Literal["chrony", "controller"]) -> ClockState:
        return ClockState(
            offset_ms=estimate.offset_ms,
            error_ms=estimate.error_ms,
            source=source,
            since_sync_s=estimate.age_s + max(0.0, self._monotonic() - estimate.read_at),
        )

    def _no_chrony(self, problem: str) -> None:
        with self._lock:
            self._chrony = None
        if problem != self._chrony_status:
            # Once per change: chronyd absent is the normal case on many Pis, not news every heartbeat.
            log.debug("no clock estimate from chrony: %s", problem)
            self._chrony_status = problem
