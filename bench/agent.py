"""Agent benchmark: a real ``probe-agent run`` process, 4 virtual modems, a burst of 1,000 SMS, then
300 SMS paced like a real fleet, a real mosquitto; how fast observations reach the broker, how much
later than the URC, and what the agent costs in memory and in idle CPU.

It starts its own mosquitto on a free loopback port, 4 virtual modems (profile ``generic``) in a
child process (on a Pi the modems are separate hardware; sharing the agent's interpreter would
measure the rig), and the agent with those modems, its spool in a temp dir. A paho subscriber
here (MQTT 5, QoS 1) stamps every observation on ``{prefix}/agents/+/sms`` as it arrives and
matches it to its delivery by the first PDU. Measured:

* rate: observations per second from the first URC to the last observation at the subscriber
  (a message at the subscriber was accepted by the broker);
* added delay per message: subscriber receipt minus the instant the modem wrote the URC. It
  includes broker->subscriber delivery, so it over-estimates the agent's share;
* the agent's peak RSS over the whole run, burst and paced phases included (psutil, every 50 ms),
  and its CPU over 30 s of idle after them (cpu_times delta / wall time, % of one core).

Phases, in order:

1. burst: the SMS as fast as the modems take them. Hundreds are queued at once, so their added
   delay is mostly queueing; ``agent_added_ms_p99`` on the last line is this burst figure, as the
   benchmark's definition (issue 3) says.
2. paced: once the SIMs are empty again, 300 more SMS (``--paced``) at a steady 40 SMS/s in total
   (``--paced-rate``), dealt round robin over the 4 modems at fixed instants (one every 25 ms,
   each modem one every 100 ms, never in clumps), as a fleet sees them. Its added delay is
   reported on its own lines, with its own PASS/FAIL against the same 10 ms goal.
3. idle: 30 s of nothing.

Baseline in the same run: a bare paho-mqtt publisher (MQTT 5, QoS 1, paho's defaults, in a child
process) publishes the same 1,000 payloads to the same broker, measured the same way;
``rate_ratio`` = agent rate / bare paho rate.

The burst is as fast as the modems take it: a modem whose storage is full refuses the SMS, as a
real one does, and the network side retries it after 1 ms (the refusals are counted).

Run from the project root: ``.venv/bin/python bench/agent.py [--messages 1000] [--paced 300]
[--paced-rate 40]``.
Exit code 0 even when a goal is missed; 1 when an SMS was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import paho.mqtt.client as mqtt
import psutil
from harness import cpu_s, log, reply, start_child, start_mosquitto, start_process
from paho.mqtt.enums import CallbackAPIVersion

from probe_agent.protocol import DEFAULT_PREFIX, ModemState, Observation, Topics

ROOT = Path(__file__).resolve().parents[1]
GOAL_RSS_MB = 60.0
GOAL_IDLE_CPU_PCT = 1.0
GOAL_ADDED_P99_MS = 10.0
MODEMS = 4
PROFILE = "generic"
AGENT_ID = "bench-agent"
BARE_ID = "bench-bare"
SENDER = "+447700900123"
IDLE_S = 30.0
#: Pause between the last observation and the idle measurement, for the last deletes and acks.
SETTLE_S = 1.0
RSS_SAMPLE_S = 0.05
#: Waiting for observations ends when none came for this long.
STALL_TIMEOUT_S = 20.0
#: A modem with full storage refuses an SMS; the network side tries again after this.
STORAGE_FULL_RETRY_S = 0.001
#: The paced phase: this many SMS at this many per second in total, round robin over the modems.
PACED_MESSAGES = 300
PACED_RATE = 40.0
#: Before the paced phase the agent must have emptied the SIMs the burst filled, within this.
DRAIN_TIMEOUT_S = 60.0
TOPICS = Topics(DEFAULT_PREFIX)


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN when there is no sample."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _modem_server(count: int, profile: str, conn: Connection) -> None:
    """Child: run ``count`` virtual modems, send their ports, then answer requests until ("stop",):

    * ("deliver", [(modem, sender, text), ...], interval_s): with ([(urc_ns, pdus), ...], the
      storage-full refusals, the latest a delivery started after its instant in ms). Interval 0
      delivers as fast as the modems take it; otherwise SMS ``k`` is due ``k * interval_s`` after
      the first, on an absolute schedule (no drift);
    * ("stored",): with the number of SMS the modems' storage holds now.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up, in order
    from hardware.virtual_modem import StorageFullError, VirtualModem

    modems = [VirtualModem(profile).start() for _ in range(count)]
    try:
        conn.send([m.port for m in modems])
        while (request := conn.recv())[0] in ("deliver", "stored"):
            if request[0] == "stored":
                conn.send(sum(len(m.stored()) for m in modems))
                continue
            interval_ns = round(request[2] * 1e9)
            results: list[tuple[int | None, tuple[str, ...]]] = []
            refused = 0
            late_ns = 0
            start_ns = time.monotonic_ns()
            for k, (index, sender, text) in enumerate(request[1]):
                if interval_ns:
                    due_ns = start_ns + k * interval_ns
                    if (wait_ns := due_ns - time.monotonic_ns()) > 0:
                        time.sleep(wait_ns / 1e9)
                    late_ns = max(late_ns, time.monotonic_ns() - due_ns)
                while True:
                    try:
                        d = modems[index].deliver(sender, text)
                        break
                    except StorageFullError:
                        refused += 1
                        time.sleep(STORAGE_FULL_RETRY_S)
                results.append((d.urc_ns, d.pdus))
            conn.send((results, refused, late_ns / 1e6))
    finally:
        for m in modems:
            m.stop()


