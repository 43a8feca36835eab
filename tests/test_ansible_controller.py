"""The controller role (ansible/roles/controller): controller.toml rendered from the example
inventory passes ``probe-fleet check`` (SQLite, the local PostgreSQL, extra tables), the systemd
unit passes ``systemd-analyze``, and the first admin user and the playbooks' API token are made
once and only once.
(ansible-lint and --syntax-check of the whole tree, this role and rotate-credentials.yml included:
tests/test_ansible_lint.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller import config as controller_config
from tests.ansible_env import (
    ANSIBLE_DIR,
    BIN,
    changed_tasks,
    chroot_apply,
    debian_root,
    play_recap,
    render_template,
    run_ansible,
    wheelhouse,
)

INVENTORY_DIR = ANSIBLE_DIR / "inventory" / "example"
#: The venv running these tests stands in for the role's virtual environment on the host.
VENV = BIN.parent
#: The admin password in the example vault (group_vars/all/vault.yml).
EXAMPLE_ADMIN_PASSWORD = "admin-example-4e8a61b0"
#: The playbooks' API token in the example vault (group_vars/all/vault.yml).
EXAMPLE_API_TOKEN = "pf_e8jqrUycaa21RjbypiHhMnmqIe9q4Qa0PfPjrNvW5sE"


def probe_fleet(*args: str) -> subprocess.CompletedProcess[str]:
    """The venv's ``probe-fleet`` console script, as the role's validate step and tasks run it."""
    return subprocess.run([str(BIN / "probe-fleet"), *args], capture_output=True, text=True, timeout=120)


def paths(tmp_path: Path) -> dict[str, object]:
    """Extra vars that move the role's paths on the host into this test's directory."""
    return {
        "controller_venv": str(VENV),
        "controller_config_dir": str(tmp_path / "etc"),
        "controller_state_dir": str(tmp_path / "var"),
    }


def render_config(tmp_path: Path, **extra: object) -> tuple[Path, str]:
    """controller.toml rendered for ctl-1 (paths moved, ``extra`` on top); its path and text."""
    dest = tmp_path / "controller.toml"
    text = render_template(
        "ctl-1", "controller", "controller.toml.j2", dest, tmp_path / "home", {**paths(tmp_path), **extra}
    )
    return dest, text


def test_the_rendered_config_passes_check_with_sqlite(tmp_path: Path) -> None:
    dest, _ = render_config(tmp_path)
    done = probe_fleet("check", "--config", str(dest))
    db = f"sqlite:///{tmp_path}/var/probe-fleet.db"
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{dest}: ok: database {db}, broker mqtt-1.example.net:8883\n"
    config = controller_config.load(dest)
    assert config.database_url == db
    assert config.topic_prefix == "pf/v1"
    broker = config.broker
    assert (broker.host, broker.port, broker.protocol) == ("mqtt-1.example.net", 8883, "5")
    assert (broker.username, broker.password, broker.password_file) == (
        "probe-fleet-controller",
        None,
        tmp_path / "etc" / "mqtt-password",
    )
    assert broker.tls is not None and broker.tls.ca == tmp_path / "etc" / "ca.crt"
    # One controller in the inventory: the fleet-wide client id, no shared subscription.
    assert (broker.client_id, broker.session_expiry_s, broker.shared_group) == (
        "probe-fleet-controller",
        604800,
        None,
    )
    assert (config.api.host, config.api.port) == ("127.0.0.1", 8080)


def test_the_rendered_config_passes_check_with_the_local_postgresql(tmp_path: Path) -> None:
    """Peer authentication over the server's socket: no password in the URL or anywhere."""
    dest, _ = render_config(tmp_path, controller_database="postgresql")
    done = probe_fleet("check", "--config", str(dest))
    assert done.returncode == 0, done.stderr
    url = "postgresql://probe-fleet@/probe_fleet?host=/var/run/postgresql"
    assert controller_config.load(dest).database_url == url


