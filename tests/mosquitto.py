"""A real mosquitto per test, on a free loopback port with the test's own config (auth, ACL, TLS),
and a small paho subscriber that records what the broker delivers."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trustme


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    """One mosquitto process; ``stop()`` and ``start()`` again keep the same port and config."""

    workdir: Path
    port: int = field(default_factory=free_port)
    users: dict[str, str] = field(default_factory=dict)
    acl: str | None = None
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None
    ca: trustme.CA | None = None

    @property
    def ca_file(self) -> Path:
        return self.workdir / "ca.pem"

    def write_config(self) -> Path:
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "max_queued_messages 0"]
        if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot read tmp_path
            lines.append(f"user {getpass.getuser()}")
        if self.users:
            pwfile = self.workdir / "passwd"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None:
            aclfile = self.workdir / "acl"
            aclfile.write_text(self.acl)
            lines.append(f"acl_file {aclfile}")
        if self.tls:
            self.ca = trustme.CA()
            cert = self.ca.issue_cert("127.0.0.1", "localhost")
            self.ca.cert_pem.write_to_path(str(self.ca_file))
            cert.private_key_and_cert_chain_pem.write_to_path(str(self.workdir / "server.pem"))
            cert.private_key_pem.write_to_path(str(self.workdir / "server.key"))
            cert.cert_chain_pems[0].write_to_path(str(self.workdir / "server.crt"))
            lines += [
                f"cafile {self.ca_file}",
                f"certfile {self.workdir / 'server.crt'}",
                f"keyfile {self.workdir / 'server.key'}",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self) -> Mosquitto:
        conf = self.workdir / "mosquitto.conf"
        if not conf.exists():
            conf = self.write_config()
        log = open(self.workdir / "mosquitto.log", "ab")  # noqa: SIM115  kept open for the process
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.workdir / "mosquitto.log").read_text()) from None
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (.ci/run installs it with apt)")


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto of this test's own, on a free port, default config (no auth, no TLS)."""
    require_mosquitto()
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


class Recorder:
    """A paho subscriber (MQTT 5) that records every message it gets: (topic, payload, retain)."""

    def __init__(
        self,
        broker: Mosquitto,
        topics: Iterable[str],
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self._topics = list(topics)
        self._ready = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("recorder could not subscribe")

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        client.subscribe([(topic, 1) for topic in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload, bool(message.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: object, timeout_s: float = 10.0) -> list[tuple[str, bytes, bool]]:
        """Wait until ``predicate(messages)`` holds; returns the messages."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"not seen in {timeout_s} s; got {[m[0] for m in self.messages][-20:]}"
                    )
                self._cond.wait(remaining)
            return list(self.messages)

    def payloads(self, topic_suffix: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.messages if t.endswith(topic_suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def connected_client(
    broker: Mosquitto, username: str | None = None, password: str | None = None
) -> mqtt.Client:
    """A paho client (MQTT 5), connected and looping, for publishing from a test."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    if broker.tls:
        client.tls_set(ca_certs=str(broker.ca_file))
    ready = threading.Event()
    client.on_connect = lambda *args: ready.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    if not ready.wait(10):
        raise RuntimeError("test client could not connect")
    return client
