"""End to end: the default scenario through the whole system, judged against simnet's truth.

``probe-fleet demo --duration`` (one run per session, ``tests.demo_run``, shared with the web
UI tests) runs everything as a user would (mosquitto, simnet, the controller, one real
probe-agent process per emulated Pi on its virtual modems); its report is checked against what
the scenario says the routes are, and every latency against the ground truth. One emulated Pi
(pi-de-1) runs with its clock 30 s fast: its latencies must hold too, so the clock-offset
correction is what makes them right.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import pytest

from tests.demo_run import DEMO_DURATION_S, DEMO_TIMEOUT_S, DemoRun


@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_default_scenario_measures_the_truth(demo_run: DemoRun) -> None:
    workdir, report = demo_run.workdir, demo_run.report
    assert "web UI   http://127.0.0.1:" in demo_run.stdout and "user: demo, password: " in demo_run.stdout
    networks = json.loads((workdir / "simnet" / "simnet.json").read_text())["networks"]

    table = report["routing_table"]
    assert set(table) == {n["mcc_mnc"] for n in networks}
    for mcc_mnc, routes in table.items():
        assert routes[0] == "direct", f"{mcc_mnc}: {routes}"

    flags = report["flags"]
    assert {"grey", "sender_replaced", "foreign_smsc"} <= set(flags["grey"])
    assert "fake_receipts" in flags["fakedlr"]
    assert "degraded" in flags["degrading"]
    assert not {"grey", "fake_receipts", "degraded"} & set(flags["direct"])

    accuracy = report["accuracy"]
    assert accuracy["tests"] >= 300 and accuracy["delivered"] >= 200
    assert accuracy["lost_observations"] == 0
    assert accuracy["within_bound_share"] == 1.0
    assert accuracy["latency_error_ms"]["p99"] <= 50.0

    db = sqlite3.connect(f"file:{workdir / 'controller.db'}?mode=ro", uri=True)
    try:
        offsets = dict(db.execute("SELECT id, clock_offset_ms FROM agents").fetchall())
        versions = db.execute('SELECT created_at, "table" FROM routing_tables ORDER BY version').fetchall()
        shifted = db.execute(
            "SELECT count(*) FROM results WHERE delivered AND mcc_mnc IN ('26201', '26202', '26203')"
        ).fetchone()[0]
    finally:
        db.close()
    # pi-de-1's clock is 30 s fast, and its SMS were measured (within bound, as every other)
    assert abs(offsets["pi-de-1"] - 30_000) < 100 and shifted > 20

    # the degrading route ranked better somewhere before it degraded (half-way) than at the end
    started = datetime.fromisoformat(
        json.loads((workdir / "simnet" / "simnet.json").read_text())["started_at"]
    )
    half_way = started.timestamp() + DEMO_DURATION_S / 2

    def rank(document: str, mcc_mnc: str) -> int:
        routes = [c["route"] for c in json.loads(document)["networks"].get(mcc_mnc, [])]
        return routes.index("degrading") if "degrading" in routes else len(routes)

    before = [
        (v, t) for v, t in versions if datetime.fromisoformat(v).replace(tzinfo=UTC).timestamp() < half_way
    ]
    assert before, "no routing table was built before the route degraded"
    final = versions[-1][1]
    assert any(rank(final, n) > min(rank(t, n) for _, t in before) for n in table)
