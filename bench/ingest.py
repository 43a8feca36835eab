"""Controller ingest benchmark: observations per second validated and persisted by a real
``probe-fleet serve`` process from a real mosquitto, against a bare paho subscriber draining the
same payloads from the same broker in the same run.

It starts its own mosquitto on a free loopback port (``max_queued_messages 0``: a consumer that
lags is queued for, never dropped) and a publisher child process holding several paho clients
(MQTT 5, QoS 1, paho's in-flight window of 20 each, the broker's own receive maximum). The
publisher sends N (default 20,000) distinct, valid Observation payloads, spread over a few agents,
to ``pf/v1/agents/<agent>/sms``. The payloads are what an agent publishes: real SMS-DELIVER PDUs,
OTP-like texts, the SIM, the clock estimate. Two phases, in this order:

1. baseline: a bare paho-mqtt subscriber (MQTT 5, QoS 1, paho's defaults, no processing) in a
   child process; rate = N / (first publish -> last message received). It runs first because the
   controller's session outlives it (clean start off): after the controller, the broker would
   also queue every baseline message for the absent controller.
2. ingest: ``python -m controller.cli serve --config <toml>`` (what runs in production), SQLite in
   a temp dir, default ingest settings; once its retained ``pf/v1/controller/status`` says online
   (it subscribes before it publishes that), the same N payloads are published and the SQLite file
   is polled with a read-only connection every 20 ms; rate = N / (first publish -> the poll that
   saw N rows in ``observations``). The poll resolution (20 ms) is in the controller's figure.

``ingest_ratio`` = ingest rate / bare subscriber rate. Goals (issue 4): ratio >= 0.7 and >= 5,000
observations per second on SQLite. The ingest figure covers validation, de-duplication,
correlation and the batched write; the database holds no test cases, so correlation costs its
lookups (tokens in the text, the SIM's open test cases) and each SMS is stored as unsolicited.
``recompute_s`` on the last line is ``recompute.measure()`` (bench/recompute.py), run in this
process once both phases are over: a full score compute of 10,000 (route, network) pairs over
1,000,000 synthetic results, best of 3 after a warm-up, reading the results from the database
not included (goal <= 1 s).

Run from the project root: ``.venv/bin/python bench/ingest.py [--messages 20000] [--agents 4]
[--publishers 8]``.
Exit code 0 even when a goal is missed; 1 when fewer than N observations were persisted (or the
bare subscriber did not get them all).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import paho.mqtt.client as mqtt
import psutil
from harness import cpu_s, log, reply, start_child, start_mosquitto, start_process, stop_process
from paho.mqtt.enums import CallbackAPIVersion

from hardware.sms_pdu import encode_deliver
from probe_agent.protocol import DEFAULT_PREFIX, ClockState, Observation, SimIdentity, Topics

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.7
GOAL_INGEST_PER_S = 5000.0
MESSAGES = 20_000
AGENTS = 4
PUBLISHERS = 8
MODEMS_PER_AGENT = 4
POLL_S = 0.02
#: Waiting for messages or rows ends when nothing new came for this long.
STALL_TIMEOUT_S = 30.0
CONTROLLER_CLIENT_ID = "bench-controller"
SENDER = "MyBank"
SMSC = "+447785016005"
TOPICS = Topics(DEFAULT_PREFIX)


def agent_ids(agents: int) -> list[str]:
    return [f"bench-pi-{a:02d}" for a in range(agents)]


def build_payloads(messages: int, agents: int) -> list[tuple[str, bytes]]:
    """(topic, payload) for ``messages`` distinct, valid observations dealt round robin over the
    agents (and their modems), as agents publish them. Deterministic: both phases send the same."""
    base = datetime(2026, 1, 15, 9, 0, tzinfo=UTC)
    ids = agent_ids(agents)
    out: list[tuple[str, bytes]] = []
    for i in range(messages):
        agent = ids[i % agents]
        modem_index = (i // agents) % MODEMS_PER_AGENT
        text = f"Your MyBank code is {(i * 7919) % 1_000_000:06d}. Ref PF{i:07d}"
        scts = base + timedelta(seconds=i // 10)
        urc_at = scts + timedelta(milliseconds=1500 + i % 700)
        obs = Observation(
            id=f"{agent}-m{modem_index}-{i:08d}",
            agent=agent,
            modem=f"modem-{modem_index}",
            sim=SimIdentity(
                imsi=f"23415{agents * 10 + modem_index:010d}",
                iccid=f"894411{i % (agents * MODEMS_PER_AGENT):013d}",
                msisdn=f"+4477009{i % (agents * MODEMS_PER_AGENT):05d}",
                mcc_mnc="23415",
            ),
            sender=SENDER,
            sender_type="alphanumeric",
            sender_toa=0xD0,
            text=text,
            smsc=SMSC,
            scts=scts,
            urc_at=urc_at,
            completed_at=urc_at,
            parts=1,
            total_parts=1,
            partial=False,
            dcs=0,
            alphabet="gsm7",
            pid=0,
            origin="cmti",
            pdus=encode_deliver(SENDER, text, smsc=SMSC, scts=scts),
            signal_dbm=-71,
            clock=ClockState(offset_ms=0.8, error_ms=1.5, source="chrony", since_sync_s=12.0),
            software_version="0.1.0",
        )
        out.append((TOPICS.sms(agent), obs.to_json()))
    return out


# --- child processes ------------------------------------------------------------------------------


def _publisher(port: int, messages: int, agents: int, clients: int, conn: Connection) -> None:
    """Child: ``clients`` paho clients (MQTT 5, QoS 1, paho's in-flight window). Builds the
    payloads, connects, replies (payload count, bytes); then for each ("go",) publishes every
    payload, message k on client k % clients, and replies (first publish ns, all PUBACKs ns,
    PUBACKs, PUBACKs with a failure reason code), until ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up, in order
    payloads = build_payloads(messages, agents)
    lock = threading.Lock()
    acked = [0, 0]  # all, refused
    all_acked = threading.Event()
    expected = [0]

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: Any, props: Any) -> None:
        with lock:
            acked[0] += 1
            if getattr(reason, "is_failure", False):
                acked[1] += 1
            if acked[0] >= expected[0]:
                all_acked.set()

    pubs: list[mqtt.Client] = []
    connected = threading.Semaphore(0)
    for k in range(clients):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{k}", protocol=mqtt.MQTTv5)
        client.on_connect = lambda *args: connected.release()
        client.on_publish = on_publish
        client.connect("127.0.0.1", port)
        client.loop_start()
        pubs.append(client)
    try:
        for _ in pubs:
            if not connected.acquire(timeout=10):
                raise RuntimeError("a publisher client could not connect")
        conn.send((len(payloads), sum(len(p) for _, p in payloads), pubs[0].max_inflight_messages))
        while conn.recv()[0] == "go":
            with lock:
                acked[0] = acked[1] = 0
                expected[0] = len(payloads)
                all_acked.clear()
            first_ns = time.time_ns()
            for k, (topic, payload) in enumerate(payloads):
                pubs[k % clients].publish(topic, payload, qos=1)
            all_acked.wait(300)
            done_ns = time.time_ns()
            with lock:
                conn.send((first_ns, done_ns, acked[0], acked[1]))
    finally:
        for client in pubs:
            client.disconnect()
            client.loop_stop()


