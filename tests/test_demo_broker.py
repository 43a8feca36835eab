"""The demo's embedded broker (``simnet.broker``: amqtt, MQTT 3.1.1) and the demo running on it.

The broker runs as the demo runs it, in its own process on a free loopback port; paho clients on
MQTTv311 check what the system relies on: retained state for a late subscriber, the last will of
a client killed mid-connection, a persistent session (clean session off) that keeps QoS 1
messages while its client is away, and a clean exit on SIGTERM. A short demo forced onto it must
measure deliveries and lose no observation; ``--broker mosquitto`` without mosquitto says so.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller import config as controller_config
from probe_agent import config as agent_config
from simnet import broker as embedded
from simnet import demo
from tests.mosquitto import free_port

TIMEOUT_S = 10.0
#: The short demo run: the shortest the demo accepts is DRAIN_S + 10 = 34 s; 45 s leaves about
#: 20 s of campaign before it pauses to decide the last tests.
DEMO_DURATION_S = 45


class Broker:
    """``python -m simnet.broker`` on a free port, as the demo starts it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log_path = workdir / "broker.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "simnet.broker", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + TIMEOUT_S
        while "listening on" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded broker did not start: {self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(TIMEOUT_S)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    started = Broker(tmp_path)
    yield started
    if started.proc.poll() is None:
        started.proc.kill()
        started.proc.wait()


class Client:
    """A paho client on MQTT 3.1.1, connected and looping; records (topic, payload, retain, qos)."""

    def __init__(
        self,
        port: int,
        client_id: str,
        *,
        clean_session: bool = True,
        subscribe: tuple[str, ...] = (),
        manual_ack: bool = False,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            manual_ack=manual_ack,
        )
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self._topics = subscribe
        self._ready = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(TIMEOUT_S):
            raise RuntimeError(f"{client_id} could not connect and subscribe")

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, rc: object, props: object
    ) -> None:
        self.session_present = flags.session_present
        if self._topics:
            client.subscribe([(topic, 1) for topic in self._topics])
        else:
            self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout_s: float = TIMEOUT_S) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{count} messages not seen; got {[m.topic for m in self.messages]}")
                self._cond.wait(remaining)
            return list(self.messages)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_retained_message_reaches_a_late_subscriber(broker: Broker) -> None:
    publisher = Client(broker.port, "agent")
    publisher.publish("pf/v1/agents/pi-1/status", b"online", retain=True)
    late = Client(broker.port, "late", subscribe=("pf/v1/agents/+/status",))
    [message] = late.wait_for(1)
    assert (message.topic, message.payload, message.retain) == ("pf/v1/agents/pi-1/status", b"online", True)
    publisher.close()
    late.close()


def test_will_is_published_when_a_client_is_killed(broker: Broker) -> None:
    watcher = Client(broker.port, "controller", subscribe=("pf/v1/agents/+/status",))
    agent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, paho.mqtt.client as mqtt\n"
            "c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id='agent', protocol=mqtt.MQTTv311)\n"
            "c.will_set('pf/v1/agents/pi-1/status', b'lost', qos=1, retain=True)\n"
            f"c.connect('127.0.0.1', {broker.port}, keepalive=30)\n"
            "c.loop_start()\n"
            "c.publish('pf/v1/agents/pi-1/status', b'online', qos=1, retain=True).wait_for_publish(10)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "ready"
        assert [m.payload for m in watcher.wait_for(1)] == [b"online"]
        agent.kill()  # no DISCONNECT: the broker must publish the will
        assert [m.payload for m in watcher.wait_for(2)] == [b"online", b"lost"]
    finally:
        agent.kill()
        agent.wait()
    watcher.close()
    late = Client(broker.port, "late-after-will", subscribe=("pf/v1/agents/pi-1/status",))
    received = [(m.payload, m.retain) for m in late.wait_for(1)]
    # The will is retained. amqtt 0.12 sometimes delivers that retained message twice to a new
    # subscriber (seen in about 1 run in 3, even with the watcher gone and a fresh client id; the
    # module docstring lists its retained-delivery defects): a copy is tolerated, nothing else.
    assert received[0] == (b"lost", True) and set(received) == {(b"lost", True)} and len(received) <= 2
    late.close()


