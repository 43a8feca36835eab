"""The sd_notify protocol: tell systemd the agent is ready, alive, stopping, and how it is doing.

Under a ``Type=notify`` unit with ``WatchdogSec=``, systemd sets $NOTIFY_SOCKET (a datagram
socket: a path, or an abstract name written with a leading '@') and $WATCHDOG_USEC; the agent
sends ``READY=1`` once it runs and ``WATCHDOG=1`` more often than the watchdog interval, or
systemd restarts it. The protocol is one datagram of newline-separated assignments, so it is
implemented here rather than pulled in as a dependency. Outside systemd every call is a no-op
that returns False.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The socket address of a $NOTIFY_SOCKET value, or None for a kind not supported here."""
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's vsock: addresses, used only for VMs


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; True if it was sent, False when not under
    systemd or when the socket cannot be reached."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET %r is not a socket path or abstract name; not notifying systemd", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the agent's event loop on a reader that is not reading: drop instead.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd on %s (%s): %s", value, state.split("\n", 1)[0], exc)
        return False
    return True


def ready() -> bool:
    """Startup is complete (``READY=1``)."""
    return notify("READY=1")


def stopping() -> bool:
    """A clean stop has begun (``STOPPING=1``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status for ``systemctl status`` (``STATUS=...``); line breaks become spaces."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog() -> bool:
    """The agent is alive (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None when there is no watchdog for
    this process ($WATCHDOG_PID names another one, or a value is unset or invalid). Ping at
    half of it at most."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
