"""The probe page: one SIM with its modem, agent, network, registration and signal; the SMS
that arrived on it, newest first (matched to a test or unsolicited), paged; its signal over
time (an SVG chart from ``probe_samples``); and its state changes (``probe_events``: SIM moves,
registration and connection changes).

Every SMS text is shown as text (the templates escape it): a received SMS is whatever a route
or a stranger sent. Five queries whatever the history's length: the probe with its agent and
network, the count and one page of its observations (with their test cases), its newest
``SIGNAL_POINTS`` samples and its newest ``RECENT_EVENTS`` events.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from markupsafe import Markup
from sqlalchemy import func, select

from controller.storage import schema as s
from controller.web import charts
from controller.web.fleet import REGISTERED
from controller.web.guard import require
from controller.web.render import page, page_of
from controller.web.state import UI_CONFIG, UI_ENGINE

IMSI = re.compile(r"^[0-9]{1,16}$")
#: Samples drawn in the signal history (the newest; a probe keeps a month of them).
SIGNAL_POINTS = 500
#: Samples listed under the chart.
SAMPLES_LISTED = 50
#: State changes shown.
RECENT_EVENTS = 50
#: The time axis covers at least this much, so a single sample is not a point on a zero span.
MIN_SPAN = timedelta(hours=1)
#: The y axis covers at least the range a 27.007 RSSI maps to (0..31: -113..-51 dBm).
SIGNAL_FLOOR_DBM, SIGNAL_CEILING_DBM = -113.0, -51.0
#: What each ``observations.match`` means, in words.
MATCHES = {
    "token": "matched by its token",
    "fuzzy": "matched by SIM, time and sender (the token did not survive)",
    "duplicate": "a second copy of a test's SMS",
    "superseded": "first matched fuzzily, then its token's SMS replaced it",
}


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def describe_event(kind: str, detail: Any) -> str:
    """A probe event in words."""
    detail = detail if isinstance(detail, Mapping) else {}
    if kind == "registration":
        words = []
        if "registration" in detail:
            change = detail["registration"]
            words.append(f"registration {change.get('from') or 'none'} → {change.get('to') or 'none'}")
        if "connected" in detail:
            change = detail["connected"]
            words.append(f"connected {_yes_no(change.get('from'))} → {_yes_no(change.get('to'))}")
        return "; ".join(words) or "registration changed"
    if kind == "sim_moved":
        return f"SIM moved here from {detail.get('from_agent')} / {detail.get('from_modem')}"
    if kind == "sim_changed":
        return f"the modem's SIM changed from {detail.get('old_imsi')} to {detail.get('new_imsi')}"
    return f"{kind}: {dict(detail)}" if detail else kind


def signal_chart(
    samples: Sequence[Any], now: datetime, current: int | None, *, chart_id: str, title: str
) -> Markup:
    """The signal over time as steps (each sample holds until the next), dBm on the y axis, UTC
    on the x axis up to ``now``, where the probe's current signal (``current``) ends the line. A
    sample without a signal (modem down, SIM gone) breaks it."""
    points = [(row.at, row.signal_dbm if row.connected else None) for row in samples]
    points.append((now, current))
    start = min(points[0][0], now - MIN_SPAN)
    values = [v for _, v in points if v is not None]
    low = min([SIGNAL_FLOOR_DBM, *values])
    high = max([SIGNAL_CEILING_DBM, *values])
    ticks = charts.value_ticks(low, high)
    frame = charts.Frame(start.timestamp(), now.timestamp(), ticks[0], ticks[-1])
    parts = charts.y_axis(frame, ticks, "signal (dBm)") + charts.time_axis(frame)
    if not values:
        parts.append(charts.no_data("no signal reported"))
    line: list[str] = []
    runs: list[list[str]] = []
    for (at, value), (following, _) in zip(points, [*points[1:], (now, None)], strict=True):
        if value is None:
            if line:
                runs.append(line)
            line = []
            continue
        x, x_next, y = frame.x(at.timestamp()), frame.x(following.timestamp()), frame.y(value)
        line += [f"{charts.coord(x)},{charts.coord(y)}", f"{charts.coord(x_next)},{charts.coord(y)}"]
    if line:
        runs.append(line)
    for run in runs:
        parts.append(
            Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>').format(
                " ".join(run), charts.LINE
            )
        )
    for index, (at, value) in enumerate(points):
        if value is None:
            continue
        when = "now" if index == len(points) - 1 else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        parts.append(
            Markup(
                '<circle cx="{}" cy="{}" r="3" fill="{}" data-dbm="{}"><title>{}: {} dBm</title></circle>'
            ).format(
                charts.coord(frame.x(at.timestamp())),
                charts.coord(frame.y(value)),
                charts.LINE,
                value,
                when,
                value,
            )
        )
    if values:
        desc = (
            f"{len(samples)} samples from {start:%Y-%m-%d %H:%M}Z to now, between {min(values)} and "
            f"{max(values)} dBm; now {'no signal' if current is None else f'{current} dBm'}."
        )
    else:
        desc = "No signal was reported in this period."
    return charts.svg(chart_id, title, desc, parts)


async def probe_page(request: web.Request) -> web.Response:
    """GET /probes/{imsi}: the probe, its SMS (``?page=N``), signal history and state changes."""
    require(request, "viewer")
    imsi = request.match_info["imsi"]
    if not IMSI.match(imsi):
        raise web.HTTPNotFound(text="there is no such probe (an IMSI is up to 16 digits)")
    size = request.app[UI_CONFIG].page_size
    p, a, n, o, t = s.probes.c, s.agents.c, s.networks.c, s.observations.c, s.test_cases.c
    async with request.app[UI_ENGINE].connect() as conn:
        probe = (
            await conn.execute(
                select(
                    s.probes,
                    a.state.label("agent_state"),
                    a.last_seen_at.label("agent_seen_at"),
                    n.country,
                    n.operator,
                )
                .select_from(
                    s.probes.outerjoin(s.agents, a.id == p.agent_id).outerjoin(
                        s.networks, n.mcc_mnc == p.mcc_mnc
                    )
                )
                .where(p.imsi == imsi)
            )
        ).first()
        if probe is None:
            raise web.HTTPNotFound(text=f"there is no probe with IMSI {imsi}")
        total = int(
            await conn.scalar(select(func.count()).select_from(s.observations).where(o.imsi == imsi)) or 0
        )
        page_number, pages = page_of(request, total, size)
        observations = (
            await conn.execute(
                select(
                    o.id,
                    o.agent_id,
                    o.modem_id,
                    o.sender,
                    o.text,
                    o.smsc,
                    o.urc_at,
                    o.match,
                    o.test_case_id,
                    t.route,
                    t.sender.label("sent_sender"),
                )
                .select_from(s.observations.outerjoin(s.test_cases, t.id == o.test_case_id))
                .where(o.imsi == imsi)
                .order_by(o.urc_at.desc(), o.id.desc())
                .limit(size)
                .offset((page_number - 1) * size)
            )
        ).all()
        ps = s.probe_samples.c
        samples = list(
            await conn.execute(
                select(ps.at, ps.signal_dbm, ps.registration, ps.connected)
                .where(ps.imsi == imsi)
                .order_by(ps.at.desc(), ps.id.desc())
                .limit(SIGNAL_POINTS)
            )
        )
        e = s.probe_events.c
        events = (
            await conn.execute(
                select(s.probe_events)
                .where(e.imsi == imsi)
                .order_by(e.at.desc(), e.id.desc())
                .limit(RECENT_EVENTS)
            )
        ).all()
    now = datetime.now(UTC)
    samples.reverse()
    state = probe.state or {}
    chart = signal_chart(
        samples,
        now,
        probe.signal_dbm if probe.connected else None,
        chart_id="signal-chart",
        title=f"Signal of {imsi} over time, dBm",
    )
    return page(
        request,
        "probe_detail.html",
        probe=probe,
        modem=state,
        registered=probe.connected and probe.registration in REGISTERED,
        observations=observations,
        matches=MATCHES,
        total=total,
        page_number=page_number,
        pages=pages,
        chart=chart,
        samples=list(reversed(samples))[:SAMPLES_LISTED],
        sample_count=len(samples),
        events=[(event, describe_event(event.kind, event.detail)) for event in events],
    )


ROUTES = [web.get("/probes/{imsi}", probe_page)]
