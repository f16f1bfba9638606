"""The economics simulator: a seeded month through the real gateway, invoices that reconcile,
a margin report that agrees with the ledger, and what-if comparisons checked against SQL."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from economics.scenario import Scenario, load_scenario
from economics.simulate import simulate_month
from economics.traffic import plan_month

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MONTH_HOURS = 30 * 24  # November

SMALL_PRICE_PER_HOUR = Decimal("2.00")
SMALL_SHARE = Decimal("0.0004")


def small_scenario(requests: int = 360, seed: int = 11) -> dict[str, Any]:
    """Three tenants, two models on two simulated deployments, a month of `requests`."""
    return {
        "name": "test-month",
        "seed": seed,
        "month": "2026-11",
        "requests": requests,
        "concurrency": 8,
        "gateway": {
            "providers": [
                {"name": "gpu-a", "type": "simulated", "capacity": 64, "itl_ms": 15,
                 "prefill_ms_per_token": 0.5, "seed": 1},
                {"name": "gpu-b", "type": "simulated", "capacity": 32, "itl_ms": 40,
                 "prefill_ms_per_token": 1.5, "seed": 2},
            ],
            "models": [
                {"name": "small", "deployments": [{"provider": "gpu-a", "model": "s1"}]},
                {"name": "large", "deployments": [{"provider": "gpu-b", "model": "l1"}]},
            ],
            "pricing": {
                "currency": "USD",
                "models": {
                    "small": [{"effective_from": "2026-01-01",
                               "prices": {"input": "0.15", "output": "0.60"}}],
                    "large": [{"effective_from": "2026-01-01",
                               "prices": {"input": "3", "output": "12"}}],
                },
                "plans": {"enterprise": {"multiplier": "0.8"}},
            },
            "compute_costs": {
                "deployments": {
                    "gpu-a/s1": [{"effective_from": "2026-01-01", "hardware": {
                        "price_per_hour": str(SMALL_PRICE_PER_HOUR),
                        "fleet_share": str(SMALL_SHARE)}}],
                    "gpu-b/l1": [{"effective_from": "2026-01-01",
                                  "wholesale": {"input": "1.5", "output": "6"}}],
                }
            },
            "tenants": [
                {"id": "acme", "tax_rate": "0.1"},
                {"id": "globex", "plan": "enterprise"},
                {"id": "tiny", "limits": {"tokens_per_day": 3000}},
            ],
        },
        "tenants": {
            "acme": {"share": 0.5, "models": {"small": 0.7, "large": 0.3}, "stream_share": 0.5},
            "globex": {"share": 0.3, "models": {"large": 1}, "diurnal": "evening",
                       "growth": {"factor": 12, "months": 5}},
            "tiny": {"share": 0.2, "models": {"small": 1}, "diurnal": "flat",
                     "prompt_tokens": {"distribution": "fixed", "mean": 300}},
        },
        "variants": {
            "cheaper": {
                "description": "4x cheaper tokens",
                "gateway": {"compute_costs": {"deployments": {
                    "gpu-a/s1": [{"effective_from": "2026-01-01", "hardware": {
                        "price_per_hour": "0.50", "fleet_share": str(SMALL_SHARE)}}],
                    "gpu-b/l1": [{"effective_from": "2026-01-01",
                                  "wholesale": {"input": "0.375", "output": "1.5"}}],
                }}},
            }
        },
    }  # fmt: skip


def ledger_sums(database: Path) -> dict[str, Any]:
    """Revenue, compute cost and refusals straight from the ledger's rows (plain SQL)."""
    connection = sqlite3.connect(database)
    try:
        revenue, compute, refused = connection.execute(
            "SELECT sum(cost_nanos), sum(compute_cost_nanos),"
            " sum(CASE WHEN status_code = 429 THEN 1 ELSE 0 END) FROM ledger_entries"
        ).fetchone()
        by_tenant = {
            tenant: (int(rev), int(comp))
            for tenant, rev, comp in connection.execute(
                "SELECT tenant_id, sum(cost_nanos), sum(compute_cost_nanos)"
                " FROM ledger_entries GROUP BY tenant_id"
            )
        }
        hardware_compute = connection.execute(
            "SELECT sum(compute_cost_nanos) FROM ledger_entries WHERE deployment = 'gpu-a/s1'"
        ).fetchone()[0]
    finally:
        connection.close()
    return {
        "revenue": int(revenue),
        "compute": int(compute),
        "refused": int(refused),
        "by_tenant": by_tenant,
        "hardware_compute": int(hardware_compute),
    }


