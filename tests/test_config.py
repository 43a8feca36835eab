"""The agent's config: every field validated and named when wrong; ``probe-agent check`` exits 2
naming each problem, 0 when fine, without touching hardware."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from probe_agent.config import AgentConfig, ConfigError, load, missing_files

GOOD = """
agent_id = "pi-uk-vodafone-1"
topic_prefix = "pf/v1"
heartbeat_interval_s = 30

[broker]
host = "broker.example.net"
port = 8883
username = "pi-uk-vodafone-1"
password_file = "{pw}"
[broker.tls]
ca = "{ca}"

[spool]
path = "/var/lib/probe-agent/spool.db"
max_entries = 50000

[log]
level = "INFO"
json = true

[[modems]]
id = "modem-a"
port = "/dev/gsm/modem-a"
profile = "ec25"
pin_file = "{pin}"
expected_mcc_mnc = "23415"
msisdn = "+447700900001"
hard_reset_command = ["uhubctl", "-l", "1-1", "-p", "2", "-a", "cycle"]

[[modems]]
id = "modem-b"
port = "/dev/gsm/modem-b"
profile = "sim800l"
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, content in (("pw", "s3cret\n"), ("ca", "-----BEGIN CERTIFICATE-----\n"), ("pin", "1234\n")):
        out[name] = tmp_path / name
        out[name].write_text(content)
    return out


def write(tmp_path: Path, text: str, files: dict[str, Path]) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text.format(**{k: str(v) for k, v in files.items()}))
    return path


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "probe_agent.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_good_config_loads_with_its_secrets(tmp_path: Path, files: dict[str, Path]) -> None:
    config = load(write(tmp_path, GOOD, files))
    assert config.agent_id == "pi-uk-vodafone-1" and config.broker.secret() == "s3cret"
    assert config.modems[0].secret_pin() == "1234" and config.modems[1].secret_pin() is None
    assert config.log.json_lines and config.spool.max_entries == 50000
    assert missing_files(config) == []
    proc = check(write(tmp_path, GOOD, files))
    assert proc.returncode == 0 and "ok: agent pi-uk-vodafone-1, 2 modem(s)" in proc.stdout


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (('agent_id = "pi-uk-vodafone-1"', 'agent_id = "pi/uk"'), "agent_id"),
        (("port = 8883", "port = 99999"), "broker.port"),
        (('profile = "ec25"', 'profile = "nokia3310"'), "modems.0.profile"),
        (('expected_mcc_mnc = "23415"', 'expected_mcc_mnc = "UK"'), "modems.0.expected_mcc_mnc"),
        (('msisdn = "+447700900001"', 'msisdn = "07700900001"'), "modems.0.msisdn"),
        (('id = "modem-b"', 'id = "modem-a"'), "modem ids must be unique: modem-a"),
        (
            ("heartbeat_interval_s = 30", "heartbeat_intervall_s = 30"),
            "heartbeat_intervall_s: unknown setting",
        ),
        (('host = "broker.example.net"\n', ""), "broker.host: Field required"),
        (("[broker.tls]", 'password = "x"\n[broker.tls]'), "password or password_file, not both"),
        (("max_entries = 50000", "max_entries = 1"), "spool.max_entries"),
        (("[log]", "[log\n"), "not valid TOML"),
    ],
)
def test_each_problem_is_named_and_check_exits_2(
    tmp_path: Path, files: dict[str, Path], change: tuple[str, str], named: str
) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    path = write(tmp_path, text, files)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert any(named in p for p in info.value.problems), info.value.problems
    proc = check(path)
    assert proc.returncode == 2 and named in proc.stderr and str(path) in proc.stderr


def test_several_problems_are_all_named(tmp_path: Path, files: dict[str, Path]) -> None:
    text = GOOD.replace("port = 8883", "port = 0").replace('profile = "sim800l"', 'profile = "x"')
    proc = check(write(tmp_path, text, files))
    assert proc.returncode == 2
    assert "broker.port" in proc.stderr and "modems.1.profile" in proc.stderr


def test_missing_files_are_named_by_check(tmp_path: Path, files: dict[str, Path]) -> None:
    path = write(tmp_path, GOOD, files)
    files["ca"].unlink()
    files["pin"].unlink()
    proc = check(path)
    assert proc.returncode == 2
    assert "broker.tls.ca: file" in proc.stderr and "modems.0.pin_file: file" in proc.stderr


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = check(tmp_path / "nope.toml")
    assert proc.returncode == 2 and "file not found" in proc.stderr


def test_every_config_field_has_a_description() -> None:
    def walk(model: type[AgentConfig]) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                inner = getattr(candidate, "__args__", (candidate,))
                for sub in inner:
                    if isinstance(sub, type) and hasattr(sub, "model_fields"):
                        missing += walk(sub)  # type: ignore[arg-type]
        return missing

    assert walk(AgentConfig) == []