def test_extra_tables_are_appended_and_checked(tmp_path: Path) -> None:
    extra = "[scoring]\nmin_results = 10\n\n[leader]\nttl_s = 60\nrenew_interval_s = 20\n"
    dest, _ = render_config(tmp_path, controller_config_extra=extra)
    assert probe_fleet("check", "--config", str(dest)).returncode == 0
    config = controller_config.load(dest)
    assert (config.scoring.min_results, config.leader.ttl_s, config.leader.renew_interval_s) == (10, 60, 20)
    # What the role's validate step would refuse: a typo is named, and nothing is installed.
    bad, _ = render_config(tmp_path, controller_config_extra="[scoring]\nmin_result = 10\n")
    done = probe_fleet("check", "--config", str(bad))
    assert done.returncode == 2 and "scoring.min_result" in done.stderr


def test_several_controllers_get_their_own_client_ids_and_share_ingest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a second host in the controllers group each instance keeps its own session and the
    observations are split through the shared subscription group."""
    inventory = tmp_path / "inventory"
    inventory.mkdir()
    (inventory / "group_vars").symlink_to(INVENTORY_DIR / "group_vars")
    (inventory / "hosts.yml").write_text(
        json.dumps({"all": {"children": {"controllers": {"hosts": {"ctl-1": {}, "ctl-2": {}}}}}})
    )
    monkeypatch.setenv("ANSIBLE_INVENTORY", str(inventory / "hosts.yml"))  # over ansible.cfg's
    dest = tmp_path / "controller.toml"
    shared_db = "postgresql://probe@db.example.net/probefleet"
    extra = {**paths(tmp_path), "controller_database_url": shared_db}
    render_template("ctl-2", "controller", "controller.toml.j2", dest, tmp_path / "home", extra)
    assert probe_fleet("check", "--config", str(dest)).returncode == 0
    config = controller_config.load(dest)
    assert config.database_url == shared_db
    assert (config.broker.client_id, config.broker.shared_group) == ("probe-fleet-controller-ctl-2", "ingest")


def test_the_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """No unknown keys or bad values (systemd-analyze verify reports those on stderr and still
    exits 0), and the hardening scores as 'OK' or better."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed (package systemd)")
    for database in ("sqlite", "postgresql"):
        unit = tmp_path / database / "probe-fleet.service"
        unit.parent.mkdir()
        text = render_template(
            "ctl-1",
            "controller",
            "probe-fleet.service.j2",
            unit,
            tmp_path / "home",
            {**paths(tmp_path), "controller_database": database},
        )
        assert f"ExecStart={VENV}/bin/probe-fleet serve --config {tmp_path}/etc/controller.toml" in text
        assert ("Requires=postgresql.service" in text) == (database == "postgresql")
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 2.0, done.stdout


def test_the_first_admin_is_created_once(tmp_path: Path) -> None:
    """The role's admin tasks on this machine against a SQLite database: the first run migrates
    the new database and adds the admin with the vault's password and the playbooks' API token, the
    second changes nothing."""
    config, _ = render_config(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "var").mkdir()
    shutil.copy(config, tmp_path / "etc" / "controller.toml")
    playbook = tmp_path / "admin.yml"
    play = {
        "hosts": "ctl-1",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": [
            {
                "name": "Create the first admin user",
                "ansible.builtin.include_role": {"name": "controller", "tasks_from": "admin.yml"},
            }
        ],
    }
    playbook.write_text(json.dumps([play]))
    # The tasks run as the controller's user; here that is whoever runs the tests, without become.
    extra = {**paths(tmp_path), "ansible_become": False}
    recaps = []
    for _ in range(2):
        done = run_ansible(["ansible-playbook", str(playbook), "-e", json.dumps(extra)], tmp_path / "home")
        assert done.returncode == 0, done.stdout + done.stderr
        assert EXAMPLE_ADMIN_PASSWORD not in done.stdout + done.stderr
        recap = re.search(r"ctl-1\s+: ok=\d+\s+changed=(\d+).*skipped=(\d+)", done.stdout)
        assert recap is not None, done.stdout
        recaps.append((int(recap.group(1)), int(recap.group(2))))
    # (changed, skipped): the admin and the playbooks' API token added, then both adds skipped.
    assert recaps == [(2, 0), (0, 2)]
    users = probe_fleet("user", "list", "--config", str(tmp_path / "etc" / "controller.toml"))
    assert [line.split("\t")[:3] for line in users.stdout.splitlines()] == [["admin", "admin", "enabled"]]
    tokens = probe_fleet("token", "list", "--config", str(tmp_path / "etc" / "controller.toml"))
    assert [line.split("\t")[:3] for line in tokens.stdout.splitlines()] == [["ansible", "viewer", "live"]]
    # The password is the vault's: authenticate with it.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from controller.storage.db import open_database\n"
            "from controller.web.users import authenticate\n"
            "from controller.api.tokens import find_token\n"
            "async def main():\n"
            "    engine = await open_database(sys.argv[1])\n"
            "    try:\n"
            "        print(await authenticate(engine, 'admin', sys.argv[2]) is not None)\n"
            "        async with engine.connect() as conn:\n"
            "            print(await find_token(conn, sys.argv[3]) is not None)\n"
            "    finally:\n"
            "        await engine.dispose()\n"
            "asyncio.run(main())\n",
            f"sqlite:///{tmp_path}/var/probe-fleet.db",
            EXAMPLE_ADMIN_PASSWORD,
            EXAMPLE_API_TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout == "True\nTrue\n", check.stderr