def provisioned(price_per_hour: Decimal) -> int:
    """The small deployment's accelerator cost for November, by hand."""
    return int(price_per_hour * SMALL_SHARE * MONTH_HOURS * 10**9)


@pytest.fixture(scope="module")
def month_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Any:
    import asyncio

    scenario = Scenario.model_validate(small_scenario())
    out = tmp_path_factory.mktemp("month")
    return asyncio.run(simulate_month(scenario, out, tokenizer_dir=tokenizer_dir))


def test_reduced_month_invoices_reconcile_and_report_agrees_with_ledger(month_run: Any) -> None:
    outcome = month_run
    assert outcome.run.planned > 300
    assert outcome.reconciliation.ok, str(outcome.reconciliation)
    assert not outcome.reconciliation.pending
    sums = ledger_sums(outcome.run.ledger_path)
    assert sums["refused"] > 0  # tiny's daily budget
    report = outcome.report
    assert report.requests == outcome.run.planned
    for row in report.by_tenant:
        assert (row.revenue_nanos, row.compute_nanos) == sums["by_tenant"][row.key]
        invoice = outcome.invoices[row.key]
        assert invoice.status == "final"
        assert invoice.exact_nanos == row.revenue_nanos  # every line from the same rows
        internal = outcome.internal[row.key]["total"]
        assert (internal["revenue_nanos"], internal["compute_nanos"]) == sums["by_tenant"][row.key]
        assert "compute" not in json.dumps(invoice.to_dict())  # the tenant's copy
    assert report.revenue_nanos == sums["revenue"]
    assert report.compute_nanos == sums["compute"]
    assert sum(r.revenue_nanos for r in report.by_model) == sums["revenue"]
    assert sum(r.compute_nanos for r in report.by_deployment) == sums["compute"]
    assert report.idle_nanos == provisioned(SMALL_PRICE_PER_HOUR) - sums["hardware_compute"]
    assert report.gross_margin_nanos == sums["revenue"] - sums["compute"] - report.idle_nanos
    for name in ("margin-report.txt", "margin-report.json", "margin.svg", "report.html"):
        assert (outcome.workdir / name).stat().st_size > 500
    assert (outcome.workdir / "invoices" / "acme-2026-11.csv").exists()


async def test_same_seed_same_invoices_other_seed_other_invoices(
    month_run: Any, tmp_path: Path, tokenizer_dir: Path
) -> None:
    def essence(invoices: dict[str, Any]) -> dict[str, Any]:
        result = {}
        for tenant, invoice in invoices.items():
            data = invoice.to_dict()
            data.pop("issued_at")
            result[tenant] = data
        return result

    again = await simulate_month(
        Scenario.model_validate(small_scenario()), tmp_path / "again", tokenizer_dir=tokenizer_dir
    )
    assert essence(again.invoices) == essence(month_run.invoices)
    assert again.report.compute_nanos == month_run.report.compute_nanos
    other = await simulate_month(
        Scenario.model_validate(small_scenario(seed=12)),
        tmp_path / "other",
        tokenizer_dir=tokenizer_dir,
    )
    assert essence(other.invoices) != essence(month_run.invoices)


