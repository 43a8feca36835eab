"""The probe_agent Ansible role: its templates rendered from the example inventory (agent.toml
that ``probe-agent check`` accepts, udev rules, the systemd unit), and a real apply to a fresh
Debian bookworm root through the chroot connection, twice: the second run changes nothing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with Ansible, without stubs
from paho.mqtt.enums import CallbackAPIVersion

from probe_agent import config as agent_config
from probe_agent import protocol
from probe_agent.cli import EXIT_CONFIG
from tests.ansible_env import (
    INVENTORY,
    changed_tasks,
    chroot_apply,
    debian_root,
    play_recap,
    render_templates,
    run_ansible,
    wheelhouse,
)
from tests.mosquitto import Mosquitto, free_port

INVENTORY_DIR = INVENTORY.parent
PROBE_AGENT = Path(sys.executable).parent / "probe-agent"
TEMPLATES = ("agent.toml.j2", "99-probe-fleet-modems.rules.j2", "probe-agent.service.j2")
#: Most exposure `systemd-analyze security` may give the unit (0 best, 100 worst; it says 17 now).
SECURITY_THRESHOLD = 25


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _operators() -> dict[str, str]:
    """Every Pi of the example inventory and its operator group (country -> operator -> host)."""
    hosts: dict[str, str] = {}
    countries = _yaml(INVENTORY)["all"]["children"]["probes"]["children"]
    for country in countries.values():
        for operator, group in country["children"].items():
            hosts.update(dict.fromkeys(group["hosts"], operator))
    return hosts


OPERATORS = _operators()
FLEET = _yaml(INVENTORY_DIR / "group_vars" / "all" / "main.yml")


def _modems(host: str) -> list[dict[str, Any]]:
    modems: list[dict[str, Any]] = _yaml(INVENTORY_DIR / "host_vars" / host / "main.yml")[
        "probe_agent_modems"
    ]
    return modems


def _mcc_mnc(host: str) -> str:
    return str(_yaml(INVENTORY_DIR / "group_vars" / f"{OPERATORS[host]}.yml")["probe_agent_operator_mcc_mnc"])


def _vault(path: Path, home: Path) -> dict[str, Any]:
    shown = run_ansible(["ansible-vault", "view", str(path)], home)
    assert shown.returncode == 0, shown.stderr
    secrets: dict[str, Any] = yaml.safe_load(shown.stdout)
    return secrets


_UDEV_PAIR = re.compile(r'\s*([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,\s*|$)')


def udev_rules(text: str) -> list[list[tuple[str, str, str]]]:
    """The rules of a udev rules file, each as its (key, operator, value) triples in order; a
    line that is not wholly such triples fails."""
    rules = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pairs: list[tuple[str, str, str]] = []
        position = 0
        while position < len(line):
            match = _UDEV_PAIR.match(line, position)
            assert match is not None, f"not a udev rule at column {position}: {line!r}"
            key, operator, value = match.groups()
            pairs.append((key, operator, value))
            position = match.end()
        rules.append(pairs)
    return rules


def unit_settings(text: str) -> dict[str, list[str]]:
    """A systemd unit's settings as ``{"Section.Key": [values in order]}`` (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def _render(
    host: str, tmp_path: Path, extra_vars: dict[str, object] | None = None
) -> tuple[dict[str, str], Path]:
    """The role's templates for ``host``, with its config and state under tmp_path."""
    etc = tmp_path / "etc"
    extra: dict[str, object] = {
        "probe_agent_config_dir": str(etc),
        "probe_agent_state_dir": str(tmp_path / "state"),
        **(extra_vars or {}),
    }
    out = tmp_path / "rendered"
    out.mkdir()
    texts = render_templates(
        host, "probe_agent", {t: out / t.removesuffix(".j2") for t in TEMPLATES}, tmp_path / "home", extra
    )
    return texts, etc


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PROBE_AGENT), "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("host", sorted(OPERATORS))
def test_rendered_agent_config_udev_rules_and_unit_follow_the_inventory(host: str, tmp_path: Path) -> None:
    texts, etc = _render(host, tmp_path)
    modems = _modems(host)
    assert modems, f"{host} has no modems in the example inventory"

    # agent.toml: the files it names are what the role writes; with them, `probe-agent check` passes
    config_file = tmp_path / "rendered" / "agent.toml"
    etc.mkdir()
    for name in ["mqtt-password", "ca.crt"] + [f"{m['id']}.pin" for m in modems if "pin" in m]:
        (etc / name).write_text("placeholder\n")
    checked = _check(config_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"ok: agent {host}, {len(modems)} modem(s)" in checked.stdout
    assert "with TLS" in checked.stdout
    config = agent_config.load(config_file)
    assert config.agent_id == host
    assert config.topic_prefix == FLEET["probe_fleet_topic_prefix"]
    assert (config.broker.host, config.broker.port) == (
        FLEET["probe_fleet_broker_host"],
        FLEET["probe_fleet_broker_port"],
    )
    assert config.broker.username == host  # the broker's ACL: the agent's user name is its id
    assert config.broker.password is None
    assert config.broker.password_file == etc / "mqtt-password"
    assert config.broker.tls is not None and config.broker.tls.ca == etc / "ca.crt"
    assert config.spool.path == tmp_path / "state" / "spool.db"
    assert [m.id for m in config.modems] == [m["id"] for m in modems]
    for rendered, modem in zip(config.modems, modems, strict=True):
        assert rendered.port == f"/dev/gsm/{modem['id']}"
        assert rendered.profile == modem["profile"]
        assert rendered.msisdn == modem["msisdn"]
        assert rendered.expected_mcc_mnc == _mcc_mnc(host)
        assert rendered.pin is None  # never the PIN itself in agent.toml
        assert rendered.pin_file == (etc / f"{modem['id']}.pin" if "pin" in modem else None)
    assert "placeholder" not in texts["agent.toml.j2"]

    # udev: one rule per modem, in the shipped format (hardware/udev/99-probe-fleet-modems.rules)
    rules = udev_rules(texts["99-probe-fleet-modems.rules.j2"])
    assert len(rules) == len(modems)
    for rule, modem in zip(rules, modems, strict=True):
        assert rule == [
            ("SUBSYSTEM", "==", "tty"),
            ("ENV{ID_PATH}", "==", modem["usb_path"]),
            ("SYMLINK", "+=", f"gsm/{modem['id']}"),
            ("ENV{ID_MM_DEVICE_IGNORE}", "=", "1"),
            ("GROUP", "=", "dialout"),
            ("MODE", "=", "0660"),
        ]
    shipped = udev_rules(
        (Path(__file__).parents[1] / "hardware" / "udev" / "99-probe-fleet-modems.rules").read_text()
    )
    shipped_tty = [[(k, op) for k, op, _ in rule] for rule in shipped if ("SUBSYSTEM", "==", "tty") in rule]
    assert shipped_tty and all(shape == [(k, op) for k, op, _ in rules[0]] for shape in shipped_tty)

    # the unit: notify + watchdog, the spool the only writable path, no device but the modems
    unit = unit_settings(texts["probe-agent.service.j2"])
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.ExecStart"] == [
        f"/opt/probe-agent/venv/bin/probe-agent run --config {etc}/agent.toml"
    ]
    assert unit["Service.User"] == ["probe-agent"]
    assert unit["Service.SupplementaryGroups"] == ["dialout"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert int(unit["Service.WatchdogSec"][0]) > 0
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.ReadWritePaths"] == [str(tmp_path / "state")]
    assert unit["Service.PrivateTmp"] == ["yes"]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.DevicePolicy"] == ["closed"]
    assert unit["Service.DeviceAllow"] == [f"/dev/gsm/{m['id']} rw" for m in modems]
    devices = ["dev-gsm-" + m["id"].replace("-", "\\x2d") + ".device" for m in modems]  # systemd-escape
    assert unit["Unit.Wants"] == ["network-online.target", *devices]
    assert unit["Unit.After"][1:] == devices


def test_optional_modem_settings_reach_agent_toml_and_the_unit(tmp_path: Path) -> None:
    reset = ["uhubctl", "-l", "1-1", "-p", "5", "-a", "cycle"]
    modems: list[dict[str, object]] = [
        {
            "id": "modem-x",
            "usb_path": "platform-3f980000.usb-usb-0:1.5:1.3",
            "profile": "ec25",
            "expected_mcc_mnc": "26203",
            "hard_reset_command": reset,
            "poll_interval_s": 12,
            "direct_delivery": True,
        },
        {"id": "modem-y", "usb_path": "platform-3f980000.usb-usb-0:1.4:1.0"},
    ]
    extra: dict[str, object] = {
        "probe_agent_modems": modems,
        "probe_agent_device_allow_extra": ["char-usb_device rw"],
        "probe_agent_udev_extra_rules": [
            'ACTION=="add", SUBSYSTEM=="usb", ATTR{idVendor}=="12d1", GROUP="plugdev"'
        ],
        "probe_agent_ca_cert_file": "",
        "probe_agent_log_json": True,
        "probe_agent_wait_for_modems": False,
    }
    texts, etc = _render("pi-de-tmo-01", tmp_path, extra)
    etc.mkdir()
    (etc / "mqtt-password").write_text("placeholder\n")
    checked = _check(tmp_path / "rendered" / "agent.toml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "with TLS" not in checked.stdout
    config = agent_config.load(tmp_path / "rendered" / "agent.toml")
    assert config.broker.tls is None
    assert config.log.json_lines is True
    x, y = config.modems
    assert x.expected_mcc_mnc == "26203"  # the modem's own beats the operator's
    assert x.hard_reset_command == reset
    assert (x.poll_interval_s, x.direct_delivery) == (12.0, True)
    assert (y.profile, y.msisdn, y.pin_file, y.expected_mcc_mnc) == (None, None, None, "26201")
    rules = udev_rules(texts["99-probe-fleet-modems.rules.j2"])
    assert [r[2] for r in rules[:2]] == [("SYMLINK", "+=", "gsm/modem-x"), ("SYMLINK", "+=", "gsm/modem-y")]
    assert rules[2] == [
        ("ACTION", "==", "add"),
        ("SUBSYSTEM", "==", "usb"),
        ("ATTR{idVendor}", "==", "12d1"),
        ("GROUP", "=", "plugdev"),
    ]
    unit = unit_settings(texts["probe-agent.service.j2"])
    assert unit["Service.DeviceAllow"] == ["/dev/gsm/modem-x rw", "/dev/gsm/modem-y rw", "char-usb_device rw"]
    assert unit["Unit.Wants"] == ["network-online.target"]  # probe_agent_wait_for_modems: false


def test_a_bad_inventory_value_fails_probe_agent_check(tmp_path: Path) -> None:
    """The check the rendering tests rely on does reject what it should: a malformed MSISDN."""
    bad = [{"id": "modem-a", "usb_path": "platform-x-usb-0:1.2:1.0", "msisdn": "4915112345601"}]
    _render("pi-gb-ee-01", tmp_path, {"probe_agent_modems": bad, "probe_agent_ca_cert_file": ""})
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "mqtt-password").write_text("placeholder\n")
    checked = _check(tmp_path / "rendered" / "agent.toml")
    assert checked.returncode == EXIT_CONFIG
    assert "modems.0.msisdn" in checked.stderr


# --- A real apply: the role on a fresh Debian bookworm root, through the chroot connection -----

HOST = "pi-de-tmo-01"


def _chroot(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(root), *args], capture_output=True, text=True, timeout=120)


