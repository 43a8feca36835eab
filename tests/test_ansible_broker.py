"""The broker role (ansible/roles/broker): its password-file filter, its templates rendered from the
example inventory, and a real mosquitto started with exactly what they render (TLS with the
example certificate and its vaulted key, the password file, the ACL), driven by the agents' and the
controller's users as the wire contract has them talk. (ansible-lint of the whole tree, this role
included: tests/test_ansible_lint.py.)"""

from __future__ import annotations

import base64
import getpass
import hashlib
import importlib.util
import shutil
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with ansible-core, its stubs do not
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.ansible_env import (
    ANSIBLE_DIR,
    VAULT_PASSWORD_FILE,
    changed_tasks,
    chroot_apply,
    debian_root,
    play_recap,
    render_templates,
    run_ansible,
)
from tests.mosquitto import Mosquitto, free_port, require_mosquitto

ROLE = ANSIBLE_DIR / "roles" / "broker"
INVENTORY_DIR = ANSIBLE_DIR / "inventory" / "example"
#: The name the clients use (probe_fleet_broker_host) and the example certificate carries.
BROKER_NAME = "mqtt-1.example.net"
PREFIX = "pf/v1"
CONTROLLER = "probe-fleet-controller"
#: Two agents of the example inventory, and the third.
TMO, VF, EE = "pi-de-tmo-01", "pi-de-vf-01", "pi-gb-ee-01"
#: MQTT 5 reason codes mosquitto 2.0.11 answers with (a refused login too is "not authorized").
GRANTED_QOS_1 = 1
NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10  # a PUBACK's success code when nobody is subscribed
#: How long a test waits for the broker to answer or deliver, seconds.
WAIT_S = 5.0


def load_filter() -> ModuleType:
    """The role's filter plugin, imported from its file as Ansible loads it."""
    path = ROLE / "filter_plugins" / "mosquitto_passwd.py"
    spec = importlib.util.spec_from_file_location("broker_mosquitto_passwd", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FILTER = load_filter()


def vault(path: Path, home: Path) -> dict[str, Any]:
    """An example vault file, decrypted with the example password."""
    done = run_ansible(
        ["ansible-vault", "view", "--vault-password-file", str(VAULT_PASSWORD_FILE), str(path)], home
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = yaml.safe_load(done.stdout)
    return data


def passwords(home: Path) -> dict[str, str]:
    """Every MQTT user of the example inventory and its password, from the vaults."""
    found = {
        CONTROLLER: vault(INVENTORY_DIR / "group_vars" / "all" / "vault.yml", home)[
            "vault_probe_fleet_controller_mqtt_password"
        ]
    }
    for agent in (TMO, VF, EE):
        host_vault = INVENTORY_DIR / "host_vars" / agent / "vault.yml"
        found[agent] = vault(host_vault, home)["vault_probe_agent_mqtt_password"]
    return found


# --- The filter -------------------------------------------------------------------------------


def test_filter_reproduces_a_hash_mosquitto_passwd_made(tmp_path: Path) -> None:
    """Same format and arithmetic as mosquitto_passwd: with its salt, the same line."""
    require_mosquitto()
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "s3cret:pw"], check=True)
    user, line = pwfile.read_text().strip().split(":", 1)
    _, scheme, iterations, salt_b64, _digest = line.split("$")
    assert (user, scheme, iterations) == ("alice", "7", "101")
    salt = base64.b64decode(salt_b64)
    digest = hashlib.pbkdf2_hmac("sha512", b"s3cret:pw", salt, FILTER.DEFAULT_ITERATIONS)
    assert f"$7$101${salt_b64}${base64.b64encode(digest).decode()}" == line
    assert len(salt) == FILTER.SALT_BYTES


