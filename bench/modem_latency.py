"""Modem-layer latency benchmark: how true the agent's SMS arrival stamp is, and how soon it has the SMS.

Over N messages delivered by a virtual modem and read by the real python-gsmmodem-new library
through the agent's ``ModemPort`` on a real pty, it measures

* the arrival-stamp error: ``sms.arrived_at`` minus the instant the modem wrote the ``+CMTI`` URC;
* the ready delay: when ``async for`` yields the complete SMS minus that same instant (it includes
  the library's ``AT+CMGR`` round trip and the delete);

and, in the same run as a baseline, the raw pty write-to-read delay of a URC-sized line read by a
pyserial thread the way our reader reads. The modem and the baseline writer each run in a child
process: on a Pi the modem is separate hardware, and sharing the agent's interpreter (and GIL)
would measure the test rig instead of the agent.

Messages are sent one at a time, each once the previous one is in, after a 2 ms gap, starting
once the port has finished its start-up sweep: this measures the steady state, not queueing.

Run from the project root: ``.venv/bin/python bench/modem_latency.py [--messages 1000]``.
Exit code 0 even when a goal is missed; 1 when messages were lost.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import tty
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serial

from probe_agent.modem import ModemPort
from probe_agent.received import ReceivedSms

GOAL_STAMP_ERR_P99_MS = 2.0
GOAL_READY_P99_MS = 25.0
#: Pause after each reception before the next send, so queueing does not dominate.
GAP_S = 0.002
#: How long one message may take before the next is sent anyway (it still counts if it comes).
MESSAGE_TIMEOUT_S = 5.0
URC_LINE = b'\r\n+CMTI: "SM",1\r\n'
SENDER = "+447700900123"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _progress(what: str, done: int, total: int) -> None:
    if done % 100 == 0 or done == total:
        print(f"{what}: {done}/{total}", file=sys.stderr, flush=True)


def _ns(dt: datetime) -> int:
    """A UTC datetime as integer ns since the epoch (exact to its microsecond)."""
    return (dt - _EPOCH) // timedelta(microseconds=1) * 1000


def _percentile(values_ms: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN when there is no sample."""
    if not values_ms:
        return math.nan
    ordered = sorted(values_ms)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- child processes (the "hardware") ------------------------------------------------------------


def _modem_server(profile: str, conn: Connection) -> None:
    """Child: run a virtual modem, send its port, answer ("deliver", sender, text) until ("stop",)."""
    from hardware.virtual_modem import VirtualModem

    modem = VirtualModem(profile).start()
    conn.send(modem.port)
    try:
        while True:
            request = conn.recv()
            if request[0] != "deliver":
                break
            d = modem.deliver(request[1], request[2])
            conn.send((d.urc_ns, d.pdus))
    finally:
        modem.stop()


def _pty_writer(conn: Connection) -> None:
    """Child: open a pty, send the slave's path, write one URC line per "write" and reply its ns."""
    master, slave = os.openpty()
    tty.setraw(slave)
    conn.send(os.ttyname(slave))
    try:
        while conn.recv() == "write":
            os.write(master, URC_LINE)
            conn.send(time.time_ns())
    finally:
        os.close(master)
        os.close(slave)


# --- baseline ------------------------------------------------------------------------------------


def measure_baseline(ctx: Any, count: int) -> list[float]:
    """Raw pty write-to-read delays (ms): child writes, a pyserial thread here reads like ours."""
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_pty_writer, args=(child_conn,), daemon=True)
    child.start()
    path = conn.recv()
    # The same settings as the library's SerialComms.connect().
    ser = serial.Serial(port=path, baudrate=115200, timeout=1, dsrdtr=True, rtscts=True)
    stamps: queue.Queue[int] = queue.Queue()
    alive = True

    def read_loop() -> None:
        buffer = b""
        while alive:
            chunk = ser.read(ser.in_waiting or 1)
            if not chunk:
                continue
            ns = time.time_ns()
            buffer += chunk
            while b"\r\n" in buffer:
                line, _, buffer = buffer.partition(b"\r\n")
                if line:
                    stamps.put(ns)

    reader = threading.Thread(target=read_loop, name="baseline reader", daemon=True)
    reader.start()
    delays: list[float] = []
    try:
        for i in range(count):
            conn.send("write")
            written = conn.recv()
            try:
                delays.append((stamps.get(timeout=MESSAGE_TIMEOUT_S) - written) / 1e6)
            except queue.Empty:
                print(f"baseline: line {i} not read", file=sys.stderr)
            time.sleep(GAP_S)
            _progress("baseline", i + 1, count)
    finally:
        alive = False
        ser.cancel_read()
        reader.join(2)
        ser.close()
        conn.send("stop")
        child.join(5)
    return delays


# --- the modem port ------------------------------------------------------------------------------


