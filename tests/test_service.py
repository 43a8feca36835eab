"""The whole controller service as ``probe-fleet serve`` runs it, on a real mosquitto and a SQLite
file: results in the database become scores and a routing table, published retained on
``controller/routing-table``, served by the REST API (ETag, CSV) and written by
``probe-fleet export routing-table`` from the same database; a campaign created through the API
becomes a persisted scheduler job."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from controller.api.tokens import add_token
from controller.config import ControllerConfig, load
from controller.service import serve
from controller.storage import schema as s
from controller.storage.db import open_database
from probe_agent.protocol import RoutingTable, Topics
from tests.mosquitto import Mosquitto, Recorder, free_port
from tests.test_scoring import NET, insert_results, result

T = Topics()


@pytest.fixture
def config_file(tmp_path: Path, mosquitto: Mosquitto) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'database_url = "sqlite:///{tmp_path / "controller.db"}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {mosquitto.port}\nclient_id = "service-test"\n'
        f"[api]\nport = {free_port()}\n"
        "[routing]\nrebuild_interval_s = 0.5\n"
        "[schedule]\nsync_interval_s = 0.5\n"
    )
    return path


def rows(route: str, n: int, delivered: int, latency_ms: float) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        result(route, now - timedelta(minutes=i + 1), delivered=i >= n - delivered, latency_ms=latency_ms)
        if i >= n - delivered
        else result(route, now - timedelta(minutes=i + 1), delivered=False)
        for i in range(n)
    ]


@pytest.fixture
async def running(config_file: Path) -> AsyncIterator[tuple[ControllerConfig, str]]:
    """Seeded database (a good route and a lossy one), a token, and the service running."""
    config = load(config_file)
    engine = await open_database(config.database_url)
    async with engine.begin() as conn:
        await insert_results(conn, rows("direct", 60, 59, 2_000.0) + rows("lossy", 60, 45, 900.0))
    token = await add_token(engine, "ops", "operator")
    await engine.dispose()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    yield config, token
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_table_published_served_and_exported_alike(
    running: tuple[ControllerConfig, str], mosquitto: Mosquitto, config_file: Path
) -> None:
    config, token = running
    recorder = Recorder(mosquitto, [T.routing_table()])
    await asyncio.to_thread(recorder.wait_for, lambda m: len(m) > 0, 60.0)
    recorder.close()
    late = Recorder(mosquitto, [T.routing_table()])  # a sender connecting later gets it retained
    messages = await asyncio.to_thread(late.wait_for, lambda m: len(m) > 0, 10.0)
    late.close()
    published = RoutingTable.model_validate_json(messages[-1][1])
    assert messages[-1][2] is True
    assert [c.route for c in published.networks[NET]] == ["direct", "lossy"]
    assert published.networks[NET][0].role == "primary"

    base = f"http://127.0.0.1:{config.api.port}/api/v1"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/routing-table", headers=headers) as resp:
            assert resp.status == 200
            served = RoutingTable.model_validate(await resp.json())
            etag = resp.headers["ETag"]
        async with http.get(f"{base}/routing-table", headers=headers | {"If-None-Match": etag}) as resp:
            assert resp.status == 304
        async with http.get(f"{base}/routing-table?format=csv", headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == "text/csv"
            served_csv = await resp.text()
        async with http.get(f"{base}/scores?route=lossy", headers=headers) as resp:
            scores = (await resp.json())["items"]
        campaign = {
            "name": "uk-otp",
            "definition": {"routes": ["direct"], "networks": [NET], "cadence_s": 3600},
        }
        async with http.post(f"{base}/campaigns", headers=headers, json=campaign) as resp:
            assert resp.status == 201, await resp.text()
            campaign_id = (await resp.json())["id"]
    assert served.version >= published.version and served.networks == published.networks
    assert [r["route"] for r in csv.DictReader(io.StringIO(served_csv))] == ["direct", "lossy"]
    assert len(scores) == 1 and scores[0]["state"] == "scored" and scores[0]["results"] == 60

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            "-m",
            "controller.cli",
            "export",
            "routing-table",
            "--config",
            str(config_file),
        ]
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)

    exported = export("--format", "json")
    assert exported.returncode == 0, exported.stderr
    assert RoutingTable.model_validate(json.loads(exported.stdout)) == served
    out = config_file.parent / "table.csv"
    assert export("--format", "csv", "-o", str(out)).returncode == 0
    assert out.read_bytes().decode() == served_csv
    missing = export("--version", "999")
    assert missing.returncode == 1 and "no routing table version 999" in missing.stderr

    engine = await open_database(config.database_url)
    try:
        for _ in range(100):  # the scheduler syncs its jobs with the campaigns every 0.5 s
            async with engine.connect() as conn:
                jobs = (await conn.execute(select(s.scheduler_jobs.c.id))).scalars().all()
            if f"campaign:{campaign_id}" in jobs:
                break
            await asyncio.sleep(0.1)
        assert f"campaign:{campaign_id}" in jobs, "the campaign became a persisted job"
    finally:
        await engine.dispose()
