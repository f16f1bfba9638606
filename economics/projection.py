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
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing.invoice import next_month
from economics.charts import trajectory_chart
from economics.scenario import Scenario
from economics.simulate import MonthOutcome, simulate_month
from economics.trajectory import ModelMonth, MonthTotals, Trajectory, Turn
from gateway.config import deep_merge

__all__ = ["month_scenario", "simulate_months"]

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
    )
    (out_dir / "trajectory.txt").write_text(trajectory.to_text())
    (out_dir / "trajectory.json").write_text(json.dumps(trajectory.to_dict(), indent=2) + "\n")
    (out_dir / "trajectory.svg").write_text(trajectory_chart(trajectory))
    return trajectory
