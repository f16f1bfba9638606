"""`maas-gateway simulate-months`: a scenario's months one after another, and the margin
trajectory.

Month k of a projection (k = 0 for the scenario's `month`) is the scenario with:

- **growth across months**: each tenant's expected requests are its share of `requests`
  times ``growth.factor ** (k / growth.months)`` (its growth also runs within the month,
  as in one month);
- **trends**: every hardware cost version's `price_per_hour` times
  ``trends.accelerator_price_per_year ** (k / 12)``, and every simulated backend's
  `itl_ms` and `prefill_ms_per_token` divided by ``trends.throughput_per_year ** (k / 12)``
  (faster accelerators: more tokens per accelerator-hour), so the cost per token falls by
  ``accelerator_price_per_year / throughput_per_year`` a year;
- the same gateway configuration otherwise: list price versions with dates (a price war)
  take effect on their dates, as in production.

Each month runs through the real gateway on the compressed clock, with its own ledger,
invoices, reconciliation and margin report (`<out>/<YYYY-MM>/`, see
`economics.simulate`). The trajectory (`trajectory.txt|.json`, `trajectory.svg`)
sets out per month and model revenue, compute cost, margin and margin per million tokens,
and names the months where a model's margin per million tokens turns, with the reason:
a list price change (its date and prices), the cost trend, or the traffic mix.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing.invoice import next_month
from economics.charts import trajectory_chart
from economics.scenario import Scenario
from economics.simulate import MonthOutcome, simulate_month
from gateway.config import deep_merge

__all__ = [
    "ModelMonth",
    "MonthTotals",
    "Trajectory",
    "Turn",
    "month_scenario",
    "simulate_months",
]

_PRICE_PLACES = Decimal("0.000001")


def _months_from(first: str, count: int) -> list[str]:
    months = [first]
    while len(months) < count:
        months.append(next_month(months[-1]))
    return months


def month_scenario(scenario: Scenario, index: int) -> Scenario:
    """Month `index` (0-based) of the projection as a one-month scenario (see module doc)."""
    data = scenario.model_dump(mode="json")
    data["month"] = _months_from(scenario.month, index + 1)[-1]
    data["months"] = 1
    data["name"] = f"{scenario.name}:{data['month']}"
    total_share = sum(p.share for p in scenario.tenants.values())
    expected = 0.0
    for tenant_id, profile in scenario.tenants.items():
        grown = scenario.requests * profile.share / total_share
        grown *= profile.growth.factor ** (index / profile.growth.months)
        data["tenants"][tenant_id]["share"] = grown
        expected += grown
    data["requests"] = max(1, round(expected))
    years = index / 12
    price = Decimal(str(scenario.trends.accelerator_price_per_year**years))
    speed = scenario.trends.throughput_per_year**years
    gateway = deep_merge(scenario.gateway, {})
    for provider in gateway.get("providers", []):
        if provider.get("type") == "simulated":
            for key, default in (("itl_ms", 15.0), ("prefill_ms_per_token", 0.02)):
                provider[key] = float(provider.get(key, default)) / speed
    costs = gateway.get("compute_costs", {}).get("deployments", {})
    for versions in costs.values():
        for version in versions:
            hardware = version.get("hardware")
            if hardware is not None:
                hourly = Decimal(str(hardware["price_per_hour"])) * price
                hardware["price_per_hour"] = str(hourly.quantize(_PRICE_PLACES))
    data["gateway"] = gateway
    data["variants"] = {}
    return Scenario.model_validate(data)


@dataclass(slots=True)
class ModelMonth:
    """One model in one month (money in nano-units)."""

    month: str
    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    revenue_nanos: int = 0
    compute_nanos: int = 0
    list_input_pm: Decimal | None = None  # list price per million input tokens
    list_output_pm: Decimal | None = None
    realised_output_pm: Decimal | None = None
    compute_output_pm: Decimal | None = None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def margin_nanos(self) -> int:
        return self.revenue_nanos - self.compute_nanos

    @property
    def margin_pct(self) -> float | None:
        return 100 * self.margin_nanos / self.revenue_nanos if self.revenue_nanos else None

    def per_million(self, nanos: int) -> Decimal | None:
        """`nanos` per million tokens (input and output together), in currency units."""
        if not self.tokens:
            return None
        return round(Decimal(nanos) * 1_000_000 / self.tokens / 1_000_000_000, 4)

    @property
    def margin_pm(self) -> Decimal | None:
        return self.per_million(self.margin_nanos)

    def to_dict(self) -> dict[str, Any]:
        def text(value: Decimal | None) -> str | None:
            return None if value is None else str(value)

        return {
            "month": self.month,
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "revenue_nanos": self.revenue_nanos,
            "compute_nanos": self.compute_nanos,
            "margin_nanos": self.margin_nanos,
            "margin_pct": self.margin_pct,
            "revenue_per_million": text(self.per_million(self.revenue_nanos)),
            "compute_per_million": text(self.per_million(self.compute_nanos)),
            "margin_per_million": text(self.margin_pm),
            "list_price_per_million_input": text(self.list_input_pm),
            "list_price_per_million_output": text(self.list_output_pm),
            "realised_price_per_million_output": text(self.realised_output_pm),
            "compute_cost_per_million_output": text(self.compute_output_pm),
        }


@dataclass(slots=True)
class MonthTotals:
    """A month of the whole business, and how its books agree (nano-units)."""

    month: str
    requests: int
    refused: int
    invoiced_nanos: int  # the month's invoices, exact (before tax)
    revenue_nanos: int  # the margin report's revenue
    compute_nanos: int
    idle_nanos: int
    reconciled: bool
    saturated: list[str] = field(default_factory=list)

    @property
    def gross_margin_nanos(self) -> int:
        return self.revenue_nanos - self.compute_nanos - self.idle_nanos

    def to_dict(self) -> dict[str, Any]:
        return {
            "month": self.month,
            "requests": self.requests,
            "refused": self.refused,
            "invoiced_nanos": self.invoiced_nanos,
            "revenue_nanos": self.revenue_nanos,
            "compute_nanos": self.compute_nanos,
            "idle_nanos": self.idle_nanos,
            "gross_margin_nanos": self.gross_margin_nanos,
            "reconciled": self.reconciled,
            "saturated": self.saturated,
        }


@dataclass(slots=True)
class Turn:
    """A month where a model's margin per million tokens changed direction or sign."""

    model: str
    month: str
    change: str  # "falls", "rises", "turns negative", "turns positive"
    margin_pm: Decimal
    previous_pm: Decimal
    reason: str

    def to_text(self, currency: str) -> str:
        return (
            f"  {self.month}  {self.model}: margin per million tokens {self.change},"
            f" {self.previous_pm:.4f} -> {self.margin_pm:.4f} {currency}: {self.reason}"
        )