def _ca_file(tmp_path: Path) -> Path:
    """The example inventory's CA when it is there, else one made for this test."""
    shipped = INVENTORY_DIR / "files" / "ca.crt"
    if shipped.is_file():
        return shipped
    import trustme

    ca = tmp_path / "ca.crt"
    trustme.CA().cert_pem.write_to_path(str(ca))
    return ca


@dataclass
class Applied:
    """A bookworm root the role was applied to twice, and what each apply printed."""

    root: Path
    home: Path
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]
    check: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Applied]:
    """The role applied twice to a fresh Debian bookworm root through the chroot connection (the
    example inventory's pi-de-tmo-01, with a wheelhouse built from this tree)."""
    tmp_path = tmp_path_factory.mktemp("chroot")
    root = debian_root(tmp_path / "root")  # skips when debootstrap cannot run here
    wheels = wheelhouse(tmp_path / "wheelhouse")
    home = tmp_path / "home"
    extra = {"probe_agent_wheelhouse": str(wheels), "probe_agent_ca_cert_file": str(_ca_file(tmp_path))}
    apply = chroot_apply(root, HOST, "probe_agent", tmp_path, extra)
    first = run_ansible(apply, home)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    second = run_ansible(apply, home)
    check = run_ansible([*apply, "--check"], home)
    yield Applied(root, home, first, second, check)
    shutil.rmtree(root, ignore_errors=True)  # ~600 MB; pytest would keep it for three runs