def test_what_if_is_one_command_and_its_figures_match_the_ledgers(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(small_scenario(requests=240)))
    out = tmp_path / "whatif"
    command = [
        sys.executable, "-m", "gateway.cli", "what-if", str(scenario_file), "baseline",
        "cheaper", "--out", str(out), "--tokenizer-dir", str(tokenizer_dir),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gross margin" in result.stdout
    comparison = json.loads((out / "comparison.json").read_text())
    for name, price in (("baseline", SMALL_PRICE_PER_HOUR), ("cheaper", Decimal("0.50"))):
        sums = ledger_sums(out / name / "ledger.db")
        figures = comparison["runs"][name]
        idle = provisioned(price) - sums["hardware_compute"]
        assert figures["revenue_nanos"] == sums["revenue"]
        assert figures["compute_nanos"] == sums["compute"]
        assert figures["idle_nanos"] == idle
        assert figures["gross_margin_nanos"] == sums["revenue"] - sums["compute"] - idle
        assert figures["refused"] == sums["refused"]
    base, cheap = comparison["runs"]["baseline"], comparison["runs"]["cheaper"]
    assert cheap["revenue_nanos"] == base["revenue_nanos"]  # same traffic, same prices
    assert 3.9 < base["compute_nanos"] / cheap["compute_nanos"] < 4.1
    assert comparison["difference"]["gross_margin_nanos"] == (
        cheap["gross_margin_nanos"] - base["gross_margin_nanos"]
    )
    assert (out / "comparison.svg").read_text().startswith("<svg")


def test_traffic_follows_growth_diurnal_and_weekly_shapes() -> None:
    data = small_scenario(requests=40000)
    data["tenants"] = {
        "acme": {"share": 1, "models": {"small": 1}, "diurnal": "business",
                 "weekly": [1, 1, 1, 1, 1, 0.2, 0.2], "growth": {"factor": 12, "months": 5}},
    }  # fmt: skip
    data["gateway"]["tenants"] = [{"id": "acme"}]
    scenario = Scenario.model_validate(data)
    plan = plan_month(scenario, {"acme": "UTC"})
    assert plan == plan_month(scenario, {"acme": "UTC"})  # seeded
    assert abs(len(plan) - 40000) < 800
    days = Counter(r.at.day for r in plan)
    # 12x in five months is 12 ** (1/5) = 1.64x a month; compare Mondays 2nd and 30th.
    assert 1.4 < days[30] / days[2] < 1.9
    assert days[7] < days[6] / 3  # Saturday vs Friday
    hours = Counter(r.at.hour for r in plan)
    assert hours[10] > 5 * hours[3]
    assert all(datetime(2026, 11, 1, tzinfo=UTC) <= r.at < datetime(2026, 12, 1, tzinfo=UTC)
               for r in plan)  # fmt: skip


@pytest.mark.parametrize("path", sorted((PROJECT_ROOT / "examples/scenarios").glob("*.yaml")))
def test_example_scenarios_and_their_variants_are_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert len(scenario.tenants) >= 5
    assert len(scenario.settings().models) >= 3
    for name in scenario.variants:
        scenario.variant(name).settings()


def test_the_example_month_runs_in_minutes_reconciles_and_agrees_with_the_rollups(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The shipped scenario (5 tenants, 3 models, ~30,000 requests), end to end."""
    scenario_file = PROJECT_ROOT / "examples/scenarios/month.yaml"
    scenario = load_scenario(scenario_file)
    assert len(scenario.tenants) >= 5 and len(scenario.settings().models) >= 3
    out = tmp_path / "month"
    command = [
        sys.executable, "-m", "gateway.cli", "simulate-month", str(scenario_file),
        "--out", str(out), "--tokenizer-dir", str(tokenizer_dir),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert elapsed < 600
    assert "OK, no differences" in (out / "reconciliation.txt").read_text()
    report = json.loads((out / "margin-report.json").read_text())
    connection = sqlite3.connect(out / "ledger.db")
    try:

        def rolled(column: str) -> dict[str, tuple[int, int, int]]:
            query = (
                f"SELECT {column}, sum(requests), sum(cost_nanos), sum(compute_cost_nanos)"
                f" FROM usage_rollups GROUP BY {column}"
            )
            return {key: (n, rev, comp) for key, n, rev, comp in connection.execute(query)}

        by_tenant, by_model = rolled("tenant_id"), rolled("model")
        by_deployment = rolled("deployment")
    finally:
        connection.close()
    assert len(by_tenant) >= 5 and len(by_model) >= 3
    for section, sums in (
        ("by_tenant", by_tenant),
        ("by_model", by_model),
        ("by_deployment", by_deployment),
    ):
        shown = {r["key"]: (r["requests"], r["revenue_nanos"], r["compute_nanos"])
                 for r in report[section]}  # fmt: skip
        assert shown == sums, section
    totals = report["totals"]
    assert totals["revenue_nanos"] == sum(rev for _, rev, _ in by_tenant.values())
    assert totals["compute_nanos"] == sum(comp for _, _, comp in by_tenant.values())
    assert totals["gross_margin_nanos"] == (
        totals["revenue_nanos"] - totals["compute_nanos"] - totals["idle_nanos"]
    )
