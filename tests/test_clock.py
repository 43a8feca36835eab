"""The agent's clock: the NTP arithmetic, the time exchange with a shifted agent clock, the
controller's estimate, and chrony's tracking report.

chronyd cannot run in this sandbox (it needs CAP_SYS_TIME and owns the system clock), so the
chrony tests feed recorded ``chronyc -c tracking`` lines through the injectable runner; the
field order and signs follow chrony's client.c (``process_cmd_tracking``, ``print_report`` in
CSV mode). The process wiring itself (missing binary, exit status, output, timeout) is tested
with the real subprocess runner on stand-in scripts.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from probe_agent.clock import CHRONYC_TIMEOUT_S, Clock, ntp_offset, parse_tracking
from probe_agent.protocol import TimeRequestData, TimeResponseData

REF_TIME = 1_795_687_200.5  # 2026-11-26T10:00:00.5Z, chrony's reference time in epoch seconds

# The clock 250 us slow of NTP time ("System time : 0.000250000 seconds slow of NTP time").
SLOW = (
    "C0A80001,192.168.0.1,3,1795687200.500000000,0.000250000,-0.000006747,0.000035822,"
    "-3.225,-0.000,0.129,0.013639022,0.001100737,64.2,Normal"
)
# The clock 12.5 ms fast ("System time : 0.012500000 seconds fast of NTP time").
FAST = (
    "C0A80001,192.168.0.1,2,1795687200.500000000,-0.012500000,0.000100000,0.000200000,"
    "1.500,0.001,0.050,0.002000000,0.000500000,16.0,Normal"
)
# chronyd running, no source reached yet.
UNSYNCHRONISED = (
    "00000000,,0,0.000000000,0.000000000,0.000000000,0.000000000,0.000,0.000,0.000,"
    "1.000000000,1.000000000,0.0,Not synchronised"
)


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorded:
    """A runner answering with a recorded chronyc result, remembering what it was asked."""

    def __init__(self, stdout: str = "", returncode: int = 0, raises: BaseException | None = None) -> None:
        self.stdout, self.returncode, self.raises = stdout, returncode, raises
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(args), timeout_s))
        if self.raises is not None:
            raise self.raises
        return subprocess.CompletedProcess(list(args), self.returncode, self.stdout, "")


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def chrony_clock(runner: Recorded, mono: FakeMonotonic, now_s: float = REF_TIME + 40) -> Clock:
    return Clock(now=lambda: at(now_s), chronyc="chronyc", monotonic=mono, runner=runner)


# --- NTP arithmetic -----------------------------------------------------------------------------


def test_ntp_offset_exact() -> None:
    base = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    t1 = base
    t2 = base + timedelta(milliseconds=300)  # agent stamps: 300 = 250 ahead + 50 on the way out
    t3 = base + timedelta(milliseconds=302)  # 2 ms spent answering
    t4 = base + timedelta(milliseconds=104)  # controller: 50 out + 2 + 52 back
    offset_ms, round_trip_ms = ntp_offset(t1, t2, t3, t4)
    # ((300 - 0) + (302 - 104)) / 2 = 249; (104 - 0) - (302 - 300) = 102
    assert offset_ms == 249.0
    assert round_trip_ms == 102.0


def test_ntp_offset_negative_and_microseconds() -> None:
    base = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    us = timedelta(microseconds=1)
    offset_ms, round_trip_ms = ntp_offset(base, base - 999 * us, base - 500 * us, base + 1_001 * us)
    # ((-999) + (-500 - 1001)) / 2 = -1250 us; 1001 - (-500 + 999) = 502 us
    assert offset_ms == -1.25
    assert round_trip_ms == 0.502


# --- The time exchange --------------------------------------------------------------------------


def exchange(clock: Clock, previous: tuple[float, float] | None = None) -> tuple[float, float]:
    """One exchange as the controller runs it, with t1/t4 from the true clock, through JSON."""
    t1 = datetime.now(UTC)
    data: dict[str, object] = {"t1": t1}
    if previous is not None:
        data["offset_ms"], data["error_ms"] = previous
    request = TimeRequestData.model_validate_json(TimeRequestData.model_validate(data).to_json())
    received_at = clock.now()
    reply = TimeResponseData.model_validate_json(clock.answer(request, received_at).to_json())
    t4 = datetime.now(UTC)
    assert reply.t1 == t1
    assert reply.t2 == received_at
    assert reply.t2 <= reply.t3
    return ntp_offset(reply.t1, reply.t2, reply.t3, t4)


def test_exchange_with_agreeing_clocks() -> None:
    offset_ms, round_trip_ms = exchange(Clock(chronyc=None))
    assert abs(offset_ms) < 2
    assert 0 <= round_trip_ms < 50


def test_exchange_with_agent_clock_250_ms_ahead() -> None:
    clock = Clock(now=lambda: datetime.now(UTC) + timedelta(milliseconds=250), chronyc=None)
    offset_ms, round_trip_ms = exchange(clock)
    assert offset_ms == pytest.approx(250, abs=2)
    assert 0 <= round_trip_ms < 50
    assert clock.state().source == "none"  # nothing adopted before the controller sends it


def test_exchange_with_agent_clock_behind() -> None:
    clock = Clock(now=lambda: datetime.now(UTC) - timedelta(seconds=3, milliseconds=40), chronyc=None)
    offset_ms, _ = exchange(clock)
    assert offset_ms == pytest.approx(-3040, abs=2)


def test_controller_offset_adopted_and_aged() -> None:
    mono = FakeMonotonic()
    clock = Clock(now=lambda: datetime.now(UTC) + timedelta(milliseconds=250), chronyc=None, monotonic=mono)
    first = exchange(clock)
    exchange(clock, previous=(first[0], first[1] / 2))
    state = clock.state()
    assert state.source == "controller"
    assert state.offset_ms == first[0]
    assert state.error_ms == first[1] / 2
    assert state.since_sync_s == 0.0
    mono.t += 7.5
    assert clock.state().since_sync_s == 7.5
    assert clock.state().offset_ms == pytest.approx(250, abs=2)


def test_answer_stamps_t3_after_t2_from_the_injected_clock() -> None:
    ticks = iter([at(REF_TIME + 1)])
    clock = Clock(now=lambda: next(ticks), chronyc=None)
    reply = clock.answer(TimeRequestData(t1=at(REF_TIME), offset_ms=None, error_ms=None), at(REF_TIME + 0.5))
    assert (reply.t1, reply.t2, reply.t3) == (at(REF_TIME), at(REF_TIME + 0.5), at(REF_TIME + 1))


def test_naive_clock_source_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        Clock(now=datetime.now, chronyc=None).now()


# --- chrony ---------------------------------------------------------------------------------------


def test_parse_tracking_fields() -> None:
    tracking = parse_tracking(SLOW)
    assert tracking.ref_id == "C0A80001"
    assert tracking.name == "192.168.0.1"
    assert tracking.stratum == 3
    assert tracking.ref_time == REF_TIME
    assert tracking.system_time_s == 0.00025
    assert tracking.frequency_ppm == -3.225
    assert tracking.root_delay_s == 0.013639022
    assert tracking.root_dispersion_s == 0.001100737
    assert tracking.update_interval_s == 64.2
    assert tracking.leap_status == "Normal"
    assert tracking.synchronised


def test_parse_tracking_rejects_other_output() -> None:
    for line in ("", "506 Cannot talk to daemon", SLOW.replace("0.000250000", "slow"), SLOW + ","):
        with pytest.raises(ValueError):
            parse_tracking(line)


def test_chrony_clock_slow_gives_negative_offset() -> None:
    runner, mono = Recorded(SLOW + "\n"), FakeMonotonic()
    clock = chrony_clock(runner, mono)
    clock.refresh()
    assert runner.calls == [(["chronyc", "-c", "tracking"], CHRONYC_TIMEOUT_S)]
    state = clock.state()
    assert state.source == "chrony"
    assert state.offset_ms == pytest.approx(-0.25)  # slow of true time: local minus true < 0
    assert state.error_ms == pytest.approx(1.100737 + 13.639022 / 2)
    assert state.since_sync_s == pytest.approx(40.0)
    mono.t += 5
    assert clock.state().since_sync_s == pytest.approx(45.0)


def test_chrony_clock_fast_gives_positive_offset() -> None:
    clock = chrony_clock(Recorded(FAST), FakeMonotonic())
    clock.refresh()
    state = clock.state()
    assert state.source == "chrony"
    assert state.offset_ms == pytest.approx(12.5)
    assert state.error_ms == pytest.approx(0.5 + 1.0)


def test_chrony_unsynchronised_gives_no_estimate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="probe_agent.clock")
    clock = chrony_clock(Recorded(UNSYNCHRONISED), FakeMonotonic())
    clock.refresh()
    assert clock.state().source == "none"
    assert clock.state().offset_ms is None
    assert clock.tracking is not None and clock.tracking.leap_status == "Not synchronised"
    assert any("not synchronised" in r.getMessage() for r in caplog.records)


def test_chronyd_not_running_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="probe_agent.clock")
    clock = chrony_clock(Recorded("506 Cannot talk to daemon\n", returncode=1), FakeMonotonic())
    for _ in range(3):
        clock.refresh()
    assert clock.state().source == "none"
    messages = [r.getMessage() for r in caplog.records if r.name == "probe_agent.clock"]
    assert messages == ["no clock estimate from chrony: chronyc exited 1: 506 Cannot talk to daemon"]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "probe_agent.clock")


def test_chrony_falls_back_to_controller_and_back() -> None:
    runner, mono = Recorded(FAST), FakeMonotonic()
    clock = chrony_clock(runner, mono)
    clock.refresh()
    clock.answer(TimeRequestData(t1=at(REF_TIME), offset_ms=99.0, error_ms=3.0), at(REF_TIME))
    assert clock.state().source == "chrony"  # a synchronised chrony wins over the controller
    assert clock.state().offset_ms == pytest.approx(12.5)
    runner.stdout, runner.returncode = "506 Cannot talk to daemon\n", 1
    mono.t += 2
    clock.refresh()
    state = clock.state()
    assert (state.source, state.offset_ms, state.error_ms, state.since_sync_s) == (
        "controller",
        99.0,
        3.0,
        2.0,
    )
    runner.stdout, runner.returncode = FAST, 0
    clock.refresh()
    assert clock.state().source == "chrony"


def test_chrony_binary_missing_real_subprocess(tmp_path: Path) -> None:
    clock = Clock(chronyc=str(tmp_path / "no-such-chronyc"))
    clock.refresh()
    assert clock.state().source == "none"


def test_chronyc_errors_never_raise() -> None:
    for runner in (
        Recorded(raises=FileNotFoundError(2, "No such file or directory", "chronyc")),
        Recorded(raises=PermissionError(13, "Permission denied", "chronyc")),
        Recorded(raises=subprocess.TimeoutExpired(["chronyc"], CHRONYC_TIMEOUT_S)),
        Recorded("garbage\n"),
        Recorded(""),
    ):
        clock = chrony_clock(runner, FakeMonotonic())
        clock.refresh()
        assert clock.state().source == "none", runner


def test_chrony_disabled_never_runs() -> None:
    for chronyc in (None, ""):
        runner = Recorded(SLOW)
        clock = Clock(chronyc=chronyc, runner=runner)
        clock.refresh()
        assert runner.calls == []
        assert clock.state().source == "none"


def fake_chronyc(tmp_path: Path, body: str) -> str:
    script = tmp_path / "chronyc"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_real_subprocess_reads_a_recorded_line(tmp_path: Path) -> None:
    chronyc = fake_chronyc(tmp_path, f'[ "$1 $2" = "-c tracking" ] || exit 3\necho "{FAST}"')
    clock = Clock(now=lambda: at(REF_TIME + 1), chronyc=chronyc)
    clock.refresh()
    assert clock.state().source == "chrony"
    assert clock.state().offset_ms == pytest.approx(12.5)


def test_real_subprocess_daemon_not_running(tmp_path: Path) -> None:
    chronyc = fake_chronyc(tmp_path, 'echo "506 Cannot talk to daemon"\nexit 1')
    clock = Clock(chronyc=chronyc)
    clock.refresh()
    assert clock.state().source == "none"


def test_real_subprocess_timeout(tmp_path: Path) -> None:
    clock = Clock(chronyc=fake_chronyc(tmp_path, "exec sleep 5"))  # exec: the killed child holds the pipe
    started = datetime.now(UTC)
    clock.refresh()
    assert clock.state().source == "none"
    assert datetime.now(UTC) - started < timedelta(seconds=CHRONYC_TIMEOUT_S + 2)


async def test_refresh_async_runs_off_the_loop() -> None:
    clock = chrony_clock(Recorded(SLOW), FakeMonotonic())
    await clock.refresh_async()
    assert clock.state().source == "chrony"
