"""The probe agent end to end: a real ``probe-agent run`` process, real virtual modems on ptys,
a real mosquitto started by the test on a free port with its own config. Nothing is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hardware.virtual_modem import VirtualModem
from probe_agent.protocol import AgentStatus, ModemState, Observation
from tests.mosquitto import Mosquitto, Recorder, connected_client, require_mosquitto

P = "pf/v1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    require_mosquitto()
    started: list[Mosquitto] = []

    def factory(**kwargs: object) -> Mosquitto:
        workdir = tmp_path / f"broker{len(started)}"
        workdir.mkdir()
        b = Mosquitto(workdir, **kwargs).start()  # type: ignore[arg-type]
        started.append(b)
        return b

    yield factory
    for b in started:
        b.stop()


def agent_toml(
    path: Path,
    broker: Mosquitto,
    modems: list[tuple[str, str]],
    agent_id: str = "pi-uk-1",
    extra_broker: str = "",
    spool: Path | None = None,
) -> Path:
    modem_blocks = "".join(
        f'\n[[modems]]\nid = "{mid}"\nport = "{port}"\npoll_interval_s = 0.5\n' for mid, port in modems
    )
    path.write_text(
        f'agent_id = "{agent_id}"\nheartbeat_interval_s = 0.5\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        "reconnect_initial_s = 0.2\nreconnect_max_s = 1.0\n"
        f"{extra_broker}\n"
        f'[spool]\npath = "{spool or path.with_suffix(".spool.db")}"\n'
        f'[clock]\nchronyc = ""\n'
        f"{modem_blocks}"
    )
    return path


class AgentProcess:
    """``probe-agent run`` in its own process, its stderr kept for the test."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env
        self.log = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "probe_agent.cli", "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115  the child holds it
            env={**os.environ, **(self.env or {})},
        )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(20)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def agents() -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def factory(config: Path, env: dict[str, str] | None = None) -> AgentProcess:
        a = AgentProcess(config, env).start()
        started.append(a)
        return a

    yield factory
    for a in started:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait(10)


def observations(rec: Recorder) -> list[Observation]:
    return [Observation.model_validate_json(p) for p in rec.payloads("/sms")]


def last_status(rec: Recorder, agent: str = "pi-uk-1") -> AgentStatus | None:
    found = rec.payloads(f"agents/{agent}/status")
    return AgentStatus.model_validate_json(found[-1]) if found else None


def test_injected_sms_appears_as_a_complete_observation(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem("ec25")
    rec = Recorder(b, [f"{P}/agents/+/#"])
    agents(agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)]))
    rec.wait_for(
        lambda ms: any(t.endswith("/modems/modem-a/state") and b'"connected":true' in p for t, p, _ in ms)
    )
    text = "Your code is 483920 #t:a1b2 " + "x" * 150  # two parts, so the concatenation fields fill
    delivery = modem.deliver("MyBank", text, flash=True)
    rec.wait_for(lambda ms: len([t for t, _, _ in ms if t.endswith("/sms")]) >= 1)
    [obs] = observations(rec)
    assert obs.text == text and obs.sender == "MyBank" and obs.sender_type == "alphanumeric"
    assert obs.agent == "pi-uk-1" and obs.modem == "modem-a" and obs.parts == obs.total_parts == 2
    assert obs.smsc == "+447785016005" and obs.scts is not None and obs.flash and obs.message_class == 0
    assert obs.sim.imsi == "234150000000001" and obs.sim.iccid and obs.sim.mcc_mnc == "23415"
    assert obs.pdus == list(delivery.pdus) and obs.concat_ref is not None and obs.origin == "cmti"
    assert obs.clock.source == "none" and obs.software_version and obs.signal_dbm == -73
    assert obs.dcs == 0x10 and obs.alphabet == "gsm7" and obs.pid == 0 and not obs.partial
    assert delivery.urc_ns is not None
    assert 0 <= obs.urc_at.timestamp() * 1e9 - delivery.urc_ns < 100e6
    state = ModemState.model_validate_json(rec.payloads("/modems/modem-a/state")[-1])
    assert state.imsi == "234150000000001" and state.operator == "Vodafone UK"
    assert any(t.endswith("/health") and r for t, _, r in rec.messages) or rec.payloads("/health")
    status = last_status(rec)
    assert status is not None and status.state == "online" and status.version


