"""Economics beyond one honest month: capacity that binds, per-million unit economics checked
against SQL over the rollups, a 12-month projection that reconciles month by month, and
clean errors for CLI misuse."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import gateway.cli
from economics.scenario import Scenario, ScenarioError, load_scenario
from economics.simulate import MonthOutcome, simulate_month
from economics.traffic import plan_month
from tests.test_economics import PROJECT_ROOT, small_scenario

SMALL = "gpu-a/s1"


def capacity_scenario(fleet_share: str, on_saturation: str = "queue") -> Scenario:
    """The reduced month with the small model's fleet sized by `fleet_share`, and an off-peak
    discount on the large model (so list and realised prices differ by more than plans)."""
    data = small_scenario(requests=200)
    hardware = data["gateway"]["compute_costs"]["deployments"][SMALL][0]["hardware"]
    hardware["fleet_share"] = fleet_share
    data["gateway"]["pricing"]["off_peak"] = [
        {"timezone": "UTC", "start": "18:00", "end": "23:00", "multiplier": "0.5",
         "models": ["large"]},
    ]  # fmt: skip
    data["capacity"] = {"on_saturation": on_saturation, "max_wait_s": 60}
    return Scenario.model_validate(data)


def run(scenario: Scenario, out: Path, tokenizer_dir: Path) -> MonthOutcome:
    return asyncio.run(simulate_month(scenario, out, tokenizer_dir=tokenizer_dir))


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> MonthOutcome:
    return run(capacity_scenario("0.0004"), tmp_path_factory.mktemp("roomy"), tokenizer_dir)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> MonthOutcome:
    return run(capacity_scenario("0.000004"), tmp_path_factory.mktemp("tight"), tokenizer_dir)


def deployment(outcome: MonthOutcome, name: str) -> Any:
    return next(d for d in outcome.report.deployments if d.deployment == name)


def test_a_saturated_deployment_has_no_idle_cost_and_its_ttft_rises(
    roomy: MonthOutcome, tight: MonthOutcome
) -> None:
    calm, busy = deployment(roomy, SMALL), deployment(tight, SMALL)
    # Same traffic, same tokens: only the fleet differs.
    assert busy.compute_nanos == calm.compute_nanos
    assert calm.saturation.saturated_buckets == 0 and calm.idle_nanos > 0
    assert busy.offered_load > 1  # offered more work than the month's capacity
    assert busy.utilisation == 1.0  # ...but served no more than 100%
    assert busy.idle_nanos == 0
    assert tight.report.idle_nanos == 0  # the only hardware deployment
    report = tight.report
    assert report.gross_margin_nanos == report.revenue_nanos - report.compute_nanos
    at_capacity = busy.output_per_million_at_capacity
    assert busy.per_million_at_utilisation()[1] == at_capacity  # never below capacity cost
    assert busy.saturation.saturated_hours > 0
    assert [d.deployment for d in report.saturated] == [SMALL]
    assert busy.saturation.ttft_p50_ms > 10 * calm.saturation.ttft_p50_ms
    assert busy.saturation.wait_max_s > 0
    assert report.latency.ttft_p50_ms > roomy.report.latency.ttft_p50_ms
    assert report.latency.saturated_share > 0
    text = report.to_text()
    assert "Capacity: saturated deployments" in text and SMALL in text.split("Capacity:")[1]
    assert "Capacity: no deployment saturated" in roomy.report.to_text()
    data = json.loads((tight.workdir / "margin-report.json").read_text())
    assert data["saturated"] == [SMALL]
    shown = next(d for d in data["deployments"] if d["deployment"] == SMALL)
    assert shown["idle_nanos"] == 0 and shown["utilisation"] == 1.0
    assert shown["saturation"]["saturated_hours"] == busy.saturation.saturated_hours


def test_refusing_saturated_deployment_answers_429_through_the_gateway(
    tmp_path: Path, tokenizer_dir: Path, tight: MonthOutcome
) -> None:
    outcome = run(capacity_scenario("0.000004", "refuse"), tmp_path / "refuse", tokenizer_dir)
    connection = sqlite3.connect(outcome.run.ledger_path)
    try:
        refused, charged = connection.execute(
            "SELECT count(*), coalesce(sum(cost_nanos), 0) FROM ledger_entries"
            " WHERE status_code = 429 AND deployment = ?",
            (SMALL,),
        ).fetchone()
        served = connection.execute(
            "SELECT count(*) FROM ledger_entries WHERE status_code = 200 AND deployment = ?",
            (SMALL,),
        ).fetchone()[0]
    finally:
        connection.close()
    busy = deployment(outcome, SMALL)
    assert refused > 0 and charged == 0
    assert busy.saturation.refused == refused
    assert served < deployment(tight, SMALL).saturation.requests
    assert outcome.reconciliation.ok and not outcome.reconciliation.pending
    # Refusing keeps the queue shorter than queueing everything does.
    queued = deployment(tight, SMALL).saturation
    assert busy.saturation.wait_max_s < queued.wait_max_s
    assert busy.saturation.saturated_hours < queued.saturated_hours
    assert busy.idle_nanos >= 0
    assert f"{refused:>8}" in outcome.report.to_text().split("Capacity:")[1]


def rollup_rows(database: Path) -> list[sqlite3.Row]:
    connection = sqlite3.connect(database)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(
            "SELECT model, deployment, price_version, list_price_input_nanos AS lp_in,"
            " list_price_cached_nanos AS lp_cached, list_price_output_nanos AS lp_out,"
            " sum(uncached_input) AS uncached, sum(cached_input) AS cached,"
            " sum(output) AS output, sum(cost_nanos) AS cost, sum(list_cost_nanos) AS list_cost,"
            " sum(compute_cost_nanos) AS compute FROM usage_rollups WHERE deployment != ''"
            " GROUP BY model, deployment, price_version, lp_in, lp_cached, lp_out"
        ).fetchall()
    finally:
        connection.close()


def per_million(nanos: Fraction, tokens: int) -> Decimal:
    value = nanos * 1_000_000 / tokens / 1_000_000_000
    return round(Decimal(value.numerator) / Decimal(value.denominator), 4)


def test_per_million_figures_equal_sql_over_the_rollups(roomy: MonthOutcome) -> None:
    sums: dict[tuple[str, str], dict[str, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    for row in rollup_rows(roomy.run.ledger_path):
        off_peak = 2 if "off-peak" in row["price_version"] else 1  # the window's x0.5
        list_in = row["uncached"] * row["lp_in"] + row["cached"] * row["lp_cached"]
        for key in ((row["model"], row["deployment"]), (row["model"], "*")):
            s = sums[key]
            s["in"] += row["uncached"] + row["cached"]
            s["out"] += row["output"]
            s["list_in"] += list_in * off_peak
            s["list_out"] += row["output"] * row["lp_out"] * off_peak
            s["realised_in"] += Fraction(row["cost"] * list_in, row["list_cost"])
            s["realised"] += row["cost"]
            s["compute"] += row["compute"]
    units = {(u.model, u.deployment): u for u in roomy.report.unit}
    assert set(units) == set(sums) and len(units) == 4
    rates = {"gpu-b/l1": (Decimal("1.5"), Decimal("6"))}  # the wholesale price, per million
    for key, s in sums.items():
        unit = units[key]
        tokens_in, tokens_out = int(s["in"]), int(s["out"])
        assert (unit.input_tokens, unit.output_tokens) == (tokens_in, tokens_out)
        assert unit.per_million("list_price", "input") == per_million(s["list_in"], tokens_in)
        assert unit.per_million("list_price", "output") == per_million(s["list_out"], tokens_out)
        realised_out = s["realised"] - s["realised_in"]
        assert unit.per_million("realised_price", "input") == per_million(
            s["realised_in"], tokens_in
        )
        assert unit.per_million("realised_price", "output") == per_million(realised_out, tokens_out)
        assert unit.compute_input + unit.compute_output == s["compute"]
        margin_out = realised_out - unit.compute_output
        assert unit.per_million("gross_margin", "output") == per_million(margin_out, tokens_out)
        if key[1] in rates:
            assert (
                unit.per_million("compute_cost", "input"),
                unit.per_million("compute_cost", "output"),
            ) == rates[key[1]]
    large = units[("large", "gpu-b/l1")]
    # Off-peak and the enterprise plan: realised below list, list is the price list's.
    assert large.per_million("list_price", "output") == Decimal("12.0000")
    assert (large.per_million("realised_price", "output") or 12) < Decimal("12")
    # In the reports: text, JSON (and so the HTML, which embeds the text) and Prometheus.
    text = roomy.report.to_text()
    assert "Per million tokens" in text and "large via gpu-b/l1" in text
    html = (roomy.workdir / "report.html").read_text()
    assert "large via gpu-b/l1" in html
    data = json.loads((roomy.workdir / "margin-report.json").read_text())
    shown = next(
        u for u in data["unit_economics"] if (u["model"], u["deployment"]) == ("large", "*")
    )
    assert shown["realised_price_per_million_output"] == str(
        units[("large", "*")].per_million("realised_price", "output")
    )
    families = {
        f.name: f
        for f in text_string_to_metric_families((roomy.workdir / "unit-economics.prom").read_text())
    }
    samples = {
        (s.labels["model"], s.labels["deployment"], s.labels["kind"], s.labels["measure"]): s.value
        for s in families["maas_unit_economics_per_million_tokens"].samples
    }
    margin = large.per_million("gross_margin", "output")
    assert margin is not None
    assert samples[("large", "gpu-b/l1", "output", "gross_margin")] == float(margin)
    assert len(samples) == 4 * 2 * 4


def test_a_twelve_month_projection_reconciles_month_by_month(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    """The shipped year at reduced volume: invoices = ledger = report, every month."""
    scenario_file = PROJECT_ROOT / "examples/scenarios/year.yaml"
    out = tmp_path / "year"
    command = [
        sys.executable, "-m", "gateway.cli", "simulate-months", str(scenario_file),
        "--out", str(out), "--requests", "60", "--tokenizer-dir", str(tokenizer_dir),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert elapsed < 120
    trajectory = json.loads((out / "trajectory.json").read_text())
    months = trajectory["months"]
    assert months == [f"2026-{m:02d}" for m in range(1, 13)]
    rows = {(r["month"], r["model"]): r for r in trajectory["by_month_and_model"]}
    for totals in trajectory["totals"]:
        month = totals["month"]
        folder = out / month
        assert "OK, no differences" in (folder / "reconciliation.txt").read_text()
        invoices = [json.loads(p.read_text()) for p in (folder / "invoices").glob("*-????-??.json")]
        assert len(invoices) == 5 and all(i["month"] == month for i in invoices)
        connection = sqlite3.connect(folder / "ledger.db")
        try:
            revenue, compute = connection.execute(
                "SELECT sum(cost_nanos), sum(compute_cost_nanos) FROM ledger_entries"
            ).fetchone()
            by_model = connection.execute(
                "SELECT model, sum(requests), sum(cost_nanos), sum(compute_cost_nanos)"
                " FROM usage_rollups GROUP BY model"
            ).fetchall()
        finally:
            connection.close()
        assert sum(i["exact_nanos"] for i in invoices) == revenue == totals["invoiced_nanos"]
        assert totals["revenue_nanos"] == revenue and totals["compute_nanos"] == compute
        assert totals["reconciled"]
        for model, requests, model_revenue, model_compute in by_model:
            row = rows[(month, model)]
            assert (row["requests"], row["revenue_nanos"], row["compute_nanos"]) == (
                requests,
                model_revenue,
                model_compute,
            )
    # Cost per token falls 4x a year: December's is 4 ** (-11/12) of January's.
    for model in ("chat-small", "chat-medium", "chat-large"):
        first = Decimal(rows[("2026-01", model)]["compute_cost_per_million_output"])
        last = Decimal(rows[("2026-12", model)]["compute_cost_per_million_output"])
        assert abs(float(last / first) - 4 ** (-11 / 12)) < 0.01
    # The price war: two list-price cuts for the large model, on their dates.
    cuts = [c for c in trajectory["price_changes"] if c["model"] == "chat-large"]
    assert [c["date"] for c in cuts] == ["2026-04-01", "2026-08-01"]
    assert Decimal(rows[("2026-03", "chat-large")]["list_price_per_million_output"]) == 12
    assert Decimal(rows[("2026-12", "chat-large")]["list_price_per_million_output"]) == 4
    turns = {(t["model"], t["month"]): t for t in trajectory["turns"]}
    assert ("chat-large", "2026-04") in turns or ("chat-large", "2026-08") in turns
    assert all(t["reason"] for t in trajectory["turns"])
    text = (out / "trajectory.txt").read_text()
    assert "Where margins turn" in text and "2026-04-01  chat-large list price" in text
    assert (out / "trajectory.svg").read_text().startswith("<svg")
    assert "Margin trajectory" in result.stdout


@pytest.fixture(autouse=True)
def _no_root_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` configures the root logger once per process; not in the test process."""
    monkeypatch.setattr(gateway.cli, "_configure_logging", lambda: None)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`maas-gateway ARGS` in this process: (exit code, stdout, stderr)."""
    code = gateway.cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_misuse_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(small_scenario(requests=40)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "ledger.db").write_text("")
    broken = tmp_path / "broken.yaml"
    data = small_scenario()
    data["tenants"]["acme"]["prompt_tokens"] = {"distribution": "lognormal", "sd": 3}
    data["requests"] = -1
    broken.write_text(yaml.safe_dump(data))
    fresh = str(tmp_path / "fresh")
    for args in (
        ("simulate-month", str(scenario_file), "--out", str(busy)),
        ("simulate-months", str(scenario_file), "--out", str(busy)),
        ("what-if", str(scenario_file), "baseline", "cheaper", "--out", str(busy)),
        ("simulate-month", str(broken), "--out", fresh),
        ("simulate-month", str(tmp_path / "missing.yaml"), "--out", fresh),
        ("simulate-month", str(scenario_file), "--out", fresh, "--variant", "nope"),
        ("simulate-month", str(scenario_file), "--out", fresh, "--requests", "0"),
        ("simulate-months", str(scenario_file), "--out", fresh, "--months", "-2"),
    ):
        code, _, stderr = cli(capsys, *args)
        assert code == 2, (args, stderr)
        assert stderr.startswith("maas-gateway: "), (args, stderr)
        assert stderr.count("\n") == 1, (args, stderr)
    assert "prompt_tokens" in cli(capsys, "simulate-month", str(broken), "--out", fresh)[2]
    assert not Path(fresh).exists()


def test_what_if_of_a_configuration_against_itself_runs_it_twice(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(yaml.safe_dump(small_scenario(requests=40)))
    out = tmp_path / "same"
    code, stdout, stderr = cli(
        capsys, "what-if", str(scenario_file), "baseline", "baseline", "--out", str(out),
        "--tokenizer-dir", str(tokenizer_dir),
    )  # fmt: skip
    assert code == 0, stderr[-2000:]
    assert "baseline-again" in stdout
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"baseline", "baseline-again"}
    assert comparison["difference"]["revenue_nanos"] == 0  # the same seeded month
    assert (out / "baseline-again" / "ledger.db").exists()


def test_a_uniform_length_needs_no_mean_and_stays_in_its_bounds() -> None:
    data = small_scenario(requests=400)
    data["tenants"]["tiny"]["prompt_tokens"] = {"distribution": "uniform", "min": 50, "max": 90}
    scenario = Scenario.model_validate(data)
    lengths = [r.prompt_tokens for r in plan_month(scenario, {}) if r.tenant_id == "tiny"]
    assert len(lengths) > 40 and min(lengths) >= 50 and max(lengths) <= 90
    assert max(lengths) - min(lengths) > 20  # spread over the range, not a fixed value
    data["tenants"]["tiny"]["prompt_tokens"] = {"distribution": "normal", "sd": 5}
    with pytest.raises(ValueError, match="needs a 'mean'"):
        Scenario.model_validate(data)


def test_the_year_example_is_a_twelve_month_price_war() -> None:
    scenario = load_scenario(PROJECT_ROOT / "examples/scenarios/year.yaml")
    assert scenario.months == 12
    assert abs(scenario.trends.cost_per_token_per_year - 0.25) < 1e-9
    assert len(scenario.events) >= 1
    with pytest.raises(ScenarioError):
        scenario.variant("nope")
