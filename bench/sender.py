"""Bundled sender benchmark. This step: the route pick (``controller.sender.choose``), the
decision made for every message sent.

The table is synthetic and shaped like a production one: 1,000 networks x 20 routes, per network
1 primary, 15 backups (the backup share halving down the order, the smallest rounding to weight
0 as the controller's 4-decimal export does), 2 exploration routes sharing the 5 % exploration
share, and 2 excluded routes. Every pick is timed on its own with ``time.perf_counter_ns`` over
networks drawn at random (seeded) beforehand; the figure covers what the sender pays per message:
the network lookup, the uniform draw (``random.random()``), the bisect, the reason string and the
``Decision``. The timer's own cost (two back-to-back ``perf_counter_ns`` calls) is measured in
the same run and printed beside, not subtracted. The picker build (what a table swap costs) is
printed on its own line. Goal: p99 <= 20 us.

Then the SMPP submit rate: N (default 20,000) short GSM-7 texts submitted with at most 64
unanswered to ``simnet.smsc.SmscServer`` (receipts off), which runs in a child process of its
own, started afresh for every round, so its CPU never shares the client's interpreter. Ours is
``SmppConnector`` (window 64, registered_delivery off; 128 tasks each awaiting ``submit`` one
text after another, the window deciding what is in flight), timed from the first submit to the
last acknowledgement. The bare client is smpplib 2.2.4's own synchronous
``smpplib.client.Client``: this thread sends ``submit_sm`` (texts split by ``smpplib.gsm``)
while a semaphore of 64 allows, a second thread runs ``read_once`` and its ``submit_sm_resp``
handler frees a slot. The two alternate (ours, bare) for ``--rounds`` rounds; medians are
compared. Goal: submit_ratio = ours / bare >= 0.8.

Run from the project root: ``.venv/bin/python bench/sender.py [--networks 1000] [--routes 20]
[--picks 200000] [--messages 20000] [--rounds 3] [--skip-submit]``. Last line:
``route_pick_us_p99 X submit_ratio R submit_per_s N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import smpplib.client
import smpplib.consts
import smpplib.gsm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpu_s, log, reply, start_child, stop_child

from controller.sender.choose import RoutePicker
from controller.sender.smpp import SmppConnector, SmppSettings
from probe_agent.protocol import RouteChoice, RoutingTable
from simnet.smsc import SmscBehaviour, SmscServer

GOAL_PICK_US_P99 = 20.0
SEED = 20260302
EXPLORATION_SHARE = 0.05
BACKUP_SHARE = 0.12
EXPLORATION_ROUTES = 2
EXCLUDED_ROUTES = 2
WEIGHT_DECIMALS = 4

GOAL_SUBMIT_RATIO = 0.8
MESSAGES = 20_000
ROUNDS = 3
WINDOW = 64
#: Tasks awaiting our connector's submit at once: twice the window keeps its queue from running dry.
SUBMITTERS = 2 * WINDOW
SYSTEM_ID = "bench"
PASSWORD = "secret"
#: An alphanumeric sender (TON 5, NPI 0), as our connector derives it; destinations are E.164.
SOURCE = "ProbeFleet"
SOURCE_TON, SOURCE_NPI = 5, 0
DEST_TON, DEST_NPI = 1, 1
ROUND_TIMEOUT_S = 300.0


def build_table(networks: int, routes: int, seed: int = SEED) -> RoutingTable:
    """A routing table of ``networks`` x ``routes``: 1 primary, backups (halving shares),
    2 exploration, 2 excluded per network; route names drawn from a pool of 3 x ``routes``."""
    rng = random.Random(seed)
    pool = [f"route-{i:03d}" for i in range(routes * 3)]
    backups = routes - 1 - EXPLORATION_ROUTES - EXCLUDED_ROUTES
    raw = [BACKUP_SHARE / 2 ** (k + 1) for k in range(backups)]
    backup_weights = [round(w / sum(raw) * BACKUP_SHARE, WEIGHT_DECIMALS) for w in raw]
    explore_weight = round(EXPLORATION_SHARE / EXPLORATION_ROUTES, WEIGHT_DECIMALS)
    primary_weight = round(1.0 - sum(backup_weights) - explore_weight * EXPLORATION_ROUTES, WEIGHT_DECIMALS)
    table: dict[str, list[RouteChoice]] = {}
    for n in range(networks):
        mcc_mnc = f"{200 + n // 100:03d}{n % 100:02d}"
        names = rng.sample(pool, routes)
        scores = sorted((rng.uniform(0.4, 0.99) for _ in range(routes - EXPLORATION_ROUTES)), reverse=True)
        choices = [
            RouteChoice(
                route=names[0],
                weight=primary_weight,
                score=round(scores[0], 4),
                role="primary",
                reason=f"best score {scores[0]:.2f}: 98.7% delivered, p50 2.4 s",
            )
        ]
        for k, weight in enumerate(backup_weights, start=1):
            choices.append(
                RouteChoice(
                    route=names[k],
                    weight=weight,
                    score=round(scores[k], 4),
                    role="backup",
                    reason=f"backup {k}: score {scores[k]:.2f}",
                )
            )
        for k in range(EXPLORATION_ROUTES):
            choices.append(
                RouteChoice(
                    route=names[1 + backups + k],
                    weight=explore_weight,
                    score=None,
                    role="exploration",
                    reason="unknown: 3 results, fewer than 20 needed to score",
                )
            )
        for k in range(EXCLUDED_ROUTES):
            choices.append(
                RouteChoice(
                    route=names[routes - EXCLUDED_ROUTES + k],
                    weight=0.0,
                    score=round(rng.uniform(0.05, 0.3), 4),
                    role="excluded",
                    reason="score below exclude_below 0.4",
                )
            )
        table[mcc_mnc] = choices
    return RoutingTable(
        version=1,
        created_at=datetime(2026, 3, 2, 12, tzinfo=UTC),
        exploration_share=EXPLORATION_SHARE,
        networks=table,
    )


def _percentile_us(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def measure_route_pick(networks: int = 1000, routes: int = 20, picks: int = 200_000) -> dict[str, Any]:
    """Time ``picks`` route picks, each on its own, over random networks of a synthetic table.
    Returns p50 / p99 / max in microseconds, the timer's own p50, and the picker build time."""
    log(f"building a routing table of {networks:,} networks x {routes} routes")
    table = build_table(networks, routes)
    start = time.perf_counter()
    picker = RoutePicker(table)
    build_ms = (time.perf_counter() - start) * 1000.0
    log(f"picker built in {build_ms:.1f} ms; timing {picks:,} picks")
    rng = random.Random(SEED + 1)
    keys = list(table.networks)
    targets = [rng.choice(keys) for _ in range(picks)]
    random.seed(SEED + 2)
    clock = time.perf_counter_ns
    pick = picker.pick
    for mcc_mnc in targets[:10_000]:  # warm-up
        pick(mcc_mnc)
    timer_ns: list[int] = []
    for _ in range(10_000):
        t0 = clock()
        timer_ns.append(clock() - t0)
    durations: list[int] = []
    append = durations.append
    counts: dict[str, int] = {}
    for mcc_mnc in targets:
        t0 = clock()
        decision = pick(mcc_mnc)
        append(clock() - t0)
        counts[decision.role] = counts.get(decision.role, 0) + 1
    durations.sort()
    timer_ns.sort()
    return {
        "networks": networks,
        "routes": routes,
        "picks": picks,
        "build_ms": build_ms,
        "p50_us": _percentile_us(durations, 0.50),
        "p99_us": _percentile_us(durations, 0.99),
        "max_us": durations[-1] / 1000.0,
        "timer_p50_us": _percentile_us(timer_ns, 0.50),
        "roles": {role: n / picks for role, n in sorted(counts.items())},
    }


