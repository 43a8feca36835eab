"""Scoring on result sets whose right answer is known: delivery dominates latency, fake receipts
cost, too few results is unknown; the statistics (Wilson interval, weighted percentiles, decay)
against hand-computed values; and the recompute round trip through SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.config import ScoringConfig, ScoringWeights
from controller.scoring import (
    COMPONENTS,
    Score,
    build_columns,
    compute,
    decay,
    latency_score,
    recompute,
    stored,
    weighted_percentiles,
    wilson,
    z_value,
)
from controller.storage import schema

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
NET = "20801"
DEFAULT = ScoringConfig()


def result(route: str, at: datetime, *, delivered: bool = True, **values: Any) -> dict[str, Any]:
    """One row as the results table holds it: delivered in 2 s, everything intact, unless told."""
    row: dict[str, Any] = {
        "route": route,
        "mcc_mnc": NET,
        "decided_at": at,
        "delivered": delivered,
        "late": False,
        "latency_ms": 2000.0 if delivered else None,
        "sender_kept": True if delivered else None,
        "content_intact": True if delivered else None,
        "receipt_honest": None,
        "sim_box": False,
        "smsc_known": True if delivered else None,
    }
    return row | values


def series(
    route: str, n: int, delivered: int, *, spread: timedelta = timedelta(hours=2), **values: Any
) -> list[dict[str, Any]]:
    """``n`` results of ``route`` spread evenly over the last ``spread``, the first ``delivered``
    of them (in an interleaved order, so decay treats both kinds alike) delivered."""
    rows = []
    failed = n - delivered
    for i in range(n):
        at = NOW - spread * (i / n)
        # spread the failures evenly through the series
        is_failure = failed and (i * failed) // n != ((i + 1) * failed) // n
        rows.append(result(route, at, delivered=not is_failure, **values))
    return rows


def by_route(scores: Sequence[Score]) -> dict[str, Score]:
    return {s.route: s for s in scores}


def score_of(rows: list[dict[str, Any]], config: ScoringConfig = DEFAULT, **kwargs: Any) -> dict[str, Score]:
    return by_route(compute(build_columns(rows, NOW, **kwargs), NOW, config))


@pytest.mark.parametrize("n", [100, 200, 1000])
def test_99_percent_at_2_s_beats_90_percent_at_1_s(n: int) -> None:
    rows = series("steady", n, n * 99 // 100, latency_ms=2000.0) + series("fast", n, n * 90 // 100)
    for row in rows:
        if row["route"] == "fast" and row["delivered"]:
            row["latency_ms"] = 1000.0
    scores = score_of(rows)
    steady, fast = scores["steady"], scores["fast"]
    assert steady.state == fast.state == "scored"
    assert steady.stats["delivered"] == pytest.approx(0.99, abs=0.005)
    assert fast.stats["latency_p50_ms"] == 1000.0 and steady.stats["latency_p50_ms"] == 2000.0
    # the faster route does win on latency; delivery outweighs it
    comps = {
        name: (steady.explanation["components"][name], fast.explanation["components"][name])
        for name in COMPONENTS
    }
    assert comps["latency"][1]["value"] > comps["latency"][0]["value"]
    assert steady.score is not None and fast.score is not None
    assert steady.score > fast.score


def test_fake_receipts_are_penalised() -> None:
    # Both deliver 90 of 100 and have a receipt for every message. The honest route's receipts
    # say UNDELIV for the ten lost ones; the other's say DELIVRD: ten fake receipts.
    honest = series("honest", 100, 90, receipt_honest=True)
    faker = series("faker", 100, 90)
    for row in faker:
        row["receipt_honest"] = row["delivered"]
    wrong = series("wrong", 100, 90)  # ten wrong receipts: "failed" for messages that arrived
    for i, row in enumerate(wrong):
        row["receipt_honest"] = not (row["delivered"] and i % 9 == 0 and i < 90)
    scores = score_of(honest + faker + wrong)
    assert scores["faker"].stats["receipts_fake"] == pytest.approx(0.1, abs=0.02)
    assert scores["wrong"].stats["receipts_fake"] == 0.0
    assert scores["wrong"].stats["receipts_honest"] == pytest.approx(0.9, abs=0.02)
    s_honest, s_fake, s_wrong = (scores[r].score for r in ("honest", "faker", "wrong"))
    assert s_honest is not None and s_fake is not None and s_wrong is not None
    assert s_fake < s_wrong < s_honest
    # fake receipts weigh fake_receipt_penalty times a wrong one: 90 / (90 + 5 * 10)
    assert scores["faker"].explanation["components"]["receipts"]["value"] == pytest.approx(90 / 140, abs=0.03)
    assert "weak: " in scores["faker"].explanation["why"] and "fake" in scores["faker"].explanation["why"]
    assert "fake" not in scores["honest"].explanation["why"].split("weak:")[-1]


def test_three_results_are_unknown_neither_best_nor_worst() -> None:
    scores = score_of(series("new", 3, 3) + series("bad", 40, 10) + series("good", 40, 40))
    new = scores["new"]
    assert new.state == "unknown" and new.score is None and new.results == 3
    assert new.explanation["why"] == "unknown: 3 results in the window (needs 20)"
    assert new.stats["delivered"] == 1.0  # measured, just not enough to rank
    assert scores["bad"].state == scores["good"].state == "scored"


def test_min_results_counts_raw_results_in_the_window() -> None:
    rows = series("r", 20, 20, spread=timedelta(hours=20))
    assert score_of(rows)["r"].state == "scored"
    # ages 0, 1, ..., 19 h: the oldest falls out of an 18.5 h window, leaving 19 results
    assert score_of(rows, ScoringConfig(window_s=18.5 * 3600))["r"].state == "unknown"


def test_a_scored_pair_stays_scored_a_little_under_min_results() -> None:
    """Hysteresis at min_results (20, keep share 0.75: down to 15): a pair that was scored keeps
    its score with 19 results and says why; one that was not stays unknown; below 15 it goes."""
    rows = series("r", 20, 20, spread=timedelta(hours=20))  # one result an hour, ages 0..19 h
    narrow = ScoringConfig(window_s=18.5 * 3600)  # 19 results left
    columns = build_columns(rows, NOW)
    held = by_route(compute(columns, NOW, narrow, was_scored={("r", NET)}))["r"]
    assert held.state == "scored" and held.score is not None and held.results == 19
    assert "kept scored with 19 results, under 20, until fewer than 15" in held.explanation["why"]
    assert by_route(compute(columns, NOW, narrow))["r"].state == "unknown"
    assert by_route(compute(columns, NOW, narrow, was_scored={("other", NET)}))["r"].state == "unknown"
    gone = by_route(compute(columns, NOW, ScoringConfig(window_s=13.5 * 3600), was_scored={("r", NET)}))
    assert gone["r"].state == "unknown" and gone["r"].results == 14


def test_a_route_that_delivers_nothing_cannot_score_on_price_or_receipts() -> None:
    rows = series("dead", 50, 0, receipt_honest=True) + series("live", 50, 50)
    scores = score_of(rows, prices={"dead": {NET: 0.001}, "live": {NET: 0.05}})
    dead = scores["dead"]
    assert dead.score is not None and dead.score < 0.3  # below routing's default exclusion floor
    for name in ("latency", "sender", "content", "grey"):
        assert dead.explanation["components"][name]["value"] == 0.0
    assert dead.explanation["components"]["price"]["value"] == 1.0
    assert scores["live"].explanation["components"]["price"]["value"] == pytest.approx(0.02)


def test_grey_signs_and_altered_content_lower_the_score() -> None:
    clean = series("clean", 60, 60)
    grey = series("grey", 60, 60)
    for i, row in enumerate(grey):
        row["sim_box"] = i % 4 == 0
        row["smsc_known"] = i % 4 != 1
    altered = series("altered", 60, 60)
    for i, row in enumerate(altered):
        row["content_intact"] = i % 2 == 0
        row["sender_kept"] = i % 3 != 0
    scores = score_of(clean + grey + altered)
    assert scores["grey"].stats["grey"] == pytest.approx(0.5, abs=0.01)
    assert scores["altered"].stats["content_intact"] == pytest.approx(0.5, abs=0.02)
    assert scores["altered"].stats["sender_kept"] == pytest.approx(2 / 3, abs=0.02)
    clean_score = scores["clean"].score
    assert clean_score is not None
    assert all((scores[r].score or 1.0) < clean_score for r in ("grey", "altered"))


def test_late_deliveries_count_as_delivered_and_cost_through_latency() -> None:
    punctual = series("punctual", 100, 100)
    late = series("late", 100, 100)
    for row in late[::10]:
        row["late"] = True
        row["latency_ms"] = 900_000.0  # 15 minutes: after the deadline
    scores = score_of(punctual + late)
    assert scores["late"].stats["delivered"] == 1.0
    assert scores["late"].stats["late"] == pytest.approx(0.1, abs=0.01)
    assert scores["late"].stats["latency_p99_ms"] == 900_000.0
    assert (scores["late"].score or 1.0) < (scores["punctual"].score or 0.0)


def test_conversion_rate_counts_once_enough_reports_arrived() -> None:
    rows = series("a", 30, 30) + series("b", 30, 30)
    conversions = [
        {"route": route, "mcc_mnc": NET, "at": NOW - timedelta(minutes=i), "converted": i % 10 < rate}
        for route, rate in (("a", 9), ("b", 5))
        for i in range(40)
    ]
    scores = score_of(rows, conversions=conversions)
    assert scores["a"].stats["conversions"] == 40
    assert scores["a"].stats["conversion_rate"] == pytest.approx(0.9, abs=0.02)
    assert scores["b"].stats["conversion_rate"] == pytest.approx(0.5, abs=0.02)
    assert (scores["b"].score or 1.0) < (scores["a"].score or 0.0)
    few = score_of(rows, conversions=conversions[:10])
    assert few["a"].explanation["components"]["conversion"]["value"] is None  # 10 < min_conversions


def test_explanation_contributions_add_up_to_the_score() -> None:
    scores = score_of(series("r", 50, 45, receipt_honest=True), prices={"r": {NET: 0.02}})
    explanation = scores["r"].explanation
    json.dumps(explanation)  # JSON-serialisable as stored
    parts = explanation["components"]
    assert set(parts) == set(COMPONENTS)
    assert parts["conversion"] == {"value": None, "weight": 0.04, "contribution": None}
    total = sum(p["contribution"] for p in parts.values() if p["contribution"] is not None)
    assert total == pytest.approx(explanation["score"], abs=1e-5)
    assert explanation["why"].startswith(f"score {explanation['score']:.2f}; strong: ")


def test_weights_come_from_the_config() -> None:
    rows = series("steady", 100, 99) + series("fast", 100, 90, latency_ms=200.0)
    rows = [r | {"latency_ms": 10_000.0} if r["route"] == "steady" and r["delivered"] else r for r in rows]
    default = score_of(rows)
    latency_first = score_of(rows, ScoringConfig(weights=ScoringWeights(delivery=0.05, latency=0.9)))
    assert (default["steady"].score or 0) > (default["fast"].score or 0)
    assert (latency_first["steady"].score or 0) < (latency_first["fast"].score or 0)


# statistics against hand-computed values


def test_wilson_interval_matches_hand_computed_values() -> None:
    z = 1.96
    low, high = wilson(np.array([90.0, 0.0, 10.0, 0.0]), np.array([100.0, 10.0, 10.0, 0.0]), z)
    # 90 of 100: centre (0.9 + z²/200) / (1 + z²/100), half-width z·sqrt(0.0009 + z²/40000) / (1 + z²/100)
    assert low[0] == pytest.approx(0.825633, abs=1e-6) and high[0] == pytest.approx(0.944772, abs=1e-6)
    # 0 of n: [0, z² / (n + z²)]; n of n: [n / (n + z²), 1]
    assert low[1] == 0.0 and high[1] == pytest.approx(z * z / (10 + z * z))
    assert low[2] == pytest.approx(10 / (10 + z * z)) and high[2] == 1.0
    assert math.isnan(low[3]) and math.isnan(high[3])
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)


def test_weighted_percentiles_match_hand_computed_values() -> None:
    group = np.array([0, 0, 0, 0, 1, 1], np.intp)
    values = np.array([4.0, 1.0, 3.0, 2.0, 20.0, 10.0])
    weights = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    got = weighted_percentiles(group, values, weights, 3, (0.25, 0.5, 0.9))
    # group 0, equal weights: cumulative 1, 2, 3, 4 -> q·4 = 1, 2, 3.6 -> values 1, 2, 4
    assert got[0].tolist() == [1.0, 2.0, 4.0]
    # group 1: 10 weighs 3 of 4 -> q·4 = 1, 2, 3.6 -> 10, 10, 20
    assert got[1].tolist() == [10.0, 10.0, 20.0]
    assert np.isnan(got[2]).all()  # no values


def test_weighted_percentiles_agree_with_numpy() -> None:
    rng = np.random.default_rng(3)
    group = rng.integers(0, 50, 5000)
    values = rng.lognormal(8, 1, 5000)
    weights = rng.random(5000)
    quantiles = (0.5, 0.9, 0.99)
    got = weighted_percentiles(group, values, weights, 50, quantiles)
    for g in range(50):
        mine = group == g
        expected = np.quantile(values[mine], quantiles, weights=weights[mine], method="inverted_cdf")
        assert got[g] == pytest.approx(expected, rel=1e-9)


def test_decay_halves_the_weight_at_the_half_life() -> None:
    assert decay(np.array([0.0, 3600.0, 7200.0, -5.0]), 3600.0).tolist() == [1.0, 0.5, 0.25, 1.0]
    hour = timedelta(hours=1)
    config = ScoringConfig(half_life_s=3600.0, min_results=1)
    rows = [result("r", NOW), result("r", NOW - hour, delivered=False), result("r", NOW - 25 * hour)]
    score = score_of(rows, config)["r"]
    assert score.results == 2  # the 25 h old one is outside the 24 h window
    assert score.stats["effective"] == pytest.approx(1.5)
    assert score.stats["delivered"] == pytest.approx(1 / 1.5)
    assert score.last_result_at == NOW


def test_latency_curve() -> None:
    curve = latency_score(np.array([0.0, 1000.0, 2000.0, 5000.0, 20_000.0, 600_000.0]), 5000.0, 20_000.0)
    assert curve[0] == 1.0 and curve[3] == pytest.approx(0.9) and curve[4] == pytest.approx(0.5)
    assert (np.diff(curve) < 0).all() and curve[5] < 0.01


def test_a_priced_network_without_results_is_an_unknown_pair() -> None:
    scores = score_of(series("a", 30, 30), prices={"a": {NET: 0.02}, "b": {NET: 0.01, "20810": 0.03}})
    assert set(scores) == {"a", "b"}
    b = by_route(compute(build_columns([], NOW, {"b": {"20810": 0.03}}), NOW, DEFAULT))["b"]
    assert b.mcc_mnc == "20810" and b.state == "unknown" and b.results == 0 and b.last_result_at is None
    assert scores["a"].stats["cheapest_price"] == 0.01


# through the database


async def insert_results(conn: AsyncConnection, rows: Sequence[dict[str, Any]], first_id: int = 1) -> None:
    """Store result rows as ingest would: each with its test case (and the probe and route that
    test case refers to)."""
    routes = {r["route"] for r in rows}
    known = set((await conn.execute(select(schema.routes.c.name))).scalars())
    new_routes = [
        {"name": name, "connector": {"kind": "smpp"}, "prices": {}} for name in sorted(routes - known)
    ]
    if new_routes:
        await conn.execute(insert(schema.routes), new_routes)
    if not (await conn.execute(select(schema.probes.c.imsi))).first():
        await conn.execute(insert(schema.probes), [{"imsi": "208010000000001", "updated_at": NOW}])
    cases = []
    results = []
    for i, row in enumerate(rows, start=first_id):
        cases.append(
            {
                "id": i,
                "token": f"t{i}",
                "route": row["route"],
                "imsi": "208010000000001",
                "msisdn": "+33600000001",
                "mcc_mnc": row["mcc_mnc"],
                "sender": "PROBE",
                "text": "probe",
                "scheduled_at": row["decided_at"] - timedelta(minutes=1),
                "deadline_at": row["decided_at"],
                "status": "done",
            }
        )
        results.append(row | {"test_case_id": i})
    await conn.execute(insert(schema.test_cases), cases)
    await conn.execute(insert(schema.results), results)


async def test_recompute_stores_scores_on_both_databases(database: AsyncEngine) -> None:
    rows = series("good", 30, 30) + series("new", 3, 3) + series("old", 25, 25)
    for row in rows:
        if row["route"] == "old":
            row["decided_at"] -= timedelta(hours=30)  # outside the window
    async with database.begin() as conn:
        await insert_results(conn, rows)
        await conn.execute(
            schema.routes.update()
            .where(schema.routes.c.name == "good")
            .values(prices={NET: 0.02, "20810": 0.03})
        )
        await conn.execute(
            insert(schema.conversions),
            [
                {
                    "message_id": f"m{i}",
                    "route": "good",
                    "mcc_mnc": NET,
                    "converted": i % 4 != 0,
                    "at": NOW,
                    "received_at": NOW,
                }
                for i in range(20)
            ],
        )
    computed = await recompute(database, DEFAULT, NOW)
    pairs = {(s.route, s.mcc_mnc): s for s in computed}
    assert set(pairs) == {("good", NET), ("new", NET), ("good", "20810")}  # "old" is out of the window
    good = pairs["good", NET]
    assert good.state == "scored" and good.stats["conversion_rate"] == pytest.approx(0.75)
    assert good.stats["price"] == 0.02 and good.last_result_at == NOW
    assert pairs["new", NET].score is None

    async with database.connect() as conn:
        again = await stored(conn)
        computed_at = (await conn.execute(select(schema.scores.c.computed_at).distinct())).scalars().all()
    assert sorted(again, key=lambda s: (s.mcc_mnc, s.route)) == sorted(
        computed, key=lambda s: (s.mcc_mnc, s.route)
    )
    assert computed_at == [NOW]

    # a later recompute replaces the table: "good"'s results have left the window
    later = await recompute(database, DEFAULT, NOW + timedelta(hours=25))
    async with database.connect() as conn:
        rows_now = (await conn.execute(select(schema.scores.c.route, schema.scores.c.score))).all()
    assert sorted(rows_now) == sorted((s.route, s.score) for s in later)
    assert len(rows_now) == 2 and all(score is None for _, score in rows_now)  # only the priced pairs left


async def test_load_ignores_results_decided_after_now(database: AsyncEngine) -> None:
    shift = timedelta(microseconds=123_456)
    async with database.begin() as conn:
        await insert_results(
            conn, [row | {"decided_at": row["decided_at"] - shift} for row in series("r", 30, 30)]
        )
    computed = await recompute(database, DEFAULT, NOW - timedelta(minutes=61))
    # results every 4 minutes back from NOW: those 64 minutes old and older are in the past
    assert computed[0].results == 14
    last = computed[0].last_result_at
    assert last is not None and abs(last - (NOW - timedelta(minutes=64) - shift)) <= timedelta(milliseconds=1)


async def test_recompute_holds_pairs_scored_last_time(database: AsyncEngine) -> None:
    """The hysteresis across recomputes: the scores table says what was scored last time."""
    async with database.begin() as conn:
        await insert_results(conn, series("r", 20, 20, spread=timedelta(hours=20)))
    narrow = ScoringConfig(window_s=18.5 * 3600)
    async with database.begin() as conn:
        await conn.execute(schema.scores.delete())
    assert (await recompute(database, narrow, NOW))[0].state == "unknown"  # not scored before
    assert (await recompute(database, DEFAULT, NOW))[0].state == "scored"
    again = (await recompute(database, narrow, NOW))[0]
    assert again.state == "scored" and again.results == 19
