"""Route scores per (route, network): what the recent results say, in one number and in words.

Every result in a sliding window (``ScoringConfig.window_s``) counts with a weight that halves
every ``half_life_s`` of age, so a route's score follows what it does now while a single bad hour
fades. From those weighted results, per (route, network):

* delivery rate with a Wilson score interval on the decay-weighted counts. Wilson rather than a
  Beta posterior: it is closed form (no incomplete-beta inverse, so no SciPy, and it vectorises
  over every pair at once), needs no prior to argue about, and stays inside 0..1 at 0 % and 100 %.
  The effective count is the sum of the weights (a result one half-life old is half a result),
  so old evidence widens the interval. The score uses the interval's *lower* bound: 99 of 100
  beats 20 of 20, and a route is not rewarded for being measured little. Late deliveries count as
  delivered; their lateness costs them through the latency percentiles.
* latency p50 / p90 / p99 of the delivered results, weighted by decay (the smallest latency
  whose cumulative weight reaches the quantile: numpy's ``inverted_cdf`` with weights), and p95
  for display (the web UI's p50 / p95 figures; it is not part of the score);
* sender-ID integrity (sender kept, among results where it is known), content integrity, receipt
  honesty (honest among judged receipts; a fake receipt, "delivered" for a message that never
  came, weighs ``fake_receipt_penalty`` times a wrong one), grey-route signs (a SIM-box sender or
  a foreign SMSC, among delivered results), the route's price for the network (the cheapest
  route's price over this one's: 1 for the cheapest), and the conversion rate the sender reports
  (once ``min_conversions`` reports are in). Fake and wrong receipts are told apart by the
  ``receipt_honest`` and ``delivered`` columns (dishonest and not delivered is correlation's
  ``fake_receipt``), so the flags JSON is not read.

The composite score is the weighted mean of the components that are known for the pair (weights
from ``ScoringConfig.weights``): an unknown price or an absent conversion feed neither helps nor
hurts. A pair that delivered nothing gets 0 for the components only a delivery can show (latency,
sender, content, grey) rather than leaving them out, so a dead route cannot score on its price.
A pair with fewer than ``min_results`` results in the window (raw results, not weighted: a pair
measured 20 times in the window has data, and the interval already says how old it is) is
*unknown*: no score, so it is neither best nor worst; routing explores it. A pair that was scored
at the last recompute stays scored down to ``keep_scored_share`` of ``min_results``, so one
hovering around the threshold as the window slides does not flap between scored and unknown.

The default weights let delivery dominate: 99 % delivered at a 2 s median ranks above 90 % at
1 s, and above 90 % at 0.2 s until the 99 % route's median passes about 15 s (latency maps to 0..1
by :func:`latency_score`: 0.9 at ``latency_good_ms``, 0.5 at ``latency_half_ms``).

:func:`compute` is pure and columnar: one pass of ``np.bincount`` per sum and one sort for the
percentiles, so a full recompute of 10,000 pairs over 1,000,000 results takes well under a second
(``bench/recompute.py``). :func:`load_columns` reads the database into those columns (the
database turns times into Unix seconds: parsing a million datetimes in Python would cost more
than the whole score) and :func:`recompute` loads, computes and stores the ``scores`` table.
"""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import NormalDist
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Integer,
    cast,
    delete,
    extract,
    func,
    insert,
    select,
    type_coerce,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.config import ScoringConfig
from controller.storage import schema

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
#: A yes / no / unknown column: 1, 0, or -1 (the database's NULL).
TriArray = npt.NDArray[np.int8]

YES: Final = 1
NO: Final = 0
UNKNOWN: Final = -1

