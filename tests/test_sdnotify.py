"""sd_notify against real AF_UNIX datagram sockets, as systemd listens: one bound to a path under
the test's tmp dir, one in the abstract namespace; the exact datagrams are checked."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent import sdnotify


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    assert len(os.fsencode(path)) < 108, "AF_UNIX path limit"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"probe-fleet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_path_socket_gets_exact_datagrams(path_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert path_socket.recv(4096) == b"READY=1"
    assert sdnotify.watchdog() is True
    assert path_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.status("spool 3, modems 2/2") is True
    assert path_socket.recv(4096) == b"STATUS=spool 3, modems 2/2"
    assert sdnotify.stopping() is True
    assert path_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert abstract_socket.recv(4096) == b"READY=1"
    assert sdnotify.notify("WATCHDOG=1\nSTATUS=ok") is True
    assert abstract_socket.recv(4096) == b"WATCHDOG=1\nSTATUS=ok"


def test_status_is_one_line_utf8(path_socket: socket.socket) -> None:
    assert sdnotify.status("modem m1 lost\nretrying — ünïcode")
    assert path_socket.recv(4096) == "STATUS=modem m1 lost retrying — ünïcode".encode()


def test_not_under_systemd() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False


def test_nobody_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@probe-fleet-test-{uuid.uuid4().hex}")
    assert sdnotify.ready() is False


def test_unsupported_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("2500000", "self", 2.5),
        ("30000000", "other", None),
        ("30000000", "not-a-pid", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    elif pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval_s() == expected


def test_a_reader_that_does_not_read_never_blocks_the_sender(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watchdog pings into a full socket buffer are dropped, not waited on (the agent's event
    loop sends them)."""
    import time

    start = time.monotonic()
    results = [sdnotify.watchdog() for _ in range(2000)]
    assert time.monotonic() - start < 10
    assert results[0] is True and results[-1] is False
