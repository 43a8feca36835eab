"""The one-command demo: the whole system on this machine, fed by simnet.

``probe-fleet demo`` starts, each in its own process: a broker on a free loopback port
(``--broker``: mosquitto when installed, else the embedded amqtt of ``simnet.broker``, which
speaks MQTT 3.1.1 only, so the controller and agents are then configured for 3.1.1), simnet (its
SMSCs and virtual modems), the controller (``probe-fleet serve`` with SQLite in the work folder)
and one real ``probe-agent`` per emulated Pi, opening its virtual modems' ports.
It creates an admin API token, enters the scenario's networks and routes through the REST API,
and starts one campaign over every route and network at a demo cadence (seconds, not minutes).
While it runs it prints progress (tests sent, delivered, pending; the top route per network).
Ctrl-C, or the end of ``--duration``, stops every process it started, last started first.

With ``--report FILE`` it writes what it measured, in a shape other tools can read:
``{"routing_table": {"<MCC-MNC>": ["<route>", ...best first]}, "flags": {"<route>": [...]},
"accuracy": {"tests", "delivered", "lost_observations", "latency_error_ms": {"p50", "p99",
"max"}, "within_bound_share"}}``. Accuracy compares every result with simnet's ground truth
(``truth.jsonl``: the instant each SMS was handed to the handset's modem): the latency error is
the controller's latency minus the true one (true delivery instant minus the controller's own
submit time), and it is within bound when it is no larger than the result's error bound plus
``STAMP_SLACK_MS`` (the time between the modem writing the indication and the agent's reader
stamping it, on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simnet.scenario import Scenario, ScenarioError

log = logging.getLogger(__name__)

#: The campaign's defaults: every route x network once per cadence; the deadline of a test.
CADENCE_S = 8.0
DEADLINE_S = 20.0
#: How long before the end of a timed run the campaign is paused, so its last tests can be decided.
DRAIN_S = 24.0
#: Progress is printed this often, seconds.
PROGRESS_EVERY_S = 5.0
#: Waits for a process to be ready, seconds.
READY_TIMEOUT_S = 60.0
#: Added to a result's error bound when judging its latency against the truth (see the docstring).
STAMP_SLACK_MS = 5.0
#: A route is flagged when at least this share of its delivered results shows the sign.
FLAG_SHARE = 0.2
#: ... and "fake_receipts" when at least this share of its judged receipts were fake.
FAKE_RECEIPT_SHARE = 0.05
#: "degraded": its delivery rate fell by this much, or its median latency grew this many times,
#: from the first third of the run to the last.
DEGRADED_DELIVERY_DROP = 0.2
DEGRADED_LATENCY_FACTOR = 2.0
SENDER = "PFDemo"
#: prctl option: the signal a child gets when its parent dies.
PR_SET_PDEATHSIG = 1
TEMPLATES = ["otp", "plain", "unicode", "long"]
#: ``--broker``: auto is mosquitto when installed, else the embedded amqtt (``simnet.broker``).
BROKER_CHOICES = ("auto", "mosquitto", "embedded")


class DemoError(Exception):
    """The demo could not start or run; the message says which part and why."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Processes:
    """The processes the demo started; stopped last first, SIGTERM then SIGKILL."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops them in order
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise DemoError(
                    f"{child.name} exited ({child.proc.returncode}); its log {child.log_path}:\n"
                    + tail(child.log_path)
                )

    def stop(self, names: set[str] | None = None, timeout_s: float = 15.0) -> None:
        for child in reversed(self.children):
            if names is not None and child.name not in names:
                continue
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, timeout_s)
                    child.proc.kill()
                    child.proc.wait(5)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo itself dies (killed, not stopped), so no
    broker, SMSC or agent outlives it (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until(check: Any, what: str, processes: Processes, timeout_s: float = READY_TIMEOUT_S) -> Any:
    """Poll ``check()`` until it returns something true; DemoError when a child died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        processes.check_alive()
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


@dataclass(frozen=True)
class DemoBroker:
    """The demo's running broker: where it listens, what the banner calls it, and the MQTT
    version the controller and agents must speak to it (their ``[broker] protocol``)."""

    port: int
    description: str
    protocol: str


