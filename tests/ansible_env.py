"""Running the project's Ansible (ansible/) from tests: the example inventory with its vault
password, the venv's ansible-core, and rendering one role template for one inventory host with
the real inventory and the role's defaults, as a play would."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
INVENTORY = ANSIBLE_DIR / "inventory" / "example" / "hosts.yml"
VAULT_PASSWORD_FILE = ANSIBLE_DIR / "inventory" / "example" / "vault-password.txt"
BIN = Path(sys.executable).parent


def ansible_env(home: Path) -> dict[str, str]:
    """Environment for ansible commands: our ansible.cfg, the venv first on PATH, and Ansible's own
    state (tmp, facts cache, collections it would write) under ``home`` instead of ~/.ansible."""
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
        ANSIBLE_VAULT_PASSWORD_FILE=str(VAULT_PASSWORD_FILE),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def run_ansible(args: list[str], home: Path, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    """Run one ansible command (``ansible-playbook``, ``ansible``, ``ansible-lint`` ...) from
    ansible/ and return what it printed; the caller asserts on the exit code."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=ANSIBLE_DIR,
        env=ansible_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def render_template(
    host: str, role: str, template: str, dest: Path, home: Path, extra_vars: dict[str, object] | None = None
) -> str:
    """Render ``roles/<role>/templates/<template>`` for inventory ``host`` into ``dest`` on this
    machine and return the text. The variables are the ones a real play sees, with the same
    precedence: the role's defaults and vars, then the inventory's group and host vars (vault
    included); ``extra_vars`` override them all, as ``-e`` does (a test's port or paths). A
    stand-in role whose only task is the template links to the real role's files."""
    return render_templates(host, role, {template: dest}, home, extra_vars)[template]


