"""What the benchmarks share: a mosquitto of their own, child processes on a Pipe, CPU readings.

Each benchmark runs the parts it measures against in child processes (a modem is separate
hardware, a publisher another machine), so they never share the measured process's interpreter.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil


def log(text: str) -> None:
    """A progress line on stderr (stdout holds the results)."""
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_mosquitto(
    workdir: Path, stack: contextlib.ExitStack, extra: Iterable[str] = ()
) -> tuple[int, subprocess.Popen[bytes]]:
    """A mosquitto of our own on a free loopback port (never the system's 1883); its port and
    process, stopped when ``stack`` closes. ``max_queued_messages 0``: nothing dropped for a slow
    or absent persistent session."""
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_queued_messages 0",
        *extra,
    ]
    if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot read workdir
        lines.append(f"user {getpass.getuser()}")
    conf = workdir / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log_path = workdir / "mosquitto.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=log_file, stderr=log_file, start_new_session=True
        )
    stack.callback(stop_process, proc, "mosquitto")
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return port, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {log_path.read_text()}") from None
            time.sleep(0.02)


def start_process(
    args: list[str], name: str, log_path: Path, stack: contextlib.ExitStack, cwd: Path
) -> subprocess.Popen[bytes]:
    """A project process (agent, controller) logging to ``log_path``; stopped with SIGTERM when
    ``stack`` closes, and the tail of its log printed if the benchmark fails."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            start_new_session=True,  # Ctrl-C reaches only us; we stop it cleanly
        )
    stack.callback(stop_process, proc, name)

    def tail_on_error(exc_type: type[BaseException] | None, *_: object) -> None:
        lines = log_path.read_text(errors="replace").splitlines()
        if exc_type is not None and lines:
            log(f"{name} log ({len(lines)} lines), last 20:\n  " + "\n  ".join(lines[-20:]))

    stack.push(tail_on_error)
    return proc


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not stop in ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop on SIGTERM; killing it")
            proc.kill()
            proc.wait(10)


def reply(conn: Connection, child: Any, what: str, timeout_s: float) -> Any:
    """The child's next message; an error if it exits first or says nothing for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if not child.is_alive():
            raise RuntimeError(f"{what}: the child process exited ({child.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no answer within {timeout_s:g} s")
    return conn.recv()


def start_child(
    ctx: Any, target: Callable[..., None], args: tuple[Any, ...], stack: contextlib.ExitStack
) -> tuple[Any, Connection]:
    """A spawned child with a Pipe as its last argument, stopped on the way out."""
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=target, args=(*args, child_conn), daemon=True)
    child.start()
    child_conn.close()  # ours: so a dead child reads as EOF, never as a hang
    stack.callback(stop_child, child, conn)
    return child, conn


def stop_child(child: Any, conn: Connection) -> None:
    """Ask a child to stop, then make sure it did."""
    if child.is_alive():
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stop",))  # small: never blocks on a full pipe
    child.join(10)
    if child.is_alive():
        child.terminate()
        child.join(5)


def cpu_s(proc: psutil.Process) -> float:
    """User plus system CPU seconds of a process (NaN once it is gone)."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return math.nan
    return float(t.user + t.system)