def broker_kind(requested: str) -> str:
    """``--broker auto|mosquitto|embedded`` as ``mosquitto`` or ``embedded``: auto is mosquitto
    when installed, else the embedded one."""
    if requested == "auto":
        return "mosquitto" if mosquitto_binary() is not None else "embedded"
    return requested


def start_broker(processes: Processes, kind: str = "mosquitto") -> DemoBroker:
    """The broker (``broker_kind``'s answer) on a free loopback port, anonymous, in memory."""
    if kind == "embedded":
        return start_embedded_broker(processes)
    binary = mosquitto_binary()
    if binary is None:
        raise DemoError(
            "mosquitto is not installed (apt install mosquitto): the demo needs an MQTT broker;"
            " --broker embedded (or auto) runs the embedded one instead"
        )
    port = free_port()
    conf = processes.workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_inflight_messages 0\n"
    )
    processes.start("mosquitto", [binary, "-c", str(conf)])
    _wait_listening(port, "mosquitto", processes)
    return DemoBroker(port, "mosquitto", "5")


def start_embedded_broker(processes: Processes) -> DemoBroker:
    """``python -m simnet.broker`` (amqtt, MQTT 3.1.1 only) on a free loopback port."""
    from simnet.broker import DESCRIPTION  # imports amqtt: only when it is used

    port = free_port()
    processes.start("broker", [sys.executable, "-m", "simnet.broker", "--port", str(port)])
    wait_until(lambda: _answers_mqtt(port), "the embedded broker to answer", processes)
    return DemoBroker(port, DESCRIPTION, "3.1.1")


def _wait_listening(port: int, what: str, processes: Processes) -> None:
    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, f"{what} to listen", processes)


def _answers_mqtt(port: int, timeout_s: float = 2.0) -> bool:
    """An MQTT 3.1.1 CONNECT on loopback ``port`` is accepted (amqtt logs a bare TCP probe, a
    connection closed before its CONNECT, as an error)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"demo-ready-{os.getpid()}", protocol=mqtt.MQTTv311
    )
    try:
        client.connect("127.0.0.1", port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        return client.is_connected()
    except OSError:
        return False
    finally:
        client.disconnect()


class Api:
    """The controller's REST API, with the demo's admin token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise DemoError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from exc

    def total(self, path: str) -> int:
        return int(self.call("GET", path)["total"])


def controller_toml(
    path: Path,
    *,
    broker_port: int,
    api_port: int,
    database: Path,
    cadence_s: float,
    protocol: str = "5",
) -> Path:
    """The demo controller's config: SQLite, the demo broker, scores and table at demo pace."""
    rebuild_s = max(2.0, cadence_s / 2)
    path.write_text(
        f'database_url = "sqlite:///{database}"\n'
        "time_exchange_interval_s = 10\n"
        "[broker]\n"
        f'host = "127.0.0.1"\nport = {broker_port}\nprotocol = "{protocol}"\nclient_id = "demo-controller"\n'
        "[correlation]\ngrace_s = 10\nsweep_interval_s = 1\n"
        f"[schedule]\ndeadline_s = {DEADLINE_S}\ndispatch_interval_s = 0.5\nsync_interval_s = 2\n"
        "late_submit_s = 20\nsubmit_timeout_s = 10\nretry_after_s = 5\n"
        # A demo has minutes, not days: few results, a short memory, and latency differences of
        # a second or two that should show in the ranking.
        "[scoring]\nwindow_s = 3600\n"
        f"half_life_s = {max(10.0, cadence_s * 4)}\nmin_results = 4\n"
        "latency_good_ms = 1000\nlatency_half_ms = 8000\n"
        "[scoring.weights]\nlatency = 0.25\n"
        "[routing]\nmargin = 0.02\n"
        f"rebuild_interval_s = {rebuild_s}\nstale_after_s = {cadence_s * 10}\n"
        f'[api]\nhost = "127.0.0.1"\nport = {api_port}\n'
        "[sender]\nenabled = true\n"
    )
    return path