@pytest.mark.timeout(900)
def test_role_applies_to_a_fresh_bookworm_root_and_a_second_apply_changes_nothing(applied: Applied) -> None:
    root, home, first, second = applied.root, applied.home, applied.first, applied.second
    assert play_recap(first.stdout)[HOST]["changed"] > 0
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    recap = play_recap(second.stdout)[HOST]
    assert recap["changed"] == 0, f"the second apply changed {changed_tasks(second.stdout)}"
    assert recap["failed"] == recap["unreachable"] == 0
    assert applied.check.returncode == 0, applied.check.stdout[-6000:]
    checked_recap = play_recap(applied.check.stdout)[HOST]
    assert checked_recap["changed"] == 0, f"--check would change {changed_tasks(applied.check.stdout)}"

    # the agent is installed at the pinned version and accepts the config the role wrote
    venv = "/opt/probe-agent/venv/bin/probe-agent"
    assert _chroot(root, venv, "version").stdout.strip() == FLEET["probe_fleet_version"]
    checked = _chroot(root, venv, "check", "--config", "/etc/probe-agent/agent.toml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"ok: agent {HOST}, {len(_modems(HOST))} modem(s)" in checked.stdout
    assert not list((root / "tmp").glob("probe-agent-wheelhouse.*")), "the wheelhouse was left behind"

    # the user, its groups and who may read what
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = passwd["probe-agent"]
    assert int(user[2]) < 1000 and user[6] == "/usr/sbin/nologin"
    assert "probe-agent" in groups["dialout"][3].split(",")
    agent_gid = int(groups["probe-agent"][2])
    etc = root / "etc" / "probe-agent"
    expected_modes = {
        "": 0o750,
        "agent.toml": 0o640,
        "mqtt-password": 0o640,
        "modem-a.pin": 0o640,
        "ca.crt": 0o644,
    }
    for name, mode in expected_modes.items():
        stat = (etc / name).stat()
        assert (stat.st_mode & 0o777, stat.st_uid, stat.st_gid) == (mode, 0, agent_gid), name
    spool = (root / "var/lib/probe-agent").stat()
    assert (spool.st_mode & 0o777, spool.st_uid) == (0o750, int(user[2]))

    # the secrets are the vault's
    host_vault = _vault(INVENTORY_DIR / "host_vars" / HOST / "vault.yml", home)
    assert (etc / "mqtt-password").read_text() == host_vault["vault_probe_agent_mqtt_password"] + "\n"
    pins = {m["id"] for m in _modems(HOST) if "pin" in m}
    assert {p.stem for p in etc.glob("*.pin")} == pins == {"modem-a"}
    assert (etc / "modem-a.pin").read_text() == host_vault["vault_probe_agent_sim_pins"]["modem-a"] + "\n"

    # udev rules, the journal cap, chrony and the agent enabled
    rules = udev_rules((root / "etc/udev/rules.d/99-probe-fleet-modems.rules").read_text())
    assert [r[2][2] for r in rules] == [f"gsm/{m['id']}" for m in _modems(HOST)]
    assert "SystemMaxUse=" in (root / "etc/systemd/journald.conf.d/probe-fleet.conf").read_text()
    enabled = _chroot(root, "systemctl", "is-enabled", "probe-agent.service", "chrony.service")
    assert enabled.stdout.split() == ["enabled", "enabled"], enabled.stdout + enabled.stderr

    # the unit: systemd finds nothing wrong with it (it prints problems and exits 0), and it is hardened
    unit = "/etc/systemd/system/probe-agent.service"
    verified = _chroot(root, "systemd-analyze", "verify", unit)
    assert (verified.returncode, verified.stderr) == (0, ""), verified.stderr
    security = _chroot(
        root, "systemd-analyze", "security", "--offline=yes", f"--threshold={SECURITY_THRESHOLD}", unit
    )
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr
    assert "Overall exposure level for probe-agent.service" in security.stdout


#: How the booted root reports back: a oneshot unit that waits a few watchdog periods, writes what
#: systemd says of the agent and its journal, and powers the container off.
BOOT_WATCHDOG_S = 5
BOOT_PROBE_UNIT = f"""[Unit]
After=probe-agent.service
[Service]
Type=oneshot
TimeoutStartSec=infinity
ExecStart=/bin/sh -c 'sleep {BOOT_WATCHDOG_S * 3}; \\
  systemctl show probe-agent -p ActiveState,SubState,NRestarts -p WatchdogUSec,MainPID > /boot-test.state; \\
  journalctl --no-pager -o cat -u probe-agent > /boot-test.journal 2>&1; systemctl poweroff'
[Install]
WantedBy=multi-user.target
"""


@pytest.mark.timeout(900)
def test_the_hardened_unit_runs_the_agent_under_a_real_systemd(applied: Applied) -> None:
    """The applied root booted with systemd-nspawn: the agent starts under its hardened unit (no
    modems, no broker: it runs, retries, and says so), tells systemd it is ready (Type=notify)
    and keeps pinging the watchdog (a short WatchdogSec in a drop-in: no restart in three periods),
    and its spool is written in the one writable path. (Its wait for the modems' device units
    cannot be seen here: with a read-only /sys, a container's systemd has no device units and ignores
    dependencies on them.)"""
    nspawn = shutil.which("systemd-nspawn")
    if nspawn is None:
        pytest.skip("systemd-nspawn is not installed (apt-get install systemd-container; .ci/run does)")
    root = applied.root
    drop_in = root / "etc/systemd/system/probe-agent.service.d/boot-test.conf"
    probe_unit = root / "etc/systemd/system/boot-test.service"
    wants = root / "etc/systemd/system/multi-user.target.wants/boot-test.service"
    drop_in.parent.mkdir()
    drop_in.write_text(f"[Service]\nWatchdogSec={BOOT_WATCHDOG_S}\n")
    probe_unit.write_text(BOOT_PROBE_UNIT)
    wants.symlink_to("/etc/systemd/system/boot-test.service")
    try:
        booted = subprocess.run(
            [nspawn, "--boot", "--register=no", "--keep-unit", "--quiet", "-D", str(root)],
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        for path in (wants, probe_unit, drop_in):
            path.unlink()
        drop_in.parent.rmdir()
    assert (root / "boot-test.state").exists(), booted.stdout[-4000:] + booted.stderr[-2000:]
    state = dict(line.split("=", 1) for line in (root / "boot-test.state").read_text().splitlines())
    journal = (root / "boot-test.journal").read_text()
    assert state["ActiveState"] == "active" and state["SubState"] == "running", journal[-4000:]
    assert state["NRestarts"] == "0", journal[-4000:]
    assert state["WatchdogUSec"] == f"{BOOT_WATCHDOG_S}s"
    assert int(state["MainPID"]) > 0
    assert f"agent {HOST} starting (version {FLEET['probe_fleet_version']}" in journal
    assert "Started probe-agent.service" in journal  # systemd says so only once READY=1 arrived
    assert "Traceback" not in journal and "Watchdog timeout" not in journal
    spool = (root / "var/lib/probe-agent/spool.db").stat()
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert spool.st_uid == int(passwd["probe-agent"][2])


# --- The health check of upgrade-agents.yml and add-probe.yml, against a real controller -----


def _controller(workdir: Path, broker: Mosquitto) -> tuple[subprocess.Popen[bytes], str, str]:
    """``probe-fleet serve`` on a fresh database (scheduler and sender off), its URL and a viewer
    token made with ``probe-fleet token add``."""
    port = free_port()
    config = workdir / "controller.toml"
    config.write_text(
        f'database_url = "sqlite:///{workdir / "controller.db"}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nclient_id = "ansible-test-controller"\n'
        "[schedule]\nenabled = false\n[sender]\nenabled = false\n"
        f'[api]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    cli = [sys.executable, "-m", "controller.cli"]
    added = subprocess.run(
        [*cli, "token", "add", "ansible", "--role", "viewer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    log = (workdir / "controller.log").open("wb")
    process = subprocess.Popen([*cli, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", added.stdout.strip()


def _api(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    """Publish retained at QoS 1, as the agent does its status and modem states."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def _modem_state(modem: str, imsi: str, registration: str) -> tuple[str, bytes]:
    state = protocol.ModemState(
        agent=HOST,
        modem=modem,
        port=f"/dev/gsm/{modem}",
        connected=True,
        registration=registration,
        imsi=imsi,
        mcc_mnc=_mcc_mnc(HOST),
        updated_at=datetime.now(UTC),
    )
    return protocol.Topics().modem_state(HOST, modem), state.to_json()


@pytest.mark.timeout(300)
def test_health_check_waits_for_the_agent_and_its_modems_in_a_real_controller(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    process, url, token = _controller(tmp_path, mosquitto)
    try:
        started = datetime.now(UTC)
        status = protocol.AgentStatus(
            state="online", agent=HOST, session="s1", version=FLEET["probe_fleet_version"], started_at=started
        )
        _publish(
            mosquitto,
            [
                (protocol.Topics().status(HOST), status.to_json()),
                _modem_state("modem-a", "262011234567801", "registered_home"),
                _modem_state("modem-b", "262011234567802", "searching"),
            ],
        )
        deadline = time.monotonic() + 30
        while True:  # the controller's ingest has stored both modems
            assert process.poll() is None, (tmp_path / "controller.log").read_text()[-3000:]
            try:
                if len(_api(f"{url}/api/v1/agents/{HOST}", token)["probes"]) == 2:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "controller.log").read_text()[-3000:]
            time.sleep(0.3)

        playbook = tmp_path / "health.yml"
        task = {
            "name": "Check the agent",
            "ansible.builtin.include_role": {"name": "probe_agent", "tasks_from": "health"},
        }
        playbook.write_text(
            json.dumps([{"name": "Health", "hosts": HOST, "gather_facts": False, "tasks": [task]}])
        )
        extra = {
            "probe_agent_controller_url": url,
            "probe_agent_health_from": "localhost",  # the example's controller host is not reachable
            "probe_agent_api_token": token,
            "probe_agent_health_retries": 3,
            "probe_agent_health_delay": 1,
        }
        check = ["ansible-playbook", str(playbook), "-e", json.dumps(extra)]

        unhealthy = run_ansible(check, tmp_path / "home")
        assert unhealthy.returncode != 0
        assert "modems not registered: modem-b" in unhealthy.stdout, unhealthy.stdout[-3000:]
        assert "modem-b searching" in unhealthy.stdout
        assert token not in unhealthy.stdout + unhealthy.stderr  # no_log keeps the API token out

        wrong_version = run_ansible([*check, "-e", '{"probe_agent_version": "9.9.9"}'], tmp_path / "home")
        assert wrong_version.returncode != 0
        assert f"version {FLEET['probe_fleet_version']} (want 9.9.9)" in wrong_version.stdout

        # the check keeps asking: modem-b registers while it waits, and the agent passes
        waiting = [*check, "-e", '{"probe_agent_health_retries": 30}']
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(run_ansible, waiting, tmp_path / "home")
            time.sleep(4)
            assert not running.done()
            _publish(mosquitto, [_modem_state("modem-b", "262011234567802", "registered_roaming")])
            healthy = running.result(timeout=120)
        assert healthy.returncode == 0, healthy.stdout[-3000:]
        assert "FAILED - RETRYING" in healthy.stdout
        assert play_recap(healthy.stdout)[HOST]["failed"] == 0

        lost = status.model_copy(update={"state": "lost"})
        _publish(mosquitto, [(protocol.Topics().status(HOST), lost.to_json())])
        gone = run_ansible(check, tmp_path / "home")
        assert gone.returncode != 0 and "state lost" in gone.stdout, gone.stdout[-3000:]
    finally:
        process.terminate()
        process.wait(15)


@pytest.mark.parametrize(("serial", "first_batch"), [(None, 1), (2, 2)], ids=["canary", "batches-of-2"])
def test_upgrade_stops_at_the_first_failing_batch(
    serial: int | None, first_batch: int, tmp_path: Path
) -> None:
    """Pis that cannot be reached fail the first batch (a canary of one by default); the Pis of
    later batches are never touched."""
    overlay = _unreachable_pis(tmp_path)
    args = ["ansible-playbook", "-i", str(INVENTORY), "-i", str(overlay), "upgrade-agents.yml"]
    if serial is not None:
        args += ["-e", json.dumps({"probe_agent_upgrade_serial": serial})]
    done = run_ansible(args, tmp_path / "home")
    assert done.returncode != 0
    recap = play_recap(done.stdout)
    assert len(recap) == first_batch < len(OPERATORS), done.stdout[-3000:]
    assert all(counts["failed"] == 1 for counts in recap.values())
    assert done.stdout.count("TASK [Gathering Facts]") == 1  # no second batch was started


def _unreachable_pis(tmp_path: Path) -> Path:
    """An inventory overlay that points every Pi at a chroot that does not exist."""
    unreachable = {
        host: {
            "ansible_connection": "community.general.chroot",
            "ansible_host": str(tmp_path / "missing" / host),
        }
        for host in OPERATORS
    }
    overlay = tmp_path / "unreachable.yml"
    overlay.write_text(json.dumps({"all": {"hosts": unreachable}}))
    return overlay


def test_add_probe_refuses_to_run_without_a_limit(tmp_path: Path) -> None:
    args = ["ansible-playbook", "-i", str(INVENTORY), "-i", str(_unreachable_pis(tmp_path)), "add-probe.yml"]
    refused = run_ansible(args, tmp_path / "home")
    assert refused.returncode != 0
    assert "Name the Pi(s) being added with --limit" in refused.stdout, refused.stdout[-3000:]
    assert "is not a directory" not in refused.stdout  # no Pi was contacted

    limited = run_ansible([*args, "--limit", "pi-gb-ee-01"], tmp_path / "home")
    assert limited.returncode != 0  # now it goes on to the (missing) Pi, and only to it
    assert "Name the Pi(s) being added" not in limited.stdout
    assert sorted(play_recap(limited.stdout)) == ["pi-gb-ee-01"]
    assert "missing/pi-gb-ee-01 is not a directory" in limited.stdout