def test_filter_is_deterministic_per_user_password_and_secret() -> None:
    make = FILTER.mosquitto_passwd
    first = make("pw-1", "agent-a", "secret-0123456789")
    assert make("pw-1", "agent-a", "secret-0123456789") == first
    assert first.startswith("$7$101$")
    changed = {
        make("pw-2", "agent-a", "secret-0123456789"),
        make("pw-1", "agent-b", "secret-0123456789"),
        make("pw-1", "agent-a", "secret-9876543210"),
        make("pw-1", "agent-a", "secret-0123456789", 1000),
    }
    assert first not in changed and len(changed) == 4
    assert make("pw-1", "agent-a", "secret-0123456789", 1000).startswith("$7$1000$")
    # The salt is the user's alone: two users with one password do not share a hash.
    assert make("pw-1", "agent-a", "s" * 16).split("$")[3] != make("pw-1", "agent-b", "s" * 16).split("$")[3]


@pytest.mark.parametrize(
    ("password", "username", "secret", "iterations", "message"),
    [
        ("", "agent-a", "secret", 101, "password is empty"),
        ("pw", "", "secret", 101, "cannot be a user name"),
        ("pw", "a:b", "secret", 101, "cannot be a user name"),
        ("pw", "a\nb", "secret", 101, "cannot be a user name"),
        ("pw", "agent-a", "", 101, "salt secret is empty"),
        ("pw", "agent-a", "secret", 0, "at least 1"),
    ],
)
def test_filter_refuses_what_mosquitto_cannot_use(
    password: str, username: str, secret: str, iterations: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        FILTER.mosquitto_passwd(password, username, secret, iterations)


# --- The rendered broker ----------------------------------------------------------------------


@dataclass
class Rendered:
    """What the role rendered for mqtt-1, and a mosquitto running it."""

    workdir: Path
    port: int
    texts: dict[str, str]
    passwords: dict[str, str]
    broker: Mosquitto
    ca_file: Path


TEMPLATES = {"mosquitto.conf.j2": "mosquitto.conf", "passwd.j2": "passwd", "acl.j2": "acl"}


def render_broker(
    workdir: Path,
    home: Path,
    port: int,
    out: Path | None = None,
    templates: tuple[str, ...] = tuple(TEMPLATES),
    **overrides: object,
) -> dict[str, str]:
    """mosquitto.conf, passwd and acl as the role renders them for mqtt-1 into ``out`` (default
    ``workdir``), with this test's port and paths under ``workdir`` and ``overrides`` as extra vars;
    the role's filter plugin is linked into the stand-in role as Ansible finds it beside a role."""
    (home / "render" / "roles" / "broker").mkdir(parents=True, exist_ok=True)
    plugins = home / "render" / "roles" / "broker" / "filter_plugins"
    if not plugins.exists():
        plugins.symlink_to(ROLE / "filter_plugins")
    extra_vars: dict[str, object] = {
        "broker_port": port,
        "broker_bind_address": "127.0.0.1",
        "broker_tls_dir": str(workdir / "certs"),
        "broker_passwd_file": str(workdir / "passwd"),
        "broker_acl_file": str(workdir / "acl"),
        "broker_persistence_location": f"{workdir / 'data'}/",
        "broker_pid_file": "",
        "broker_log_dest": "stderr",
        # As root mosquitto drops to this user, who must read the files under tmp_path.
        "broker_run_user": getpass.getuser(),
        **overrides,
    }
    dests = {template: (out or workdir) / TEMPLATES[template] for template in templates}
    texts = render_templates("mqtt-1", "broker", dests, home, extra_vars)
    return {TEMPLATES[template]: text for template, text in texts.items()}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    """The role's three files rendered once for this module, the example certificate and its key
    from the vault beside them, and a real mosquitto started with them."""
    require_mosquitto()
    workdir = tmp_path_factory.mktemp("broker")
    home = tmp_path_factory.mktemp("ansible-home")
    port = free_port()
    texts = render_broker(workdir, home, port)
    certs = workdir / "certs"
    certs.mkdir()
    # What the role's copy tasks put in broker_tls_dir.
    shutil.copy(INVENTORY_DIR / "files" / "ca.crt", certs / "ca.crt")
    shutil.copy(INVENTORY_DIR / "files" / "mqtt-1.crt", certs / "server.crt")
    key = vault(INVENTORY_DIR / "host_vars" / "mqtt-1" / "vault.yml", home)["vault_broker_tls_key"]
    (certs / "server.key").write_text(key.strip() + "\n")
    (workdir / "data").mkdir()
    broker = Mosquitto(workdir, port=port).start()  # runs workdir/mosquitto.conf: the rendered one
    try:
        yield Rendered(workdir, port, texts, passwords(home), broker, certs / "ca.crt")
    finally:
        broker.stop()


class _BrokerNameContext(ssl.SSLContext):
    """Verifies the broker's certificate for the name the fleet uses while the test reaches it at
    127.0.0.1: the example certificate is checked as a real client checks it."""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["server_hostname"] = BROKER_NAME
        return super().wrap_socket(sock, *args, **kwargs)


class Peer:
    """One MQTT 5 client of the rendered broker over its TLS listener, recording what it gets."""

    def __init__(
        self,
        rendered: Rendered,
        username: str | None,
        password: str | None = None,
        client_id: str | None = None,
        session_expiry_s: int | None = None,
    ) -> None:
        self.name = username or "anonymous"
        self.session_expiry_s = session_expiry_s
        context = _BrokerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(rendered.ca_file))
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{self.name}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = rendered.port
        self.connack: ReasonCode | None = None
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda *args: self.disconnected.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, rcs: list[ReasonCode], props: Any
    ) -> None:
        with self._cond:
            self.subacks[mid] = rcs
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = self.topics()
                    raise AssertionError(
                        f"{self.name}: {what} not seen in {timeout_s} s; got {len(seen)}: {seen[-5:]}"
                    )
                self._cond.wait(remaining)

    def connect(self) -> int:
        """Connect and return the CONNACK's reason code (0: accepted); with a session expiry,
        resume the session the broker kept (as the controller does)."""
        properties = None
        if self.session_expiry_s is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.session_expiry_s
        self.client.connect(
            "127.0.0.1", self.port, clean_start=self.session_expiry_s is None, properties=properties
        )
        self.client.loop_start()
        self._wait(lambda: self.connack is not None, "CONNACK")
        assert self.connack is not None
        if self.connack.is_failure:  # no reconnect attempts in the background
            self.client.disconnect()
            self.client.loop_stop()
        return self.connack.value

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason code per filter (1: granted, 0x87: refused)."""
        result, mid = self.client.subscribe([(topic, 1) for topic in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
        self._wait(lambda: mid in self.subacks, "SUBACK")
        return [rc.value for rc in self.subacks[mid]]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0: accepted, 0x87: not authorized)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.pubacks, f"PUBACK of {topic}")
        return self.pubacks[info.mid].value

    def publish_many(self, topic: str, payloads: list[bytes]) -> list[int]:
        """Publish them all at QoS 1, then wait for every PUBACK; their reason codes."""
        infos = [self.client.publish(topic, payload, qos=1) for payload in payloads]
        self._wait(lambda: all(info.mid in self.pubacks for info in infos), f"{len(infos)} PUBACKs")
        return [self.pubacks[info.mid].value for info in infos]

    def count(self, topic: str, prefix: bytes) -> int:
        with self._cond:
            return sum(1 for t, p, _ in self.messages if t == topic and p.startswith(prefix))

    def wait_for_count(self, topic: str, prefix: bytes, count: int) -> None:
        self._wait(lambda: self.count(topic, prefix) >= count, f"{count} messages on {topic}")

    def wait_for(self, topic: str, payload: bytes) -> None:
        self._wait(lambda: (topic, payload) in [(t, p) for t, p, _ in self.messages], f"{topic} {payload!r}")

    def topics(self) -> list[str]:
        with self._cond:
            return [topic for topic, _, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(rendered: Rendered) -> Iterator[Callable[..., Peer]]:
    """Connected clients by user name (the inventory's password unless one is given)."""
    made: list[Peer] = []

    def connect(username: str, password: str | None = None) -> Peer:
        peer = Peer(rendered, username, rendered.passwords[username] if password is None else password)
        assert peer.connect() == 0, f"{username} was refused"
        made.append(peer)
        return peer

    yield connect
    for peer in made:
        peer.close()


def agent_topics(agent: str) -> dict[str, str]:
    """Every topic an agent publishes, by kind."""
    base = f"{PREFIX}/agents/{agent}"
    return {
        "status": f"{base}/status",
        "modem_state": f"{base}/modems/modem-a/state",
        "health": f"{base}/health",
        "sms": f"{base}/sms",
        "response": f"{base}/response/time",
    }


#: What the controller subscribes to (controller/mqtt.py, with a shared group for observations).
CONTROLLER_FILTERS = (
    f"{PREFIX}/agents/+/status",
    f"{PREFIX}/agents/+/modems/+/state",
    f"{PREFIX}/agents/+/health",
    f"{PREFIX}/agents/+/response/+",
    f"$share/ingest/{PREFIX}/agents/+/sms",
)


def test_the_rendered_config_is_the_fleet_s(rendered: Rendered) -> None:
    """TLS on the inventory's port only, nobody anonymous, persistence, the sized queue."""
    conf = rendered.texts["mosquitto.conf"].splitlines()
    listeners = [line for line in conf if line.startswith("listener ")]
    assert listeners == [f"listener {rendered.port} 127.0.0.1"]
    for line in (
        "allow_anonymous false",
        "per_listener_settings false",
        "persistence true",
        "autosave_interval 60",
        "max_queued_messages 120000",
        f"max_queued_bytes {120000 * 4096}",
        "queue_qos0_messages false",
        "persistent_client_expiration 7d",
        "tls_version tlsv1.2",
        f"certfile {rendered.workdir}/certs/server.crt",
        f"keyfile {rendered.workdir}/certs/server.key",
    ):
        assert line in conf
    users = [
        line.split(":", 1)[0] for line in rendered.texts["passwd"].splitlines() if not line.startswith("#")
    ]
    assert sorted(users) == sorted([CONTROLLER, TMO, VF, EE])


def test_rendering_again_gives_the_same_files(rendered: Rendered, tmp_path: Path) -> None:
    """The salts are derived, not random, and the agents are sorted (ansible-core 2.19 lists the
    hosts of a group of groups in a different order from one run to the next): a second run of
    the role changes nothing."""
    again = render_broker(
        rendered.workdir, tmp_path / "home", rendered.port, tmp_path, ("passwd.j2", "acl.j2")
    )
    assert again == {name: rendered.texts[name] for name in ("passwd", "acl")}


def test_an_agent_publishes_under_its_own_topics_and_the_controller_gets_all(
    rendered: Rendered, peers: Callable[..., Peer]
) -> None:
    controller = peers(CONTROLLER)
    assert controller.subscribe(*CONTROLLER_FILTERS) == [GRANTED_QOS_1] * len(CONTROLLER_FILTERS)
    agent = peers(TMO)
    run = uuid.uuid4().hex.encode()
    sent = []
    for kind, topic in agent_topics(TMO).items():
        assert agent.publish(topic, run, retain=kind in ("status", "modem_state", "health")) == 0, kind
        sent.append(topic)
    for topic in sent:
        controller.wait_for(topic, run)
    assert sorted(t for t, p, _ in controller.messages if p == run) == sorted(sent)


def test_an_agent_cannot_write_under_another_agent(rendered: Rendered, peers: Callable[..., Peer]) -> None:
    """pi-de-tmo-01 writing any of pi-de-vf-01's topics, a request, or the controller's topics is
    refused (PUBACK 0x87) and nothing of it reaches the controller or pi-de-vf-01."""
    controller = peers(CONTROLLER)
    controller.subscribe(*CONTROLLER_FILTERS)
    victim = peers(VF)
    assert (
        victim.subscribe(
            f"{PREFIX}/agents/{VF}/request/+", f"{PREFIX}/agents/{VF}/status", f"{PREFIX}/controller/status"
        )
        == [GRANTED_QOS_1] * 3
    )
    intruder = peers(TMO)
    run = uuid.uuid4().hex.encode()
    forbidden = [
        *agent_topics(VF).values(),
        f"{PREFIX}/agents/{VF}/request/reload",
        f"{PREFIX}/agents/{TMO}/request/reload",  # not even its own: requests come from the controller
        f"{PREFIX}/controller/status",
        f"{PREFIX}/controller/routing-table",
        f"{PREFIX}/agents/{VF}",
        "elsewhere/topic",
    ]
    for topic in forbidden:
        assert intruder.publish(topic, run, retain=True) == NOT_AUTHORIZED, topic
    # mosquitto handles one connection's packets in order: once this marker has gone through,
    # anything refused before it would have arrived already.
    marker = f"{PREFIX}/agents/{TMO}/sms"
    assert intruder.publish(marker, run) == 0
    controller.wait_for(marker, run)
    assert [t for t, p, _ in controller.messages if p == run] == [marker]
    assert [t for t, p, _ in victim.messages if p == run] == []


def test_an_agent_cannot_read_another_agent_s_requests(
    rendered: Rendered, peers: Callable[..., Peer]
) -> None:
    """mosquitto 2.0 grants every subscription and checks read access per message as it delivers:
    an agent subscribed to another agent's requests, or to the whole tree, gets its own only."""
    controller = peers(CONTROLLER)
    owner = peers(VF)
    assert owner.subscribe(f"{PREFIX}/agents/{VF}/request/+") == [GRANTED_QOS_1]
    spy = peers(TMO)
    theirs, mine = f"{PREFIX}/agents/{VF}/request/time", f"{PREFIX}/agents/{TMO}/request/time"
    assert spy.subscribe(f"{PREFIX}/agents/{VF}/request/+", f"{PREFIX}/#", "#", mine) == [GRANTED_QOS_1] * 4
    run = uuid.uuid4().hex.encode()
    assert controller.publish(theirs, run) == 0
    assert controller.publish(mine, run) == 0
    owner.wait_for(theirs, run)
    # The controller's two publishes are delivered in order: once its second is in, the first
    # would be too.
    spy.wait_for(mine, run)
    assert {t for t, p, _ in spy.messages if p == run} == {mine}
    assert theirs not in spy.topics()


def test_the_controller_sends_requests_and_agents_read_its_topics(
    rendered: Rendered, peers: Callable[..., Peer]
) -> None:
    """The controller's requests reach the agent; its retained status and routing table reach
    every agent; the agent's response comes back."""
    controller = peers(CONTROLLER)
    assert controller.subscribe(f"{PREFIX}/agents/+/response/+") == [GRANTED_QOS_1]
    run = uuid.uuid4().hex.encode()
    assert controller.publish(f"{PREFIX}/controller/status", run, retain=True) == NO_MATCHING_SUBSCRIBERS
    assert (
        controller.publish(f"{PREFIX}/controller/routing-table", run, retain=True) == NO_MATCHING_SUBSCRIBERS
    )
    agent = peers(EE)
    assert (
        agent.subscribe(
            f"{PREFIX}/agents/{EE}/request/+", f"{PREFIX}/agents/{EE}/status", f"{PREFIX}/controller/status"
        )
        == [GRANTED_QOS_1] * 3
    )
    assert agent.subscribe(f"{PREFIX}/controller/routing-table") == [GRANTED_QOS_1]
    agent.wait_for(f"{PREFIX}/controller/status", run)
    agent.wait_for(f"{PREFIX}/controller/routing-table", run)
    assert controller.publish(f"{PREFIX}/agents/{EE}/request/time", run) == 0
    agent.wait_for(f"{PREFIX}/agents/{EE}/request/time", run)
    assert agent.publish(f"{PREFIX}/agents/{EE}/response/time", run) == 0
    controller.wait_for(f"{PREFIX}/agents/{EE}/response/time", run)
    # Requests are the controller's to write, not to read.
    assert controller.subscribe(f"{PREFIX}/agents/+/request/+") == [GRANTED_QOS_1]
    assert controller.publish(f"{PREFIX}/agents/{EE}/request/reload", run) == 0
    agent.wait_for(f"{PREFIX}/agents/{EE}/request/reload", run)
    assert controller.publish(f"{PREFIX}/agents/{EE}/response/reload", run) == NOT_AUTHORIZED
    assert agent.publish(f"{PREFIX}/agents/{EE}/response/reload", run) == 0
    controller.wait_for(f"{PREFIX}/agents/{EE}/response/reload", run)
    assert f"{PREFIX}/agents/{EE}/request/reload" not in controller.topics()


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (TMO, "wrong-password"),
        (TMO, None),  # pi-de-vf-01's password: each agent has its own
        ("pi-unknown-99", "whatever"),
        (CONTROLLER, "wrong-password"),
    ],
)
def test_a_wrong_password_is_refused(rendered: Rendered, username: str, password: str | None) -> None:
    peer = Peer(rendered, username, rendered.passwords[VF] if password is None else password)
    assert peer.connect() == NOT_AUTHORIZED