def agent_toml(
    path: Path,
    *,
    pi: dict[str, Any],
    handsets: list[dict[str, Any]],
    broker_port: int,
    protocol: str = "5",
) -> Path:
    """One emulated Pi's agent config: its virtual modems, its (possibly shifted) clock."""
    lines = [
        f'agent_id = "{pi["id"]}"',
        "heartbeat_interval_s = 10",
        "[broker]",
        f'host = "127.0.0.1"\nport = {broker_port}\nprotocol = "{protocol}"',
        "[spool]",
        f'path = "{path.parent / "spool.db"}"',
        "[clock]",
        'chronyc = ""',
        f"shift_s = {float(pi.get('clock_shift_s', 0.0))}",
    ]
    for h in handsets:
        lines += [
            "[[modems]]",
            f'id = "{h["modem"]}"',
            f'port = "{h["port"]}"',
            f'profile = "{h["profile"]}"',
            f'expected_mcc_mnc = "{h["mcc_mnc"]}"',
            f'msisdn = "{h["msisdn"]}"',
            "poll_interval_s = 5",
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(config: Path, *args: str, what: str, stdin: str | None = None) -> str:
    """Run ``probe-fleet ARGS --config CONFIG``; its standard output, or a DemoError."""
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"{what} failed: {result.stderr.strip()}")
    return result.stdout


def create_token(config: Path, processes: Processes) -> str:
    """The demo's admin API token (the demo seeds the controller through the REST API)."""
    output = _cli(config, "token", "add", "demo", "--role", "admin", what="creating the demo's API token")
    return output.strip().splitlines()[-1]


def create_ui_user(config: Path) -> str:
    """The demo's web UI user ``demo`` (admin) with a fresh random password, returned."""
    password = secrets.token_urlsafe(12)
    _cli(
        config,
        "user",
        "add",
        "demo",
        "--role",
        "admin",
        "--password-stdin",
        what="creating the demo's web UI user",
        stdin=password + "\n",
    )
    return password


def seed(api: Api, world: dict[str, Any], cadence_s: float) -> int:
    """The scenario's networks and routes, and one campaign over all of them; the campaign id."""
    networks = [n["mcc_mnc"] for n in world["networks"]]
    for n in world["networks"]:
        api.call(
            "POST",
            "/networks",
            {
                "mcc_mnc": n["mcc_mnc"],
                "country": n["country"],
                "operator": n["operator"],
                "smsc_addresses": n["smsc_addresses"],
            },
        )
    for r in world["routes"]:
        api.call(
            "POST",
            "/routes",
            {
                "name": r["name"],
                "connector": {
                    "kind": "smpp",
                    "host": r["host"],
                    "port": r["port"],
                    "system_id": r["system_id"],
                    "password": r["password"],
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 2.0,
                },
                "prices": {mcc_mnc: r.get("price", 0.01) for mcc_mnc in networks},
                "enabled": True,
            },
        )
    campaign = api.call(
        "POST",
        "/campaigns",
        {
            "name": "demo",
            "definition": {
                "routes": [r["name"] for r in world["routes"]],
                "networks": networks,
                "cadence_s": cadence_s,
                "jitter_s": min(1.0, cadence_s / 8),
                "templates": TEMPLATES,
                "sender": SENDER,
                "deadline_s": DEADLINE_S,
            },
        },
    )
    return int(campaign["id"])


def routing_table(api: Api) -> dict[str, Any]:
    """The current routing table, or {} while the controller has built none."""
    try:
        return dict(api.call("GET", "/routing-table") or {})
    except DemoError as exc:
        if " 404 " in str(exc):
            return {}
        raise


def progress_line(api: Api, elapsed_s: float) -> str:
    pending = api.total("/test-cases?limit=1&status=submitted")
    sent = pending + api.total("/test-cases?limit=1&status=done")
    delivered = api.total("/results?limit=1&delivered=true")
    tops = []
    for mcc_mnc, choices in sorted(routing_table(api).get("networks", {}).items()):
        top = next((c["route"] for c in choices if c.get("role") == "primary"), None)
        tops.append(f"{mcc_mnc}:{top or '?'}")
    return (
        f"[{elapsed_s:5.0f} s] tests sent {sent}, delivered {delivered}, pending {pending}; "
        f"top route {' '.join(tops) or '(no table yet)'}"
    )


