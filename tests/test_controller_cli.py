"""``probe-fleet check`` and ``serve`` as an operator runs them: a bad config names the field and
exits 2; a database that cannot be reached at start is one clear line and exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.mosquitto import free_port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_check_accepts_a_good_config_and_names_bad_fields(tmp_path: Path) -> None:
    good = tmp_path / "controller.toml"
    good.write_text(
        'database_url = "postgresql://probe:secret@db.example.net/probefleet"\n'
        '[broker]\nhost = "mqtt.example.net"\nport = 8883\nshared_group = "ingest"\n'
    )
    proc = run("check", "--config", str(good))
    assert proc.returncode == 0 and "db.example.net/probefleet" in proc.stdout and "secret" not in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nhost = "x"\nport = 0\nshared_group = "no spaces allowed"\nsession_expiry = 5\n')
    proc = run("check", "--config", str(bad))
    assert proc.returncode == 2
    for field in ("broker.port", "broker.shared_group", "broker.session_expiry: unknown setting"):
        assert field in proc.stderr


def test_serve_with_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'database_url = "postgresql://probe:secret@127.0.0.1:{free_port()}/probefleet"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {free_port()}\n'
    )
    proc = run("serve", "--config", str(config))
    assert proc.returncode == 1
    assert "cannot open database postgresql://probe:***@127.0.0.1" in proc.stderr
    assert "secret" not in proc.stderr and "Traceback" not in proc.stderr


def test_the_readme_controller_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README shows controller.toml; it must stay a config ``check`` accepts (the secret and
    CA files it names are written here, as an operator would have them)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start = readme.index("# controller.toml:")
    example = readme[start : readme.index("```", start)]
    password, ca = tmp_path / "mqtt-password", tmp_path / "ca.pem"
    password.write_text("secret\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    example = example.replace("/etc/probe-fleet/mqtt-password", str(password))
    example = example.replace("/etc/probe-fleet/ca.pem", str(ca))
    assert "[scoring.weights]" in example and "[routing]" in example
    config = tmp_path / "controller.toml"
    config.write_text(example)
    proc = run("check", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
