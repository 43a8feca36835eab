"""Small server-side SVG charts for the web UI: latency over time (p50 line in a p50..p95 band),
a latency histogram, and a rate over time.

Drawn on the server so pages need no chart library and no script (the CSP allows none inline),
and so a chart is there without JavaScript. Each function is pure: data in, markup out, as a
``jinja2.Markup`` the templates insert as is. Every text that reaches the markup (titles,
labels) is escaped here. Each chart carries ``role="img"``, an ``aria-label``, a ``<title>`` and
a ``<desc>`` that says in words what it shows, and axes labelled with their units.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from markupsafe import Markup

#: Drawing size (the SVG scales to its container; these are viewBox units).
WIDTH = 720
HEIGHT = 260
#: Room for the axes: tick labels and axis titles.
LEFT, RIGHT, TOP, BOTTOM = 76, 18, 28, 52
#: Colours, all at least 4.5:1 on white where they carry text, 3:1 where they are lines.
INK = "#1a1a1a"
GRID = "#d0d0d0"
LINE = "#0b5cad"
BAND = "#b9d3ee"
TAIL = "#5b7fa6"
BAR = "#3d6f9f"
RATE = "#116329"
#: Time axis steps, seconds: the first that gives at most ``TIME_TICKS`` ticks is used.
TIME_STEPS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
TIME_TICKS = 7
VALUE_TICKS = 5


@dataclass(frozen=True)
class Bucket:
    """One time bucket of a chart: its start and end (aware datetimes) and its values (None where
    the bucket has none: a gap in the line)."""

    start: datetime
    end: datetime
    low: float | None = None
    high: float | None = None
    count: int = 0


def coord(value: float) -> str:
    """A coordinate, short."""
    return f"{value:.1f}"


def nice_step(span: float, ticks: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about ``ticks`` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= factor * power:
            return factor * power
    return 10.0 * power


def value_ticks(low: float, high: float, ticks: int = VALUE_TICKS) -> list[float]:
    """Round tick values covering ``low``..``high`` (0 included when the range starts at 0)."""
    if high <= low:
        high = low + 1.0
    step = nice_step(high - low, ticks)
    first = math.floor(low / step) * step
    last = math.ceil(high / step) * step
    count = round((last - first) / step)
    return [first + i * step for i in range(count + 1)]


def number(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs, thousands grouped."""
    decimals = 0 if step >= 1 else min(6, math.ceil(-math.log10(step)))
    return f"{value:,.{decimals}f}"


def time_ticks(start_s: float, end_s: float, ticks: int = TIME_TICKS) -> tuple[list[float], str]:
    """Tick times (Unix seconds, on round UTC multiples of the step) and their strftime format."""
    span = max(end_s - start_s, 1.0)
    step = next((s for s in TIME_STEPS_S if span / s <= ticks), None)
    if step is None:
        step = TIME_STEPS_S[-1] * math.ceil(span / TIME_STEPS_S[-1] / ticks)
    first = math.ceil(start_s / step) * step
    values = []
    t = float(first)
    while t <= end_s:
        values.append(t)
        t += step
    if step >= 86400:
        fmt = "%m-%d"
    elif span > 86400:
        fmt = "%m-%d %H:%M"
    elif step >= 60:
        fmt = "%H:%M"
    else:
        fmt = "%H:%M:%S"
    return values, fmt


@dataclass(frozen=True)
class Frame:
    """Maps data to drawing coordinates."""

    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return LEFT + (value - self.x0) / span * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return HEIGHT - BOTTOM - (value - self.y0) / span * (HEIGHT - TOP - BOTTOM)


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> Markup:
    return Markup('<text x="{}" y="{}" text-anchor="{}" font-size="12" fill="{}"{}>{}</text>').format(
        coord(x), coord(y), anchor, INK, Markup(extra), text
    )


def svg(chart_id: str, title: str, desc: str, parts: Iterable[Markup]) -> Markup:
    """The chart's ``<svg>``: an accessible name (``title``) and description, then ``parts``."""
    head = Markup(
        '<svg class="chart" id="{id}" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        'aria-label="{title}" aria-describedby="{id}-desc" xmlns="http://www.w3.org/2000/svg">'
        '<title id="{id}-title">{title}</title><desc id="{id}-desc">{desc}</desc>'
    ).format(id=chart_id, w=WIDTH, h=HEIGHT, title=title, desc=desc)
    return head + Markup("").join(parts) + Markup("</svg>")


