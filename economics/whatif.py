"""`maas-gateway what-if`: one scenario under two configurations, side by side.

Each configuration (the scenario itself, "baseline", or one of its `variants`) runs the
same seeded month in its own directory (`<out>/<name>/`, see `economics.simulate`;
a name compared with itself runs twice, the second time in `<out>/<name>-again/`);
the comparison (`comparison.txt|.json`, `comparison.svg`) sets their revenue, compute cost,
idle capacity, gross margin, modelled latency and refusals side by side with the
difference, and warns when a run's deployments saturated (their margin then assumes the
queued work was served later, or lost the refused requests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from economics.charts import comparison_chart
from economics.report import DeploymentCost, MarginReport
from economics.scenario import Scenario
from economics.simulate import MonthOutcome, simulate_month

__all__ = ["Comparison", "compare", "what_if"]

_MEASURES: tuple[tuple[str, str], ...] = (
    ("requests", "requests"),
    ("refused", "refused (429)"),
    ("revenue_nanos", "revenue"),
    ("compute_nanos", "compute cost"),
    ("idle_nanos", "idle capacity"),
    ("gross_margin_nanos", "gross margin"),
    ("gross_margin_pct", "gross margin %"),
    ("ttft_p50_ms", "TTFT p50 ms (modelled)"),
    ("ttft_p95_ms", "TTFT p95 ms (modelled)"),
    ("e2e_p50_ms", "total p50 ms (modelled)"),
    ("e2e_p95_ms", "total p95 ms (modelled)"),
)


def figures(report: MarginReport) -> dict[str, Any]:
    """The compared figures of one run (money in nano-units)."""
    return {
        "requests": report.requests,
        "refused": report.refused,
        "revenue_nanos": report.revenue_nanos,
        "compute_nanos": report.compute_nanos,
        "idle_nanos": report.idle_nanos,
        "gross_margin_nanos": report.gross_margin_nanos,
        "gross_margin_pct": report.gross_margin_pct,
        "ttft_p50_ms": report.latency.ttft_p50_ms,
        "ttft_p95_ms": report.latency.ttft_p95_ms,
        "e2e_p50_ms": report.latency.e2e_p50_ms,
        "e2e_p95_ms": report.latency.e2e_p95_ms,
    }


@dataclass(slots=True)
class Comparison:
    """Two runs of one scenario and their differences."""

    names: tuple[str, str]
    outcomes: tuple[MonthOutcome, MonthOutcome]

    @property
    def figures(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return figures(self.outcomes[0].report), figures(self.outcomes[1].report)

    def difference(self) -> dict[str, Any]:
        a, b = self.figures
        return {
            key: (b[key] - a[key]) if a[key] is not None and b[key] is not None else None
            for key in a
        }

    def to_dict(self) -> dict[str, Any]:
        a, b = self.figures
        return {
            "currency": self.outcomes[0].report.currency,
            "runs": {self.names[0]: a, self.names[1]: b},
            "difference": self.difference(),
            "saturated": {
                name: {d.deployment: _hours(d) for d in outcome.report.saturated}
                for name, outcome in zip(self.names, self.outcomes, strict=True)
            },
        }

    def to_text(self) -> str:
        a, b = self.figures
        diff = self.difference()
        currency = self.outcomes[0].report.currency
        first, second = self.names
        lines = [
            f"What-if: {first} vs {second} ({self.outcomes[0].report.month}, {currency})",
            "",
            f"  {'':<26} {first:>16} {second:>16} {'difference':>16}",
        ]
        for key, label in _MEASURES:
            lines.append(
                f"  {label:<26} {_show(key, a[key]):>16} {_show(key, b[key]):>16}"
                f" {_show(key, diff[key], signed=True):>16}"
            )
        for name, outcome in zip(self.names, self.outcomes, strict=True):
            saturated = outcome.report.saturated
            if saturated:
                shown = ", ".join(f"{d.deployment} ({_hours(d):g} h)" for d in saturated)
                lines.append(
                    f"  warning: in {name} these deployments were offered more than they can"
                    f" serve (queued or refused): {shown}"
                )
        return "\n".join(lines) + "\n"


def _hours(deployment: DeploymentCost) -> float:
    return deployment.saturation.saturated_hours if deployment.saturation else 0.0


def _show(key: str, value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    sign = "+" if signed else ""
    if key.endswith("_nanos"):
        return f"{value / 1e9:{sign},.2f}"
    if isinstance(value, float):
        return f"{value:{sign},.1f}"
    return f"{value:{sign},d}"


def compare(names: tuple[str, str], outcomes: tuple[MonthOutcome, MonthOutcome]) -> Comparison:
    return Comparison(names, outcomes)


def _write_all(out_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (out_dir / name).write_text(text)


async def what_if(
    scenario: Scenario,
    first: str,
    second: str,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    progress: Any = None,
) -> Comparison:
    """Run `scenario` as `first` and as `second` (names of variants, or "baseline")."""
    runs = []
    folders = (first, second if second != first else f"{second}-again")
    for name, folder in zip((first, second), folders, strict=True):
        variant = scenario.variant(name)
        runs.append(
            await simulate_month(
                variant, out_dir / folder, tokenizer_dir=tokenizer_dir, progress=progress
            )
        )
    comparison = Comparison(folders, (runs[0], runs[1]))
    reports = [(folders[0], runs[0].report), (folders[1], runs[1].report)]
    _write_all(
        out_dir,
        {
            "comparison.txt": comparison.to_text(),
            "comparison.json": json.dumps(comparison.to_dict(), indent=2) + "\n",
            "comparison.svg": comparison_chart(reports),
        },
    )
    return comparison
