"""Score recompute benchmark: a full ``controller.scoring.compute`` of 10,000 (route, network)
pairs over 1,000,000 results. Goal (issue 4): <= 1 s on this 2-core machine.

The results are synthetic columns from a seeded RNG, shaped like a real fleet's: 50 routes x 200
networks, results spread over the 24 h window, about 95 % delivered with lognormal latencies
(median ~3 s) and 1 % late, sender / content / receipt / grey signs at realistic rates (some
unknown), a price for most pairs and 50,000 conversion reports.

Included in the figure: everything ``compute`` does from columns to the list of ``Score``
objects: decay, window, every weighted sum, the Wilson intervals, the weighted latency
percentiles (one sort of all delivered results), the composite score, and each pair's stats and
explanation as JSON-ready dicts with its "why" sentence. Best of 3 runs after one warm-up.

Not included: reading the results from the database into columns (``load_columns``: row by row
through the driver, seconds for a million rows) and writing the 10,000 scores back. With
``--load`` the benchmark also measures ``load_columns`` on a SQLite file holding the same number
of results (inserted first with plain ``sqlite3`` executemany, not timed) and prints that time
on its own line; it is reported beside, not inside, ``recompute_s``.

Run from the project root: ``.venv/bin/python bench/recompute.py [--results 1000000]
[--pairs 10000] [--load]``. Last line: ``recompute_s S pairs P results N``. ``bench/ingest.py``
calls :func:`measure` for the ``recompute_s`` of its own last line.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from controller.config import ScoringConfig
from controller.scoring import Columns, compute, load_columns
from controller.storage.db import open_database

GOAL_S = 1.0
ROUTES = 50
SEED = 20260302
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def synthetic(results: int = 1_000_000, pairs: int = 10_000, seed: int = SEED) -> Columns:
    """``results`` results over ``pairs`` (route, network) pairs, as columns."""
    rng = np.random.default_rng(seed)
    config = ScoringConfig()
    names = [(f"route-{i % ROUTES:02d}", f"{20800 + i // ROUTES:05d}") for i in range(pairs)]
    # each pair has its own quality: delivery 80..99.9 %, median latency 1..10 s
    quality = rng.uniform(0.8, 0.999, pairs)
    median_ms = rng.uniform(1000, 10_000, pairs)
    pair = rng.integers(0, pairs, results)
    delivered = rng.random(results) < quality[pair]
    late = delivered & (rng.random(results) < 0.01)
    latency = np.where(delivered, rng.lognormal(np.log(median_ms[pair]), 0.5), np.nan)
    latency = np.where(late, latency + 600_000.0, latency)

    def tri(p_yes: float, p_unknown: float, known: np.ndarray | None = None) -> np.ndarray:
        value = np.where(rng.random(results) < p_yes, 1, 0)
        unknown = rng.random(results) < p_unknown
        if known is not None:
            unknown |= ~known
        return np.where(unknown, -1, value).astype(np.int8)

    price = np.where(rng.random(pairs) < 0.9, rng.uniform(0.002, 0.08, pairs), np.nan)
    conversions = 50_000
    return Columns(
        pairs=names,
        pair=pair,
        age_s=rng.random(results) * config.window_s,
        delivered=delivered,
        late=late,
        latency_ms=latency,
        sender_kept=tri(0.97, 0.0, delivered),
        content_intact=tri(0.99, 0.0, delivered),
        receipt_honest=tri(0.97, 0.3),
        grey=delivered & (rng.random(results) < 0.02),
        price=price,
        conversion_pair=rng.integers(0, pairs, conversions),
        conversion_age_s=rng.random(conversions) * config.window_s,
        converted=rng.random(conversions) < 0.8,
    )


def measure(results: int = 1_000_000, pairs: int = 10_000) -> float:
    """Seconds for one full ``compute`` over synthetic columns: best of 3 after a warm-up."""
    columns = synthetic(results, pairs)
    config = ScoringConfig()
    scores = compute(columns, NOW, config)  # warm-up
    if len(scores) != pairs:
        raise AssertionError(f"{len(scores)} scores for {pairs} pairs")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        compute(columns, NOW, config)
        best = min(best, time.perf_counter() - start)
    return best


def _store(path: Path, columns: Columns) -> None:
    """Write the columns as ``results`` rows with plain sqlite3 (foreign keys off: no test cases)."""
    decided = [
        # as SQLAlchemy stores a UTC datetime in SQLite
        (NOW - timedelta(seconds=float(age))).isoformat(sep=" ", timespec="microseconds")[:-6]
        for age in columns.age_s
    ]

    def opt(value: int) -> bool | None:
        return None if value < 0 else bool(value)

    rows = (
        (
            i + 1,
            columns.pairs[int(p)][0],
            columns.pairs[int(p)][1],
            bool(d),
            bool(late),
            None if lat != lat else float(lat),
            opt(int(s)),
            opt(int(c)),
            opt(int(r)),
            bool(g),
            decided[i],
        )
        for i, (p, d, late, lat, s, c, r, g) in enumerate(
            zip(
                columns.pair,
                columns.delivered,
                columns.late,
                columns.latency_ms,
                columns.sender_kept,
                columns.content_intact,
                columns.receipt_honest,
                columns.grey,
                strict=True,
            )
        )
    )
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO results (test_case_id, route, mcc_mnc, delivered, late, latency_ms, sender_kept,"
            " content_intact, receipt_honest, sim_box, decided_at, flags, notes)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', '[]')",
            rows,
        )


async def measure_load(results: int = 1_000_000, pairs: int = 10_000) -> float:
    """Seconds for ``load_columns`` to read ``results`` results from a SQLite file (one run)."""
    config = ScoringConfig()
    columns = synthetic(results, pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "controller.db"
        engine = await open_database(str(path))
        try:
            await asyncio.to_thread(_store, path, columns)
            since = NOW - timedelta(seconds=config.window_s)
            start = time.perf_counter()
            async with engine.connect() as conn:
                loaded = await load_columns(conn, since, NOW)
            elapsed = time.perf_counter() - start
        finally:
            await engine.dispose()
    if len(loaded.pair) != results:
        raise AssertionError(f"loaded {len(loaded.pair)} of {results} results")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--results", type=int, default=1_000_000, help="results to score")
    parser.add_argument("--pairs", type=int, default=10_000, help="(route, network) pairs")
    parser.add_argument("--load", action="store_true", help="also time load_columns from a SQLite file")
    args = parser.parse_args()
    seconds = measure(args.results, args.pairs)
    print(
        f"score recompute, {args.pairs:,} pairs over {args.results:,} results (compute only, "
        f"best of 3): {seconds:.3f} s"
    )
    print(f"goal recompute <= {GOAL_S:g} s: {seconds:.3f} s {'PASS' if seconds <= GOAL_S else 'FAIL'}")
    if args.load:
        load_s = asyncio.run(measure_load(args.results, args.pairs))
        print(f"load_columns from SQLite, {args.results:,} results (not in recompute_s): {load_s:.2f} s")
    print(f"recompute_s {seconds:.3f} pairs {args.pairs} results {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