def render_templates(
    host: str,
    role: str,
    templates: Mapping[str, Path],
    home: Path,
    extra_vars: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """``render_template`` for several templates of one role and host in one play (one Ansible
    start, one fact gathering): ``{template: dest}`` in, ``{template: text}`` out."""
    real = ANSIBLE_DIR / "roles" / role
    stand_in = home / "render" / "roles" / role
    (stand_in / "tasks").mkdir(parents=True, exist_ok=True)
    for part in ("defaults", "vars", "templates", "files", "filter_plugins"):
        link = stand_in / part
        if (real / part).is_dir() and not link.exists():
            link.symlink_to(real / part)
    tasks = [
        {"name": f"Render {template}", "ansible.builtin.template": {"src": template, "dest": str(dest)}}
        for template, dest in templates.items()
    ]
    (stand_in / "tasks" / "main.yml").write_text(json.dumps(tasks))
    play: dict[str, object] = {"hosts": host, "connection": "local", "gather_facts": True, "roles": [role]}
    play["vars"] = {"ansible_python_interpreter": sys.executable}
    playbook = home / "render" / f"render-{role}.yml"
    playbook.write_text(json.dumps([play]))
    args = ["ansible-playbook", str(playbook)]
    if extra_vars:
        args += ["-e", json.dumps(dict(extra_vars))]
    done = run_ansible(args, home)
    names = ", ".join(templates)
    assert done.returncode == 0, f"rendering {role}/{names} for {host}:\n{done.stdout}\n{done.stderr}"
    return {template: dest.read_text() for template, dest in templates.items()}


_RECAP_LINE = re.compile(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$")


def play_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of an ``ansible-playbook`` run: ``{host: {"ok": n, "changed": n, ...}}``."""
    recap: dict[str, dict[str, int]] = {}
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("PLAY RECAP")]
    assert starts, f"no PLAY RECAP in:\n{output[-3000:]}"
    for line in lines[starts[-1] + 1 :]:
        match = _RECAP_LINE.match(line.strip())
        if match is None:
            if recap:
                break
            continue
        counts = dict(pair.split("=") for pair in match.group(2).split())
        recap[match.group(1)] = {key: int(value) for key, value in counts.items()}
    return recap


def changed_tasks(output: str) -> list[str]:
    """The tasks an ``ansible-playbook`` run reported changed, by name (to say what broke
    idempotence)."""
    task, changed = "", []
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            task = line.split("[", 1)[1].rsplit("]", 1)[0]
        elif line.startswith("changed:"):
            changed.append(task)
    return changed


def chroot_apply(root: Path, host: str, role: str, workdir: Path, extra: dict[str, object]) -> list[str]:
    """The ``ansible-playbook`` command applying ``role`` to ``host`` of the example inventory,
    reached through the chroot connection in ``root`` (an inventory overlay and a one-play
    playbook are written to ``workdir``); ``extra`` are its ``-e`` variables."""
    overlay = workdir / f"{host}-chroot.json"
    connection = {
        "ansible_connection": "community.general.chroot",
        "ansible_host": str(root),
        "ansible_python_interpreter": "/usr/bin/python3",
    }
    overlay.write_text(json.dumps({"all": {"hosts": {host: connection}}}))
    playbook = workdir / f"apply-{role}.yml"
    playbook.write_text(json.dumps([{"name": f"Apply the {role} role", "hosts": host, "roles": [role]}]))
    inventories = ["-i", str(INVENTORY), "-i", str(overlay)]
    return ["ansible-playbook", *inventories, str(playbook), "-e", json.dumps(extra)]


# --- A real Debian root to apply roles to (chroot), and a wheelhouse of the project ----------

#: Cached, between test runs and outside the clone: the debootstrapped root (a tar file) and the
#: wheels of the project's dependencies. PROBE_FLEET_TEST_CACHE moves it.
CACHE_DIR = Path(
    os.environ.get(
        "PROBE_FLEET_TEST_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "probe-fleet",
    )
)
#: A cached root older than this is made afresh (its packages and apt lists age).
ROOT_MAX_AGE_S = 30 * 86400
DEBOOTSTRAP_TIMEOUT_S = 600.0
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def debootstrap_unavailable() -> str | None:
    """Why debootstrap cannot run here (the reason to skip with), or None when it can."""
    if os.geteuid() != 0:
        return "debootstrap and chroot need root (run the tests as root, as CI does)"
    if shutil.which("debootstrap") is None and not Path("/usr/sbin/debootstrap").exists():
        return "debootstrap is not installed (apt-get install debootstrap; .ci/run does)"
    if shutil.which("chroot") is None and not Path("/usr/sbin/chroot").exists():
        return "chroot is not available"
    return None


def apt_mirror(suite: str) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (deb822 .sources or one-line
    .list files), else deb.debian.org."""
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for file in files:
        for line in file.read_text().splitlines() if file.is_file() else []:
            parts = line.split("#", 1)[0].split()
            words = [w for w in parts if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    for file in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in file.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                return fields.get("uris", DEFAULT_MIRROR).split()[0]
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """One builder of a cache entry at a time, across processes (parallel test runs)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def debian_root(dest: Path, suite: str = "bookworm", include: tuple[str, ...] = ("python3",)) -> Path:
    """A fresh minimal Debian ``suite`` root at ``dest``, as ``debootstrap --variant=minbase`` makes
    it (with ``include``), unpacked from a tar file cached in CACHE_DIR (made on first use, ~40 s;
    an unpack takes ~2 s). Package installs there never start services (policy-rc.d exits 101).
    Skips the test when debootstrap cannot run here."""
    reason = debootstrap_unavailable()
    if reason:
        pytest.skip(reason)
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True)
    tarball = CACHE_DIR / f"debian-{suite}-minbase-{'-'.join(include)}-{arch.stdout.strip()}.tar"
    with _cache_lock(tarball.name):
        if not tarball.exists() or time.time() - tarball.stat().st_mtime > ROOT_MAX_AGE_S:
            build = Path(tempfile.mkdtemp(prefix="debootstrap.", dir=CACHE_DIR))
            try:
                mirror = apt_mirror(suite)
                debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
                command = [debootstrap, "--variant=minbase", f"--include={','.join(include)}", suite]
                made = subprocess.run(
                    [*command, str(build / "root"), mirror],
                    capture_output=True,
                    text=True,
                    timeout=DEBOOTSTRAP_TIMEOUT_S,
                )
                assert made.returncode == 0, f"debootstrap {suite} from {mirror}:\n{made.stdout[-3000:]}"
                packed = build / "root.tar"
                subprocess.run(["tar", "-C", str(build / "root"), "-cf", str(packed), "."], check=True)
                packed.replace(tarball)
            finally:
                shutil.rmtree(build, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-C", str(dest), "-xf", str(tarball)], check=True)
    policy = dest / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# no service starts inside a chroot\nexit 101\n")
    policy.chmod(0o755)
    return dest


#: What goes into the project's wheel (pyproject.toml's packages and the files it reads).
_PROJECT_PARTS = ("pyproject.toml", "README.md", "probe_agent", "hardware", "controller", "simnet")


def wheelhouse(dest: Path) -> Path:
    """A wheelhouse at ``dest``, as the README has operators build one (``pip wheel . -w DIR``):
    the project's wheel, built now from a copy of the working tree (the clone stays clean), and
    the wheels of its dependencies for this machine's Python and architecture, cached in
    CACHE_DIR by the dependency list (first build ~10 s from pip's cache)."""
    source = dest.parent / f"{dest.name}-source"
    source.mkdir(parents=True)
    for part in _PROJECT_PARTS:
        if (ROOT / part).is_dir():
            shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / part, source / part)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet"]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(
        json.dumps([sorted(dependencies), sys.version_info[:2], platform.machine()]).encode()
    ).hexdigest()[:16]
    cached = CACHE_DIR / f"wheelhouse-{key}"
    with _cache_lock(cached.name):
        if not cached.is_dir():
            build = Path(tempfile.mkdtemp(prefix="wheelhouse.", dir=CACHE_DIR))
            made = subprocess.run([*pip, "-w", str(build), str(source)], capture_output=True, text=True)
            assert made.returncode == 0, f"pip wheel:\n{made.stdout[-2000:]}\n{made.stderr[-3000:]}"
            for own in build.glob("probe_fleet-*.whl"):
                own.unlink()
            build.replace(cached)
    shutil.copytree(cached, dest)
    made = subprocess.run([*pip, "--no-deps", "-w", str(dest), str(source)], capture_output=True, text=True)
    assert made.returncode == 0, f"pip wheel (project):\n{made.stdout[-2000:]}\n{made.stderr[-3000:]}"
    return dest
