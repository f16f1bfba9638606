"""Charts of a margin report as self-contained SVG (no plotting library needed).

`margin_chart` draws two panels: day by day, the compute cost of served tokens (dark) and
idle capacity (light) stacked as bars, with revenue as a line; below, each tenant's and
each model's revenue beside its compute cost, with the gross margin percentage.
`comparison_chart` draws revenue, compute cost, idle capacity and gross margin of several
runs side by side. `trajectory_chart` draws a projection month by month: per model, revenue
and compute cost per million tokens (the gap is the margin per million) with list price
changes and turns marked; below, the whole business's revenue, compute cost and idle
capacity per month.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from economics.report import MarginReport

if TYPE_CHECKING:
    from economics.projection import Trajectory

__all__ = ["comparison_chart", "margin_chart", "trajectory_chart"]

_FONT = "font-family='Helvetica, Arial, sans-serif'"
COMPUTE = "#34568b"
IDLE = "#a9c1e0"
REVENUE = "#e07b39"
MARGIN = "#3a8f5c"
LOSS = "#c0392b"


def _units(nanos: int) -> float:
    return nanos / 1e9


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _text(
    x: float, y: float, body: str, size: int = 12, anchor: str = "start", **extra: str
) -> str:
    attrs = " ".join(f"{k.replace('_', '-')}='{v}'" for k, v in extra.items())
    return (
        f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' text-anchor='{anchor}' {_FONT}"
        f" {attrs}>{escape(body)}</text>"
    )


def _axis(x0: float, y0: float, width: float, height: float, top: float, label: str) -> list[str]:
    parts = []
    for i in range(5):
        value = top * i / 4
        y = y0 - height * i / 4
        parts.append(f"<line x1='{x0}' y1='{y:.1f}' x2='{x0 + width}' y2='{y:.1f}' stroke='#ddd'/>")
        parts.append(_text(x0 - 6, y + 4, f"{value:,.2f}", 11, "end"))
    parts.append(_text(x0 - 50, y0 - height - 12, label, 11))
    return parts


def margin_chart(report: MarginReport) -> str:
    """The report's chart as an SVG document."""
    width, height = 960, 640
    c = report.currency
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'"
        f" viewBox='0 0 {width} {height}'>",
        "<rect width='100%' height='100%' fill='white'/>",
        _text(20, 28, f"Margin: {report.scenario} ({report.month})", 18, font_weight="bold"),
        _text(
            20,
            50,
            f"revenue {_units(report.revenue_nanos):,.2f} {c} - compute"
            f" {_units(report.compute_nanos):,.2f} - idle {_units(report.idle_nanos):,.2f}"
            f" = gross margin {_units(report.gross_margin_nanos):,.2f} {c}"
            + (f" ({report.gross_margin_pct:.1f}%)" if report.gross_margin_pct is not None else ""),
            13,
        ),
    ]
    # Panel 1: daily bars.
    x0, y0, w, h = 80, 310, 840, 220
    days = report.daily
    top = _nice_max(
        max(
            [
                max(_units(p.revenue_nanos), _units(p.compute_nanos + max(p.idle_nanos, 0)))
                for p in days
            ]
            or [0]
        )
    )
    parts += _axis(x0, y0, w, h, top, f"{c} per day")
    if days:
        slot = w / len(days)
        points = []
        for i, p in enumerate(days):
            x = x0 + i * slot + slot * 0.15
            bw = slot * 0.7
            compute_h = h * _units(p.compute_nanos) / top
            idle_h = h * max(_units(p.idle_nanos), 0) / top
            parts.append(
                f"<rect x='{x:.1f}' y='{y0 - compute_h:.1f}' width='{bw:.1f}'"
                f" height='{compute_h:.1f}' fill='{COMPUTE}'/>"
            )
            parts.append(
                f"<rect x='{x:.1f}' y='{y0 - compute_h - idle_h:.1f}' width='{bw:.1f}'"
                f" height='{idle_h:.1f}' fill='{IDLE}'/>"
            )
            points.append(f"{x + bw / 2:.1f},{y0 - h * _units(p.revenue_nanos) / top:.1f}")
            if i % 5 == 0:
                parts.append(_text(x + bw / 2, y0 + 16, p.day.strftime("%d %b"), 10, "middle"))
        parts.append(
            f"<polyline points='{' '.join(points)}' fill='none' stroke='{REVENUE}'"
            " stroke-width='2.5'/>"
        )
    legend_y = y0 + 36
    for i, (color, label) in enumerate(
        (
            (REVENUE, "revenue"),
            (COMPUTE, "compute cost of served tokens"),
            (IDLE, "idle capacity (provisioned, unused)"),
        )
    ):
        lx = x0 + i * 250
        parts.append(f"<rect x='{lx}' y='{legend_y - 10}' width='14' height='10' fill='{color}'/>")
        parts.append(_text(lx + 20, legend_y, label, 12))
    # Panel 2: tenants and models.
    rows = [(r.key, r) for r in report.by_tenant] + [(f"model {r.key}", r) for r in report.by_model]
    x0, y_top, w = 200, 390, 560
    bar = 10
    top = _nice_max(max([_units(r.revenue_nanos) for _, r in rows] or [0]))
    parts.append(
        _text(
            20,
            y_top - 8,
            f"Revenue vs compute cost ({c}) by tenant and model",
            13,
            font_weight="bold",
        )
    )
    for i, (label, r) in enumerate(rows):
        y = y_top + 6 + i * 2.6 * bar
        rev_w = w * _units(r.revenue_nanos) / top
        cost_w = w * _units(r.compute_nanos) / top
        parts.append(_text(x0 - 8, y + bar + 3, label, 11, "end"))
        parts.append(
            f"<rect x='{x0}' y='{y:.1f}' width='{rev_w:.1f}' height='{bar}' fill='{REVENUE}'/>"
        )
        parts.append(
            f"<rect x='{x0}' y='{y + bar:.1f}' width='{cost_w:.1f}' height='{bar}'"
            f" fill='{COMPUTE}'/>"
        )
        pct = r.margin_pct
        color = MARGIN if (pct or 0) >= 0 else LOSS
        parts.append(
            _text(
                x0 + max(rev_w, cost_w) + 8,
                y + bar + 3,
                f"{_units(r.revenue_nanos):,.2f} / {_units(r.compute_nanos):,.2f}"
                + (f"  margin {pct:.0f}%" if pct is not None else ""),
                11,
                fill=color,
            )
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def comparison_chart(reports: list[tuple[str, MarginReport]]) -> str:
    """Grouped bars of revenue, compute, idle and gross margin per run, as SVG."""
    width, height = 960, 420
    measures = (
        ("revenue", REVENUE, lambda r: r.revenue_nanos),
        ("compute cost", COMPUTE, lambda r: r.compute_nanos),
        ("idle capacity", IDLE, lambda r: r.idle_nanos),
        ("gross margin", MARGIN, lambda r: r.gross_margin_nanos),
    )
    values = [_units(f(r)) for _, r in reports for _, _, f in measures]
    top = _nice_max(max([abs(v) for v in values] or [0]))
    low = -top if min(values or [0]) < 0 else 0.0
    x0, y_base, w, h = 80, 340, 840, 260
    zero = y_base - h * (0 - low) / (top - low)
    currency = reports[0][1].currency if reports else ""
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'"
        f" viewBox='0 0 {width} {height}'>",
        "<rect width='100%' height='100%' fill='white'/>",
        _text(
            20, 28, "What-if: " + " vs ".join(name for name, _ in reports), 18, font_weight="bold"
        ),
    ]
    for i in range(5):
        value = low + (top - low) * i / 4
        y = y_base - h * i / 4
        parts.append(f"<line x1='{x0}' y1='{y:.1f}' x2='{x0 + w}' y2='{y:.1f}' stroke='#ddd'/>")
        parts.append(_text(x0 - 6, y + 4, f"{value:,.2f}", 11, "end"))
    parts.append(_text(x0 - 50, y_base - h - 12, currency, 11))
    group = w / max(1, len(reports))
    bw = group * 0.8 / len(measures)
    for g, (name, report) in enumerate(reports):
        for m, (label, color, f) in enumerate(measures):
            value = _units(f(report))
            x = x0 + g * group + group * 0.1 + m * bw
            y = y_base - h * (value - low) / (top - low)
            top_y, bar_h = min(y, zero), abs(zero - y)
            fill = LOSS if label == "gross margin" and value < 0 else color
            parts.append(
                f"<rect x='{x:.1f}' y='{top_y:.1f}' width='{bw * 0.9:.1f}' height='{bar_h:.1f}'"
                f" fill='{fill}'/>"
            )
            parts.append(_text(x + bw * 0.45, top_y - 4, f"{value:,.2f}", 10, "middle"))
        parts.append(_text(x0 + g * group + group / 2, y_base + 20, name, 13, "middle"))
    for m, (label, color, _) in enumerate(measures):
        lx = x0 + m * 180
        parts.append(f"<rect x='{lx}' y='{y_base + 40}' width='14' height='10' fill='{color}'/>")
        parts.append(_text(lx + 20, y_base + 50, label, 12))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _polyline(points: list[tuple[float, float]], color: str, width: float = 2.5) -> str:
    joined = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f"<polyline points='{joined}' fill='none' stroke='{color}' stroke-width='{width}'/>"


def trajectory_chart(trajectory: Trajectory) -> str:
    """A projection's margin trajectory as an SVG document (see the module doc)."""
    c = trajectory.currency
    months = trajectory.months
    models = trajectory.models
    panel_h, gap = 120, 46
    x0, w = 90, 760
    top_y = 96
    height = top_y + len(models) * (panel_h + gap) + 300
    width = 960
    slot = w / max(1, len(months))

    def mx(index: int) -> float:
        return x0 + slot * (index + 0.5)

    first = trajectory.totals[0] if trajectory.totals else None
    last = trajectory.totals[-1] if trajectory.totals else None
    headline = ""
    if first is not None and last is not None:
        headline = (
            f"gross margin {months[0]} {_units(first.gross_margin_nanos):,.2f} -> {months[-1]}"
            f" {_units(last.gross_margin_nanos):,.2f} {c}; cost per token"
            f" x{trajectory.scenario.trends.cost_per_token_per_year:g} a year"
        )
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'"
        f" viewBox='0 0 {width} {height}'>",
        "<rect width='100%' height='100%' fill='white'/>",
        _text(20, 28, f"Margin trajectory: {trajectory.scenario.name}", 18, font_weight="bold"),
        _text(20, 50, headline, 13),
        _text(
            20,
            70,
            "Per model: revenue (orange) and compute cost (blue) per million tokens, the gap"
            " is the margin per million; dashed: list price changes; circles: turns.",
            12,
        ),
    ]
    changes = trajectory.price_changes
    for m_index, model in enumerate(models):
        y_top = top_y + m_index * (panel_h + gap) + 14
        y0 = y_top + panel_h
        rows = [trajectory.row(month, model) for month in months]
        revenue = [r.per_million(r.revenue_nanos) if r else None for r in rows]
        compute = [r.per_million(r.compute_nanos) if r else None for r in rows]
        values = [float(v) for v in revenue + compute if v is not None]
        top = _nice_max(max(values or [0]))
        parts.append(
            _text(20, y_top - 12, f"{model} ({c} per million tokens)", 13, font_weight="bold")
        )
        for i in range(3):
            y = y0 - panel_h * i / 2
            parts.append(f"<line x1='{x0}' y1='{y:.1f}' x2='{x0 + w}' y2='{y:.1f}' stroke='#ddd'/>")
            parts.append(_text(x0 - 6, y + 4, f"{top * i / 2:,.3f}", 10, "end"))
        for day, changed_model, _ in changes:
            if changed_model != model or day[:7] not in months:
                continue
            index = months.index(day[:7])
            fraction = (int(day[8:10]) - 1) / 30
            x = x0 + slot * (index + fraction)
            parts.append(
                f"<line x1='{x:.1f}' y1='{y_top:.1f}' x2='{x:.1f}' y2='{y0:.1f}'"
                f" stroke='{LOSS}' stroke-dasharray='4 3'/>"
            )
            parts.append(_text(x + 3, y_top + 10, f"price {day}", 10, fill=LOSS))
        for series, color in ((revenue, REVENUE), (compute, COMPUTE)):
            points = [
                (mx(i), y0 - panel_h * float(v) / top)
                for i, v in enumerate(series)
                if v is not None
            ]
            if points:
                parts.append(_polyline(points, color))
        for turn in trajectory.turns:
            if turn.model != model or turn.month not in months:
                continue
            i = months.index(turn.month)
            value = revenue[i]
            if value is None:
                continue
            y = y0 - panel_h * float(value) / top
            color = MARGIN if turn.change in ("rises", "turns positive") else LOSS
            parts.append(
                f"<circle cx='{mx(i):.1f}' cy='{y:.1f}' r='6' fill='none' stroke='{color}'"
                " stroke-width='2'/>"
            )
        r_first = next((r for r in rows if r is not None), None)
        r_last = next((r for r in reversed(rows) if r is not None), None)
        parts.append(_text(x0 + w + 8, y_top + 14, "margin per M", 11, fill="#666"))
        for line, r in enumerate((r_first, r_last)):
            if r is None or r.margin_pm is None:
                continue
            color = "#666" if line == 0 else (MARGIN if r.margin_pm >= 0 else LOSS)
            label = f"{r.month}: {r.margin_pm:.3f}"
            parts.append(_text(x0 + w + 8, y_top + 30 + 16 * line, label, 11, fill=color))
    # Bottom panel: the business per month.
    y_top = top_y + len(models) * (panel_h + gap) + 20
    h = 180
    y0 = y_top + h
    totals = trajectory.totals
    top = _nice_max(
        max(
            [max(_units(t.revenue_nanos), _units(t.compute_nanos + t.idle_nanos)) for t in totals]
            or [0]
        )
    )
    parts.append(_text(20, y_top - 8, f"The business per month ({c})", 13, font_weight="bold"))
    parts += _axis(x0, y0, w, h, top, "")
    revenue_points = []
    for i, t in enumerate(totals):
        x = x0 + slot * i + slot * 0.2
        bw = slot * 0.6
        compute_h = h * _units(t.compute_nanos) / top
        idle_h = h * _units(t.idle_nanos) / top
        parts.append(
            f"<rect x='{x:.1f}' y='{y0 - compute_h:.1f}' width='{bw:.1f}'"
            f" height='{compute_h:.1f}' fill='{COMPUTE}'/>"
        )
        parts.append(
            f"<rect x='{x:.1f}' y='{y0 - compute_h - idle_h:.1f}' width='{bw:.1f}'"
            f" height='{idle_h:.1f}' fill='{IDLE}'/>"
        )
        revenue_points.append((mx(i), y0 - h * _units(t.revenue_nanos) / top))
        parts.append(_text(mx(i), y0 + 16, t.month, 10, "middle"))
    if revenue_points:
        parts.append(_polyline(revenue_points, REVENUE))
    legend_y = y0 + 40
    for i, (color, label) in enumerate(
        (
            (REVENUE, "revenue"),
            (COMPUTE, "compute cost of served tokens"),
            (IDLE, "idle capacity (provisioned, unused)"),
        )
    ):
        lx = x0 + i * 250
        parts.append(f"<rect x='{lx}' y='{legend_y - 10}' width='14' height='10' fill='{color}'/>")
        parts.append(_text(lx + 20, legend_y, label, 12))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