def test_a_shifted_clock_stamps_everything_30_s_ahead(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    """``clock.shift_s = 30`` (an emulated Pi whose clock is off, for simnet): the arrival stamp
    comes 30 s after the true one (not only some of the stamps: the port's reader thread takes
    it), and so does the agent's status."""
    b = broker()
    modem = make_modem("sim800l")
    rec = Recorder(b, [f"{P}/agents/+/#"])
    config = agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)])
    config.write_text(config.read_text().replace('chronyc = ""\n', 'chronyc = ""\nshift_s = 30\n'))
    before = time.time()
    agents(config)
    rec.wait_for(
        lambda ms: any(t.endswith("/modems/modem-a/state") and b'"connected":true' in p for t, p, _ in ms)
    )
    delivery = modem.deliver("MyBank", "Your code is 112233")
    rec.wait_for(lambda ms: any(t.endswith("/sms") for t, _, _ in ms))
    [obs] = observations(rec)
    assert delivery.urc_ns is not None
    assert 30e9 <= obs.urc_at.timestamp() * 1e9 - delivery.urc_ns < 30e9 + 100e6
    status = last_status(rec)
    assert status is not None and status.started_at.timestamp() - before >= 29.0


def test_broker_down_for_30_s_while_100_sms_arrive(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem("sim800l")
    agents(agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)]))
    rec = Recorder(b, [f"{P}/agents/+/sms"])
    modem.deliver("+447700900123", "before the outage")
    rec.wait_for(lambda ms: len(ms) >= 1)
    rec.close()
    b.stop()
    outage_start = time.monotonic()
    sent = [f"during the outage {i:03d}" for i in range(100)]
    for text in sent:
        modem.deliver("+447700900123", text)
        time.sleep(0.2)
    time.sleep(max(0.0, 30 - (time.monotonic() - outage_start)))
    b.start()
    rec = Recorder(b, [f"{P}/agents/+/sms"])
    rec.wait_for(
        lambda ms: len({Observation.model_validate_json(p).id for _, p, _ in ms}) >= 100, timeout_s=60
    )
    unique = {o.id: o for o in observations(rec)}
    assert sorted(o.text or "" for o in unique.values()) == sent, (
        "each exactly once after removing duplicates"
    )
    assert modem.stored() == {} or all(v for v in modem.stored().values()) is False


def test_sigkill_mid_burst_loses_nothing(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem("ec25")
    config = agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)])
    rec = Recorder(b, [f"{P}/agents/+/sms"])
    first = agents(config)
    rec.wait_for(lambda ms: True)
    time.sleep(1.5)
    sent = [f"burst {i:03d}" for i in range(60)]
    for i, text in enumerate(sent):
        modem.deliver("+447700900123", text)
        if i == 30:
            first.kill()  # SIGKILL, mid-burst: messages on the SIM, in the spool, in flight
    agents(config)
    rec.wait_for(
        lambda ms: {Observation.model_validate_json(p).text for _, p, _ in ms} >= set(sent), timeout_s=60
    )
    unique = {o.id for o in observations(rec)}
    assert len(unique) == len(sent)


def test_status_lost_on_kill_offline_on_clean_stop(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem()
    config = agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)])
    rec = Recorder(b, [f"{P}/agents/+/status"])
    a = agents(config)
    rec.wait_for(lambda ms: (s := last_status(rec)) is not None and s.state == "online")
    online = last_status(rec)
    a.kill()
    rec.wait_for(lambda ms: (s := last_status(rec)) is not None and s.state == "lost", timeout_s=60)
    lost = last_status(rec)
    assert lost is not None and online is not None and lost.session == online.session
    a = agents(config)
    rec.wait_for(
        lambda ms: (s := last_status(rec)) is not None and s.state == "online" and s.session != online.session
    )
    assert a.terminate() == 0
    rec.wait_for(lambda ms: (s := last_status(rec)) is not None and s.state == "offline")
    # What a newcomer sees: the retained status.
    late = Recorder(b, [f"{P}/agents/+/status"])
    late.wait_for(lambda ms: len(ms) >= 1)
    assert AgentStatus.model_validate_json(late.messages[0][1]).state == "offline" and late.messages[0][2]