#: The components of the score, in the order of ``ScoringWeights``' fields.
COMPONENTS: Final = ("delivery", "latency", "sender", "content", "receipts", "grey", "price", "conversion")
#: Components that only a delivered message can show: 0 for a pair that delivered nothing.
DELIVERED_ONLY: Final = ("latency", "sender", "content", "grey")
#: The latency percentiles, and how much each counts in the latency component. The median is what
#: most messages see; p90 and p99 carry the tail (and the late deliveries), with less weight as
#: they rest on fewer results and move more between recomputes.
QUANTILES: Final = (0.5, 0.9, 0.99)
QUANTILE_WEIGHTS: Final = (0.5, 0.3, 0.2)
#: Percentiles stored in the stats for people to read but not scored (``latency_p95_ms``).
SHOWN_QUANTILES: Final = (0.95,)
#: Latency-curve value at ``latency_good_ms`` (at ``latency_half_ms`` it is 0.5 by definition).
GOOD_LATENCY_SCORE: Final = 0.9
#: A component at or above this is named a strength in the explanation; a weakness below it.
STRONG: Final = 0.9
#: A weakness must cost the score at least this much to be named.
NOTABLE_LOSS: Final = 0.01
#: Bits of the value in weighted_percentiles' packed sort key (the group gets the other 23).
VALUE_KEY_BITS: Final = 40
#: Decimals kept in stored stats and explanations.
DECIMALS: Final = 6

State = Literal["scored", "unknown"]


@dataclass(frozen=True)
class Columns:
    """Results and conversions as columns, one entry per result (or conversion), for :func:`compute`.

    ``pair`` indexes ``pairs`` ((route, mcc_mnc)); ages are seconds before the moment scored
    (negative ages are treated as 0); ``latency_ms`` is NaN where unknown; the yes / no / unknown
    columns hold 1, 0 or -1; ``grey`` is a SIM-box sender or a foreign SMSC. ``price`` has one
    entry per pair (NaN: no price for that network).
    """

    pairs: Sequence[tuple[str, str]]
    pair: IntArray
    age_s: FloatArray
    delivered: BoolArray
    late: BoolArray
    latency_ms: FloatArray
    sender_kept: TriArray
    content_intact: TriArray
    receipt_honest: TriArray
    grey: BoolArray
    price: FloatArray
    conversion_pair: IntArray = field(default_factory=lambda: np.zeros(0, np.intp))
    conversion_age_s: FloatArray = field(default_factory=lambda: np.zeros(0, np.float64))
    converted: BoolArray = field(default_factory=lambda: np.zeros(0, np.bool_))

    def __post_init__(self) -> None:
        n = len(self.pair)
        per_result: tuple[npt.NDArray[Any], ...] = (self.age_s, self.delivered, self.late, self.latency_ms)
        per_result += (self.sender_kept, self.content_intact, self.receipt_honest, self.grey)
        if any(len(column) != n for column in per_result):
            raise ValueError("every per-result column must have one entry per result")
        if len(self.price) != len(self.pairs):
            raise ValueError("price must have one entry per pair")
        if not len(self.conversion_pair) == len(self.conversion_age_s) == len(self.converted):
            raise ValueError("every conversion column must have one entry per conversion")


@dataclass(frozen=True)
class Score:
    """The score of one (route, network) and how it came about; fields as the ``scores`` columns.

    ``stats`` holds the measured values (shares 0..1, latencies in ms, counts; None where
    unknown) and ``explanation`` each component's value, weight and contribution with a sentence
    saying why; both are JSON-serialisable.
    """

    route: str
    mcc_mnc: str
    state: State
    score: float | None
    results: int
    stats: dict[str, Any]
    explanation: dict[str, Any]

    @property
    def last_result_at(self) -> datetime | None:
        """When the newest result in the window was decided; None without results."""
        value = self.stats.get("last_result_at")
        return datetime.fromisoformat(value) if value else None


def decay(age_s: FloatArray, half_life_s: float) -> FloatArray:
    """The weight of results of these ages: 1 when new, 0.5 at one half-life, 0.25 at two."""
    return np.exp2(-np.maximum(age_s, 0.0) / half_life_s)


