"""One route's page (``GET /routes/{name}``): how it does, over time and now, for every network
or one (``?network=MCCMNC``), over a time range (``?hours=24``).

Shown: its score per network with the explanation (the sentence, and for one network each
component's value, weight and contribution), latency over time (p50 in a p50..p95 band) and its
distribution, the delivery rate over time, and its recent results, each with the text sent and
received side by side (the differences marked, computed here with difflib), the sender sent and
received, the SMSC seen (the network's own or foreign) and the receipt against what really
happened. New results appear live in their own table.

Six queries whatever the data: the route, its scores, the range's count and first result, the
counts per time bucket (grouped in SQL), the latencies of the range (newest ``MAX_LATENCIES``,
percentiles per bucket computed with numpy) and one page of results joined with their test case
and observation. The results in range are the REST API's ``/results`` filter (route, network,
since), checked and built by its own code, so the page and the API agree on what they cover.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from difflib import SequenceMatcher
from typing import Any, Final

import numpy as np
from aiohttp import web
from markupsafe import Markup, escape
from pydantic import ValidationError
from sqlalchemy import ColumnElement, Integer, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.api.results import ResultsQuery, results_query
from controller.scoring import COMPONENTS, unix_s
from controller.storage import schema as s
from controller.web import charts
from controller.web.guard import require
from controller.web.render import page
from controller.web.scoreboard import CellView, cell_view
from controller.web.state import UI_CONFIG, UI_ENGINE

#: The time ranges offered, hours; any whole number from 1 to ``MAX_HOURS`` is accepted.
HOURS_CHOICES: Final = (1, 6, 24, 72, 168, 720)
DEFAULT_HOURS: Final = 24
MAX_HOURS: Final = 720
#: Latencies read for the charts at most (the newest): bounds the page's memory and time.
MAX_LATENCIES: Final = 50_000
#: Bucket sizes for the charts, seconds: the smallest giving at most ``MAX_BUCKETS`` buckets.
BUCKET_STEPS_S: Final = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
MAX_BUCKETS: Final = 60
#: Histogram bars (at most); latencies above the 99th percentile share one overflow bar.
HISTOGRAM_BARS: Final = 24
#: Words, runs of white space, and single other characters: the units the text diff compares.
_PIECES: Final = re.compile(r"\w+|\s+|[^\w\s]")


def text_diff(sent: str, received: str) -> tuple[Markup, Markup]:
    """The text sent and the text received as markup, side by side: what the route removed or
    replaced in ``<del>`` on the sent side, what it added or put instead in ``<ins>`` on the
    received side. Both texts are escaped: an SMS holding HTML shows as that text."""
    a, b = _PIECES.findall(sent), _PIECES.findall(received)
    left: list[Markup] = []
    right: list[Markup] = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = "".join(a[i1:i2]), "".join(b[j1:j2])
        if tag == "equal":
            left.append(escape(old))
            right.append(escape(new))
            continue
        if old:
            left.append(Markup("<del>{}</del>").format(old))
        if new:
            right.append(Markup("<ins>{}</ins>").format(new))
    return Markup("").join(left), Markup("").join(right)


@dataclass(frozen=True)
class RangeQuery:
    """The page's parameters, checked: the results it covers as the REST API's result filters
    (the same validation of the route name and network, the same query), the range in hours
    and the page of results."""

    results: ResultsQuery
    hours: int
    page: int

    @property
    def network(self) -> str | None:
        return self.results.mcc_mnc


def _query(request: web.Request, now: datetime) -> RangeQuery:
    """The page's parameters; 404 for a name no route can have, 400 for a bad parameter."""
    try:
        hours = int(request.query.get("hours", str(DEFAULT_HOURS)))
        number = int(request.query.get("page", "1"))
    except ValueError:
        raise web.HTTPBadRequest(text="hours and page: whole numbers") from None
    if not 1 <= hours <= MAX_HOURS:
        raise web.HTTPBadRequest(text=f"hours: from 1 to {MAX_HOURS}")
    name = request.match_info["name"]
    try:
        results = ResultsQuery(
            route=name, mcc_mnc=request.query.get("network") or None, since=now - timedelta(hours=hours)
        )
    except ValidationError as exc:
        if any(error["loc"][:1] == ("route",) for error in exc.errors()):
            raise web.HTTPNotFound(text=f"no route named {name[:64]!r}") from None
        raise web.HTTPBadRequest(text="network: an MCC-MNC, 5 or 6 digits (e.g. 23410)") from None
    return RangeQuery(results, hours, max(1, number))


