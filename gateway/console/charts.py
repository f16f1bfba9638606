"""Server-rendered SVG charts for the console (no script, no plotting library)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
BAR = "#34568b"
ALT = "#e07b39"


def _nice_max(value: float) -> float:
    """The axis top: the next of 1, 2, 2.5, 5 or 10 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude * (1 + 1e-12):
            return step * magnitude
    return 10 * magnitude


def _label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:,.1f}M"
    if value >= 10_000:
        return f"{value / 1_000:,.0f}k"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:,.4g}"


def bar_chart(
    points: Sequence[tuple[str, float]], *, title: str, unit: str = "", color: str = BAR
) -> str:
    """Vertical bars, one per (label, value), e.g. one per day of a month."""
    width, height = 720, 220
    left, right, top, bottom = 56, 12, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = _nice_max(max((v for _, v in points), default=0.0))
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
        f"role='img' aria-label='{escape(title)}' class='chart'>",
        f"<text x='{left}' y='16' font-size='13' font-weight='bold' {_FONT}>"
        f"{escape(title)}{escape(f' ({unit})' if unit else '')}</text>",
    ]
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' stroke='#e3e3e3'/>"
        )
        parts.append(
            f"<text x='{left - 6}' y='{y + 4:.1f}' font-size='10' text-anchor='end' {_FONT}>"
            f"{_label(peak * i / 4)}</text>"
        )
    n = max(len(points), 1)
    slot = plot_w / n
    every = max(1, n // 10)
    for index, (label, value) in enumerate(points):
        h = plot_h * value / peak
        x = left + index * slot + slot * 0.15
        parts.append(
            f"<rect x='{x:.1f}' y='{top + plot_h - h:.1f}' width='{slot * 0.7:.1f}' "
            f"height='{h:.1f}' fill='{color}'><title>{escape(label)}: {value:,.6g}</title></rect>"
        )
        if index % every == 0:
            parts.append(
                f"<text x='{x + slot * 0.35:.1f}' y='{height - bottom + 14}' font-size='10' "
                f"text-anchor='middle' {_FONT}>{escape(label)}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def hbar_chart(rows: Sequence[tuple[str, float]], *, title: str, unit: str = "") -> str:
    """Horizontal bars, one per (label, value), e.g. one per model."""
    width, row_h = 720, 26
    left, top = 190, 26
    height = top + row_h * max(len(rows), 1) + 8
    peak = max((v for _, v in rows), default=0.0) or 1.0
    plot_w = width - left - 110
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
        f"role='img' aria-label='{escape(title)}' class='chart'>",
        f"<text x='4' y='16' font-size='13' font-weight='bold' {_FONT}>"
        f"{escape(title)}{escape(f' ({unit})' if unit else '')}</text>",
    ]
    for index, (label, value) in enumerate(rows):
        y = top + index * row_h
        w = plot_w * value / peak
        parts.append(
            f"<text x='{left - 8}' y='{y + 16}' font-size='11' text-anchor='end' {_FONT}>"
            f"{escape(label)}</text>"
        )
        parts.append(
            f"<rect x='{left}' y='{y + 4}' width='{w:.1f}' height='{row_h - 8}' fill='{ALT}'/>"
        )
        parts.append(
            f"<text x='{left + w + 6:.1f}' y='{y + 16}' font-size='11' {_FONT}>"
            f"{_label(value)}</text>"
        )
    if not rows:
        parts.append(f"<text x='{left}' y='{top + 16}' font-size='11' {_FONT}>no usage</text>")
    parts.append("</svg>")
    return "".join(parts)