async def _request(conn: Connection, message: tuple[Any, ...]) -> Any:
    """Send a request to a child and await its reply without blocking the event loop."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        conn.send(message)
        await readable
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


async def measure_modem(ctx: Any, profile: str, count: int) -> tuple[list[float], list[float], int]:
    """(stamp errors ms, ready delays ms, lost count) over ``count`` messages through ModemPort."""
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_modem_server, args=(profile, child_conn), daemon=True)
    child.start()
    port_path = conn.recv()
    port = ModemPort(port_path, profile=None if profile == "generic" else profile)
    arrivals: dict[str, tuple[int, ReceivedSms]] = {}
    waiters: dict[str, asyncio.Future[None]] = {}

    async def receive() -> None:
        async for sms in port.received():
            ready_ns = time.time_ns()
            key = sms.pdus[0] if sms.pdus else ""
            arrivals[key] = (ready_ns, sms)
            waiter = waiters.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    sent: list[tuple[int | None, str]] = []  # (urc_ns, first PDU); no urc_ns if the modem hung
    receiver: asyncio.Task[None] | None = None
    try:
        await port.start()
        if not await port.wait_connected(15):
            print("modem did not come up:", (await port.state()).last_error, file=sys.stderr)
            return [], [], count
        await port.state(refresh=True)  # answered once the start-up sweep is over: steady state
        receiver = asyncio.create_task(receive())
        loop = asyncio.get_running_loop()
        for i in range(count):
            urc_ns, pdus = await _request(conn, ("deliver", SENDER, f"probe-fleet bench message {i:06d}"))
            sent.append((urc_ns, pdus[0]))
            if pdus[0] not in arrivals:
                waiters[pdus[0]] = loop.create_future()
                try:
                    await asyncio.wait_for(waiters[pdus[0]], MESSAGE_TIMEOUT_S)
                except TimeoutError:
                    waiters.pop(pdus[0], None)
                    print(f"modem: message {i} not received within {MESSAGE_TIMEOUT_S} s", file=sys.stderr)
            await asyncio.sleep(GAP_S)
            _progress("modem", i + 1, count)
        if any(pdu not in arrivals for _, pdu in sent):
            await asyncio.sleep(MESSAGE_TIMEOUT_S)  # a last chance for stragglers
    finally:
        await port.stop()
        conn.send(("stop",))
        child.join(5)
    if receiver is not None:
        await receiver
    errors: list[float] = []
    ready: list[float] = []
    lost = 0
    for urc_ns, pdu in sent:
        if pdu not in arrivals or urc_ns is None:
            lost += 1
            continue
        ready_ns, sms = arrivals[pdu]
        errors.append((_ns(sms.arrived_at) - urc_ns) / 1e6)
        ready.append((ready_ns - urc_ns) / 1e6)
    return errors, ready, lost + count - len(sent)


def main(argv: list[str] | None = None) -> int:
    """Run the baseline and the modem measurement, print the table, goals and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, help="messages (and baseline samples)")
    parser.add_argument("--profile", default="generic", help="virtual modem model (default generic)")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    baseline = measure_baseline(ctx, args.messages)
    errors, ready, lost = asyncio.run(measure_modem(ctx, args.profile, args.messages))

    rows = [
        ("arrival-stamp error", errors),
        ("ready delay", ready),
        ("baseline pty write->read", baseline),
    ]
    print(f"modem latency, profile {args.profile}, {args.messages} messages, {os.cpu_count()} CPUs")
    print(f"{'figure (ms)':<26}{'n':>6}{'p50':>10}{'p99':>10}{'max':>10}")
    for name, values in rows:
        p50, p99, top = _percentile(values, 50), _percentile(values, 99), max(values, default=math.nan)
        print(f"{name:<26}{len(values):>6}{p50:>10.3f}{p99:>10.3f}{top:>10.3f}")
    err_p99, ready_p99, base_p99 = (_percentile(v, 99) for _, v in rows)

    def ratio(x: float) -> float:
        return x / base_p99 if base_p99 > 0 else math.nan

    print(f"stamp error p99 / baseline p99 = {ratio(err_p99):.2f}")
    print(f"ready delay p99 / baseline p99 = {ratio(ready_p99):.2f}")
    for label, value, goal in (
        ("arrival-stamp error p99", err_p99, GOAL_STAMP_ERR_P99_MS),
        ("ready delay p99", ready_p99, GOAL_READY_P99_MS),
    ):
        print(f"goal {label} <= {goal:g} ms: {value:.3f} ms {'PASS' if value <= goal else 'FAIL'}")
    if lost:
        print(f"LOST: {lost} of {args.messages} messages never received")
    print(
        f"modem_stamp_err_ms_p99 {err_p99:.3f} modem_ready_ms_p99 {ready_p99:.3f} "
        f"baseline_ms_p99 {base_p99:.3f}"
    )
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