def load_truth(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _utc(value: Any) -> datetime | None:
    """A timestamp from SQLite (naive UTC text) or JSON (ISO with offset), as aware UTC."""
    if value is None:
        return None
    moment = datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[rank]


def report(database: Path, truth_path: Path, table: dict[str, Any]) -> dict[str, Any]:
    """The report: the final routing table, flags per route, accuracy against the ground truth."""
    truth = {(t["route"], str(t["message_id"]).lower()): t for t in load_truth(truth_path)}
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT t.id, t.route, t.message_id, t.submitted_at, t.scheduled_at, r.delivered, r.latency_ms,"
            " r.latency_error_ms, r.sender_kept, r.smsc_known, r.content_intact, r.sim_box, r.flags,"
            " r.receipt_honest, r.decided_at FROM test_cases t LEFT JOIN results r ON r.test_case_id = t.id"
            " WHERE t.message_id IS NOT NULL"
        ).fetchall()
    finally:
        db.close()
    errors: list[float] = []
    within = 0
    delivered = 0
    lost_observations = 0
    by_route: dict[str, list[sqlite3.Row]] = defaultdict(list)
    for row in rows:
        by_route[row["route"]].append(row)
        if row["delivered"]:
            delivered += 1
        fact = truth.get((row["route"], str(row["message_id"]).lower()))
        if fact is None or fact.get("delivered_at") is None:
            continue
        if row["delivered"] is None or not row["delivered"]:
            lost_observations += 1  # it reached the handset, the controller never saw it
            continue
        submitted = _utc(row["submitted_at"])
        true_at = _utc(fact["delivered_at"])
        if submitted is None or true_at is None or row["latency_ms"] is None:
            continue
        error_ms = row["latency_ms"] - (true_at - submitted).total_seconds() * 1000
        errors.append(abs(error_ms))
        if abs(error_ms) <= (row["latency_error_ms"] or 0.0) + STAMP_SLACK_MS:
            within += 1
    errors.sort()
    return {
        "routing_table": {
            mcc_mnc: [c["route"] for c in choices]
            for mcc_mnc, choices in sorted(table.get("networks", {}).items())
        },
        "flags": {route: route_flags(results) for route, results in sorted(by_route.items())},
        "accuracy": {
            "tests": len(rows),
            "delivered": delivered,
            "lost_observations": lost_observations,
            "latency_error_ms": {
                "p50": round(_percentile(errors, 0.5), 3) if errors else None,
                "p99": round(_percentile(errors, 0.99), 3) if errors else None,
                "max": round(errors[-1], 3) if errors else None,
            },
            "within_bound_share": round(within / len(errors), 4) if errors else None,
        },
    }


def route_flags(rows: list[sqlite3.Row]) -> list[str]:
    """What a route's results show: grey-route signs, fake receipts, a degradation over the run."""
    decided = [r for r in rows if r["delivered"] is not None]
    got = [r for r in decided if r["delivered"]]
    flags: list[str] = []

    def share(rows_: list[sqlite3.Row], test: Any) -> float:
        return sum(1 for r in rows_ if test(r)) / len(rows_) if rows_ else 0.0

    sender_replaced = share(got, lambda r: r["sender_kept"] == 0) >= FLAG_SHARE
    foreign = share(got, lambda r: r["smsc_known"] == 0) >= FLAG_SHARE
    sim_box = share(got, lambda r: r["sim_box"] == 1) >= FLAG_SHARE
    if sender_replaced or foreign or sim_box:
        flags.append("grey")
    if sender_replaced:
        flags.append("sender_replaced")
    if sim_box:
        flags.append("sim_box")
    if foreign:
        flags.append("foreign_smsc")
    if share(got, lambda r: r["content_intact"] == 0) >= FLAG_SHARE:
        flags.append("content_altered")
    judged = [r for r in decided if r["receipt_honest"] is not None]
    if share(judged, lambda r: "fake_receipt" in json.loads(r["flags"] or "[]")) >= FAKE_RECEIPT_SHARE:
        flags.append("fake_receipts")
    if _degraded(decided):
        flags.append("degraded")
    return flags


