"""Web UI benchmark: how long the fleet page, the route scoreboard and a route page take at fleet
size, and how many SQL statements each runs, against a bare endpoint measured in the same run.

It seeds a SQLite database (in a temp dir, migrated like production) with 1,000 agents of 4
modems each, 300 networks in 30 countries, 100 routes priced for every network, 100,000 test
cases and results over the last 24 h (with an observation for each delivered one), and the
scores of all 30,000 (route, network) pairs computed from them by ``controller.scoring.recompute``
(a mix of scored and unknown pairs: ``min_results`` 3). Then it serves ``make_app`` (the API and
the UI, as ``probe-fleet serve`` does) through an aiohttp ``web.AppRunner`` on a free loopback
port and GETs, as a logged-in viewer with an aiohttp client in the same process:

* baseline: ``/api/v1/health`` (one trivial query, no session, no template);
* ``/`` (the fleet page), ``/routes`` (the scoreboard's first page: 50 networks x 100 routes),
  ``/routes/route-07`` (all networks, last 24 h) and ``/routes/route-07?network=...``.

Each page is fetched twice to warm up, then ``--requests`` times (default 15) one after another;
it prints the median and p90 ms, the response size and the SQL statements the page ran (counted
by a ``before_cursor_execute`` listener on the engine; every UI page includes the guard's session
lookup). The client shares the event loop with the server, so its own time is in every figure,
the baseline's included. Last line: ``ui_fleet_ms X ui_scoreboard_ms Y ui_route_ms Z`` (medians;
Z is the route page for all networks).

Run from the project root: ``.venv/bin/python bench/ui.py [--requests 15] [--results 100000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiohttp import ClientSession, web
from harness import log
from sqlalchemy import create_engine, event, insert

from controller.api.app import make_app
from controller.config import ControllerConfig, ScoringConfig
from controller.correlation import new_token, render
from controller.scoring import recompute
from controller.storage import schema as s
from controller.storage.db import open_database
from controller.web.sessions import COOKIE, start_session
from controller.web.users import add_user

AGENTS = 1000
MODEMS_PER_AGENT = 4
COUNTRIES = 30
NETWORKS_PER_COUNTRY = 10
ROUTES = 100
RESULTS = 100_000
REQUESTS = 15
SEED = 20261126
ROUTE = "route-07"
#: Rows per INSERT batch while seeding.
BATCH = 5000


def networks() -> list[tuple[str, str, str]]:
    """(mcc_mnc, country, operator) of every network: 30 countries of 10."""
    out = []
    for c in range(COUNTRIES):
        country = chr(ord("A") + c // 26) + chr(ord("A") + c % 26)
        for n in range(NETWORKS_PER_COUNTRY):
            out.append((f"{200 + c:03d}{n + 1:02d}", country, f"Operator {country}-{n + 1}"))
    return out


def _batches(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), BATCH):
        yield rows[start : start + BATCH]


def seed(path: Path, results: int, now: datetime) -> None:
    """Fill the migrated database at ``path`` (synchronously: it is not what is measured)."""
    rng = random.Random(SEED)
    nets = networks()
    routes = [f"route-{i:02d}" for i in range(ROUTES)]
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            insert(s.networks),
            [
                {"mcc_mnc": m, "country": c, "operator": o, "smsc_addresses": [f"+{m}0000"]}
                for m, c, o in nets
            ],
        )
        conn.execute(
            insert(s.routes),
            [
                {"name": name, "connector": {"kind": "http"}, "prices": {m: 0.01 for m, _, _ in nets}}
                for name in routes
            ],
        )
        agents, probes = [], []
        for a in range(AGENTS):
            state = "lost" if a % 50 == 0 else "online"
            seen = now - timedelta(seconds=rng.uniform(0, 120))
            agents.append(
                {
                    "id": f"pi-{a:04d}",
                    "state": state,
                    "version": "0.1.0",
                    "status_at": seen,
                    "last_seen_at": seen,
                    "started_at": seen - timedelta(days=3),
                    "health": {"spool_depth": rng.choice((0, 0, 0, 3, 250)), "clock": {"source": "chrony"}},
                    "clock_offset_ms": rng.uniform(-20, 20),
                    "clock_error_ms": rng.uniform(1, 30),
                    "clock_measured_at": seen,
                }
            )
            for m in range(MODEMS_PER_AGENT):
                mcc_mnc = nets[(a * MODEMS_PER_AGENT + m) % len(nets)][0]
                registered = rng.random() > 0.02
                probes.append(
                    {
                        "imsi": f"{mcc_mnc}{a * MODEMS_PER_AGENT + m:010d}",
                        "msisdn": f"+99{a * MODEMS_PER_AGENT + m:09d}",
                        "mcc_mnc": mcc_mnc,
                        "agent_id": f"pi-{a:04d}",
                        "modem_id": f"modem-{m}",
                        "connected": registered,
                        "registration": "registered_home" if registered else "searching",
                        "signal_dbm": rng.randint(-105, -55),
                        "state": {"operator": f"op {mcc_mnc}", "profile": "generic", "storage_total": 30},
                        "updated_at": seen,
                    }
                )
        conn.execute(insert(s.agents), agents)
        for batch in _batches(probes):
            conn.execute(insert(s.probes), batch)
    cases, rows, observations = [], [], []
    tokens: set[str] = set()
    for i in range(results):
        route = routes[i % ROUTES]
        probe = probes[rng.randrange(len(probes))]
        token = new_token(rng)
        while str(token) in tokens:  # the unique constraint would refuse a repeat
            token = new_token(rng)
        tokens.add(str(token))
        text = render(token, rng.choice(("plain", "otp", "unicode")))
        decided = now - timedelta(seconds=rng.uniform(0, 86_000))
        submitted = decided - timedelta(seconds=30)
        delivered = rng.random() < 0.93
        latency = rng.lognormvariate(8.0, 0.6) if delivered else None
        altered = delivered and rng.random() < 0.05
        fake = not delivered and rng.random() < 0.2
        received = text.upper() if altered else text
        cases.append(
            {
                "id": i + 1,
                "token": str(token),
                "route": route,
                "imsi": probe["imsi"],
                "msisdn": probe["msisdn"],
                "mcc_mnc": probe["mcc_mnc"],
                "sender": "PFBench",
                "text": text,
                "template": "otp",
                "scheduled_at": submitted,
                "submitted_at": submitted,
                "deadline_at": submitted + timedelta(minutes=5),
                "status": "done",
            }
        )
        observation_id = f"obs-{i + 1}" if delivered else None
        rows.append(
            {
                "test_case_id": i + 1,
                "route": route,
                "mcc_mnc": probe["mcc_mnc"],
                "delivered": delivered,
                "late": False,
                "latency_ms": latency,
                "latency_error_ms": 12.0 if delivered else None,
                "sender_kept": (rng.random() > 0.03) if delivered else None,
                "sender_received": "PFBench" if delivered else None,
                "content_intact": (not altered) if delivered else None,
                "smsc": f"+{probe['mcc_mnc']}0000" if delivered else None,
                "smsc_known": True if delivered else None,
                "receipt_status": "DELIVRD" if delivered or fake else "UNDELIV",
                "receipt_honest": not fake,
                "decided_at": decided,
                "observation_id": observation_id,
                "sender_sent": "PFBench",
                "sim_box": False,
                "flags": ["content_altered"] if altered else [],
                "notes": [],
            }
        )
        if observation_id is not None:
            observations.append(
                {
                    "id": observation_id,
                    "agent_id": probe["agent_id"],
                    "modem_id": probe["modem_id"],
                    "imsi": probe["imsi"],
                    "sender": "PFBench",
                    "text": received,
                    "smsc": f"+{probe['mcc_mnc']}0000",
                    "urc_at": decided,
                    "ingested_at": decided,
                    "test_case_id": i + 1,
                    "match": "token",
                    "payload": {},
                }
            )
    with engine.begin() as conn:
        for table, table_rows in ((s.test_cases, cases), (s.results, rows), (s.observations, observations)):
            for batch in _batches(table_rows):
                conn.execute(insert(table), batch)
    engine.dispose()


async def timed(http: ClientSession, url: str, requests: int, counter: list[int]) -> dict[str, Any]:
    """Median and p90 ms of ``requests`` GETs after two warm-ups, the body size and the SQL
    statements of the last one."""
    for _ in range(2):
        async with http.get(url, allow_redirects=False) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url}: {response.status}")
    times, statements, size = [], 0, 0
    for _ in range(requests):
        counter[0] = 0
        start = time.perf_counter()
        async with http.get(url, allow_redirects=False) as response:
            body = await response.read()
        times.append((time.perf_counter() - start) * 1000)
        statements, size = counter[0], len(body)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))],
        "statements": statements,
        "bytes": size,
    }


async def run(workdir: Path, requests: int, results: int) -> dict[str, dict[str, Any]]:
    path = workdir / "ui-bench.db"
    url = f"sqlite:///{path}"
    now = datetime.now(UTC)
    engine = await open_database(url)  # migrates
    await engine.dispose()
    started = time.perf_counter()
    seed(path, results, now)
    log(
        f"seeded {AGENTS} agents, {ROUTES} routes x {len(networks())} networks, {results} results in "
        f"{time.perf_counter() - started:.1f} s"
    )
    engine = await open_database(url)
    started = time.perf_counter()
    scores = await recompute(engine, ScoringConfig(min_results=3), now)
    unknown = sum(1 for score in scores if score.score is None)
    log(f"scored {len(scores)} pairs ({unknown} unknown) in {time.perf_counter() - started:.1f} s")
    counter = [0]

    def count(*_: Any) -> None:
        counter[0] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    user = await add_user(engine, "bench", "viewer", "bench password 1")
    cookie, _ = await start_session(engine, user, 3600)
    config = ControllerConfig.model_validate({"broker": {"host": "127.0.0.1", "port": 1883}})
    runner = web.AppRunner(make_app(engine, config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    network = networks()[0][0]
    pages = {
        "baseline /api/v1/health": "/api/v1/health",
        "fleet /": "/",
        "scoreboard /routes": "/routes",
        f"route /routes/{ROUTE}": f"/routes/{ROUTE}",
        f"route /routes/{ROUTE}?network={network}": f"/routes/{ROUTE}?network={network}",
    }
    out: dict[str, dict[str, Any]] = {}
    try:
        async with ClientSession(cookies={COOKIE: cookie}) as http:
            for name, target in pages.items():
                out[name] = await timed(http, base + target, requests, counter)
                log(f"{name}: median {out[name]['median_ms']:.1f} ms")
    finally:
        await runner.cleanup()
        await engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="timed GETs per page")
    parser.add_argument("--results", type=int, default=RESULTS, help="results to seed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pf-bench-ui-") as tmp:
        out = asyncio.run(run(Path(tmp), args.requests, args.results))
    baseline = out["baseline /api/v1/health"]["median_ms"]
    print(f"{'page':48} {'median ms':>10} {'p90 ms':>8} {'x base':>7} {'SQL':>4} {'KiB':>7}")
    for name, figures in out.items():
        median, kib = figures["median_ms"], figures["bytes"] / 1024
        print(
            f"{name:48} {median:10.1f} {figures['p90_ms']:8.1f} "
            f"{median / baseline:7.1f} {figures['statements']:4d} {kib:7.0f}"
        )
    fleet = out["fleet /"]["median_ms"]
    board = out["scoreboard /routes"]["median_ms"]
    route = out[f"route /routes/{ROUTE}"]["median_ms"]
    print(f"ui_fleet_ms {fleet:.1f} ui_scoreboard_ms {board:.1f} ui_route_ms {route:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