@dataclass(slots=True)
class Trajectory:
    """The months of a projection and the margin trajectory drawn from them."""

    scenario: Scenario
    currency: str
    months: list[str]
    totals: list[MonthTotals]
    rows: list[ModelMonth]
    turns: list[Turn]
    price_changes: list[tuple[str, str, str]]  # (date, model, "input a -> b, output c -> d")
    outcomes: list[MonthOutcome] = field(default_factory=list, repr=False)

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.rows})

    def row(self, month: str, model: str) -> ModelMonth | None:
        for r in self.rows:
            if r.month == month and r.model == model:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        trends = self.scenario.trends
        return {
            "scenario": self.scenario.name,
            "currency": self.currency,
            "months": self.months,
            "trends": {
                "accelerator_price_per_year": trends.accelerator_price_per_year,
                "throughput_per_year": trends.throughput_per_year,
                "cost_per_token_per_year": trends.cost_per_token_per_year,
            },
            "events": [e.model_dump() for e in self.scenario.events],
            "price_changes": [
                {"date": d, "model": m, "change": c} for d, m, c in self.price_changes
            ],
            "totals": [t.to_dict() for t in self.totals],
            "by_month_and_model": [r.to_dict() for r in self.rows],
            "turns": [
                {
                    "model": t.model,
                    "month": t.month,
                    "change": t.change,
                    "margin_per_million": str(t.margin_pm),
                    "previous_margin_per_million": str(t.previous_pm),
                    "reason": t.reason,
                }
                for t in self.turns
            ],
        }

    def to_text(self) -> str:
        c = self.currency
        trends = self.scenario.trends
        lines = [
            f"Margin trajectory: {self.scenario.name}, {self.months[0]} to {self.months[-1]}"
            f" ({len(self.months)} months), {c}",
            f"  cost per token x{trends.cost_per_token_per_year:g} a year (accelerator price"
            f" x{trends.accelerator_price_per_year:g}, throughput"
            f" x{trends.throughput_per_year:g})",
            "",
            "By month (the whole business)",
            f"  {'month':<8} {'requests':>9} {'refused':>8} {'invoiced':>12} {'revenue':>12}"
            f" {'compute':>12} {'idle':>12} {'margin':>12} {'margin%':>8}  books",
        ]
        for t in self.totals:
            pct = 100 * t.gross_margin_nanos / t.revenue_nanos if t.revenue_nanos else None
            books = "agree" if t.reconciled and t.invoiced_nanos == t.revenue_nanos else "DIFFER"
            if t.saturated:
                books += f"; saturated: {', '.join(t.saturated)}"
            lines.append(
                f"  {t.month:<8} {t.requests:>9} {t.refused:>8} {_money(t.invoiced_nanos):>12}"
                f" {_money(t.revenue_nanos):>12} {_money(t.compute_nanos):>12}"
                f" {_money(t.idle_nanos):>12} {_money(t.gross_margin_nanos):>12}"
                f" {_pct(pct):>8}  {books}"
            )
        for model in self.models:
            lines += [
                "",
                f"{model} (margin = revenue - compute cost of its tokens; per million tokens,"
                " input and output together)",
                f"  {'month':<8} {'requests':>9} {'revenue':>12} {'compute':>12} {'margin':>12}"
                f" {'margin%':>8} {'margin/M':>9} {'list in/M':>10} {'list out/M':>10}"
                f" {'cost out/M':>10}",
            ]
            for month in self.months:
                r = self.row(month, model)
                if r is None:
                    continue
                lines.append(
                    f"  {month:<8} {r.requests:>9} {_money(r.revenue_nanos):>12}"
                    f" {_money(r.compute_nanos):>12} {_money(r.margin_nanos):>12}"
                    f" {_pct(r.margin_pct):>8} {_dec(r.margin_pm):>9}"
                    f" {_dec(r.list_input_pm):>10} {_dec(r.list_output_pm):>10}"
                    f" {_dec(r.compute_output_pm):>10}"
                )
        lines += ["", "Market events and list price changes"]
        notes = [(e.date, e.note) for e in self.scenario.events]
        notes += [(d, f"{m} list price: {change}") for d, m, change in self.price_changes]
        lines += [f"  {d}  {n}" for d, n in sorted(notes)] or ["  none"]
        lines += ["", "Where margins turn"]
        lines += [t.to_text(c) for t in self.turns] or ["  no model's margin changed direction"]
        return "\n".join(lines) + "\n"


