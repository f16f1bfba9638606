"""`maas-gateway simulate-month`: run a scenario's month, then invoice, reconcile and report.

Writes into the output directory:

- `ledger.db`: the run's ledger (every request, its rollups, the finalised invoices);
- `invoices/<tenant>-<month>.json|.csv`: each tenant's finalised invoice (the tenant's
  copy: no compute cost), and `invoices/<tenant>-<month>.internal.json`, the operator's
  view of the same month: revenue, compute cost and margin by model and deployment;
- `reconciliation.txt`: invoices against ledger rows and rollups (must be clean);
- `margin-report.txt|.json`, `margin.svg` and `report.html`: the margin report and chart;
- `unit-economics.prom`: price, compute cost and margin per million tokens as Prometheus
  series (`maas_unit_economics_per_million_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billing.invoice import Invoice, TenantBilling, finalize_invoice, month_buckets
from billing.invoice_render import render_invoice
from billing.ledger import Ledger
from billing.reconcile import ReconciliationReport, reconcile
from billing.store.usage import rollup_sums
from economics.charts import margin_chart
from economics.report import MarginReport, MarginRow, build_margin_report
from economics.runner import RunResult, run_month
from economics.scenario import Scenario
from economics.unit import prometheus_text
from gateway.config import Settings

__all__ = ["MonthOutcome", "internal_view", "simulate_month", "tenant_billing"]


@dataclass(slots=True)
class MonthOutcome:
    """Everything a simulated month produced."""

    run: RunResult
    invoices: dict[str, Invoice]
    internal: dict[str, dict[str, Any]]
    reconciliation: ReconciliationReport
    report: MarginReport

    @property
    def workdir(self) -> Path:
        return self.run.workdir


def tenant_billing(settings: Settings) -> list[TenantBilling]:
    return [
        TenantBilling(t.id, t.name or t.id, t.timezone, t.currency, t.tax_rate)
        for t in settings.tenants
    ]


async def internal_view(ledger: Ledger, tenant: TenantBilling, month: str) -> dict[str, Any]:
    """The operator's view of a tenant's invoice month: revenue, compute cost and gross
    margin by model and deployment, from the same rollups as the invoice. Never part of
    the tenant's copy."""
    first, end = month_buckets(month, tenant.timezone)
    groups = await rollup_sums(
        ledger.engine,
        by=("model", "deployment"),
        first=first,
        end=end,
        tenant_id=tenant.tenant_id,
        currency=tenant.currency,
        ordered=True,
    )
    lines = []
    total = MarginRow("total")
    for group in groups:
        model, deployment = group.key
        values = group.sums
        row = MarginRow(f"{model} via {deployment or '(not served)'}")
        row.add(values)
        total.add(values)
        lines.append({"model": model, "deployment": deployment, **row.to_dict()})
    return {
        "tenant_id": tenant.tenant_id,
        "month": month,
        "currency": tenant.currency.upper(),
        "view": "internal (operator only)",
        "lines": lines,
        "total": total.to_dict(),
    }


async def simulate_month(
    scenario: Scenario,
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    progress: Any = None,
) -> MonthOutcome:
    """Run the month through the gateway, finalise invoices, reconcile, report; write all."""
    run = await run_month(scenario, out_dir, tokenizer_dir=tokenizer_dir, progress=progress)
    ledger = await Ledger.open(run.settings.ledger)
    try:
        return await _close_month(run, ledger)
    finally:
        await ledger.aclose()


async def _close_month(run: RunResult, ledger: Ledger) -> MonthOutcome:
    month = run.scenario.month
    out = run.workdir
    invoices_dir = out / "invoices"
    tenants = tenant_billing(run.settings)
    invoices: dict[str, Invoice] = {}
    internal: dict[str, dict[str, Any]] = {}
    for tenant in tenants:
        invoice = await finalize_invoice(ledger, tenant, month, allow_open_period=True)
        invoices[tenant.tenant_id] = invoice
        stem = invoices_dir / f"{tenant.tenant_id}-{month}"
        _write(Path(f"{stem}.json"), render_invoice(invoice, "json"))
        _write(Path(f"{stem}.csv"), render_invoice(invoice, "csv"))
        view = await internal_view(ledger, tenant, month)
        internal[tenant.tenant_id] = view
        _write(Path(f"{stem}.internal.json"), json.dumps(view, indent=2) + "\n")
    reconciliation = await reconcile(ledger, tenants, month)
    _write(out / "reconciliation.txt", str(reconciliation) + "\n")
    report = await build_margin_report(ledger, run.settings, month, run.scenario.name)
    _write(out / "margin-report.txt", report.to_text())
    _write(out / "margin-report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    _write(out / "unit-economics.prom", prometheus_text(report.unit, report.currency))
    chart = margin_chart(report)
    _write(out / "margin.svg", chart)
    _write(out / "report.html", _html(report, chart))
    return MonthOutcome(run, invoices, internal, reconciliation, report)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _html(report: MarginReport, chart: str) -> str:
    from html import escape

    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Margin report {escape(report.scenario)} {report.month}</title></head>"
        "<body style='font-family: Helvetica, Arial, sans-serif'>"
        f"{chart}<pre>{escape(report.to_text())}</pre></body></html>\n"
    )