def test_persistent_session_keeps_qos1_messages_while_the_client_is_away(broker: Broker) -> None:
    """The controller's session (clean session off): what agents publish while it restarts
    waits at the broker. amqtt drops such a session for a client it calls anonymous, which
    ``simnet.broker.OpenAuth`` avoids."""
    controller = Client(broker.port, "controller", clean_session=False, subscribe=("pf/v1/agents/+/sms",))
    controller.close()
    agent = Client(broker.port, "agent")
    for n in range(3):
        agent.publish("pf/v1/agents/pi-1/sms", f"observation {n}".encode())
    back = Client(broker.port, "controller", clean_session=False)  # no new SUBSCRIBE
    assert back.session_present is True
    messages = back.wait_for(3)
    assert [(m.payload, m.qos) for m in messages] == [
        (b"observation 0", 1),
        (b"observation 1", 1),
        (b"observation 2", 1),
    ]
    agent.close()
    back.close()


@pytest.mark.xfail(
    strict=True,
    reason="amqtt 0.12.1 forgets a QoS 1 message unacknowledged when its client disconnects "
    "(see simnet/broker.py); when this passes, update that docstring",
)
def test_unacknowledged_message_is_resent_after_a_reconnect(broker: Broker) -> None:
    controller = Client(
        broker.port, "controller", clean_session=False, subscribe=("pf/v1/agents/+/sms",), manual_ack=True
    )
    agent = Client(broker.port, "agent")
    agent.publish("pf/v1/agents/pi-1/sms", b"observation")
    controller.wait_for(1)  # received, never acknowledged (the write failed, the process died)
    controller.client.loop_stop()
    controller.client.socket().close()  # type: ignore[union-attr]
    time.sleep(0.5)
    back = Client(broker.port, "controller", clean_session=False, manual_ack=True)
    try:
        assert [m.payload for m in back.wait_for(1, timeout_s=3)] == [b"observation"]
    finally:
        agent.close()
        back.close()


def test_sigterm_stops_the_broker_cleanly(broker: Broker) -> None:
    client = Client(broker.port, "agent")
    started = time.monotonic()
    assert broker.stop() == 0
    assert time.monotonic() - started < 5
    client.close()
    log = broker.log_path.read_text()
    assert "embedded amqtt" in log and "MQTT 3.1.1" in log and "stopping" in log


def test_only_a_loopback_address_is_accepted() -> None:
    with pytest.raises(SystemExit) as exit_info:
        embedded.main(["--port", str(free_port()), "--host", "0.0.0.0"])
    assert exit_info.value.code == 2


def test_configs_for_the_embedded_broker_speak_3_1_1(tmp_path: Path) -> None:
    controller = demo.controller_toml(
        tmp_path / "controller.toml",
        broker_port=1883,
        api_port=8080,
        database=tmp_path / "controller.db",
        cadence_s=8,
        protocol="3.1.1",
    )
    agent = demo.agent_toml(
        tmp_path / "agent" / "agent.toml",
        pi={"id": "pi-1"},
        handsets=[
            {
                "modem": "m1",
                "port": "/dev/ttyGSM0",
                "profile": "sim800l",
                "mcc_mnc": "23415",
                "msisdn": "+447700900001",
            }
        ],
        broker_port=1883,
        protocol="3.1.1",
    )
    assert controller_config.load(controller).broker.protocol == "3.1.1"
    assert agent_config.load(agent).broker.protocol == "3.1.1"


def test_auto_is_mosquitto_when_installed_else_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: "/usr/sbin/mosquitto")
    assert demo.broker_kind("auto") == "mosquitto"
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: None)
    assert demo.broker_kind("auto") == "embedded"
    assert demo.broker_kind("mosquitto") == "mosquitto"


def test_forced_mosquitto_without_mosquitto_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "mosquitto_binary", lambda: None)
    code = demo.main(["--broker", "mosquitto", "--workdir", str(tmp_path), "--port", str(free_port())])
    assert code == 1
    err = capsys.readouterr().err
    assert "mosquitto is not installed" in err and "--broker embedded" in err


@pytest.mark.timeout(DEMO_DURATION_S + 60)
def test_demo_runs_on_the_embedded_broker(tmp_path: Path) -> None:
    workdir, report_path = tmp_path / "demo", tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--broker",
            "embedded",
            "--duration",
            str(DEMO_DURATION_S),
            "--report",
            str(report_path),
            "--workdir",
            str(workdir),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_DURATION_S + 45,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "broker   embedded amqtt" in run.stdout and "(MQTT 3.1.1)" in run.stdout
    accuracy = json.loads(report_path.read_text())["accuracy"]
    assert accuracy["tests"] > 0 and accuracy["delivered"] > 0, accuracy
    assert accuracy["lost_observations"] == 0, accuracy
    assert 'protocol = "3.1.1"' in (workdir / "controller.toml").read_text()
    assert all('protocol = "3.1.1"' in p.read_text() for p in (workdir / "agents").glob("*/agent.toml"))
    assert not (workdir / "mosquitto.conf").exists()