def test_rotating_without_the_brokers_stops_before_touching_an_agent(tmp_path: Path) -> None:
    """A --limit that leaves the brokers out would give agents passwords the broker refuses: the
    playbook stops at its check, before any agent task (run locally: nothing is reached)."""
    done = run_ansible(
        [
            "ansible-playbook",
            "rotate-credentials.yml",
            "--limit",
            "pi-de-tmo-01",
            "-c",
            "local",
            "-e",
            json.dumps({"ansible_become": False, "ansible_python_interpreter": sys.executable}),
        ],
        tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "The brokers were not updated in this run" in done.stdout
    assert "Write the agent's new password" not in done.stdout


@pytest.mark.timeout(900)
def test_role_applies_to_a_fresh_bookworm_root_and_a_second_apply_changes_nothing(tmp_path: Path) -> None:
    """The whole role (SQLite) in a chroot: installed from the wheelhouse, controller.toml checked,
    the unit enabled; no service runs there, so the admin user waits for the real host."""
    root = debian_root(tmp_path / "root")  # skips when debootstrap cannot run here
    wheels = wheelhouse(tmp_path / "wheelhouse")
    home = tmp_path / "home"
    apply = chroot_apply(root, "ctl-1", "controller", tmp_path, {"controller_wheelhouse": str(wheels)})
    outputs = []
    for _ in range(2):
        done = run_ansible(apply, home)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    assert play_recap(outputs[0])["ctl-1"]["changed"] > 0
    assert play_recap(outputs[1])["ctl-1"]["changed"] == 0, (
        f"the second apply changed {changed_tasks(outputs[1])}"
    )

    def chroot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["chroot", str(root), *args], capture_output=True, text=True, timeout=120)

    cli = "/opt/probe-fleet/venv/bin/probe-fleet"
    fleet_version = (INVENTORY_DIR / "group_vars" / "all" / "main.yml").read_text()
    assert f'probe_fleet_version: "{chroot(cli, "version").stdout.strip()}"' in fleet_version
    checked = chroot(cli, "check", "--config", "/etc/probe-fleet/controller.toml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (
        "database sqlite:////var/lib/probe-fleet/probe-fleet.db, broker mqtt-1.example.net:8883"
        in checked.stdout
    )
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    gid = int(groups["probe-fleet"][2])
    etc = root / "etc" / "probe-fleet"
    for name, mode in {"": 0o750, "controller.toml": 0o640, "mqtt-password": 0o640, "ca.crt": 0o644}.items():
        stat = (etc / name).stat()
        assert (stat.st_mode & 0o777, stat.st_uid, stat.st_gid) == (mode, 0, gid), name
    assert (etc / "mqtt-password").read_text().strip() not in (etc / "controller.toml").read_text()
    enabled = chroot("systemctl", "is-enabled", "probe-fleet.service")
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr
    verified = chroot("systemd-analyze", "verify", "/etc/systemd/system/probe-fleet.service")
    assert (verified.returncode, verified.stderr) == (0, ""), verified.stderr