# --- the SMPP submit rate -------------------------------------------------------------------------


def submit_texts(messages: int) -> list[tuple[str, str]]:
    """(E.164 destination, short GSM-7 text) for each message; distinct, one part each."""
    return [(f"+4917{i % 100_000_000:08d}", f"Your probe code is {i:06d}") for i in range(messages)]


def _smsc_child(conn: Connection) -> None:
    """Child process: a loopback SMSC without receipts; sends its port, then answers ``count``
    (submits accepted so far) and ``stop``."""
    asyncio.run(_serve_smsc(conn))


async def _serve_smsc(conn: Connection) -> None:
    server = SmscServer(
        system_id=SYSTEM_ID,
        password=PASSWORD,
        behaviour=SmscBehaviour(receipts=False),
        name="bench-smsc",
    )
    await server.start()
    conn.send(server.port)
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                command = await loop.run_in_executor(None, conn.recv)  # a thread blocked in recv
            except EOFError:
                return
            if command[0] == "count":
                conn.send(len(server.submits))
            elif command[0] == "stop":
                return
    finally:
        await server.stop()


async def _ours(port: int, items: list[tuple[str, str]], window: int) -> float:
    """Our connector submits ``items``; seconds from the first submit to the last acknowledgement."""
    settings = SmppSettings(
        host="127.0.0.1",
        port=port,
        system_id=SYSTEM_ID,
        password=PASSWORD,  # pydantic turns it into a SecretStr
        window=window,
        registered_delivery=False,
    )
    connector = SmppConnector("bench", settings)
    await connector.start()
    try:
        for _ in range(2000):  # the bind, before the clock starts: at most 10 s
            if connector.health().bound:
                break
            await asyncio.sleep(0.005)
        else:
            raise RuntimeError(f"ours: not bound to 127.0.0.1:{port} within 10 s")
        texts = iter(items)
        submit = connector.submit

        async def submitter() -> None:
            for destination, text in texts:  # the iterator is shared: each text is taken once
                await submit(source=SOURCE, destination=destination, text=text)

        start = time.perf_counter()
        async with asyncio.timeout(ROUND_TIMEOUT_S):
            await asyncio.gather(*(submitter() for _ in range(min(SUBMITTERS, len(items)))))
        elapsed = time.perf_counter() - start
        health = connector.health()
        if health.acknowledged != len(items) or health.resent or health.errors:
            raise RuntimeError(
                f"ours: {health.acknowledged} acknowledged, {health.resent} resent, {health.errors} errors"
            )
        return elapsed
    finally:
        await connector.stop()


