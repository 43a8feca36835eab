"""The command lines as a user runs them: the modem-layer demo, ``probe-agent listen`` on a
virtual modem and ``probe-fleet demo``'s refusal of a bad scenario, each in its own process
(the whole demo runs in ``test_e2e.py``)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hardware.virtual_modem import VirtualModem


def test_modem_layer_demo_prints_each_sms() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "probe_agent.modem_demo", "--count", "5", "--interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "modem-layer demo" in out
    assert out.count("arrival stamp error") == 5
    assert "Kurs €/$: [1.08] {ok} ~ ^ \\ | §" in out and "Grüße aus Köln 😀 ✓" in out
    assert "2/2 part(s)" in out


def test_demo_stops_cleanly_on_sigint() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe_agent.modem_demo", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    assert "connected:" in lines[1]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0
    assert "stopped" in proc.stdout.read()


def test_probe_agent_listen_prints_json(make_modem: Callable[..., VirtualModem]) -> None:
    modem = make_modem("ec25")
    proc = subprocess.Popen(
        [sys.executable, "-m", "probe_agent.cli", "listen", "--port", modem.port, "--profile", "ec25"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        state = json.loads(proc.stdout.readline())["state"]
        assert state["connected"] and state["imsi"] == "234150000000001" and state["model"] == "EC25"
        modem.deliver("Alerts", "Grüße 😀")
        sms = json.loads(proc.stdout.readline())["sms"]
        assert (sms["sender"], sms["text"], sms["origin"]) == ("Alerts", "Grüße 😀", "cmti")
        assert sms["arrived_at"].endswith("+00:00")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0


def test_probe_agent_listen_fails_clearly_without_a_modem(tmp_path: object) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe_agent.cli",
            "listen",
            "--port",
            "/dev/nonexistent-modem",
            "--connect-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "did not come up" in proc.stderr and "/dev/nonexistent-modem" in proc.stderr


def test_demo_refuses_a_bad_scenario_naming_the_field(tmp_path: Path) -> None:
    """Tried: a scenario whose route name is a number and which has no networks: exit 2, each
    field named, and nothing started (no work folder made)."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[[routes]]\nname = 5\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.cli",
            "demo",
            "--scenario",
            str(bad),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "routes.0.name" in run.stderr and "networks: Field required" in run.stderr
    assert not (tmp_path / "w").exists()