def _money(nanos: int) -> str:
    return f"{Decimal(nanos).scaleb(-9):,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _dec(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _list_prices(scenario: Scenario) -> dict[str, list[tuple[datetime, Decimal, Decimal]]]:
    """Model -> its list price versions (start, input, output per million), in order."""
    settings = scenario.settings()
    result = {}
    for model, versions in settings.pricing.models.items():
        line = []
        for v in sorted(versions, key=lambda v: v.effective_from):
            if v.prices is not None:
                line.append((v.effective_from, v.prices.input, v.prices.output))
        result[model] = line
    return result


def _price_changes(
    prices: dict[str, list[tuple[datetime, Decimal, Decimal]]], start: datetime, end: datetime
) -> list[tuple[str, str, str]]:
    changes = []
    for model, line in prices.items():
        for before, after in itertools.pairwise(line):
            if start <= after[0] < end:
                changes.append(
                    (
                        after[0].date().isoformat(),
                        model,
                        f"input {before[1]} -> {after[1]}, output {before[2]} -> {after[2]}",
                    )
                )
    return sorted(changes)


def _model_months(month: str, outcome: MonthOutcome) -> list[ModelMonth]:
    report = outcome.report
    rows = {}
    for r in report.by_model:
        rows[r.key] = ModelMonth(
            month,
            r.key,
            r.requests,
            r.input_tokens,
            r.output_tokens,
            r.revenue_nanos,
            r.compute_nanos,
        )
    for unit in report.unit:
        row = rows.get(unit.model)
        if row is not None and unit.deployment == "*":
            row.list_input_pm = unit.per_million("list_price", "input")
            row.list_output_pm = unit.per_million("list_price", "output")
            row.realised_output_pm = unit.per_million("realised_price", "output")
            row.compute_output_pm = unit.per_million("compute_cost", "output")
    return [rows[k] for k in sorted(rows)]