class _LockedSequence(smpplib.client.SimpleSequenceGenerator):  # type: ignore[misc]
    """smpplib's sequence generator behind a lock: its ``read_pdu`` draws a number for every PDU
    it parses, here in the reading thread while the sending thread draws for submit_sm."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def next_sequence(self) -> int:
        with self._lock:
            number: int = super().next_sequence()
            return number


def _bare(port: int, items: list[tuple[str, str]], window: int) -> float:
    """smpplib's own synchronous client submits ``items`` with at most ``window`` unanswered;
    seconds from the first submit to the last ``submit_sm_resp``."""
    client = smpplib.client.Client(
        "127.0.0.1", port, timeout=5, sequence_generator=_LockedSequence(), allow_unknown_opt_params=True
    )
    client.connect()
    try:
        client.bind_transceiver(system_id=SYSTEM_ID, password=PASSWORD)
        slots = threading.BoundedSemaphore(window)
        done = threading.Event()
        state: dict[str, Any] = {"acked": 0, "end": math.nan, "error": None}

        def on_sent(pdu: Any, **_: Any) -> None:
            if pdu.status != smpplib.consts.SMPP_ESME_ROK:
                raise RuntimeError(f"bare: submit_sm_resp status 0x{pdu.status:08x}")
            state["acked"] += 1
            slots.release()
            if state["acked"] == len(items):
                state["end"] = time.perf_counter()
                done.set()

        def read() -> None:
            try:
                while not done.is_set():
                    client.read_once()
            except Exception as exc:  # reported by the sending thread
                state["error"] = exc
                done.set()

        client.set_message_sent_handler(on_sent)
        reader = threading.Thread(target=read, name="bare-reader", daemon=True)
        reader.start()
        start = time.perf_counter()
        for destination, text in items:
            parts, data_coding, esm_class = smpplib.gsm.make_parts(text)
            for part in parts:
                while not slots.acquire(timeout=1.0):
                    if done.is_set():
                        raise RuntimeError(f"bare: the reading thread stopped: {state['error']!r}")
                client.send_message(
                    source_addr_ton=SOURCE_TON,
                    source_addr_npi=SOURCE_NPI,
                    source_addr=SOURCE,
                    dest_addr_ton=DEST_TON,
                    dest_addr_npi=DEST_NPI,
                    destination_addr=destination.removeprefix("+"),
                    short_message=part,
                    data_coding=data_coding,
                    esm_class=esm_class,
                    registered_delivery=0,
                )
        if not done.wait(ROUND_TIMEOUT_S) or state["error"] is not None:
            raise RuntimeError(f"bare: {state['acked']} of {len(items)} acknowledged ({state['error']!r})")
        reader.join(10)
        elapsed: float = state["end"] - start
        with contextlib.suppress(Exception):
            client.unbind()
        return elapsed
    finally:
        client.disconnect()


def _round(ctx: Any, client: str, run: Callable[[int], float], messages: int, number: int) -> dict[str, Any]:
    """One timed run of ``client`` against a freshly started SMSC child process."""
    with contextlib.ExitStack() as stack:
        child, conn = start_child(ctx, _smsc_child, (), stack)
        port = reply(conn, child, "starting the SMSC", 60)
        smsc = psutil.Process(child.pid)
        log(f"round {number}, {client}: SMSC (pid {child.pid}) on 127.0.0.1:{port}; {messages:,} submits")
        server_cpu0, own_cpu0, wall0 = cpu_s(smsc), time.process_time(), time.perf_counter()
        seconds = run(port)
        wall = time.perf_counter() - wall0
        server_cpu, own_cpu = cpu_s(smsc) - server_cpu0, time.process_time() - own_cpu0
        conn.send(("count",))
        accepted = reply(conn, child, "the SMSC", 30)
        stop_child(child, conn)
    if accepted != messages:
        raise RuntimeError(f"round {number}, {client}: the SMSC accepted {accepted} of {messages} submits")
    rate = messages / seconds
    log(f"round {number}, {client}: {rate:,.0f} submits/s ({seconds:.3f} s)")
    return {
        "client": client,
        "round": number,
        "seconds": seconds,
        "per_s": rate,
        "port": port,
        # CPU over the client's whole call (bind and unbind included): per submit, and as a share
        # of one core over its wall time
        "client_cpu_us": own_cpu / messages * 1e6,
        "client_cpu": own_cpu / wall,
        "server_cpu": server_cpu / wall,
    }


def measure_submit(messages: int = MESSAGES, window: int = WINDOW, rounds: int = ROUNDS) -> dict[str, Any]:
    """submit_sm acknowledged per second, ours and smpplib's bare client alternately, ``rounds``
    each; per-round figures and the medians."""
    ctx = mp.get_context("spawn")
    items = submit_texts(messages)
    runs: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        runs.append(
            _round(ctx, "ours", lambda port: asyncio.run(_ours(port, items, window)), messages, number)
        )
        runs.append(_round(ctx, "bare", lambda port: _bare(port, items, window), messages, number))
    ours = statistics.median(r["per_s"] for r in runs if r["client"] == "ours")
    bare = statistics.median(r["per_s"] for r in runs if r["client"] == "bare")
    paired = [o["per_s"] / b["per_s"] for o, b in zip(runs[::2], runs[1::2], strict=True)]
    return {
        "messages": messages,
        "window": window,
        "rounds": runs,
        "ours_per_s": ours,
        "bare_per_s": bare,
        "ratio": ours / bare if bare > 0 else math.nan,
        "paired": paired,
    }


def print_submit(result: dict[str, Any]) -> None:
    print(
        f"submit_sm to a loopback SMSC (simnet.smsc in its own process, receipts off), "
        f"{result['messages']:,} short GSM-7 texts, window {result['window']}, {os.cpu_count()} CPUs; "
        "bare = smpplib 2.2.4 smpplib.client.Client (sync: sending thread + read_once thread)"
    )
    print(
        f"{'round':<7}{'client':<8}{'seconds':>9}{'per s':>9}{'client CPU/submit':>19}"
        f"{'client CPU':>12}{'SMSC CPU':>10}  port"
    )
    for r in result["rounds"]:
        print(
            f"{r['round']:<7}{r['client']:<8}{r['seconds']:>9.3f}{r['per_s']:>9.0f}"
            f"{r['client_cpu_us']:>16.1f} us{r['client_cpu'] * 100:>11.0f}%{r['server_cpu'] * 100:>9.0f}%"
            f"  {r['port']}"
        )
    print(
        "  (client CPU over its whole call, bind and unbind included; CPU % is the share of one core "
        "over that wall time)"
    )
    for client in ("ours", "bare"):
        rates = [r["per_s"] for r in result["rounds"] if r["client"] == client]
        print(
            f"{client}: median {statistics.median(rates):,.0f} submits/s "
            f"(range {min(rates):,.0f}-{max(rates):,.0f})"
        )
    paired = ", ".join(f"{ratio:.3f}" for ratio in result["paired"])
    print(f"ours / bare round by round: {paired} (median {statistics.median(result['paired']):.3f})")
    ok = result["ratio"] >= GOAL_SUBMIT_RATIO
    print(f"goal submit_ratio >= {GOAL_SUBMIT_RATIO:g}: {result['ratio']:.3f} {'PASS' if ok else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--networks", type=int, default=1000, help="networks in the routing table")
    parser.add_argument("--routes", type=int, default=20, help="routes per network (at least 5)")
    parser.add_argument("--picks", type=int, default=200_000, help="picks to time")
    parser.add_argument("--messages", type=int, default=MESSAGES, help="submit_sm per round and client")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of each client (ours, bare)")
    parser.add_argument("--skip-submit", action="store_true", help="only the route pick")
    args = parser.parse_args()
    if args.routes < 1 + EXPLORATION_ROUTES + EXCLUDED_ROUTES:
        parser.error("--routes must be at least 5")
    if args.messages < 1 or args.rounds < 1:
        parser.error("--messages and --rounds must be at least 1")
    pick = measure_route_pick(args.networks, args.routes, args.picks)
    roles = ", ".join(f"{role} {share * 100:.1f}%" for role, share in pick["roles"].items())
    print(
        f"route pick, {pick['networks']:,} networks x {pick['routes']} routes, {pick['picks']:,} picks: "
        f"p50 {pick['p50_us']:.2f} us, p99 {pick['p99_us']:.2f} us, max {pick['max_us']:.1f} us "
        f"(timer alone p50 {pick['timer_p50_us']:.2f} us, included); shares by role: {roles}"
    )
    print(f"picker build (a table swap), {pick['networks']:,} networks: {pick['build_ms']:.1f} ms")
    ok = pick["p99_us"] <= GOAL_PICK_US_P99
    print(
        f"goal route pick p99 <= {GOAL_PICK_US_P99:g} us: {pick['p99_us']:.2f} us {'PASS' if ok else 'FAIL'}"
    )
    ratio = per_s = math.nan
    if not args.skip_submit:
        submit = measure_submit(args.messages, WINDOW, args.rounds)
        print_submit(submit)
        ratio, per_s = submit["ratio"], submit["ours_per_s"]
    print(f"route_pick_us_p99 {pick['p99_us']:.2f} submit_ratio {ratio:.3f} submit_per_s {per_s:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