def _degraded(decided: list[sqlite3.Row]) -> bool:
    timed = sorted(
        ((t, r) for r in decided if (t := _utc(r["scheduled_at"])) is not None), key=lambda pair: pair[0]
    )
    if len(timed) < 6:
        return False
    third = len(timed) // 3
    first, last = [r for _, r in timed[:third]], [r for _, r in timed[-third:]]

    def rate(rows: list[sqlite3.Row]) -> float:
        return sum(1 for r in rows if r["delivered"]) / len(rows)

    def median(rows: list[sqlite3.Row]) -> float | None:
        values = sorted(r["latency_ms"] for r in rows if r["delivered"] and r["latency_ms"] is not None)
        return values[len(values) // 2] if values else None

    if rate(first) - rate(last) >= DEGRADED_DELIVERY_DROP:
        return True
    before, after = median(first), median(last)
    return before is not None and after is not None and after >= DEGRADED_LATENCY_FACTOR * max(before, 1.0)


def _nothing_pending(api: Api) -> bool:
    return all(api.total(f"/test-cases?limit=1&status={s}") == 0 for s in ("scheduled", "submitted"))


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="probe-fleet-demo-") as tmp:
        yield Path(tmp)


class _Stop(Exception):
    pass


def run(
    *,
    scenario_path: Path | None,
    duration_s: float | None,
    report_path: Path | None,
    workdir: Path | None,
    api_port: int,
    cadence_s: float,
    seed_value: int,
    broker: str = "auto",
) -> int:
    """Run the demo; 0 on a clean stop (Ctrl-C or the end of the duration), 1 when a part failed."""
    try:
        scenario = Scenario.load(scenario_path) if scenario_path else Scenario.default()
    except ScenarioError as exc:
        for problem in exc.problems:
            print(f"{scenario_path}: {problem}", file=sys.stderr)
        return 2
    stopping = {"now": False}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["now"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    with _workdir(workdir) as root:
        processes = Processes(root)
        try:
            return _run(
                scenario,
                scenario_path,
                duration_s,
                report_path,
                processes,
                api_port,
                cadence_s,
                seed_value,
                broker,
                stopping,
            )
        except DemoError as exc:
            print(f"probe-fleet demo: {exc}", file=sys.stderr)
            return 1
        finally:
            print("stopping every process the demo started ...", flush=True)
            processes.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)


