"""ansible/ passes ansible-lint (its production profile, offline; config in ansible/.ansible-lint)
and every playbook in it passes ``ansible-playbook --syntax-check`` against the example inventory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ansible_env import ANSIBLE_DIR, run_ansible

#: Every playbook: the YAML files at the top of ansible/ (roles and inventory live in folders).
PLAYBOOKS = sorted(path.name for path in ANSIBLE_DIR.glob("*.yml"))


def test_there_are_playbooks() -> None:
    assert {"site.yml", "upgrade-agents.yml", "add-probe.yml"} <= set(PLAYBOOKS)


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_passes_syntax_check(playbook: str, tmp_path: Path) -> None:
    done = run_ansible(["ansible-playbook", "--syntax-check", playbook], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(300)
def test_ansible_lint_is_clean(tmp_path: Path) -> None:
    done = run_ansible(["ansible-lint", "--offline", "--nocolor"], tmp_path)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-8000:]
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr
