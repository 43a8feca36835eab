"""The routing table: order, weights and roles from known scores; unknown routes explored, not
ranked; hysteresis that holds on noise and lets a degrading route go within the window; versions
only on change; CSV and JSON export; save / latest / version and rebuild on both databases."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.config import RoutingConfig, ScoringConfig
from controller.routing import (
    CSV_FIELDS,
    build_table,
    latest,
    rebuild,
    save,
    table_csv,
    table_json,
    version,
)
from controller.scoring import Score, State, build_columns, compute
from controller.storage import schema
from probe_agent.protocol import RouteChoice, RoutingTable
from tests.test_scoring import insert_results, series

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
NET = "20801"
CONFIG = RoutingConfig()


def score(
    route: str, value: float | None, *, net: str = NET, results: int = 100, age: timedelta = timedelta()
) -> Score:
    """A Score as scoring makes it, with the stats routing reads."""
    stats: dict[str, Any] = {
        "delivered": 0.99,
        "latency_p50_ms": 1800.0,
        "last_result_at": (NOW - age).isoformat() if results else None,
        "results": results,
    }
    state: State = "unknown" if value is None else "scored"
    return Score(route, net, state, value, results, stats, {"why": ""})


def choices(table: RoutingTable, net: str = NET) -> dict[str, RouteChoice]:
    return {c.route: c for c in table.networks[net]}


def routes_in_order(table: RoutingTable, net: str = NET) -> list[str]:
    return [c.route for c in table.networks[net]]


def test_routes_best_first_primary_gets_most_backups_halve() -> None:
    scores = [score("b", 0.80), score("a", 0.90), score("c", 0.70)]
    table, changed = build_table(scores, None, CONFIG, {"a", "b", "c"}, NOW)
    assert changed and table.version == 1 and table.created_at == NOW
    assert routes_in_order(table) == ["a", "b", "c"]
    got = choices(table)
    assert [got[r].role for r in "abc"] == ["primary", "backup", "backup"]
    assert got["a"].weight == pytest.approx(0.9)
    assert got["b"].weight == pytest.approx(0.1 * 2 / 3, abs=1e-4) and got["c"].weight == pytest.approx(
        0.1 / 3, abs=1e-4
    )
    assert sum(c.weight for c in table.networks[NET]) == pytest.approx(1.0, abs=1e-9)
    assert got["a"].reason == "best score 0.90: 99.0% delivered, p50 1.8 s"
    assert got["b"].reason.startswith("backup 1, score 0.80")


def test_an_unknown_route_is_explored_neither_primary_nor_worst() -> None:
    scores = [score("good", 0.9), score("bad", 0.2), score("new", None, results=3)]
    table, _ = build_table(scores, None, CONFIG, {"good", "bad", "new"}, NOW)
    got = choices(table)
    assert got["new"].role == "exploration" and got["new"].score is None
    assert got["new"].weight == pytest.approx(CONFIG.exploration_share)
    assert got["new"].reason == "unknown: 3 results, exploring"
    assert got["good"].role == "primary" and got["good"].weight == pytest.approx(1 - CONFIG.exploration_share)
    assert got["bad"].role == "excluded" and got["bad"].weight == 0.0
    assert got["bad"].reason.startswith("excluded: score 0.20 below 0.30")
    assert routes_in_order(table) == ["good", "new", "bad"]  # after the ranked, before the excluded


def test_only_unknown_routes_share_all_the_traffic() -> None:
    table, _ = build_table(
        [score("x", None, results=0), score("y", None, results=5)], None, CONFIG, {"x", "y"}, NOW
    )
    assert [(c.route, c.role, c.weight) for c in table.networks[NET]] == [
        ("x", "exploration", 0.5),
        ("y", "exploration", 0.5),
    ]


def test_disabled_routes_are_excluded_and_poor_routes_kept_when_nothing_is_better() -> None:
    scores = [score("off", 0.95), score("poor", 0.25), score("worse", 0.1)]
    table, _ = build_table(scores, None, CONFIG, {"poor", "worse"}, NOW)
    got = choices(table)
    assert (
        got["off"].role == "excluded" and got["off"].reason == "excluded: disabled" and got["off"].weight == 0
    )
    assert got["poor"].role == "primary" and got["poor"].weight == 1.0
    assert got["poor"].reason.startswith("best of poor routes, score 0.25 (below 0.30)")
    assert got["worse"].role == "excluded"


def test_a_stale_route_keeps_its_place_and_gets_the_exploration_share() -> None:
    scores = [score("a", 0.9), score("b", 0.8, age=timedelta(hours=7))]
    table, _ = build_table(scores, None, CONFIG, {"a", "b"}, NOW)
    got = choices(table)
    assert got["b"].role == "backup"
    assert got["b"].weight == pytest.approx(0.95 * 0.1 + 0.05)
    assert got["b"].reason.endswith("stale: newest result 7.0 h old, exploring")
    fresh, _ = build_table([score("a", 0.9), score("b", 0.8)], None, CONFIG, {"a", "b"}, NOW)
    assert choices(fresh)["b"].weight == pytest.approx(0.1)


def test_the_incumbent_keeps_its_place_unless_beaten_by_the_margin() -> None:
    first, _ = build_table([score("a", 0.80), score("b", 0.78)], None, CONFIG, {"a", "b"}, NOW)
    assert routes_in_order(first) == ["a", "b"]
    later = NOW + timedelta(hours=1)
    held, changed = build_table([score("a", 0.80), score("b", 0.84)], first, CONFIG, {"a", "b"}, later)
    assert not changed and held is first
    # the same scores without a previous table: b is simply best
    assert routes_in_order(
        build_table([score("a", 0.80), score("b", 0.84)], None, CONFIG, {"a", "b"}, later)[0]
    ) == [
        "b",
        "a",
    ]
    taken, changed = build_table([score("a", 0.80), score("b", 0.86)], first, CONFIG, {"a", "b"}, later)
    assert changed and taken.version == 2 and taken.created_at == later
    assert routes_in_order(taken) == ["b", "a"]
    assert choices(taken)["b"].reason.startswith("best score 0.86, took over from a")


def test_hysteresis_reason_names_the_challenger() -> None:
    first, _ = build_table([score("a", 0.80), score("b", 0.70)], None, CONFIG, {"a", "b"}, NOW)
    # a new route joins close to the incumbent: the table changes (a new backup), the primary holds
    table, changed = build_table(
        [score("a", 0.80), score("b", 0.70), score("c", 0.83)], first, CONFIG, {"a", "b", "c"}, NOW
    )
    assert changed and routes_in_order(table) == ["a", "c", "b"]
    assert choices(table)["a"].reason.startswith(
        "kept as primary, score 0.80 (c 0.83 is within the margin 0.05)"
    )


def test_a_score_wobbling_at_the_exclusion_threshold_does_not_flap() -> None:
    """Tried: a backup's score wobbles around ``exclude_below`` (0.30) by less than the margin:
    it stays ranked and the table keeps its version; it is excluded once a margin below, and
    comes back only above the threshold itself."""
    enabled = {"a", "b"}
    first, _ = build_table([score("a", 0.80), score("b", 0.32)], None, CONFIG, enabled, NOW)
    assert choices(first)["b"].role == "backup"
    table = first
    for wobble in (0.29, 0.31, 0.27, 0.33, 0.26):
        table, changed = build_table([score("a", 0.80), score("b", wobble)], table, CONFIG, enabled, NOW)
        assert not changed and choices(table)["b"].role == "backup", wobble
    held, _ = build_table(
        [score("a", 0.80), score("b", 0.27)], None, CONFIG, enabled, NOW
    )  # without a previous table the plain threshold applies
    assert choices(held)["b"].role == "excluded"
    fallen, changed = build_table([score("a", 0.80), score("b", 0.24)], table, CONFIG, enabled, NOW)
    assert changed and choices(fallen)["b"].role == "excluded"
    still_out, changed = build_table([score("a", 0.80), score("b", 0.28)], fallen, CONFIG, enabled, NOW)
    assert not changed and choices(still_out)["b"].role == "excluded"
    back, changed = build_table([score("a", 0.80), score("b", 0.31)], still_out, CONFIG, enabled, NOW)
    assert changed and choices(back)["b"].role == "backup"
    # a new route makes a new version: the held route's reason says why it is still there
    joined, changed = build_table(
        [score("a", 0.80), score("b", 0.28), score("c", None, results=3)], first, CONFIG, {*enabled, "c"}, NOW
    )
    assert changed and choices(joined)["b"].role == "backup"
    assert (
        "below 0.30 but within the margin 0.05: kept until it falls below 0.25" in choices(joined)["b"].reason
    )


def test_version_increments_only_when_the_content_changes() -> None:
    enabled = {"a", "b"}
    v1, changed = build_table([score("a", 0.9), score("b", 0.8)], None, CONFIG, enabled, NOW)
    assert changed and v1.version == 1
    # other scores, same order, roles and weights: the previous table, unchanged
    same, changed = build_table(
        [score("a", 0.93), score("b", 0.77)], v1, CONFIG, enabled, NOW + timedelta(minutes=5)
    )
    assert not changed and same is v1
    v2, changed = build_table([score("a", 0.9)], v1, CONFIG, enabled, NOW)  # b has gone
    assert changed and v2.version == 2
    v3, changed = build_table([score("a", 0.9), score("b", 0.8)], v2, CONFIG, {"a"}, NOW)  # b disabled
    assert changed and v3.version == 3 and choices(v3)["b"].role == "excluded"
    v4, changed = build_table(
        [score("a", 0.9), score("b", 0.8)], v3, RoutingConfig(backup_share=0.2), enabled, NOW
    )
    assert changed and v4.version == 4 and choices(v4)["b"].weight == pytest.approx(0.2)
    # unknown routes whose counts move, or excluded ones whose scores move, change nothing
    unknowns = [score("a", 0.9), score("x", None, results=3), score("y", None, results=5), score("z", 0.1)]
    v5, changed = build_table(unknowns, v4, CONFIG, {"a", "x", "y", "z"}, NOW)
    assert changed and v5.version == 5
    moved = [score("a", 0.9), score("x", None, results=9), score("y", None, results=1), score("z", 0.2)]
    same, changed = build_table(moved, v5, CONFIG, {"a", "x", "y", "z"}, NOW)
    assert not changed and same is v5


def test_csv_export_parses_back_to_the_table() -> None:
    scores = [
        score("a", 0.9),
        score("b, the other", 0.8),
        score("new", None, results=3),
        score("x", 0.7, net="20810"),
    ]
    table, _ = build_table(scores, None, CONFIG, {"a", "b, the other", "new", "x"}, NOW)
    text = table_csv(table)
    assert text.splitlines()[0] == ",".join(CSV_FIELDS)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4
    parsed: dict[str, list[RouteChoice]] = {}
    for row in rows:
        assert int(row["version"]) == table.version
        choice = RouteChoice(
            route=row["route"],
            weight=float(row["weight"]),
            score=float(row["score"]) if row["score"] else None,
            role=row["role"],
            reason=row["reason"],
        )
        network = parsed.setdefault(row["mcc_mnc"], [])
        assert int(row["rank"]) == len(network) + 1
        network.append(choice)
    assert parsed == table.networks


def test_json_export_is_the_payload() -> None:
    table, _ = build_table([score("a", 0.9), score("b", None, results=1)], None, CONFIG, {"a", "b"}, NOW)
    assert RoutingTable.model_validate_json(table_json(table)) == table


# over time, from results: degradation and noise


def simulate(
    steps: int,
    step: timedelta,
    delivery: Mapping[str, Sequence[float]],
    *,
    margin: float = CONFIG.margin,
    seed: int = 1,
    tests_per_step: int = 3,
) -> list[RoutingTable]:
    """Tests every route ``tests_per_step`` times per step (random delivery with the step's
    probability, lognormal latency around 2 s), rebuilds the table after each step, and returns
    the table in force after each."""
    rng = np.random.default_rng(seed)
    scoring = ScoringConfig()
    routing = RoutingConfig(margin=margin)
    rows: list[dict[str, Any]] = []
    tables: list[RoutingTable] = []
    table: RoutingTable | None = None
    start = NOW - step * steps
    for k in range(steps):
        now = start + step * (k + 1)
        for route, probabilities in delivery.items():
            for j in range(tests_per_step):
                delivered = bool(rng.random() < probabilities[k])
                at = now - step * (j / tests_per_step)
                row = {
                    "route": route,
                    "mcc_mnc": NET,
                    "decided_at": at,
                    "delivered": delivered,
                    "late": False,
                }
                row |= {"latency_ms": float(rng.lognormal(np.log(2000), 0.3)) if delivered else None}
                row |= {"sender_kept": delivered or None, "content_intact": delivered or None}
                row |= {"receipt_honest": None, "sim_box": False, "smsc_known": delivered or None}
                rows.append(row)
        cutoff = now - timedelta(seconds=scoring.window_s)
        rows = [r for r in rows if r["decided_at"] >= cutoff]
        scores = compute(build_columns(rows, now), now, scoring)
        table, _ = build_table(scores, table, routing, set(delivery), now)
        tables.append(table)
    return tables


def primaries(tables: Sequence[RoutingTable]) -> list[str | None]:
    return [next((c.route for c in t.networks[NET] if c.role == "primary"), None) for t in tables]


def test_a_degrading_route_loses_the_primary_place_within_the_window() -> None:
    step = timedelta(minutes=15)
    day = 96  # steps
    # a: 99 % for a day, then 60 %; b: 96 % throughout
    tables = simulate(2 * day, step, {"a": [0.99] * day + [0.6] * day, "b": [0.96] * 2 * day})
    leaders = primaries(tables)
    settled = day // 4  # the first hours, while a pair has too few results, are not judged
    assert set(leaders[settled:day]) == {"a"}  # no flap while both are steady
    lost = next(k for k in range(day, 2 * day) if leaders[k] != "a")
    assert set(leaders[lost:]) == {"b"}  # and it does not come back
    assert (lost - day + 1) * step <= timedelta(seconds=ScoringConfig().window_s)
    assert (lost - day + 1) * step <= timedelta(hours=4)  # in fact much sooner
    assert choices(tables[-1])["a"].role == "backup"


def test_noise_around_equal_scores_does_not_flap_the_order() -> None:
    step = timedelta(minutes=30)
    steps = 240  # five days
    both = {"a": [0.97] * steps, "b": [0.97] * steps}
    tables = simulate(steps, step, both, tests_per_step=6)
    settled = tables[12:]  # from the sixth hour
    assert {t.version for t in settled} == {settled[0].version}  # no new version at all
    assert len(set(primaries(settled))) == 1
    # the same noise without hysteresis does flip the order: the test above could fail
    flappy = simulate(steps, step, both, margin=0.0, tests_per_step=6)[12:]
    assert len(set(primaries(flappy))) == 2
    assert flappy[-1].version > flappy[0].version + 2


# through the database


async def test_save_latest_and_version_round_trip(database: AsyncEngine) -> None:
    v1, _ = build_table([score("a", 0.9), score("b", None, results=2)], None, CONFIG, {"a", "b"}, NOW)
    v2, _ = build_table([score("a", 0.9)], v1, CONFIG, {"a"}, NOW + timedelta(hours=1))
    async with database.begin() as conn:
        assert await latest(conn) is None
        await save(conn, v1)
        await save(conn, v2)
    async with database.connect() as conn:
        assert await latest(conn) == v2
        assert await version(conn, 1) == v1
        assert await version(conn, 3) is None


async def test_rebuild_saves_only_when_the_table_changes(database: AsyncEngine) -> None:
    async with database.begin() as conn:
        await insert_results(conn, series("a", 40, 40) + series("b", 40, 36) + series("c", 3, 3))
    scoring, routing = ScoringConfig(), RoutingConfig()
    table, changed = await rebuild(database, scoring, routing, NOW)
    assert changed and table.version == 1
    assert routes_in_order(table) == ["a", "b", "c"]
    assert [c.role for c in table.networks[NET]] == ["primary", "backup", "exploration"]

    again, changed = await rebuild(database, scoring, routing, NOW + timedelta(minutes=1))
    assert not changed and again == table

    async with database.begin() as conn:
        await conn.execute(update(schema.routes).where(schema.routes.c.name == "a").values(enabled=False))
    v2, changed = await rebuild(database, scoring, routing, NOW + timedelta(minutes=2))
    assert changed and v2.version == 2
    assert choices(v2)["b"].role == "primary" and choices(v2)["a"].role == "excluded"
    async with database.connect() as conn:
        assert await latest(conn) == v2
        assert await version(conn, 1) == table