def hours_label(hours: int) -> str:
    """A time range in words: ``last hour``, ``last 6 hours``, ``last 3 days``."""
    if hours == 1:
        return "last hour"
    if hours % 24 == 0 and hours > 24:
        return f"last {hours // 24} days"
    return f"last {hours} hours"


def bucket_size_s(span_s: float) -> int:
    """The chart bucket for a time span: the smallest step giving at most ``MAX_BUCKETS``."""
    for step in BUCKET_STEPS_S:
        if span_s / step <= MAX_BUCKETS:
            return step
    return BUCKET_STEPS_S[-1] * math.ceil(span_s / BUCKET_STEPS_S[-1] / MAX_BUCKETS)


def _bucket_of(unix_s: ColumnElement[float], start_s: float, step_s: int, dialect: str) -> ColumnElement[int]:
    """The bucket number of a time, computed by the database (0 for ``start_s``)."""
    offset = (unix_s - start_s) / step_s
    if dialect == "sqlite":  # CAST truncates, and the offset is never negative here
        return cast(offset, Integer)
    return cast(func.floor(offset), Integer)


@dataclass
class Charts:
    """The three charts as markup, and what the page says about them."""

    latency: Markup
    histogram: Markup
    rate: Markup
    latencies: int
    capped: bool


def _latency_buckets(
    times_s: np.ndarray[Any, Any], latencies: np.ndarray[Any, Any], start_s: float, step_s: int, buckets: int
) -> list[tuple[float | None, float | None]]:
    """Per bucket, (p50, p95) of its latencies (None, None when it has none)."""
    out: list[tuple[float | None, float | None]] = [(None, None)] * buckets
    if len(latencies) == 0:
        return out
    index = np.clip(((times_s - start_s) // step_s).astype(np.intp), 0, buckets - 1)
    order = np.argsort(index, kind="stable")
    index, latencies = index[order], latencies[order]
    bounds = np.searchsorted(index, np.arange(buckets + 1))
    for b in range(buckets):
        values = latencies[bounds[b] : bounds[b + 1]]
        if len(values):
            p50, p95 = np.percentile(values, (50, 95), method="inverted_cdf")
            out[b] = (float(p50), float(p95))
    return out


def _histogram(latencies: np.ndarray[Any, Any]) -> tuple[list[float], list[int], int]:
    """Round-width bins from 0 (or the smallest latency, if negative) to the 99th percentile, and
    how many latencies lie beyond (the overflow bar)."""
    if len(latencies) == 0:
        return [0.0, 1000.0], [0], 0
    low = min(0.0, float(latencies.min()))
    high = float(np.percentile(latencies, 99, method="inverted_cdf"))
    width = charts.nice_step(max(high - low, 1.0), HISTOGRAM_BARS)
    bars = max(1, math.ceil((high - low) / width + 1e-9))
    if low + bars * width <= high:
        bars += 1
    edges = [low + i * width for i in range(bars + 1)]
    counts, _ = np.histogram(latencies, bins=np.asarray(edges))
    # np.histogram closes the last bin on the right: the latency equal to the last edge is in it
    overflow = int((latencies > edges[-1]).sum())
    return edges, [int(c) for c in counts], overflow


def _charts(
    label: str,
    start: datetime,
    end: datetime,
    step_s: int,
    counts: dict[int, tuple[int, int]],
    times_s: np.ndarray[Any, Any],
    latencies: np.ndarray[Any, Any],
    capped: bool,
) -> Charts:
    buckets = max(1, math.ceil((end - start).total_seconds() / step_s))
    bounds = [
        (start + timedelta(seconds=b * step_s), start + timedelta(seconds=(b + 1) * step_s))
        for b in range(buckets)
    ]
    percentiles = _latency_buckets(times_s, latencies, start.timestamp(), step_s, buckets)
    latency_buckets = [
        charts.Bucket(a, b, low=p50, high=p95) for (a, b), (p50, p95) in zip(bounds, percentiles, strict=True)
    ]
    rate_buckets = []
    for number, (a, b) in enumerate(bounds):
        total, delivered = counts.get(number, (0, 0))
        rate_buckets.append(charts.Bucket(a, b, low=delivered / total if total else None, count=total))
    edges, bins, overflow = _histogram(latencies)
    minutes = charts.number(step_s / 60, 0.1)
    span = f"{start:%Y-%m-%d %H:%M}Z to {end:%Y-%m-%d %H:%M}Z, buckets of {minutes} min"
    medians = [p for p, _ in percentiles if p is not None]
    tails = [q for _, q in percentiles if q is not None]
    if medians:
        latency_words = (
            f"{len(latencies)} delivered results; per-bucket median from {min(medians):,.0f} ms to "
            f"{max(medians):,.0f} ms, p95 up to {max(tails):,.0f} ms"
        )
    else:
        latency_words = "no delivered results with a latency"
    rates = [b.low for b in rate_buckets if b.low is not None]
    rate_words = (
        f"{sum(t for t, _ in counts.values())} results; delivered share per bucket from "
        f"{min(rates) * 100:.0f} % to {max(rates) * 100:.0f} %"
        if rates
        else "no results"
    )
    return Charts(
        latency=charts.latency_band_chart(
            latency_buckets,
            start,
            end,
            chart_id="chart-latency",
            title=f"Latency over time, {label}",
            desc=f"p50 and p95 latency in ms per time bucket, {span}: {latency_words}.",
        ),
        histogram=charts.histogram(
            edges,
            bins,
            overflow=overflow,
            chart_id="chart-histogram",
            title=f"Latency distribution, {label}",
            desc=f"Delivered results per latency bin in ms ({len(latencies)} results, {overflow} above the "
            f"99th percentile in the last bar).",
        ),
        rate=charts.rate_chart(
            rate_buckets,
            start,
            end,
            chart_id="chart-rate",
            title=f"Delivery rate over time, {label}",
            desc=f"Share of results delivered per time bucket, {span}: {rate_words}.",
        ),
        latencies=len(latencies),
        capped=capped,
    )


@dataclass
class ResultView:
    """One recent result as the page shows it."""

    row: Any
    sent: Markup
    received: Markup | None
    outcome: str
    smsc: str
    receipt: str
    verdict: str


def receipt_verdict(row: Any) -> tuple[str, str]:
    """The receipt against the truth, in words, and its CSS word (honest, fake, wrong, none)."""
    truth = "arrived" if row.delivered else "never arrived"
    if row.receipt_status is None:
        return f"no receipt; {truth}", "none"
    if row.receipt_honest is None:
        return f"{row.receipt_status} (not final); {truth}", "none"
    if row.receipt_honest:
        return f"{row.receipt_status}; {truth}: honest", "honest"
    if not row.delivered:
        return f"{row.receipt_status}; {truth}: fake receipt", "fake"
    return f"{row.receipt_status}; {truth}: wrong receipt", "wrong"


def _result_view(row: Any) -> ResultView:
    if row.observed_text is None:
        sent, received = escape(row.text), None
    else:
        sent, received = text_diff(row.text, row.observed_text)
    smsc = "-" if row.smsc is None else {True: "known", False: "foreign", None: "unknown"}[row.smsc_known]
    receipt, verdict = receipt_verdict(row)
    outcome = ("late" if row.late else "delivered") if row.delivered else "not delivered"
    return ResultView(row, sent, received, outcome, smsc, receipt, verdict)


async def _route_exists(conn: AsyncConnection, name: str) -> bool | None:
    """Whether the route is enabled; None if it is not configured (it may still have scores)."""
    enabled = await conn.scalar(select(s.routes.c.enabled).where(s.routes.c.name == name))
    return None if enabled is None else bool(enabled)


async def route_detail(request: web.Request) -> web.Response:
    """GET /routes/{name}: one route; ``?network=MCCMNC``, ``?hours=N`` (1..720), ``?page=N``."""
    require(request, "viewer")
    now = datetime.now(UTC)
    query = _query(request, now)
    name = request.match_info["name"]
    engine = request.app[UI_ENGINE]
    size = request.app[UI_CONFIG].page_size
    c, n, r, t, o = s.scores.c, s.networks.c, s.results.c, s.test_cases.c, s.observations.c
    in_range = results_query(query.results).whereclause
    assert in_range is not None  # the route is always given
    async with engine.connect() as conn:
        dialect = conn.dialect.name
        enabled = await _route_exists(conn, name)
        score_rows = (
            await conn.execute(
                select(
                    c.mcc_mnc,
                    c.score,
                    c.results,
                    c.stats,
                    c.explanation,
                    c.computed_at,
                    n.country,
                    n.operator,
                )
                .outerjoin(s.networks, n.mcc_mnc == c.mcc_mnc)
                .where(c.route == name)
                .order_by(n.country, c.mcc_mnc)
            )
        ).all()
        if enabled is None and not score_rows:
            raise web.HTTPNotFound(text=f"no route named {name!r}")
        total, first = (
            await conn.execute(select(func.count(), func.min(r.decided_at)).where(in_range))
        ).one()
        start = min(first, now) if first is not None else now - timedelta(hours=query.hours)
        step_s = bucket_size_s(max((now - start).total_seconds(), 1.0))
        start = datetime.fromtimestamp(math.floor(start.timestamp() / step_s) * step_s, UTC)
        decided_s = unix_s(r.decided_at, dialect)
        # grouped on a subquery's column: PostgreSQL would not see the bucket expression with its
        # bound parameters in SELECT and in GROUP BY as the same
        per_result = (
            select(
                _bucket_of(decided_s, start.timestamp(), step_s, dialect).label("bucket"),
                cast(r.delivered, Integer).label("delivered"),
            )
            .where(in_range)
            .subquery()
        )
        counts = {
            row.bucket: (int(row.total), int(row.delivered or 0))
            for row in await conn.execute(
                select(
                    per_result.c.bucket,
                    func.count().label("total"),
                    func.sum(per_result.c.delivered).label("delivered"),
                ).group_by(per_result.c.bucket)
            )
        }
        latency_rows = (
            await conn.execute(
                select(decided_s, r.latency_ms)
                .where(in_range, r.delivered.is_(True), r.latency_ms.is_not(None))
                .order_by(r.decided_at.desc())
                .limit(MAX_LATENCIES + 1)
            )
        ).all()
        pages = max(1, -(-int(total) // size))
        number = min(query.page, pages)
        results = (
            await conn.execute(
                select(
                    s.results,
                    t.text,
                    t.sender.label("sender_sent_case"),
                    o.text.label("observed_text"),
                )
                .join(s.test_cases, t.id == r.test_case_id)
                .outerjoin(s.observations, o.id == r.observation_id)
                .where(in_range)
                .order_by(r.decided_at.desc(), r.test_case_id.desc())
                .limit(size)
                .offset((number - 1) * size)
            )
        ).all()
    capped = len(latency_rows) > MAX_LATENCIES
    latency_rows = latency_rows[:MAX_LATENCIES]
    times_s = np.array([row[0] for row in latency_rows], np.float64)
    latencies = np.array([row[1] for row in latency_rows], np.float64)
    label = f"route {name}" + (f", network {query.network}" if query.network else ", all networks")
    scores: list[tuple[Any, CellView]] = [
        (row, cell_view(name, row.mcc_mnc, row.score, row.results, row.stats or {})) for row in score_rows
    ]
    selected = next((pair for pair in scores if pair[0].mcc_mnc == query.network), None)
    return page(
        request,
        "route_detail.html",
        name=name,
        enabled=enabled,
        saved="saved" in request.query,
        network=query.network,
        hours=query.hours,
        hours_choices=[(h, hours_label(h)) for h in sorted({*HOURS_CHOICES, query.hours})],
        hours_text=hours_label(query.hours),
        scores=scores,
        selected=selected,
        components=COMPONENTS,
        charts=_charts(label, start, now, step_s, counts, times_s, latencies, capped),
        total=int(total),
        results=[_result_view(row) for row in results],
        page_number=number,
        pages=pages,
        max_latencies=MAX_LATENCIES,
    )


ROUTES = [web.get("/routes/{name}", route_detail)]