def _run(
    scenario: Scenario,
    scenario_path: Path | None,
    duration_s: float | None,
    report_path: Path | None,
    processes: Processes,
    api_port: int,
    cadence_s: float,
    seed_value: int,
    broker_choice: str,
    stopping: dict[str, bool],
) -> int:
    root = processes.workdir
    for stale in (
        *root.glob("controller.db*"),
        root / "simnet" / "truth.jsonl",
        *root.glob("agents/*/spool.db*"),
    ):
        stale.unlink(missing_ok=True)  # a reused work folder starts afresh
    started = time.monotonic()
    print(f"probe-fleet demo: work folder {root}", flush=True)
    broker = start_broker(processes, broker_kind(broker_choice))
    print(f"  broker   {broker.description} on 127.0.0.1:{broker.port}", flush=True)

    simnet_dir = root / "simnet"
    simnet_dir.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "simnet", "run", "--workdir", str(simnet_dir), "--seed", str(seed_value)]
    if scenario_path is not None:
        argv += ["--scenario", str(scenario_path)]
    if duration_s is not None:
        argv += ["--duration", str(duration_s)]
    processes.start("simnet", argv)
    described = simnet_dir / "simnet.json"
    world: dict[str, Any] = wait_until(
        lambda: json.loads(described.read_text()) if described.exists() else None, "simnet", processes
    )
    print(
        f"  simnet   {len(world['routes'])} routes, {len(world['handsets'])} handsets on "
        f"{len(world['networks'])} networks",
        flush=True,
    )

    if api_port == 0 or not port_is_free(api_port):  # 0: any free port, known before the controller starts
        api_port = free_port()
    database = root / "controller.db"
    config = controller_toml(
        root / "controller.toml",
        broker_port=broker.port,
        api_port=api_port,
        database=database,
        cadence_s=cadence_s,
        protocol=broker.protocol,
    )
    token = create_token(config, processes)
    ui_password = create_ui_user(config)
    processes.start("controller", [sys.executable, "-m", "controller.cli", "serve", "--config", str(config)])
    base = f"http://127.0.0.1:{api_port}/api/v1"
    api = Api(base, token)

    def healthy() -> bool:
        try:
            api.call("GET", "/health")
        except (DemoError, OSError):
            return False
        return True

    wait_until(healthy, "the controller's API", processes)
    print(f"  web UI   http://127.0.0.1:{api_port}/  (user: demo, password: {ui_password})", flush=True)
    print(f"  API      {base}  (token: {token})", flush=True)

    pis = {pi.id: pi for pi in scenario.pis}
    by_pi: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for handset in world["handsets"]:
        by_pi[handset["pi"]].append(handset)
    for pi_id, handsets in sorted(by_pi.items()):
        pi = pis[pi_id]
        config_path = agent_toml(
            root / "agents" / pi_id / "agent.toml",
            pi={"id": pi_id, "clock_shift_s": pi.clock_shift_s},
            handsets=handsets,
            broker_port=broker.port,
            protocol=broker.protocol,
        )
        processes.start(
            f"agent-{pi_id}", [sys.executable, "-m", "probe_agent.cli", "run", "--config", str(config_path)]
        )
        shift = f", clock {pi.clock_shift_s:+g} s" if pi.clock_shift_s else ""
        print(f"  agent    {pi_id}: {len(handsets)} modems{shift}", flush=True)

    campaign = seed(api, world, cadence_s)
    print(
        f"  campaign every route x network every {cadence_s:g} s; "
        + (f"running for {duration_s:g} s" if duration_s else "Ctrl-C stops it"),
        flush=True,
    )
    paused = False
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    while not stopping["now"]:
        elapsed = time.monotonic() - started
        if duration_s is not None:
            if not paused and elapsed >= duration_s - DRAIN_S:
                api.call("POST", f"/campaigns/{campaign}/pause")
                paused = True
                print(f"[{elapsed:5.0f} s] campaign paused: deciding the last tests", flush=True)
            if elapsed >= duration_s:
                break
            if paused and elapsed >= duration_s - DRAIN_S + 5 and _nothing_pending(api):
                break
        processes.check_alive()
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            print(progress_line(api, elapsed), flush=True)
        time.sleep(0.2)
    table = routing_table(api)
    print(progress_line(api, time.monotonic() - started), flush=True)
    if report_path is not None:
        processes.stop({name for name in (c.name for c in processes.children) if name.startswith("agent-")})
        processes.stop({"controller"})
        document = report(database, simnet_dir / "truth.jsonl", table)
        report_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"report written to {report_path}: {json.dumps(document['accuracy'])}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``probe-fleet demo`` (also ``python -m simnet.demo``)."""
    parser = argparse.ArgumentParser(prog="probe-fleet demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, help="scenario TOML (default: simnet's default scenario)")
    parser.add_argument("--duration", type=float, help="stop by itself after this many seconds")
    parser.add_argument("--report", type=Path, help="write the JSON report here at the end")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--port", type=int, default=8080, help="API port (a free one when taken)")
    parser.add_argument("--cadence", type=float, default=CADENCE_S, help="seconds between rounds")
    parser.add_argument("--seed", type=int, default=1, help="simnet's random seed")
    parser.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default="auto",
        help="the MQTT broker: mosquitto, the embedded amqtt (MQTT 3.1.1 only), or auto (default):"
        " mosquitto when installed, else the embedded one",
    )
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration < DRAIN_S + 10:
        parser.error(f"--duration must be at least {DRAIN_S + 10:g} s")
    from probe_agent.logs import setup_logging

    setup_logging("INFO")
    return run(
        scenario_path=args.scenario,
        duration_s=args.duration,
        report_path=args.report,
        workdir=args.workdir,
        api_port=args.port,
        cadence_s=args.cadence,
        seed_value=args.seed,
        broker=args.broker,
    )


if __name__ == "__main__":
    raise SystemExit(main())