def y_axis(frame: Frame, ticks: Sequence[float], label: str, fmt: str = "{}") -> list[Markup]:
    """The value axis: grid lines at ``ticks``, their numbers, and ``label`` (with its unit)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    parts: list[Markup] = []
    for value in ticks:
        y = frame.y(value)
        parts.append(
            Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="1"/>').format(
                LEFT, WIDTH - RIGHT, coord(y), coord(y), GRID
            )
        )
        parts.append(_text(LEFT - 6, y + 4, fmt.format(number(value, step)), "end"))
    middle = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(_text(16, middle, label, extra=f' transform="rotate(-90 16 {coord(middle)})"'))
    return parts


def _x_axis_frame(frame: Frame) -> Markup:
    bottom = HEIGHT - BOTTOM
    return Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="1"/>').format(
        LEFT, WIDTH - RIGHT, coord(bottom), coord(bottom), INK
    )


def time_axis(frame: Frame, label: str = "time (UTC)") -> list[Markup]:
    """The time axis along the bottom, ticks at round times, labelled in UTC."""
    values, fmt = time_ticks(frame.x0, frame.x1)
    parts = [_x_axis_frame(frame)]
    bottom = HEIGHT - BOTTOM
    for t in values:
        x = frame.x(t)
        parts.append(
            Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}"/>').format(
                coord(x), coord(x), coord(bottom), coord(bottom + 5), INK
            )
        )
        parts.append(_text(x, bottom + 18, datetime.fromtimestamp(t, UTC).strftime(fmt)))
    parts.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 8, label))
    return parts


def no_data(message: str) -> Markup:
    """``message`` in the middle of an empty chart."""
    return _text((LEFT + WIDTH - RIGHT) / 2, (TOP + HEIGHT - BOTTOM) / 2, message)


def _runs(buckets: Sequence[Bucket]) -> list[list[Bucket]]:
    """The buckets with a value, in runs of neighbours (a bucket without one breaks the line)."""
    runs: list[list[Bucket]] = []
    current: list[Bucket] = []
    for bucket in buckets:
        if bucket.low is None:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(bucket)
    if current:
        runs.append(current)
    return runs


def _mid_s(bucket: Bucket) -> float:
    return (bucket.start.timestamp() + bucket.end.timestamp()) / 2


def _legend(items: Sequence[tuple[str, str, str]]) -> list[Markup]:
    """Legend entries (kind "line" or "band", colour, label) along the top."""
    parts: list[Markup] = []
    x = LEFT
    for kind, colour, label in items:
        if kind == "band":
            parts.append(
                Markup('<rect x="{}" y="8" width="18" height="10" fill="{}" stroke="{}"/>').format(
                    x, colour, TAIL
                )
            )
        else:
            parts.append(
                Markup('<line x1="{}" x2="{}" y1="13" y2="13" stroke="{}" stroke-width="3"/>').format(
                    x, x + 18, colour
                )
            )
        parts.append(_text(x + 24, 17, label, "start"))
        x += 24 + 8 * len(label) + 18
    return parts


def latency_band_chart(
    buckets: Sequence[Bucket], start: datetime, end: datetime, *, chart_id: str, title: str, desc: str
) -> Markup:
    """Latency over time: per bucket the median (``low``, a line) inside a band up to p95
    (``high``), ms on the y axis, UTC time on the x axis from ``start`` to ``end``."""
    values = [v for b in buckets for v in (b.low, b.high) if v is not None]
    top = max(values) if values else 1000.0
    ticks = value_ticks(min(0.0, *values) if values else 0.0, top)
    frame = Frame(start.timestamp(), end.timestamp(), ticks[0], ticks[-1])
    parts = y_axis(frame, ticks, "latency (ms)") + time_axis(frame)
    if not values:
        parts.append(no_data("no delivered results in this range"))
        return svg(chart_id, title, desc, parts)
    parts += _legend((("band", BAND, "p50 to p95"), ("line", LINE, "p50 (median)")))
    for run in _runs(buckets):
        xs = [frame.x(_mid_s(b)) for b in run]
        lows = [frame.y(b.low if b.low is not None else 0.0) for b in run]
        highs = [frame.y(b.high if b.high is not None else (b.low or 0.0)) for b in run]
        if len(run) == 1:  # a lone bucket: a bar for the band and a dot for the median
            parts.append(
                Markup('<line x1="{x}" x2="{x}" y1="{a}" y2="{b}" stroke="{c}" stroke-width="8"/>').format(
                    x=coord(xs[0]), a=coord(lows[0]), b=coord(highs[0]), c=BAND
                )
            )
        else:
            outline = [f"{coord(x)},{coord(y)}" for x, y in zip(xs, highs, strict=True)]
            outline += [f"{coord(x)},{coord(y)}" for x, y in reversed(list(zip(xs, lows, strict=True)))]
            parts.append(
                Markup('<polygon points="{}" fill="{}" stroke="{}" stroke-width="1"/>').format(
                    " ".join(outline), BAND, TAIL
                )
            )
            parts.append(
                Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2.5"/>').format(
                    " ".join(f"{coord(x)},{coord(y)}" for x, y in zip(xs, lows, strict=True)), LINE
                )
            )
        for x, y in zip(xs, lows, strict=True):
            parts.append(Markup('<circle cx="{}" cy="{}" r="3" fill="{}"/>').format(coord(x), coord(y), LINE))
    return svg(chart_id, title, desc, parts)


def rate_chart(
    buckets: Sequence[Bucket], start: datetime, end: datetime, *, chart_id: str, title: str, desc: str
) -> Markup:
    """A share over time (``low``, 0..1 per bucket) as a line with dots, in % on the y axis."""
    ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
    frame = Frame(start.timestamp(), end.timestamp(), 0.0, 1.0)
    parts: list[Markup] = []
    for value in ticks:
        y = frame.y(value)
        parts.append(
            Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}" stroke-width="1"/>').format(
                LEFT, WIDTH - RIGHT, coord(y), coord(y), GRID
            )
        )
        parts.append(_text(LEFT - 6, y + 4, f"{value * 100:.0f} %", "end"))
    middle = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(_text(16, middle, "delivered (%)", extra=f' transform="rotate(-90 16 {coord(middle)})"'))
    parts += time_axis(frame)
    runs = _runs(buckets)
    if not runs:
        parts.append(no_data("no results in this range"))
        return svg(chart_id, title, desc, parts)
    for run in runs:
        points = [(frame.x(_mid_s(b)), frame.y(b.low or 0.0)) for b in run]
        if len(points) > 1:
            parts.append(
                Markup('<polyline points="{}" fill="none" stroke="{}" stroke-width="2.5"/>').format(
                    " ".join(f"{coord(x)},{coord(y)}" for x, y in points), RATE
                )
            )
        for x, y in points:
            parts.append(Markup('<circle cx="{}" cy="{}" r="3" fill="{}"/>').format(coord(x), coord(y), RATE))
    return svg(chart_id, title, desc, parts)


def histogram(
    edges: Sequence[float],
    counts: Sequence[int],
    *,
    chart_id: str,
    title: str,
    desc: str,
    overflow: int = 0,
    x_label: str = "latency (ms)",
    y_label: str = "results",
) -> Markup:
    """Bars of ``counts`` between consecutive ``edges`` (len(edges) == len(counts) + 1); an
    ``overflow`` count beyond the last edge gets its own bar, labelled with ">"."""
    if len(edges) != len(counts) + 1:
        raise ValueError("a histogram needs one more edge than counts")
    top = max([*counts, overflow, 1])
    ticks = value_ticks(0.0, float(top))
    if ticks[1] - ticks[0] < 1:  # counts are whole: no half ticks
        ticks = [float(t) for t in range(0, math.ceil(top) + 1)]
    low, high = (edges[0], edges[-1]) if edges else (0.0, 1.0)
    bar_width = (high - low) / max(len(counts), 1)
    x_high = high + (bar_width if overflow else 0.0)
    frame = Frame(low, x_high if x_high > low else low + 1.0, 0.0, ticks[-1])
    parts = y_axis(frame, ticks, y_label)
    parts.append(_x_axis_frame(frame))
    bottom = HEIGHT - BOTTOM
    if not any(counts) and not overflow:
        parts.append(no_data("no delivered results in this range"))
        parts.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 8, x_label))
        return svg(chart_id, title, desc, parts)
    bars = [(edges[i], edges[i + 1], count) for i, count in enumerate(counts)]
    if overflow:
        bars.append((high, x_high, overflow))
    for a, b, count in bars:
        if count:
            x, y = frame.x(a), frame.y(count)
            parts.append(
                Markup('<rect x="{}" y="{}" width="{}" height="{}" fill="{}" stroke="#ffffff"/>').format(
                    coord(x), coord(y), coord(max(frame.x(b) - x, 1.0)), coord(bottom - y), BAR
                )
            )
    tick_values = value_ticks(low, high, 6)
    step = tick_values[1] - tick_values[0] if len(tick_values) > 1 else 1.0
    for value in tick_values:
        if low <= value <= high:
            x = frame.x(value)
            parts.append(
                Markup('<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="{}"/>').format(
                    coord(x), coord(x), coord(bottom), coord(bottom + 5), INK
                )
            )
            parts.append(_text(x, bottom + 18, number(value, step)))
    if overflow:
        parts.append(_text(frame.x((high + x_high) / 2), bottom + 18, f"> {number(high, step)}"))
    parts.append(_text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 8, x_label))
    return svg(chart_id, title, desc, parts)