def _bare_publisher(port: int, topic: str, payloads: list[bytes], conn: Connection) -> None:
    """Child: a bare paho publisher with paho's defaults. Connects, answers its in-flight window,
    and on "go" publishes every payload (QoS 1); replies (publish-call ns per payload, all-acked
    ns, acked count)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=BARE_ID, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("bare publisher could not connect")
        conn.send(client.max_inflight_messages)
        conn.recv()  # go
        stamps: list[int] = []
        infos = []
        for payload in payloads:
            stamps.append(time.time_ns())
            infos.append(client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        conn.send((stamps, time.time_ns(), sum(info.is_published() for info in infos)))
    finally:
        client.disconnect()
        client.loop_stop()


# --- this process: broker, agent, subscriber, sampler --------------------------------------------


def write_agent_toml(path: Path, broker_port: int, ports: list[str]) -> Path:
    modems = "".join(f'\n[[modems]]\nid = "modem-{i}"\nport = "{p}"\n' for i, p in enumerate(ports))
    path.write_text(
        f'agent_id = "{AGENT_ID}"\nheartbeat_interval_s = 30\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        f'[spool]\npath = "{path.parent / "spool.db"}"\n'
        '[clock]\nchronyc = ""\n[log]\nlevel = "WARNING"\n'
        f"{modems}"
    )
    return path


class Subscriber:
    """A paho subscriber (MQTT 5, QoS 1): stamps each message on ``+/sms`` by its topic, keeps
    the latest modem state of the agent."""

    def __init__(self, port: int) -> None:
        self.sms: defaultdict[str, list[tuple[int, bytes]]] = defaultdict(list)
        self.states: dict[str, bytes] = {}
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        topics = [f"{DEFAULT_PREFIX}/agents/+/sms", f"{DEFAULT_PREFIX}/agents/{AGENT_ID}/modems/+/state"]
        client.subscribe([(topic, 1) for topic in topics])

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        ns = time.time_ns()
        if message.topic.endswith("/sms"):
            self.sms[message.topic].append((ns, bytes(message.payload)))
        else:
            self.states[message.topic] = bytes(message.payload)

    def received(self, agent: str) -> list[tuple[int, bytes]]:
        return list(self.sms[TOPICS.sms(agent)])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RssSampler:
    """Samples a process's RSS every ``RSS_SAMPLE_S`` in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.last = self._proc.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)
            if self._stop.wait(RSS_SAMPLE_S):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def wait_until(what: str, done: Callable[[], bool], timeout_s: float, agent: subprocess.Popen[bytes]) -> None:
    """Poll ``done`` until it holds; an error on timeout or if the agent exits meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _modems_connected(sub: Subscriber) -> bool:
    states = [ModemState.model_validate_json(p) for p in list(sub.states.values())]
    return sum(s.connected for s in states) >= MODEMS


def _deliver(
    phase: str,
    modem_conn: Connection,
    modem_child: Any,
    items: list[tuple[int, str, str]],
    interval_s: float,
    sub: Subscriber,
) -> tuple[list[tuple[int | None, tuple[str, ...]]], int, float]:
    """Have the modems deliver ``items`` (see ``_modem_server``); logs progress meanwhile."""
    modem_conn.send(("deliver", items, interval_s))
    while not modem_conn.poll(1.0):
        if not modem_child.is_alive():
            raise RuntimeError(f"the modems' process exited ({modem_child.exitcode}) during the {phase}")
        log(f"{phase}: {len(sub.received(AGENT_ID))} observations received so far")
    reply: tuple[list[tuple[int | None, tuple[str, ...]]], int, float] = modem_conn.recv()
    return reply


def _await_observations(
    phase: str, sub: Subscriber, wanted: set[str], agent: subprocess.Popen[bytes]
) -> None:
    """Wait until an observation of every first PDU in ``wanted`` reached the subscriber, or none
    came for ``STALL_TIMEOUT_S``. Light on the CPU: the agent needs it more than we do."""
    seen: set[str] = set()
    parsed = 0
    last_change = time.monotonic()
    while True:
        got = sub.received(AGENT_ID)
        if len(got) > parsed:
            seen.update(Observation.model_validate_json(p).pdus[0] for _, p in got[parsed:])
            parsed, last_change = len(got), time.monotonic()
            log(f"{phase}: {len(wanted & seen)}/{len(wanted)} observations received")
        if wanted <= seen:
            return
        if time.monotonic() - last_change > STALL_TIMEOUT_S:
            log(f"{phase}: no new observation for {STALL_TIMEOUT_S:g} s; giving up")
            return
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}) during the {phase}")
        time.sleep(0.2)


def run(
    messages: int, paced: int, paced_rate: float, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    """Everything that needs the processes; returns the raw figures."""
    ctx = mp.get_context("spawn")
    broker_port, _ = start_mosquitto(workdir, stack)
    log(f"mosquitto on 127.0.0.1:{broker_port}")

    modem_child, modem_conn = start_child(ctx, _modem_server, (MODEMS, PROFILE), stack)
    ports: list[str] = reply(modem_conn, modem_child, "starting the modems", 30)
    log(f"{MODEMS} virtual modems ({PROFILE}) in child pid {modem_child.pid}")

    sub = Subscriber(broker_port)
    stack.callback(sub.close)
    config = write_agent_toml(workdir / "agent.toml", broker_port, ports)
    agent_log = workdir / "agent.log"
    agent = start_process(
        [sys.executable, "-m", "probe_agent.cli", "run", "--config", str(config)],
        "agent",
        agent_log,
        stack,
        ROOT,
    )
    agent_ps = psutil.Process(agent.pid)
    sampler = RssSampler(agent.pid)
    stack.callback(sampler.stop)
    log(f"agent pid {agent.pid}; waiting for its {MODEMS} modems")
    wait_until("the modems to connect", lambda: _modems_connected(sub), 60, agent)
    time.sleep(SETTLE_S)
    rss_ready = sampler.last

    # --- the burst
    texts = [f"probe-fleet bench message {i:06d}" for i in range(messages)]
    log(f"burst: delivering {messages} SMS over {MODEMS} modems")
    cpu_before = cpu_s(agent_ps)
    items = [(i % MODEMS, SENDER, t) for i, t in enumerate(texts)]
    deliveries, refused, _ = _deliver("burst", modem_conn, modem_child, items, 0.0, sub)
    delivered_ns = time.time_ns()
    log(f"burst: all delivered ({refused} storage-full refusals retried); waiting for observations")
    _await_observations("burst", sub, {pdus[0] for _, pdus in deliveries}, agent)
    burst_cpu_s = cpu_s(agent_ps) - cpu_before
    observed = sub.received(AGENT_ID)
    rss_burst_peak = sampler.peak
    log(f"burst: done, {len(observed)} observations")

    # --- paced: a steady trickle, round robin, once the agent has emptied the SIMs
    log("paced: waiting for the agent to empty the modems' storage")
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        modem_conn.send(("stored",))
        if (stored := reply(modem_conn, modem_child, "the modems' storage", 30)) == 0:
            break
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({agent.returncode}) before the paced phase")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the modems still hold {stored} SMS after {DRAIN_TIMEOUT_S:g} s")
        time.sleep(0.2)
    time.sleep(SETTLE_S)
    paced_texts = [f"probe-fleet bench paced message {i:06d}" for i in range(paced)]
    log(f"paced: delivering {paced} SMS over {MODEMS} modems at {paced_rate:g} SMS/s in total")
    cpu_before = cpu_s(agent_ps)
    items = [(i % MODEMS, SENDER, t) for i, t in enumerate(paced_texts)]
    paced_deliveries, paced_refused, paced_late_ms = _deliver(
        "paced", modem_conn, modem_child, items, 1 / paced_rate, sub
    )
    log(f"paced: all delivered ({paced_refused} storage-full refusals retried); waiting for observations")
    _await_observations("paced", sub, {pdus[0] for _, pdus in paced_deliveries}, agent)
    paced_cpu_s = cpu_s(agent_ps) - cpu_before
    log("paced: done")

    # --- idle
    time.sleep(SETTLE_S)
    log(f"idle: measuring the agent's CPU over {IDLE_S:g} s")
    cpu0, wall0 = cpu_s(agent_ps), time.monotonic()
    time.sleep(IDLE_S)
    idle_cpu_pct = (cpu_s(agent_ps) - cpu0) / (time.monotonic() - wall0) * 100
    sampler.stop()

    # --- baseline: the same payloads through a bare paho publisher
    first_seen: dict[str, bytes] = {}
    for _, payload in observed:
        first_seen.setdefault(Observation.model_validate_json(payload).id, payload)
    payloads = list(first_seen.values())
    log(f"baseline: bare paho publisher, {len(payloads)} payloads")
    bare, bare_conn = start_child(ctx, _bare_publisher, (broker_port, TOPICS.sms(BARE_ID), payloads), stack)
    bare_window = reply(bare_conn, bare, "starting the bare publisher", 30)
    bare_conn.send("go")
    bare_stamps, bare_acked_ns, bare_acked = reply(bare_conn, bare, "the bare publisher", 120)
    wait_until(
        "the bare publisher's messages",
        lambda: len(sub.received(BARE_ID)) >= len(payloads),
        STALL_TIMEOUT_S,
        agent,
    )
    return {
        "deliveries": deliveries,
        "refused": refused,
        "delivered_ns": delivered_ns,
        "observed": observed,
        "paced_deliveries": paced_deliveries,
        "paced_refused": paced_refused,
        "paced_late_ms": paced_late_ms,
        "paced_cpu_s": paced_cpu_s,
        "all_observed": sub.received(AGENT_ID),
        "rss_ready": rss_ready,
        "rss_burst_peak": rss_burst_peak,
        "rss_peak": sampler.peak,
        "burst_cpu_s": burst_cpu_s,
        "idle_cpu_pct": idle_cpu_pct,
        "payloads": payloads,
        "bare_stamps": bare_stamps,
        "bare_acked_ns": bare_acked_ns,
        "bare_acked": bare_acked,
        "bare_window": bare_window,
        "bare_received": sub.received(BARE_ID),
        "broker_port": broker_port,
        "agent_warnings": [
            line for line in agent_log.read_text(errors="replace").splitlines() if " WARNING " in line
        ],
    }


def report(messages: int, paced: int, paced_rate: float, r: dict[str, Any]) -> int:
    """Print the table, the goals and the summary line; the exit code."""
    first_urc = min(ns for ns, _ in r["deliveries"] if ns is not None)
    urc_by_pdu = {pdus[0]: ns for ns, pdus in r["deliveries"]}
    received: dict[str, int] = {}
    duplicates = 0
    for ns, payload in r["observed"]:
        pdu = Observation.model_validate_json(payload).pdus[0]
        if pdu in received:
            duplicates += 1
        else:
            received[pdu] = ns
    added = [(received[p] - urc) / 1e6 for p, urc in urc_by_pdu.items() if p in received and urc is not None]
    lost = sum(1 for p, urc in urc_by_pdu.items() if p not in received or urc is None)
    lost += messages - len(urc_by_pdu)
    agent_s = (max(received.values(), default=first_urc) - first_urc) / 1e9
    agent_rate = len(received) / agent_s if agent_s > 0 else math.nan
    burst_s = (r["delivered_ns"] - first_urc) / 1e9

    index = {payload: i for i, payload in enumerate(r["payloads"])}
    bare_first: dict[int, int] = {}
    for ns, payload in r["bare_received"]:
        bare_first.setdefault(index[payload], ns)
    bare_delay = [(ns - r["bare_stamps"][i]) / 1e6 for i, ns in bare_first.items()]
    bare_s = (max(bare_first.values(), default=0) - r["bare_stamps"][0]) / 1e9 if r["bare_stamps"] else 0
    bare_rate = len(bare_first) / bare_s if bare_s > 0 else math.nan
    bare_ack_s = (r["bare_acked_ns"] - r["bare_stamps"][0]) / 1e9 if r["bare_stamps"] else math.nan
    rate_ratio = agent_rate / bare_rate if bare_rate > 0 else math.nan

    # paced: first receipt of each PDU over the whole run (PDUs differ between the phases)
    first_any: dict[str, int] = {}
    for ns, payload in r["all_observed"]:
        first_any.setdefault(Observation.model_validate_json(payload).pdus[0], ns)
    paced_urc = {pdus[0]: ns for ns, pdus in r["paced_deliveries"]}
    paced_added = [
        (first_any[p] - urc) / 1e6 for p, urc in paced_urc.items() if p in first_any and urc is not None
    ]
    paced_lost = sum(1 for p, urc in paced_urc.items() if p not in first_any or urc is None)
    paced_lost += paced - len(paced_urc)
    paced_stamps = sorted(ns for ns in paced_urc.values() if ns is not None)
    paced_s = (paced_stamps[-1] - paced_stamps[0]) / 1e9 if paced_stamps else math.nan
    paced_took_rate = (len(paced_stamps) - 1) / paced_s if paced_s > 0 else math.nan

    rss_mb, rss_ready_mb, rss_burst_mb = r["rss_peak"] / 1e6, r["rss_ready"] / 1e6, r["rss_burst_peak"] / 1e6
    p99 = _percentile(added, 99)
    paced_p99 = _percentile(paced_added, 99)
    print(
        f"agent benchmark: {MODEMS} virtual modems ({PROFILE}), burst of {messages} SMS, then {paced} SMS "
        f"paced at {paced_rate:g}/s, mosquitto 127.0.0.1:{r['broker_port']}, {os.cpu_count()} CPUs"
    )
    print(f"{'delay (ms)':<44}{'n':>6}{'p50':>10}{'p99':>10}{'max':>10}")
    for name, values in (
        ("agent, burst: URC -> at subscriber", added),
        (f"agent, paced {paced_rate:g}/s: URC -> at subscriber", paced_added),
        ("bare paho: publish() -> at subscriber", bare_delay),
    ):
        p50, q99, top = _percentile(values, 50), _percentile(values, 99), max(values, default=math.nan)
        print(f"{name:<44}{len(values):>6}{p50:>10.3f}{q99:>10.3f}{top:>10.3f}")
    print("  (all include broker->subscriber delivery, so they over-estimate the publisher's share)")
    rows = [
        ("modems took the burst in", f"{burst_s:.3f} s ({r['refused']} storage-full refusals, retried)"),
        ("burst observations received", f"{len(received)}/{messages} ({duplicates} duplicates)"),
        (
            "paced SMS, first URC -> last URC",
            f"{paced_s:.3f} s ({paced_took_rate:.2f} SMS/s, each modem every "
            f"{MODEMS / paced_rate * 1e3:g} ms; latest start {r['paced_late_ms']:.3f} ms after its instant; "
            f"{r['paced_refused']} storage-full refusals)",
        ),
        ("paced observations received", f"{len(paced_added)}/{paced}"),
        ("agent burst rate, first URC -> last obs.", f"{agent_rate:.1f} obs/s over {agent_s:.3f} s"),
        (
            "bare paho rate, first publish -> last",
            f"{bare_rate:.1f} msg/s over {bare_s:.3f} s "
            f"({r['bare_acked']} PUBACKs in {bare_ack_s:.3f} s; in-flight window {r['bare_window']})",
        ),
        ("rate_ratio (agent / bare paho)", f"{rate_ratio:.3f}"),
        (
            "agent RSS start-up / burst peak / peak",
            f"{rss_ready_mb:.1f} MB / {rss_burst_mb:.1f} MB / {rss_mb:.1f} MB (peak: burst, paced and idle)",
        ),
        (
            "agent CPU during the burst",
            f"{r['burst_cpu_s']:.2f} s ({r['burst_cpu_s'] / max(1, len(received)) * 1e3:.2f} ms per SMS)",
        ),
        (
            "agent CPU during the paced phase",
            f"{r['paced_cpu_s']:.2f} s ({r['paced_cpu_s'] / max(1, len(paced_added)) * 1e3:.2f} ms per SMS)",
        ),
        (f"agent CPU idle over {IDLE_S:g} s", f"{r['idle_cpu_pct']:.3f} % of one core"),
        ("agent log warnings", str(len(r["agent_warnings"]))),
    ]
    for name, text in rows:
        print(f"{name:<44}{text}")
    for line in r["agent_warnings"][:5]:
        print(f"  {line[:200]}")
    for label, value, goal, unit, ok in (
        ("agent peak RSS", rss_mb, GOAL_RSS_MB, "MB", rss_mb <= GOAL_RSS_MB),
        ("agent idle CPU", r["idle_cpu_pct"], GOAL_IDLE_CPU_PCT, "%", r["idle_cpu_pct"] < GOAL_IDLE_CPU_PCT),
        ("added delay p99, burst", p99, GOAL_ADDED_P99_MS, "ms", p99 <= GOAL_ADDED_P99_MS),
        (
            f"added delay p99, paced {paced_rate:g} SMS/s",
            paced_p99,
            GOAL_ADDED_P99_MS,
            "ms",
            paced_p99 <= GOAL_ADDED_P99_MS,
        ),
    ):
        rel = "<" if unit == "%" else "<="
        print(f"goal {label} {rel} {goal:g} {unit}: {value:.3f} {unit} {'PASS' if ok else 'FAIL'}")
    if lost:
        print(f"LOST: {lost} of {messages} burst SMS never reached the broker")
    if paced_lost:
        print(f"LOST: {paced_lost} of {paced} paced SMS never reached the broker")
    print(
        f"agent_rss_mb {rss_mb:.2f} agent_idle_cpu_pct {r['idle_cpu_pct']:.3f} "
        f"agent_added_ms_p99 {p99:.3f} rate_ratio {rate_ratio:.3f}"
    )
    return 1 if lost or paced_lost else 0


def main(argv: list[str] | None = None) -> int:
    """Start everything, measure, stop everything (also on Ctrl-C, SIGTERM or an error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000, help="SMS in the burst")
    parser.add_argument("--paced", type=int, default=PACED_MESSAGES, help="SMS in the paced phase")
    parser.add_argument(
        "--paced-rate",
        type=float,
        default=PACED_RATE,
        help="SMS per second in the paced phase, over all modems",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.paced < 1 or args.paced_rate <= 0:
        parser.error("--messages and --paced must be at least 1 and --paced-rate above 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the clean-up below
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-agent-")))
        try:
            results = run(args.messages, args.paced, args.paced_rate, workdir, stack)
        except KeyboardInterrupt:
            log("interrupted; stopping everything")
            return 130
    return report(args.messages, args.paced, args.paced_rate, results)


if __name__ == "__main__":
    raise SystemExit(main())
