"""The routing table: per destination network, which routes carry the traffic, in failover order.

:func:`build_table` turns the scores (``controller.scoring``) into a ``RoutingTable`` (the wire
payload of ``{p}/controller/routing-table``). Per network, routes are ordered best first; the
first is the *primary* and carries most of the traffic, the others are *backups* in failover
order with a small share halving down the order (``backup_share``), so a failover lands on a
route that is carrying traffic already. A small ``exploration_share`` is split among the routes
that need measuring: *unknown* routes (too few results to score, role ``exploration``) and
*stale* ones (scored, but their newest result is older than ``stale_after_s``; they keep their
place and get the extra share), so every route keeps being measured. Disabled routes, and scored
routes below ``exclude_below`` (unless no route is better), are *excluded*: no traffic (a route
ranked in the previous table only once it is a ``margin`` below it). Every choice carries its
reason in words.

Hysteresis: a route passes the one ahead of it in the previous table only when its score beats
that route's by more than ``margin``. Scores wobbling by less than the margin leave the order as
it is. A route that degrades falls behind as soon as its score is a margin below a challenger's:
the decay of old results (``ScoringConfig.half_life_s``) brings that about within hours, and at
the latest once the scoring window holds only results from after the change, the score is the
degraded route's alone.

Versions: a table's *content* is, per network, the routes with their roles and weights (rounded
to 0.001), and the exploration share. :func:`build_table` returns ``(table, changed)``: a new
table with ``version = previous.version + 1`` when the content changed (or there is no previous
table), else the previous table itself, unchanged, with ``changed`` False. Scores and reasons
alone do not make a version, or every recompute would: a published table shows the scores of the
build that changed it, the scores table has the current ones.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller import scoring
from controller.config import RoutingConfig, ScoringConfig
from controller.scoring import Score
from controller.storage import schema
from probe_agent.protocol import MCC_MNC_PATTERN, RouteChoice, RoutingTable

log = logging.getLogger(__name__)

#: Header of :func:`table_csv`.
CSV_FIELDS = ("version", "mcc_mnc", "rank", "route", "role", "weight", "score", "reason")
#: Weights are published to this many decimals (and compared to 3 for the version).
WEIGHT_DECIMALS = 4
CONTENT_WEIGHT_DECIMALS = 3
#: RouteChoice.reason's limit.
REASON_MAX = 500

_MCC_MNC = re.compile(MCC_MNC_PATTERN)
Role = Literal["primary", "backup", "exploration", "excluded"]
Content = tuple[float, tuple[tuple[str, tuple[tuple[str, str, float], ...]], ...]]


def _summary(score: Score) -> str:
    """A scored route in a few words: delivery and median latency."""
    stats = score.stats
    parts = []
    if stats.get("delivered") is not None:
        parts.append(f"{stats['delivered'] * 100:.1f}% delivered")
    if stats.get("latency_p50_ms") is not None:
        parts.append(f"p50 {stats['latency_p50_ms'] / 1000:.1f} s")
    return ", ".join(parts) or "no deliveries"


def _stale(score: Score, now: datetime, config: RoutingConfig) -> float | None:
    """Hours since the newest result when that is older than ``stale_after_s``, else None (also
    when the time is not known: a scored route has results)."""
    last = score.last_result_at
    if last is None:
        return None
    age_s = (now - last).total_seconds()
    return age_s / 3600 if age_s > config.stale_after_s else None


def _ordered(
    candidates: Sequence[Score], previous_rank: Mapping[str, int], margin: float
) -> list[tuple[Score, Score | None]]:
    """The candidates best first, with hysteresis. Each place goes to the best-scoring remaining
    route unless the remaining route that stood highest in the previous table (the incumbent)
    is within ``margin`` of it: then the incumbent keeps it. Returns (route, the challenger it
    held off or None) per place."""
    remaining = sorted(candidates, key=lambda s: (-(s.score or 0.0), s.route))
    order: list[tuple[Score, Score | None]] = []
    while remaining:
        best = remaining[0]
        incumbent = min(remaining, key=lambda s: (previous_rank.get(s.route, math.inf), remaining.index(s)))
        held = (
            incumbent is not best
            and incumbent.route in previous_rank
            and (best.score or 0.0) <= (incumbent.score or 0.0) + margin
        )
        chosen = incumbent if held else best
        order.append((chosen, best if held else None))
        remaining.remove(chosen)
    return order


def _network(
    scores: Sequence[Score],
    previous: Sequence[RouteChoice],
    config: RoutingConfig,
    enabled: Collection[str],
    now: datetime,
) -> list[RouteChoice]:
    """One network's choices: ranked (best first), then exploring, then excluded (each by name)."""
    previous_rank = {c.route: i for i, c in enumerate(previous) if c.role in ("primary", "backup")}
    previous_primary = next((c.route for c in previous if c.role == "primary"), None)
    # Unranked routes go by name: ordered by their counts or scores, two of them would swap
    # places (and make a version) whenever those moved, with nothing changed for the traffic.
    disabled = sorted((s for s in scores if s.route not in enabled), key=lambda s: s.route)
    unknown = sorted((s for s in scores if s.route in enabled and s.score is None), key=lambda s: s.route)
    scored = [s for s in scores if s.route in enabled and s.score is not None]
    # Hysteresis at the exclusion threshold too: a ranked route is excluded only once it falls a
    # margin below it, so a score wobbling around ``exclude_below`` does not flap in and out.
    usable = [s for s in scored if (s.score or 0.0) >= _exclusion_floor(s.route, previous_rank, config)]
    held_in = {s.route for s in usable if (s.score or 0.0) < config.exclude_below}
    poor_best = not usable and bool(scored)
    if poor_best:
        usable = [max(scored, key=lambda s: (s.score or 0.0, s.route))]
    too_bad = sorted((s for s in scored if s not in usable), key=lambda s: s.route)
    order = _ordered(usable, previous_rank, config.margin)
    stale = {s.route: hours for s, _ in order if (hours := _stale(s, now, config)) is not None}
    explorers = len(unknown) + len(stale)

    weights: dict[str, float] = {}
    exploration = config.exploration_share if explorers and order else (1.0 if explorers else 0.0)
    ranked_share = 1.0 - exploration if order else 0.0
    backups = len(order) - 1
    if order:
        backup_total = ranked_share * config.backup_share if backups else 0.0
        weights[order[0][0].route] = ranked_share - backup_total
        halving = [0.5**k for k in range(backups)]
        for (s, _), part in zip(order[1:], halving, strict=True):
            weights[s.route] = backup_total * part / sum(halving)
    for s in [*unknown, *(s for s, _ in order if s.route in stale)]:
        weights[s.route] = weights.get(s.route, 0.0) + exploration / explorers
    weights = _rounded(weights)

    choices: list[RouteChoice] = []

    def add(score: Score, role: Role, reason: str) -> None:
        choices.append(
            RouteChoice(
                route=score.route,
                weight=weights.get(score.route, 0.0),
                score=None if score.score is None else round(score.score, 4),
                role=role,
                reason=reason[:REASON_MAX],
            )
        )

    for rank, (s, challenger) in enumerate(order):
        head = f"score {s.score:.2f}"
        if poor_best:
            reason = f"best of poor routes, {head} (below {config.exclude_below:.2f}): {_summary(s)}"
        elif rank == 0 and challenger is not None:
            reason = (
                f"kept as primary, {head} ({challenger.route} {challenger.score:.2f} is within the "
                f"margin {config.margin:.2f}): {_summary(s)}"
            )
        elif rank == 0 and previous_primary not in (None, s.route):
            reason = f"best {head}, took over from {previous_primary}: {_summary(s)}"
        elif rank == 0:
            reason = f"best {head}: {_summary(s)}"
        elif challenger is not None:
            reason = (
                f"backup {rank}, {head} (kept ahead of {challenger.route} {challenger.score:.2f}, "
                f"within the margin): {_summary(s)}"
            )
        else:
            reason = f"backup {rank}, {head}: {_summary(s)}"
        if s.route in held_in and not poor_best:
            reason += (
                f"; below {config.exclude_below:.2f} but within the margin {config.margin:.2f}: kept until "
                f"it falls below {config.exclude_below - config.margin:.2f}"
            )
        if s.route in stale:
            reason += f"; stale: newest result {stale[s.route]:.1f} h old, exploring"
        add(s, "primary" if rank == 0 else "backup", reason)
    for s in unknown:
        add(s, "exploration", f"unknown: {s.results} results, exploring")
    for s in too_bad:
        add(s, "excluded", f"excluded: score {s.score:.2f} below {config.exclude_below:.2f}: {_summary(s)}")
    for s in disabled:
        add(s, "excluded", "excluded: disabled")
    return choices