def test_a_late_will_of_an_old_session_never_marks_the_live_agent_lost(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    config = agent_toml(tmp_path / "agent.toml", b, [])
    rec = Recorder(b, [f"{P}/agents/+/status"])
    old = agents(config)
    rec.wait_for(lambda ms: (s := last_status(rec)) is not None and s.state == "online")
    first_session = last_status(rec).session  # type: ignore[union-attr]
    assert old.proc is not None
    os.kill(old.proc.pid, signal.SIGSTOP)  # frozen: its connection stays open, its will pending
    try:
        new = agents(agent_toml(tmp_path / "agent2.toml", b, [], spool=tmp_path / "spool2.db"))
        # The new connection takes over the client id: the broker sends the old one's will.
        rec.wait_for(lambda ms: any(b'"lost"' in p for _, p, _ in ms), timeout_s=30)
        rec.wait_for(
            lambda ms: (
                (s := last_status(rec)) is not None and s.state == "online" and s.session != first_session
            ),
            timeout_s=30,
        )
    finally:
        os.kill(old.proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    late = Recorder(b, [f"{P}/agents/+/status"])
    late.wait_for(lambda ms: len(ms) >= 1)
    retained = AgentStatus.model_validate_json(late.messages[-1][1])
    assert retained.state == "online" and retained.session != first_session
    assert new.proc is not None and new.proc.poll() is None


def test_tls_with_password_and_acl(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    acl = (
        "user controller\ntopic readwrite pf/v1/#\n\n"
        "pattern write pf/v1/agents/%u/#\npattern read pf/v1/agents/%u/#\n"
        "topic read pf/v1/controller/status\n"
    )
    b = broker(users={"pi-uk-1": "s3cret", "pi-uk-2": "other", "controller": "ctl"}, acl=acl, tls=True)
    modem = make_modem()
    (tmp_path / "password").write_text("s3cret\n")
    tls = (
        f'username = "pi-uk-1"\npassword_file = "{tmp_path / "password"}"\n[broker.tls]\nca = "{b.ca_file}"\n'
    )
    rec = Recorder(b, [f"{P}/#"], username="controller", password="ctl")
    agents(agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)], extra_broker=tls))
    modem.deliver("+1555", "over TLS")
    rec.wait_for(lambda ms: any(t.endswith("/sms") for t, _, _ in ms))
    assert observations(rec)[0].text == "over TLS"

    # Agent pi-uk-2 may not publish under pi-uk-1: the broker drops it.
    # (mosquitto may answer the denied publish by closing the connection: either way it is dropped)
    intruder = connected_client(b, "pi-uk-2", "other")
    with contextlib.suppress(RuntimeError, ValueError):
        intruder.publish(f"{P}/agents/pi-uk-1/sms", b'{"forged": true}', qos=1).wait_for_publish(5)
    intruder.loop_stop()
    intruder.disconnect()
    own = connected_client(b, "pi-uk-2", "other")
    own.publish(f"{P}/agents/pi-uk-2/health", b"{}", qos=1).wait_for_publish(5)
    rec.wait_for(lambda ms: any(t.endswith("pi-uk-2/health") for t, _, _ in ms))
    assert not any(b"forged" in p for _, p, _ in rec.messages)
    own.loop_stop()
    own.disconnect()

    # A wrong password is refused, logged clearly, and retried.
    (tmp_path / "wrong").write_text("nope\n")
    bad_tls = (
        f'username = "pi-uk-1"\npassword_file = "{tmp_path / "wrong"}"\n[broker.tls]\nca = "{b.ca_file}"\n'
    )
    bad = agents(agent_toml(tmp_path / "bad.toml", b, [], extra_broker=bad_tls, spool=tmp_path / "bad.db"))
    deadline = time.monotonic() + 15
    while "refused the credentials" not in bad.stderr():
        assert time.monotonic() < deadline, bad.stderr()
        time.sleep(0.1)
    time.sleep(1.5)
    assert bad.stderr().count("refused the credentials") >= 2, "retried with backoff"
    assert bad.proc is not None and bad.proc.poll() is None