def test_an_anonymous_client_is_refused(rendered: Rendered) -> None:
    assert Peer(rendered, None).connect() == NOT_AUTHORIZED


def test_a_reload_takes_a_rotated_password_and_drops_only_its_old_connection(
    rendered: Rendered, peers: Callable[..., Peer], tmp_path: Path
) -> None:
    """What rotate-credentials.yml relies on. A new controller password in the vault changes its
    line of the password file only. On a reload (SIGHUP, the role's handler) mosquitto 2.0.11
    checks the connected clients again, whatever its man page says: the controller, still
    logged in with the old password, is dropped; the agents, whose passwords did not change, stay
    connected; from then on only the new password logs in."""
    new_password = "rotated-" + uuid.uuid4().hex
    rotated = render_broker(
        rendered.workdir,
        tmp_path / "home",
        rendered.port,
        tmp_path,
        ("passwd.j2",),
        vault_probe_fleet_controller_mqtt_password=new_password,
    )["passwd"]
    before = rendered.texts["passwd"].splitlines()
    after = rotated.splitlines()
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [
        i for i, line in enumerate(before) if line.startswith(f"{CONTROLLER}:")
    ]
    controller = peers(CONTROLLER)  # logged in with the old password
    agent = peers(TMO)
    passwd = rendered.workdir / "passwd"

    def login(password: str) -> int:
        peer = Peer(rendered, CONTROLLER, password)
        code = peer.connect()
        if code == 0:
            peer.close()
        return code

    try:
        passwd.write_text(rotated)
        assert rendered.broker.proc is not None
        rendered.broker.proc.send_signal(signal.SIGHUP)
        assert controller.disconnected.wait(WAIT_S), "the old password's connection was kept"
        assert login(new_password) == 0
        assert login(rendered.passwords[CONTROLLER]) == NOT_AUTHORIZED
        assert agent.publish(f"{PREFIX}/agents/{TMO}/health", b"{}") == NO_MATCHING_SUBSCRIBERS
        assert not agent.disconnected.is_set()
    finally:
        passwd.write_text(rendered.texts["passwd"])
        assert rendered.broker.proc is not None
        rendered.broker.proc.send_signal(signal.SIGHUP)