def _turns(
    trajectory_rows: list[ModelMonth],
    months: list[str],
    changes: list[tuple[str, str, str]],
    scenario: Scenario,
) -> list[Turn]:
    """Months where a model's margin per million tokens moves: its list price changed, its
    sign flipped, or it changed direction by more than `_NOISE` of its value."""
    turns = []
    by_model: dict[str, list[ModelMonth]] = {}
    for r in trajectory_rows:
        by_model.setdefault(r.model, []).append(r)
    for model, rows in sorted(by_model.items()):
        rows = [r for r in sorted(rows, key=lambda r: months.index(r.month)) if r.margin_pm]
        direction = 0
        for before, now in itertools.pairwise(rows):
            assert before.margin_pm is not None and now.margin_pm is not None
            delta = now.margin_pm - before.margin_pm
            step = 0 if abs(delta) < abs(before.margin_pm) * _NOISE else (1 if delta > 0 else -1)
            repriced = bool(_repricing(model, before, now, changes))
            if (before.margin_pm < 0) != (now.margin_pm < 0):
                change = "turns positive" if now.margin_pm >= 0 else "turns negative"
            elif step and ((direction and step != direction) or repriced):
                change = "rises" if step > 0 else "falls"
            else:
                change = ""
            if step:
                direction = step
            if change:
                reason = _reason(model, before, now, changes, scenario)
                turns.append(
                    Turn(model, now.month, change, now.margin_pm, before.margin_pm, reason)
                )
    return sorted(turns, key=lambda t: (t.month, t.model))


_NOISE = Decimal("0.03")
"""A month-on-month move smaller than this share of the margin is not a turn (traffic mix)."""


def _repricing(
    model: str, before: ModelMonth, now: ModelMonth, changes: list[tuple[str, str, str]]
) -> list[tuple[str, str]]:
    """List price changes of `model` that separate month `before` from month `now`."""
    return [
        (d, c)
        for d, m, c in changes
        if m == model and before.month <= d[:7] <= now.month and d != f"{before.month}-01"
    ]


def _reason(
    model: str,
    before: ModelMonth,
    now: ModelMonth,
    changes: list[tuple[str, str, str]],
    scenario: Scenario,
) -> str:
    parts = []
    cut = _repricing(model, before, now, changes)
    for day, change in cut:
        parts.append(f"list price changed on {day} ({change})")
    revenue_pm = (before.per_million(before.revenue_nanos), now.per_million(now.revenue_nanos))
    compute_pm = (before.per_million(before.compute_nanos), now.per_million(now.compute_nanos))
    if None not in revenue_pm and None not in compute_pm:
        assert revenue_pm[0] is not None and revenue_pm[1] is not None
        assert compute_pm[0] is not None and compute_pm[1] is not None
        d_rev, d_cost = revenue_pm[1] - revenue_pm[0], compute_pm[1] - compute_pm[0]
        parts.append(
            f"revenue per million tokens {d_rev:+.4f}, compute cost per million {d_cost:+.4f}"
        )
        if not cut:
            if abs(d_cost) >= abs(d_rev):
                parts.append("the cost trend (cheaper, faster accelerators) drives it")
            else:
                parts.append("the traffic mix drives it (input/output share, plans, off-peak use)")
    for event in scenario.events:
        if event.date[:7] in (before.month, now.month) and event.date[:7] <= now.month:
            parts.append(f"{event.date}: {event.note}")
    return "; ".join(parts)


async def simulate_months(
    scenario: Scenario,
    out_dir: Path,
    *,
    months: int | None = None,
    tokenizer_dir: Path | None = None,
    progress: Any = None,
) -> Trajectory:
    """Run every month of the projection (see the module doc) and write the trajectory.

    `out_dir` must not exist or be empty."""
    count = months or scenario.months
    names = _months_from(scenario.month, count)
    outcomes = []
    totals = []
    rows: list[ModelMonth] = []
    for index, month in enumerate(names):
        outcome = await simulate_month(
            month_scenario(scenario, index),
            out_dir / month,
            tokenizer_dir=tokenizer_dir,
            progress=progress,
        )
        outcomes.append(outcome)
        report = outcome.report
        recon = outcome.reconciliation
        totals.append(
            MonthTotals(
                month=month,
                requests=report.requests,
                refused=report.refused,
                invoiced_nanos=sum(i.exact_nanos for i in outcome.invoices.values()),
                revenue_nanos=report.revenue_nanos,
                compute_nanos=report.compute_nanos,
                idle_nanos=report.idle_nanos,
                reconciled=recon.ok and not recon.pending,
                saturated=[d.deployment for d in report.saturated],
            )
        )
        rows += _model_months(month, outcome)
    first = outcomes[0].report.window_start
    last = outcomes[-1].report.window_end
    changes = _price_changes(_list_prices(scenario), first, last)
    trajectory = Trajectory(
        scenario=scenario,
        currency=outcomes[0].report.currency,
        months=names,
        totals=totals,
        rows=rows,
        turns=_turns(rows, names, changes, scenario),
        price_changes=changes,
        outcomes=outcomes,
    )
    (out_dir / "trajectory.txt").write_text(trajectory.to_text())
    (out_dir / "trajectory.json").write_text(json.dumps(trajectory.to_dict(), indent=2) + "\n")
    (out_dir / "trajectory.svg").write_text(trajectory_chart(trajectory))
    return trajectory