def test_a_missing_port_is_reported_while_the_other_modem_works(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem()
    rec = Recorder(b, [f"{P}/agents/+/#"])
    agents(
        agent_toml(tmp_path / "agent.toml", b, [("gone", str(tmp_path / "ttyNOPE")), ("good", modem.port)])
    )
    modem.deliver("+1555", "the good one works")
    rec.wait_for(lambda ms: any(t.endswith("/sms") for t, _, _ in ms))
    rec.wait_for(lambda ms: any(t.endswith("/modems/gone/state") for t, _, _ in ms))
    gone = ModemState.model_validate_json(rec.payloads("/modems/gone/state")[-1])
    assert not gone.connected and gone.last_error and "ttyNOPE" in gone.last_error


def test_commands_answer_with_the_transaction(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[[Path], AgentProcess],
) -> None:
    b = broker()
    modem = make_modem()
    rec = Recorder(b, [f"{P}/agents/+/response/+", f"{P}/agents/+/modems/+/state"])
    agents(agent_toml(tmp_path / "agent.toml", b, [("modem-a", modem.port)]))
    rec.wait_for(lambda ms: any(b'"connected":true' in p for _, p, _ in ms))
    pub = connected_client(b)

    def ask(cmd: str, payload: bytes) -> dict[str, object]:
        count = len(rec.payloads(f"/response/{cmd}"))
        pub.publish(f"{P}/agents/pi-uk-1/request/{cmd}", payload, qos=1).wait_for_publish(5)
        rec.wait_for(lambda ms: len(rec.payloads(f"/response/{cmd}")) > count)
        result: dict[str, object] = json.loads(rec.payloads(f"/response/{cmd}")[-1])
        return result

    storage = ask("storage", b'{"transaction": "t-1"}')
    assert storage["transaction"] == "t-1" and storage["status"] == "ok"
    assert storage["data"] == {"storage": {"modem-a": {"memory": "ME", "used": 0, "total": 100}}}
    unknown = ask("self-destruct", b'{"transaction": "t-2"}')
    assert unknown["status"] == "error" and "unknown command" in str(unknown["error"])
    assert unknown["transaction"] == "t-2"
    malformed = ask("time", b'{"transaction": "t-3", "data": {"t1": "yesterday"}}')
    assert (
        malformed["status"] == "error"
        and malformed["transaction"] == "t-3"
        and "t1" in str(malformed["error"])
    )
    garbage = ask("rescan", b"not json at all")
    assert garbage["status"] == "error" and garbage["transaction"] is None
    rescan = ask("rescan", b'{"transaction": "t-4"}')
    assert rescan["status"] == "ok" and rescan["data"]["reopened"] == []  # type: ignore[index]
    reset = ask("modem-reset", b'{"transaction": "t-5", "data": {"modem": "modem-a"}}')
    assert reset["status"] == "ok" and reset["data"]["connected"] is True  # type: ignore[index]
    modem.deliver("+1555", "after the reset")
    pub.loop_stop()
    pub.disconnect()


def test_systemd_ready_watchdog_and_stopping(
    tmp_path: Path,
    broker: Callable[..., Mosquitto],
    make_modem: Callable[..., VirtualModem],
    agents: Callable[..., AgentProcess],
) -> None:
    """A real notify socket, as systemd gives a Type=notify unit with WatchdogSec."""
    b = broker()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    a = agents(
        agent_toml(tmp_path / "agent.toml", b, [("modem-a", make_modem().port)]),
        env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "600000"},
    )
    seen = [sock.recv(256) for _ in range(4)]
    assert seen.count(b"READY=1") == 1 and seen.count(b"WATCHDOG=1") >= 2
    assert a.terminate() == 0
    rest = []
    with contextlib.suppress(TimeoutError):
        sock.settimeout(1)
        while True:
            rest.append(sock.recv(256))
    assert b"STOPPING=1" in rest
    sock.close()


def test_modems_command_prints_one_line_per_modem(
    tmp_path: Path, broker: Callable[..., Mosquitto], make_modem: Callable[..., VirtualModem]
) -> None:
    b = broker()
    modem = make_modem("e3372")
    config = agent_toml(
        tmp_path / "agent.toml", b, [("good", modem.port), ("gone", str(tmp_path / "ttyNOPE"))]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "probe_agent.cli", "modems", "--config", str(config), "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    good, gone = proc.stdout.splitlines()
    assert good.startswith(f"good {modem.port}: huawei E3372, IMSI 234150000000001")
    assert "Vodafone UK 23415" in good and "signal -73 dBm" in good and "storage ME 0/100" in good
    assert gone.startswith("gone ") and "not available" in gone and "ttyNOPE" in gone
    assert proc.returncode == 1