def z_value(confidence: float) -> float:
    """The normal quantile of a two-sided interval at ``confidence`` (0.95 gives 1.96)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: FloatArray, n: FloatArray, z: float) -> tuple[FloatArray, FloatArray]:
    """Wilson score interval (lower, upper) of ``successes`` out of ``n``, element-wise; the counts
    may be fractional (decay-weighted). NaN where ``n`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        p = successes / n
        z2n = z * z / n
        denominator = 1 + z2n
        centre = (p + z2n / 2) / denominator
        half = z * np.sqrt(np.maximum(p * (1 - p), 0.0) / n + z2n / (4 * n)) / denominator
        return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def latency_score(latency_ms: FloatArray, good_ms: float, half_ms: float) -> FloatArray:
    """Latency mapped to 0..1 by a log-logistic curve: ``1 / (1 + (latency / half_ms) ** k)``,
    with ``k`` chosen so ``good_ms`` scores 0.9. It is 1 at 0, falls smoothly (1 s 0.99, 2 s 0.97,
    5 s 0.9, 20 s 0.5, 60 s 0.15, 10 min under 0.01 with the defaults) and never reaches 0, so
    every second counts a little and minutes count a lot. NaN stays NaN."""
    k = math.log(GOOD_LATENCY_SCORE / (1 - GOOD_LATENCY_SCORE)) / math.log(half_ms / good_ms)
    return 1.0 / (1.0 + (np.maximum(latency_ms, 0.0) / half_ms) ** k)


def weighted_percentiles(
    group: IntArray, values: FloatArray, weights: FloatArray, groups: int, quantiles: Sequence[float]
) -> FloatArray:
    """Per group, the weighted quantiles of ``values``: the smallest value whose cumulative weight
    reaches ``q`` times the group's total (numpy's ``inverted_cdf`` method with weights). Returns
    an array (groups, len(quantiles)), NaN for a group without weight.

    One sort and one cumulative sum for all groups; each quantile is then a ``searchsorted`` of
    every group's target weight into that sum. The sort key packs the group and the value (to a
    thousandth of its unit, a microsecond for milliseconds) into one int64, which numpy sorts
    much faster than a lexsort; values closer than that may swap places, which moves a quantile
    by less than that. Values over 2**40 thousandths above the smallest (12 days, in ms) sort as equal.
    """
    out = np.full((groups, len(quantiles)), np.nan)
    if len(values) == 0:
        return out
    if groups <= 1 << (63 - VALUE_KEY_BITS):
        fine = np.minimum((values - values.min()) * 1000.0, float((1 << VALUE_KEY_BITS) - 1))
        order = np.argsort((group.astype(np.int64) << VALUE_KEY_BITS) | fine.astype(np.int64))
    else:
        order = np.lexsort((values, group))
    sorted_values = values[order]
    cumulative = np.cumsum(weights[order])
    counts = np.bincount(group, minlength=groups)
    ends = np.cumsum(counts)
    starts = ends - counts
    before = np.concatenate(([0.0], cumulative))[starts]
    totals = np.concatenate(([0.0], cumulative))[ends] - before
    present = (counts > 0) & (totals > 0)
    for column, q in enumerate(quantiles):
        index = np.searchsorted(cumulative, before + q * totals, side="left")
        index = np.clip(index, starts, np.maximum(ends - 1, starts))
        out[present, column] = sorted_values[index[present]]
    return out


def _ratio(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _network_cheapest(pairs: Sequence[tuple[str, str]], price: FloatArray) -> FloatArray:
    """Per pair, the lowest known price of any route to the same network (NaN if none)."""
    networks: dict[str, int] = {}
    network = np.fromiter((networks.setdefault(p[1], len(networks)) for p in pairs), np.intp, len(pairs))
    cheapest = np.full(len(networks), np.nan)
    np.fmin.at(cheapest, network, price)
    result: FloatArray = cheapest[network]
    return result


def _values(array: FloatArray) -> list[float | None]:
    """The array as JSON-ready floats, None for NaN."""
    return [None if v != v else v for v in np.round(array, DECIMALS).tolist()]


def _rows(array: FloatArray) -> list[list[float | None]]:
    """A 2-D array as JSON-ready rows of floats, None for NaN."""
    return [[None if v != v else v for v in row] for row in np.round(array, DECIMALS).tolist()]


def keep_scored_min(config: ScoringConfig) -> int:
    """The fewest results with which a pair scored at the last recompute stays scored."""
    return max(1, math.ceil(config.min_results * config.keep_scored_share))


def compute(
    columns: Columns,
    now: datetime,
    config: ScoringConfig,
    was_scored: Collection[tuple[str, str]] = frozenset(),
) -> list[Score]:
    """Score every pair of ``columns`` (results scored as of ``now``); one Score per pair, in the
    order of ``columns.pairs``. ``was_scored``: the (route, network) pairs scored at the last
    recompute (hysteresis at ``min_results``). Pure: no I/O, and no clock but ``now``."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    n_pairs = len(columns.pairs)
    pair = columns.pair

    def total(weights: FloatArray | BoolArray, index: IntArray = pair) -> FloatArray:
        # bincount with weights sums in float64 (its stubs say integers): astype copies nothing.
        return np.bincount(index, weights=weights, minlength=n_pairs).astype(np.float64, copy=False)

    in_window = columns.age_s <= config.window_s
    weight = np.where(in_window, decay(columns.age_s, config.half_life_s), 0.0)
    count = np.bincount(pair[in_window], minlength=n_pairs)
    newest_age = np.full(n_pairs, np.inf)
    np.minimum.at(newest_age, pair[in_window], np.maximum(columns.age_s[in_window], 0.0))

    effective = total(weight)
    delivered = columns.delivered
    delivered_w = total(weight * delivered)
    delivered_n = np.bincount(pair[in_window & delivered], minlength=n_pairs)
    late_w = total(weight * columns.late)
    delivery_low, delivery_high = wilson(delivered_w, effective, z_value(config.confidence))

    timed = in_window & delivered & ~np.isnan(columns.latency_ms)
    percentiles = weighted_percentiles(
        pair[timed], columns.latency_ms[timed], weight[timed], n_pairs, (*QUANTILES, *SHOWN_QUANTILES)
    )
    scored_percentiles = percentiles[:, : len(QUANTILES)]
    latency_parts = latency_score(scored_percentiles, config.latency_good_ms, config.latency_half_ms)
    latency = latency_parts @ np.asarray(QUANTILE_WEIGHTS)

    def share(column: TriArray) -> FloatArray:
        return _ratio(total(weight * (column == YES)), total(weight * (column != UNKNOWN)))

    sender = share(columns.sender_kept)
    content = share(columns.content_intact)
    honest = columns.receipt_honest
    judged_w = total(weight * (honest != UNKNOWN))
    honest_w = total(weight * (honest == YES))
    fake_w = total(weight * ((honest == NO) & ~delivered))
    wrong_w = judged_w - honest_w - fake_w
    receipts = _ratio(honest_w, honest_w + wrong_w + config.fake_receipt_penalty * fake_w)
    grey_share = _ratio(total(weight * (columns.grey & delivered)), delivered_w)

    cheapest = _network_cheapest(columns.pairs, columns.price)
    with np.errstate(divide="ignore", invalid="ignore"):
        price_score = np.where(
            columns.price > 0, cheapest / columns.price, np.where(columns.price == 0, 1, np.nan)
        )

    conversion_in = columns.conversion_age_s <= config.window_s
    conversion_w = np.where(conversion_in, decay(columns.conversion_age_s, config.half_life_s), 0.0)
    conversion_pair = columns.conversion_pair
    conversions = np.bincount(conversion_pair[conversion_in], minlength=n_pairs)
    conversion_rate = _ratio(
        total(conversion_w * columns.converted, conversion_pair), total(conversion_w, conversion_pair)
    )
    conversion = np.where(conversions >= config.min_conversions, conversion_rate, np.nan)

    values = np.column_stack(
        [delivery_low, latency, sender, content, receipts, 1 - grey_share, price_score, conversion]
    )
    nothing_delivered = (count > 0) & (delivered_n == 0)
    for name in DELIVERED_ONLY:
        values[nothing_delivered, COMPONENTS.index(name)] = 0.0
    weights = np.asarray([getattr(config.weights, name) for name in COMPONENTS])
    known = ~np.isnan(values)
    weight_sum = known @ weights
    contributions = _ratio(values * weights, weight_sum[:, None])  # NaN where unknown
    scores = np.clip(np.nansum(contributions, axis=1), 0.0, 1.0)
    needed = np.full(n_pairs, config.min_results)
    if was_scored:
        held = np.fromiter((p in was_scored for p in columns.pairs), dtype=bool, count=n_pairs)
        needed[held] = keep_scored_min(config)
    scored = (count >= needed) & (weight_sum > 0)

    last_at = np.full(n_pairs, None, dtype=object)
    has_results = np.isfinite(newest_age)
    if has_results.any():
        stamp = np.datetime64(now.astimezone(UTC).replace(tzinfo=None), "us")
        newest = stamp - np.round(newest_age[has_results] * 1e6).astype("timedelta64[us]")
        # to the nearest millisecond: the database's times (SQLite's julianday) are that exact
        newest_ms = (newest + np.timedelta64(500, "us")).astype("datetime64[ms]")
        last_at[has_results] = [f"{t}+00:00" for t in np.datetime_as_string(newest_ms, unit="ms")]

    stat_columns = {
        "effective": effective,
        "delivered": _ratio(delivered_w, effective),
        "delivered_low": delivery_low,
        "delivered_high": delivery_high,
        "late": _ratio(late_w, effective),
        "latency_p50_ms": percentiles[:, 0],
        "latency_p90_ms": percentiles[:, 1],
        "latency_p95_ms": percentiles[:, 3],
        "latency_p99_ms": percentiles[:, 2],
        "sender_kept": sender,
        "content_intact": content,
        "receipts_judged": judged_w,
        "receipts_honest": _ratio(honest_w, judged_w),
        "receipts_fake": _ratio(fake_w, judged_w),
        "grey": grey_share,
        "price": columns.price,
        "cheapest_price": cheapest,
        "conversion_rate": conversion_rate,
    }
    with _gc_paused():
        strengths, weaknesses = _highlights(values, weights, weight_sum)
        return _scores(
            columns.pairs,
            config,
            stats={name: _values(array) for name, array in stat_columns.items()},
            values=_rows(values),
            contributions=_rows(contributions),
            weights=weights.tolist(),
            scores=_values(scores),
            scored=scored.tolist(),
            counts=count.tolist(),
            conversions=conversions.tolist(),
            last_at=last_at.tolist(),
            strengths=strengths,
            weaknesses=weaknesses,
        )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects that form no cycles
    (10,000 scores are some 200,000 dicts and lists): it would run hundreds of times over them
    for nothing, a third of a full recompute."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _scores(
    pairs: Sequence[tuple[str, str]],
    config: ScoringConfig,
    *,
    stats: Mapping[str, list[float | None]],
    values: list[list[float | None]],
    contributions: list[list[float | None]],
    weights: list[float],
    scores: list[float | None],
    scored: list[bool],
    counts: list[int],
    conversions: list[int],
    last_at: list[str | None],
    strengths: list[list[str]],
    weaknesses: list[list[str]],
) -> list[Score]:
    """The Score objects, from compute's per-pair columns as Python lists."""
    out: list[Score] = []
    for i, (route, mcc_mnc) in enumerate(pairs):
        pair_stats: dict[str, Any] = {name: column[i] for name, column in stats.items()}
        pair_stats["results"] = counts[i]
        pair_stats["conversions"] = conversions[i]
        pair_stats["last_result_at"] = last_at[i]
        row_values, row_contributions = values[i], contributions[i]
        components = {
            name: {"value": row_values[c], "weight": weights[c], "contribution": row_contributions[c]}
            for c, name in enumerate(COMPONENTS)
        }
        score = scores[i] if scored[i] else None
        state: State = "scored" if score is not None else "unknown"
        why = _why(pair_stats, strengths[i], weaknesses[i], score, config)
        explanation = {"state": state, "score": score, "components": components, "why": why}
        out.append(Score(route, mcc_mnc, state, score, counts[i], pair_stats, explanation))
    return out


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%" if value < 0.9995 else "100%"


def _seconds(ms: float) -> str:
    return f"{ms / 1000:.1f} s"


#: The stat that describes each component but delivery.
_DESCRIBED_BY: Final = {
    "latency": "latency_p50_ms",
    "sender": "sender_kept",
    "content": "content_intact",
    "receipts": "receipts_honest",
    "grey": "grey",
    "price": "price",
    "conversion": "conversion_rate",
}


def describe(name: str, stats: Mapping[str, Any]) -> str:
    """One component in words, from a Score's stats (for explanations and routing reasons)."""
    if name == "delivery":
        if stats["delivered"] is None:
            return "no results"
        low, high = _percent(stats["delivered_low"]), _percent(stats["delivered_high"])
        return f"{_percent(stats['delivered'])} delivered (CI {low.rstrip('%')}-{high})"
    key = _DESCRIBED_BY.get(name)
    if key is None:
        raise ValueError(f"unknown component {name!r}")
    value = stats[key]
    if value is None:
        return f"{name} unknown" if stats["delivered"] else f"{name}: nothing delivered"
    if name == "latency":
        return f"latency p50 {_seconds(value)} / p90 {_seconds(stats['latency_p90_ms'])}"
    if name == "sender":
        return f"sender kept {_percent(value)}"
    if name == "content":
        return f"content intact {_percent(value)}"
    if name == "receipts":
        return f"receipts {_percent(value)} honest ({_percent(stats['receipts_fake'] or 0.0)} fake)"
    if name == "grey":
        return f"grey-route signs {_percent(value)}"
    if name == "price":
        return f"price {value:.4g} (cheapest {stats['cheapest_price']:.4g})"
    return f"conversion {_percent(value)} of {stats['conversions']}"


def _highlights(
    values: FloatArray, weights: FloatArray, weight_sum: FloatArray
) -> tuple[list[list[str]], list[list[str]]]:
    """Per pair, up to two strengths (components at or above ``STRONG``, the largest weighted value
    first) and up to two weaknesses (components below it that cost the score at least
    ``NOTABLE_LOSS``, the costliest first), by name."""
    with np.errstate(divide="ignore", invalid="ignore"):
        strength = np.where(values >= STRONG, values * weights, -np.inf)
        loss = np.where(values < STRONG, (1 - values) * weights / weight_sum[:, None], -np.inf)
    loss[~(loss >= NOTABLE_LOSS)] = -np.inf
    names = np.array([*COMPONENTS, ""])  # index -1: none
    rows = np.arange(len(values))

    def top(merit: FloatArray) -> list[list[str]]:
        # two argmax passes: much faster than sorting 10,000 rows of 8 one by one
        merit = merit.copy()
        picks = []
        for _ in range(2):
            best = np.argmax(merit, axis=1)
            picks.append(np.where(np.isfinite(merit[rows, best]), best, -1))
            merit[rows, best] = -np.inf
        first, second = names[picks[0]].tolist(), names[picks[1]].tolist()
        return [[n for n in pair if n] for pair in zip(first, second, strict=True)]

    return top(strength), top(loss)


def _why(
    stats: Mapping[str, Any],
    strong: Sequence[str],
    weak: Sequence[str],
    score: float | None,
    config: ScoringConfig,
) -> str:
    """A short sentence: the score, its biggest strengths and its biggest weaknesses."""
    if score is None:
        return f"unknown: {stats['results']} results in the window (needs {config.min_results})"
    text = f"score {score:.2f}"
    if stats["results"] < config.min_results:
        text += (
            f" (kept scored with {stats['results']} results, under {config.min_results}, "
            f"until fewer than {keep_scored_min(config)})"
        )
    if strong:
        text += "; strong: " + ", ".join(describe(name, stats) for name in strong)
    if weak:
        text += "; weak: " + ", ".join(describe(name, stats) for name in weak)
    if not strong and not weak:
        text += "; " + describe("delivery", stats)
    return text


#: The results columns scoring reads, in the order :func:`columns_from_lists` takes them; the
#: decision time comes first, as seconds since the Unix epoch.
RESULT_COLUMNS: Final = (
    "route",
    "mcc_mnc",
    "delivered",
    "late",
    "latency_ms",
    "sender_kept",
    "content_intact",
    "receipt_honest",
    "sim_box",
    "smsc_known",
)
#: The Julian day number of 1970-01-01T00:00Z (SQLite's ``julianday`` counts in those).
UNIX_EPOCH_JULIAN_DAY: Final = 2440587.5


def _tri(values: Sequence[object]) -> TriArray:
    # numpy reads None as NaN in a float array: one C loop, not one Python branch per row
    floats = np.array(values, np.float64) if len(values) else np.zeros(0)
    return np.where(np.isnan(floats), UNKNOWN, floats != 0).astype(np.int8)


def columns_from_lists(
    now: datetime,
    decided_s: Sequence[float],
    results: Sequence[Sequence[Any]],
    conversions: Sequence[Sequence[Any]] = ((), (), (), ()),
    prices: Mapping[str, Mapping[str, float]] | None = None,
) -> Columns:
    """Columns from column lists: ``decided_s`` (decision times, Unix seconds), ``results`` one
    list per name of ``RESULT_COLUMNS`` (None for NULL), ``conversions`` the lists (route,
    mcc_mnc, at in Unix seconds, converted), and each route's ``prices`` ({route: {mcc_mnc:
    price}}). A network a route has a price for is a pair even without results: it is unknown
    until measured."""
    route, mcc_mnc, delivered, late, latency, sender, content, receipt, sim_box, smsc_known = results
    pairs: dict[tuple[str, str], int] = {}

    def index(routes: Sequence[str], networks: Sequence[str]) -> IntArray:
        found = [pairs.setdefault(key, len(pairs)) for key in zip(routes, networks, strict=True)]
        return np.array(found, np.intp)

    pair = index(route, mcc_mnc)
    conversion_route, conversion_network, conversion_at, converted = conversions
    conversion_pair = index(conversion_route, conversion_network)
    for priced_route, by_network in (prices or {}).items():
        for network in by_network:
            pairs.setdefault((priced_route, network), len(pairs))
    price = np.array([(prices or {}).get(r, {}).get(n, np.nan) for r, n in pairs], np.float64)
    now_s = now.timestamp()
    return Columns(
        pairs=list(pairs),
        pair=pair,
        age_s=now_s - np.array(decided_s, np.float64),
        delivered=np.array(delivered, np.bool_),
        late=np.array(late, np.bool_),
        latency_ms=np.array(latency, np.float64),
        sender_kept=_tri(sender),
        content_intact=_tri(content),
        receipt_honest=_tri(receipt),
        grey=np.array(sim_box, np.bool_) | (_tri(smsc_known) == NO),
        price=price,
        conversion_pair=conversion_pair,
        conversion_age_s=now_s - np.array(conversion_at, np.float64),
        converted=np.array(converted, np.bool_),
    )


def build_columns(
    results: Iterable[Mapping[Any, Any]],
    now: datetime,
    prices: Mapping[str, Mapping[str, float]] | None = None,
    conversions: Iterable[Mapping[Any, Any]] = (),
) -> Columns:
    """Columns from rows shaped as the ``results`` and ``conversions`` tables' (only the columns
    scoring uses are read; ``decided_at`` and ``at`` are aware datetimes) and each route's
    ``prices``: for tests and tools; :func:`load_columns` reads the database column-wise."""
    rows = list(results)
    conversion_rows = list(conversions)
    return columns_from_lists(
        now,
        [r["decided_at"].timestamp() for r in rows],
        [[r[name] for r in rows] for name in RESULT_COLUMNS],
        [
            [c["route"] for c in conversion_rows],
            [c["mcc_mnc"] for c in conversion_rows],
            [c["at"].timestamp() for c in conversion_rows],
            [c["converted"] for c in conversion_rows],
        ],
        prices,
    )


def unix_s(column: ColumnElement[datetime], dialect: str) -> ColumnElement[float]:
    """The time in ``column`` as Unix seconds, computed by the database: reading a million
    datetimes through the driver and the column type costs several times the whole score."""
    if dialect == "sqlite":  # UTCDateTime stores UTC text there, which julianday reads
        return type_coerce((func.julianday(column) - UNIX_EPOCH_JULIAN_DAY) * 86400.0, Float)
    return cast(extract("epoch", column), Float)


def _raw(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The column as the driver returns it: a boolean without SQLAlchemy's per-value conversion
    (SQLite's 0 / 1 and PostgreSQL's booleans both suit numpy)."""
    return type_coerce(column, Integer).label(column.key) if isinstance(column.type, Boolean) else column


def _transpose(rows: Sequence[Sequence[Any]], width: int) -> list[Sequence[Any]]:
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(width)]


async def load_columns(conn: AsyncConnection, since: datetime, now: datetime) -> Columns:
    """The results and conversions decided in ``since``..``now``, and every route's prices, as
    columns; only the columns scoring uses are selected."""
    dialect = conn.dialect.name
    r = schema.results.c
    result_rows = (
        await conn.execute(
            select(unix_s(r.decided_at, dialect), *(_raw(r[name]) for name in RESULT_COLUMNS)).where(
                r.decided_at >= since, r.decided_at <= now
            )
        )
    ).all()
    c = schema.conversions.c
    conversion_rows = (
        await conn.execute(
            select(c.route, c.mcc_mnc, unix_s(c.at, dialect), c.converted).where(c.at >= since, c.at <= now)
        )
    ).all()
    price_rows = await conn.execute(select(schema.routes.c.name, schema.routes.c.prices))
    prices = {name: dict(by_network or {}) for name, by_network in price_rows}

    def assemble() -> Columns:
        decided_s, *results = _transpose(result_rows, 1 + len(RESULT_COLUMNS))
        return columns_from_lists(now, decided_s, results, _transpose(conversion_rows, 4), prices)

    # Turning a million rows into columns takes CPU seconds: not on the event loop.
    return await asyncio.to_thread(assemble)


async def recompute(engine: AsyncEngine, config: ScoringConfig, now: datetime) -> list[Score]:
    """Score every pair from the database as of ``now`` and replace the ``scores`` table with the
    result, in one transaction (readers see the old scores or the new ones, never a mix)."""
    since = now - timedelta(seconds=config.window_s)
    last = schema.scores.c
    async with engine.connect() as conn:
        columns = await load_columns(conn, since, now)
        scored_before = select(last.route, last.mcc_mnc).where(last.score.is_not(None))
        was_scored = frozenset((route, network) for route, network in await conn.execute(scored_before))
    scored = await asyncio.to_thread(compute, columns, now, config, was_scored)
    rows = [
        {
            "route": s.route,
            "mcc_mnc": s.mcc_mnc,
            "computed_at": now,
            "score": s.score,
            "results": s.results,
            "stats": s.stats,
            "explanation": s.explanation,
        }
        for s in scored
    ]
    async with engine.begin() as conn:
        await conn.execute(delete(schema.scores))
        if rows:
            await conn.execute(insert(schema.scores), rows)
    return scored


async def stored(conn: AsyncConnection) -> list[Score]:
    """The scores as last stored by :func:`recompute`, by network then route."""
    s = schema.scores.c
    rows = await conn.execute(
        select(s.route, s.mcc_mnc, s.score, s.results, s.stats, s.explanation).order_by(s.mcc_mnc, s.route)
    )
    return [
        Score(
            route,
            mcc_mnc,
            "unknown" if score is None else "scored",
            score,
            results,
            stats,
            explanation,
        )
        for route, mcc_mnc, score, results, stats, explanation in rows
    ]