def test_the_controller_s_session_keeps_results_across_its_absence_and_a_broker_restart(
    rendered: Rendered, peers: Callable[..., Peer]
) -> None:
    """The controller's persistent session (clean start off, a session expiry) queues the
    observations sent while it is away, beyond mosquitto's default limit of 1000 queued messages,
    and the broker's persistence keeps the queue over its own restart."""
    client_id = f"test-controller-{uuid.uuid4().hex[:8]}"
    sms = f"{PREFIX}/agents/{TMO}/sms"
    controller = Peer(rendered, CONTROLLER, rendered.passwords[CONTROLLER], client_id, session_expiry_s=3600)
    assert controller.connect() == 0
    assert controller.subscribe(f"$share/ingest/{PREFIX}/agents/+/sms") == [GRANTED_QOS_1]
    controller.close()  # a clean stop: the session stays for session_expiry_s
    run = uuid.uuid4().hex.encode()
    queued = 1500
    agent = peers(TMO)
    assert set(agent.publish_many(sms, [run + b"-%d" % i for i in range(queued)])) == {0}
    agent.close()
    rendered.broker.stop()  # saves the queue in the persistence file ...
    rendered.broker.start()  # ... and restores it
    back = Peer(rendered, CONTROLLER, rendered.passwords[CONTROLLER], client_id, session_expiry_s=3600)
    try:
        assert back.connect() == 0
        back.wait_for_count(sms, run, queued)
        received = sorted(p for t, p, _ in back.messages if t == sms and p.startswith(run))
        assert received == sorted(run + b"-%d" % i for i in range(queued))
    finally:
        back.close()