def _bare_subscriber(port: int, topic_filter: str, expected: int, conn: Connection) -> None:
    """Child: a bare paho subscriber (MQTT 5, QoS 1, paho's defaults, no processing). Replies
    "subscribed", then (received count, last receipt ns) once ``expected`` messages came or on
    ("stop",)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    state = {"n": 0, "last_ns": 0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        state["last_ns"] = time.time_ns()
        state["n"] += 1
        if state["n"] >= expected:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare-sub", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *args: c.subscribe(topic_filter, qos=1)
    client.on_subscribe = lambda *args: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError("bare subscriber could not subscribe")
        conn.send("subscribed")
        while not done.wait(0.2):
            if conn.poll() and conn.recv()[0] == "stop":
                break
        conn.send((state["n"], state["last_ns"]))
    finally:
        client.disconnect()
        client.loop_stop()


# --- this process ---------------------------------------------------------------------------------


def write_controller_toml(path: Path, broker_port: int, db: Path) -> Path:
    path.write_text(
        f'database_url = "sqlite:///{db}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\nclient_id = "{CONTROLLER_CLIENT_ID}"\n'
        "[api]\nport = 0\n"
    )
    return path


def wait_controller_online(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Until the controller's retained status says online: it has subscribed by then."""
    online = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(ValueError):
            if json.loads(message.payload).get("state") == "online":
                online.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-watch", protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *args: c.subscribe(TOPICS.controller_status(), qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout_s
        while not online.wait(0.2):
            if proc.poll() is not None:
                raise RuntimeError(f"the controller exited ({proc.returncode}) before it came online")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the controller was not online within {timeout_s:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


class CpuMeter:
    """CPU seconds used by some processes, each with its child processes (the controller's MQTT
    worker), between ``start()`` and ``stop()``."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    @staticmethod
    def _cpu_s(proc: psutil.Process) -> float:
        try:
            children = proc.children(recursive=True)
        except psutil.Error:
            children = []
        return cpu_s(proc) + sum(cpu_s(c) for c in children)

    def start(self) -> None:
        self.before = {name: self._cpu_s(p) for name, p in self.procs.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: self._cpu_s(p) - self.before[name] for name, p in self.procs.items()}
        return self.used


def run_baseline(
    ctx: Any,
    port: int,
    messages: int,
    pub: tuple[Any, Connection],
    mosquitto: subprocess.Popen[bytes],
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    """The bare subscriber drains the N payloads."""
    pub_child, pub_conn = pub
    sub_filter = f"{DEFAULT_PREFIX}/agents/+/sms"
    sub_child, sub_conn = start_child(ctx, _bare_subscriber, (port, sub_filter, messages), stack)
    reply(sub_conn, sub_child, "starting the bare subscriber", 30)
    cpu = CpuMeter({"subscriber": sub_child.pid, "mosquitto": mosquitto.pid, "publisher": pub_child.pid})
    log(f"baseline: bare paho subscriber (pid {sub_child.pid}) subscribed; publishing {messages}")
    cpu.start()
    wall0 = time.monotonic()
    pub_conn.send(("go",))
    first_ns, acked_ns, acked, refused = reply(pub_conn, pub_child, "the publisher", 330)
    log(f"baseline: publisher got {acked} PUBACKs ({refused} refused); waiting for the subscriber")
    got = None
    deadline = time.monotonic() + STALL_TIMEOUT_S
    while got is None and time.monotonic() < deadline:
        if sub_conn.poll(0.2):
            got = sub_conn.recv()
    if got is None:
        sub_conn.send(("stop",))
        got = reply(sub_conn, sub_child, "the bare subscriber", 10)
    wall = time.monotonic() - wall0
    used = cpu.stop()
    received, last_ns = got
    log(f"baseline: {received}/{messages} messages at the subscriber")
    sub_child.join(10)
    return {
        "first_ns": first_ns,
        "acked_ns": acked_ns,
        "acked": acked,
        "refused": refused,
        "received": received,
        "last_ns": last_ns,
        "cpu": used,
        "wall_s": wall,
    }


def _count_rows(db: sqlite3.Connection, table: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def run_ingest(
    port: int,
    messages: int,
    workdir: Path,
    pub: tuple[Any, Connection],
    mosquitto: subprocess.Popen[bytes],
    stack: contextlib.ExitStack,
) -> dict[str, Any]:
    """The controller process takes the same N payloads; the SQLite file is polled."""
    pub_child, pub_conn = pub
    db_path = workdir / "controller.db"
    config = write_controller_toml(workdir / "controller.toml", port, db_path)
    log_path = workdir / "controller.log"
    proc = start_process(
        [sys.executable, "-m", "controller.cli", "serve", "--config", str(config)],
        "controller",
        log_path,
        stack,
        ROOT,
    )
    log(f"ingest: controller pid {proc.pid}; waiting for its retained status online")
    wait_controller_online(port, proc)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
    stack.callback(db.close)
    if (before := _count_rows(db, "observations")) != 0:
        raise RuntimeError(f"the new database already holds {before} observations")
    cpu = CpuMeter({"controller": proc.pid, "mosquitto": mosquitto.pid, "publisher": pub_child.pid})
    log(f"ingest: controller online; publishing {messages}, polling {db_path.name} every {POLL_S * 1e3:g} ms")
    timeline: list[tuple[int, int]] = []  # (poll ns, rows)
    cpu.start()
    wall0 = time.monotonic()
    pub_conn.send(("go",))
    pub_reply: tuple[int, int, int, int] | None = None
    rows, last_change, next_poll = 0, time.monotonic(), time.monotonic()
    last_log = 0.0
    while rows < messages:
        next_poll += POLL_S
        if (pause := next_poll - time.monotonic()) > 0:
            time.sleep(pause)
        else:
            next_poll = time.monotonic()
        ns = time.time_ns()
        count = _count_rows(db, "observations")
        timeline.append((ns, count))
        if count != rows:
            rows, last_change = count, time.monotonic()
        if pub_reply is None and pub_conn.poll():
            pub_reply = pub_conn.recv()
        if time.monotonic() - last_log > 1.0:
            last_log = time.monotonic()
            log(f"ingest: {rows}/{messages} observations persisted")
        if time.monotonic() - last_change > STALL_TIMEOUT_S:
            log(f"ingest: no new row for {STALL_TIMEOUT_S:g} s; giving up at {rows}")
            break
        if proc.poll() is not None:
            log(f"ingest: the controller exited ({proc.returncode}) at {rows} rows")
            break
    wall = time.monotonic() - wall0
    used = cpu.stop()
    if pub_reply is None:
        pub_reply = reply(pub_conn, pub_child, "the publisher", 330)
    first_ns, acked_ns, acked, refused = pub_reply
    log(f"ingest: {rows}/{messages} observations persisted; publisher got {acked} PUBACKs")
    dead = _count_rows(db, "dead_letters")
    distinct = int(db.execute("SELECT count(DISTINCT id) FROM observations").fetchone()[0])
    stop_process(proc, "controller")
    warnings = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if " WARNING " in line or " ERROR " in line
    ]
    return {
        "first_ns": first_ns,
        "acked_ns": acked_ns,
        "acked": acked,
        "refused": refused,
        "rows": rows,
        "distinct": distinct,
        "dead": dead,
        "timeline": timeline,
        "cpu": used,
        "wall_s": wall,
        "controller_exit": proc.returncode,
        "warnings": warnings,
    }


def run(
    messages: int, agents: int, publishers: int, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    """Everything that needs the processes; returns the raw figures."""
    ctx = mp.get_context("spawn")
    port, mosquitto = start_mosquitto(workdir, stack)
    log(f"mosquitto on 127.0.0.1:{port}")
    pub_child, pub_conn = start_child(ctx, _publisher, (port, messages, agents, publishers), stack)
    count, size, window = reply(pub_conn, pub_child, "starting the publisher", 120)
    log(f"publisher (pid {pub_child.pid}): {count} payloads, {size / count:.0f} bytes on average")
    pub = (pub_child, pub_conn)
    baseline = run_baseline(ctx, port, messages, pub, mosquitto, stack)
    ingest = run_ingest(port, messages, workdir, pub, mosquitto, stack)
    return {
        "port": port,
        "payload_bytes": size / count,
        "window": window,
        "baseline": baseline,
        "ingest": ingest,
    }


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


def report(messages: int, agents: int, publishers: int, r: dict[str, Any]) -> int:
    """Print the table, the goals and the summary line; the exit code."""
    b, g = r["baseline"], r["ingest"]
    bare_s = (b["last_ns"] - b["first_ns"]) / 1e9 if b["received"] else math.nan
    bare_rate = _rate(messages, bare_s) if b["received"] >= messages else math.nan
    done_ns = next((ns for ns, rows in g["timeline"] if rows >= messages), None)
    ingest_s = (done_ns - g["first_ns"]) / 1e9 if done_ns is not None else math.nan
    ingest_rate = _rate(messages, ingest_s) if done_ns is not None else math.nan
    ratio = ingest_rate / bare_rate if bare_rate > 0 else math.nan
    first_row_ns = next((ns for ns, rows in g["timeline"] if rows > 0), None)
    first_row_ms = (first_row_ns - g["first_ns"]) / 1e6 if first_row_ns is not None else math.nan
    # steady rate: between the polls that first saw 10 % and 90 % of the rows
    t10 = next((ns, n) for ns, n in g["timeline"] if n >= messages * 0.1) if g["rows"] >= messages else None
    t90 = next((ns, n) for ns, n in g["timeline"] if n >= messages * 0.9) if g["rows"] >= messages else None
    steady = _rate(t90[1] - t10[1], (t90[0] - t10[0]) / 1e9) if t10 and t90 else math.nan

    print(
        f"ingest benchmark: {messages} observations from {agents} agents over {publishers} paho publishers "
        f"(QoS 1, in-flight {r['window']} each), {r['payload_bytes']:.0f} B each, mosquitto "
        f"127.0.0.1:{r['port']}, {os.cpu_count()} CPUs"
    )
    print(f"{'consumer':<48}{'received':>10}{'seconds':>10}{'per s':>10}")
    for name, got, seconds, rate in (
        ("bare paho subscriber: first publish -> last msg", b["received"], bare_s, bare_rate),
        ("controller: first publish -> N rows (SQLite)", g["rows"], ingest_s, ingest_rate),
    ):
        print(f"{name:<48}{got:>10}{seconds:>10.3f}{rate:>10.0f}")
    print(f"  (the controller's time includes up to {POLL_S * 1e3:g} ms of poll resolution)")
    bare_pub_s = (b["acked_ns"] - b["first_ns"]) / 1e9
    ing_pub_s = (g["acked_ns"] - g["first_ns"]) / 1e9

    def cpu(used: dict[str, float], wall: float) -> str:
        parts = [f"{name} {sec:.2f}" for name, sec in used.items()]
        share = sum(used.values()) / wall * 100
        return f"{', '.join(parts)} s over {wall:.2f} s wall ({share:.0f} % of one core)"

    rows = [
        (
            "publisher, baseline: all PUBACKs in",
            f"{bare_pub_s:.3f} s ({b['acked']} PUBACKs, {b['refused']} refused by the broker)",
        ),
        (
            "publisher, ingest: all PUBACKs in",
            f"{ing_pub_s:.3f} s ({g['acked']} PUBACKs, {g['refused']} refused by the broker)",
        ),
        ("controller: first publish -> first row", f"{first_row_ms:.1f} ms"),
        ("controller: steady rate, 10 % -> 90 % rows", f"{steady:.0f} obs/s"),
        (
            "controller: rows / distinct ids / dead letters",
            f"{g['rows']} / {g['distinct']} / {g['dead']} (expected {messages} / {messages} / 0)",
        ),
        ("CPU during baseline", cpu(b["cpu"], b["wall_s"])),
        ("CPU during ingest", cpu(g["cpu"], g["wall_s"])),
        (
            "controller CPU per observation",
            f"{g['cpu']['controller'] / max(1, g['rows']) * 1e6:.0f} us "
            f"(bare subscriber: {b['cpu']['subscriber'] / max(1, b['received']) * 1e6:.0f} us per message)",
        ),
        ("controller exit code on SIGTERM", str(g["controller_exit"])),
        ("controller log warnings / errors", str(len(g["warnings"]))),
    ]
    for name, text in rows:
        print(f"{name:<48}{text}")
    for line in g["warnings"][:5]:
        print(f"  {line[:200]}")
    ratio_ok = ratio >= GOAL_RATIO
    rate_ok = ingest_rate >= GOAL_INGEST_PER_S
    print(f"goal ingest_ratio >= {GOAL_RATIO:g}: {ratio:.3f} {'PASS' if ratio_ok else 'FAIL'}")
    print(
        f"goal ingest >= {GOAL_INGEST_PER_S:,.0f} obs/s on SQLite: {ingest_rate:.0f} obs/s "
        f"{'PASS' if rate_ok else 'FAIL'}"
    )
    from recompute import GOAL_S, measure  # bench/ is on sys.path

    recompute_s = measure()
    print(
        f"goal score recompute, 10,000 (route, network) pairs over 1,000,000 results <= {GOAL_S:g} s: "
        f"{recompute_s:.3f} s {'PASS' if recompute_s <= GOAL_S else 'FAIL'}"
    )
    lost = messages - g["rows"]
    if lost > 0:
        print(f"LOST: only {g['rows']} of {messages} observations were persisted")
    if b["received"] < messages:
        print(f"LOST: the bare subscriber received only {b['received']} of {messages} messages")
    print(f"ingest_ratio {ratio:.3f} ingest_per_s {ingest_rate:.0f} recompute_s {recompute_s:.3f}")
    return 1 if lost > 0 or b["received"] < messages else 0


def main(argv: list[str] | None = None) -> int:
    """Start everything, measure, stop everything (also on Ctrl-C, SIGTERM or an error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=MESSAGES, help="observations published")
    parser.add_argument("--agents", type=int, default=AGENTS, help="agents they come from")
    parser.add_argument("--publishers", type=int, default=PUBLISHERS, help="paho publisher clients")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.agents < 1 or args.publishers < 1:
        parser.error("--messages, --agents and --publishers must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the clean-up below
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-")))
        try:
            results = run(args.messages, args.agents, args.publishers, workdir, stack)
        except KeyboardInterrupt:
            log("interrupted; stopping everything")
            return 130
    return report(args.messages, args.agents, args.publishers, results)


if __name__ == "__main__":
    raise SystemExit(main())