def _exclusion_floor(route: str, previous_rank: Mapping[str, int], config: RoutingConfig) -> float:
    """The score below which ``route`` is excluded: ``exclude_below``, or a margin lower for a
    route that carried traffic in the previous table."""
    return config.exclude_below - config.margin if route in previous_rank else config.exclude_below


def _rounded(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights rounded for publication, still summing to 1 (the rounding residue goes to the
    largest); all zero stays all zero."""
    rounded = {route: round(w, WEIGHT_DECIMALS) for route, w in weights.items()}
    if rounded and sum(weights.values()) > 0:
        largest = max(rounded, key=lambda r: (rounded[r], r))
        rounded[largest] = round(rounded[largest] + 1.0 - sum(rounded.values()), WEIGHT_DECIMALS)
    return rounded


def content(table: RoutingTable) -> Content:
    """What makes a new version: per network, routes with their roles and weights (rounded to
    ``CONTENT_WEIGHT_DECIMALS``), and the exploration share; not scores or reasons."""
    return (
        round(table.exploration_share, CONTENT_WEIGHT_DECIMALS),
        tuple(
            (
                network,
                tuple((c.route, c.role, round(c.weight, CONTENT_WEIGHT_DECIMALS)) for c in choices),
            )
            for network, choices in sorted(table.networks.items())
        ),
    )


def build_table(
    scores: Iterable[Score],
    previous: RoutingTable | None,
    config: RoutingConfig,
    enabled_routes: Collection[str],
    now: datetime,
) -> tuple[RoutingTable, bool]:
    """The routing table for these scores: ``(table, changed)``. ``changed`` is False when the
    content (routes, roles, weights) is that of ``previous``, which is then returned as it is;
    otherwise the table is new, version ``previous.version + 1`` (1 without a previous table),
    built at ``now``. Hysteresis works against ``previous``. Pure: no I/O."""
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    by_network: dict[str, list[Score]] = {}
    for score in scores:
        if _MCC_MNC.match(score.mcc_mnc):
            by_network.setdefault(score.mcc_mnc, []).append(score)
        else:
            log.warning("route %s: network %r is not an MCC-MNC; left out", score.route, score.mcc_mnc)
    enabled = frozenset(enabled_routes)
    networks = {
        network: _network(
            network_scores,
            previous.networks.get(network, []) if previous else [],
            config,
            enabled,
            now,
        )
        for network, network_scores in sorted(by_network.items())
    }
    table = RoutingTable(
        version=previous.version + 1 if previous else 1,
        created_at=now,
        exploration_share=config.exploration_share,
        networks=networks,
    )
    if previous is not None and content(previous) == content(table):
        return previous, False
    return table, True


def table_json(table: RoutingTable) -> str:
    """The table as JSON, exactly as published on MQTT."""
    return table.model_dump_json()


def table_csv(table: RoutingTable) -> str:
    """The table as CSV: one row per (network, route), best first, rank from 1; ``score`` is
    empty for an unknown route."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_FIELDS)
    for network, choices in sorted(table.networks.items()):
        for rank, c in enumerate(choices, start=1):
            score = "" if c.score is None else repr(c.score)
            writer.writerow([table.version, network, rank, c.route, c.role, repr(c.weight), score, c.reason])
    return out.getvalue()


def _from_row(value: Mapping[str, object] | str) -> RoutingTable:
    if isinstance(value, str):
        return RoutingTable.model_validate_json(value)
    return RoutingTable.model_validate(value)


async def save(conn: AsyncConnection, table: RoutingTable) -> None:
    """Store a new version (IntegrityError if that version exists)."""
    await conn.execute(
        insert(schema.routing_tables).values(
            version=table.version, created_at=table.created_at, table=table.model_dump(mode="json")
        )
    )


async def latest(conn: AsyncConnection) -> RoutingTable | None:
    """The newest stored version, None before the first."""
    t = schema.routing_tables.c
    row = (await conn.execute(select(t.table).order_by(t.version.desc()).limit(1))).scalar_one_or_none()
    return None if row is None else _from_row(row)


async def version(conn: AsyncConnection, n: int) -> RoutingTable | None:
    """Version ``n``, None if there is none."""
    t = schema.routing_tables.c
    row = (await conn.execute(select(t.table).where(t.version == n))).scalar_one_or_none()
    return None if row is None else _from_row(row)


async def enabled_routes(conn: AsyncConnection) -> set[str]:
    """Names of the enabled routes."""
    r = schema.routes.c
    return set((await conn.execute(select(r.name).where(r.enabled.is_(True)))).scalars())


async def rebuild(
    engine: AsyncEngine, scoring_config: ScoringConfig, routing_config: RoutingConfig, now: datetime
) -> tuple[RoutingTable, bool]:
    """Recompute the scores, build the table against the latest one and store it if it changed.
    Returns ``(table, changed)``; the caller publishes when ``changed``. When another controller
    stored the same version first, its table is returned, unchanged."""
    scores = await scoring.recompute(engine, scoring_config, now)
    try:
        async with engine.begin() as conn:
            previous = await latest(conn)
            table, changed = build_table(scores, previous, routing_config, await enabled_routes(conn), now)
            if changed:
                await save(conn, table)
    except IntegrityError:
        async with engine.connect() as conn:
            stored = await latest(conn)
        if stored is None:
            raise
        log.info("routing table version %d was stored by another controller", stored.version)
        return stored, False
    if changed:
        log.info("routing table version %d: %d networks", table.version, len(table.networks))
    return table, changed