# --- The role applied to a real Debian root -----------------------------------------------------


def apply_in_chroot(root: Path, host: str, role: str, home: Path, extra: dict[str, object]) -> str:
    """Apply ``role`` to ``host`` in the chroot ``root``; its output (the caller asserts on the recap)."""
    done = run_ansible(chroot_apply(root, host, role, home.parent, extra), home)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(900)
def test_role_applies_to_a_fresh_bookworm_root_and_a_second_apply_changes_nothing(tmp_path: Path) -> None:
    root = debian_root(tmp_path / "root")  # skips when debootstrap cannot run here
    home = tmp_path / "home"
    first = apply_in_chroot(root, "mqtt-1", "broker", home, {})
    assert play_recap(first)["mqtt-1"]["changed"] > 0
    second = apply_in_chroot(root, "mqtt-1", "broker", home, {})
    assert play_recap(second)["mqtt-1"]["changed"] == 0, f"the second apply changed {changed_tasks(second)}"

    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    mosquitto_gid = int(groups["mosquitto"][2])
    etc = root / "etc" / "mosquitto"
    for name, mode in {
        "certs": 0o750,
        "certs/ca.crt": 0o644,
        "certs/server.crt": 0o644,
        "certs/server.key": 0o640,
        "passwd": 0o640,
        "acl": 0o640,
    }.items():
        stat = (etc / name).stat()
        assert (stat.st_mode & 0o777, stat.st_uid, stat.st_gid) == (mode, 0, mosquitto_gid), name
    assert (etc / "certs" / "server.crt").read_bytes() == (
        INVENTORY_DIR / "files" / "mqtt-1.crt"
    ).read_bytes()
    conf = (etc / "mosquitto.conf").read_text()
    assert "listener 8883\n" in conf and "password_file /etc/mosquitto/passwd" in conf
    # The users are the inventory's, hashed so that mosquitto takes the vault's passwords.
    lines = dict(line.split(":", 1) for line in (etc / "passwd").read_text().splitlines() if ":" in line)
    assert sorted(lines) == sorted([CONTROLLER, TMO, VF, EE])
    secret = vault(INVENTORY_DIR / "group_vars" / "brokers" / "vault.yml", home)[
        "vault_broker_passwd_salt_secret"
    ]
    for user, password in passwords(home).items():
        assert lines[user] == FILTER.mosquitto_passwd(password, user, secret)
    enabled = subprocess.run(
        ["chroot", str(root), "systemctl", "is-enabled", "mosquitto.service"], capture_output=True, text=True
    )
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
