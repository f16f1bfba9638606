"""Monthly reconciliation: invoices against the ledger's raw rows and its rollups.

For each tenant and month it checks, per currency and model:

* raw ledger rows = rollups (requests, every token kind, cost, list cost), unless raw rows
  of the month have been pruned (then the rollups stand for the ledger, and a note says so);
* what invoices charge for the month = the rollups (tokens per kind, exact amount = cost);
  for a finalised month, a difference is late usage waiting for an adjustment line on the
  next invoice, reported as *pending*, not as an error;
* the invoice's arithmetic: each line rounded once from its exact amount, subtotal, tax and
  total, and no usage in a currency other than the tenant's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from billing.invoice import (
    TenantBilling,
    build_invoice,
    invoiced_amounts,
    month_buckets,
    month_period,
    spec_from_key,
)
from billing.ledger import Ledger
from billing.money import round_to_minor, to_nanos
from billing.store import usage
from billing.store.engine import naive_utc
from billing.store.usage import Group

SUM_FIELDS = ("requests", "uncached_input", "cached_input", "output", "cost_nanos", "list_cost")


@dataclass(frozen=True, slots=True)
class Difference:
    """One disagreement: what `check` expected for `key` and what it found."""

    tenant_id: str
    check: str
    key: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"{self.tenant_id}: {self.check} [{self.key}] expected {self.expected},"
            f" found {self.actual} (difference {_delta(self.actual, self.expected)})"
        )


def _delta(actual: Any, expected: Any) -> Any:
    try:
        return actual - expected
    except TypeError:
        return "n/a"


@dataclass(slots=True)
class ReconciliationReport:
    """The outcome for one month; `ok` when there is no difference (pending is fine)."""

    month: str
    tenants: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    pending: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def __str__(self) -> str:
        verdict = "OK, no differences" if self.ok else f"{len(self.differences)} difference(s)"
        lines = [f"Reconciliation {self.month}: {len(self.tenants)} tenant(s), {verdict}"]
        lines += [f"  DIFFERENCE {difference}" for difference in self.differences]
        lines += [f"  pending adjustment {difference}" for difference in self.pending]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def item(difference: Difference) -> dict[str, Any]:
            return {
                "tenant_id": difference.tenant_id,
                "check": difference.check,
                "key": difference.key,
                "expected": str(difference.expected),
                "actual": str(difference.actual),
            }

        return {
            "month": self.month,
            "ok": self.ok,
            "tenants": self.tenants,
            "differences": [item(d) for d in self.differences],
            "pending": [item(d) for d in self.pending],
            "notes": self.notes,
        }


Sums = dict[tuple[str, str], dict[str, int]]  # (currency, model) -> field -> value
_GROUP = ("currency", "model")


def _by_currency_and_model(groups: list[Group]) -> Sums:
    return {
        (currency, model): {
            "requests": g.sums.requests,
            "uncached_input": g.sums.uncached_input,
            "cached_input": g.sums.cached_input,
            "output": g.sums.output,
            "cost_nanos": g.sums.cost_nanos,
            "list_cost": g.sums.list_cost_nanos,
        }
        for g in groups
        for currency, model in [g.key]
    }


async def rollup_sums(ledger: Ledger, tenant: TenantBilling, month: str) -> Sums:
    first, end = month_buckets(month, tenant.timezone)
    groups = await usage.rollup_sums(
        ledger.engine, by=_GROUP, first=first, end=end, tenant_id=tenant.tenant_id
    )
    return _by_currency_and_model(groups)


async def raw_sums(ledger: Ledger, tenant: TenantBilling, month: str) -> Sums:
    start, end = month_period(month, tenant.timezone)
    groups = await usage.entry_sums(
        ledger.engine, by=_GROUP, tenant_id=tenant.tenant_id, start=start, end=end
    )
    return _by_currency_and_model(groups)


def _compare(
    tenant_id: str, check: str, expected: Sums, actual: Sums, fields: tuple[str, ...]
) -> list[Difference]:
    found = []
    for currency, model in sorted(set(expected) | set(actual)):
        want = expected.get((currency, model), {})
        got = actual.get((currency, model), {})
        for name in fields:
            if want.get(name, 0) != got.get(name, 0):
                key = f"{currency} {model} {name}"
                found.append(Difference(tenant_id, check, key, want.get(name, 0), got.get(name, 0)))
    return found


async def reconcile(
    ledger: Ledger, tenants: list[TenantBilling], month: str
) -> ReconciliationReport:
    """Compare invoice totals, ledger sums and rollups for `month`; report every difference."""
    await ledger.flush()
    report = ReconciliationReport(month)
    pruned_before = await ledger.pruned_before()
    for tenant in tenants:
        report.tenants.append(tenant.tenant_id)
        currency = tenant.currency.upper()
        rollups = await rollup_sums(ledger, tenant, month)
        start, _end = month_period(month, tenant.timezone)
        if pruned_before is not None and pruned_before > naive_utc(start):
            report.notes.append(
                f"{tenant.tenant_id}: raw rows before {pruned_before.isoformat()}Z were pruned;"
                " the ledger is checked through its rollups"
            )
        else:
            raw = await raw_sums(ledger, tenant, month)
            report.differences += _compare(
                tenant.tenant_id, "ledger rows vs rollups", raw, rollups, SUM_FIELDS
            )
        for other_currency, model in sorted(rollups):
            if other_currency != currency:
                report.differences.append(
                    Difference(
                        tenant.tenant_id,
                        f"usage in a currency other than {currency}",
                        f"{other_currency} {model} cost_nanos",
                        0,
                        rollups[(other_currency, model)]["cost_nanos"],
                    )
                )
        invoice = await build_invoice(ledger, tenant, month)
        report.differences += _check_arithmetic(tenant.tenant_id, invoice)
        charged: Sums = defaultdict(lambda: dict.fromkeys(SUM_FIELDS, 0))
        if invoice.status == "final":
            for key, amount in (await invoiced_amounts(ledger, tenant.tenant_id, month)).items():
                spec = spec_from_key(key)
                _charge(charged[(currency, spec.model)], spec.token_kind, amount.quantity)
                charged[(currency, spec.model)]["cost_nanos"] += amount.nanos
        else:
            for line in invoice.lines_for(month):
                _charge(charged[(currency, line.model)], line.token_kind, line.quantity)
                charged[(currency, line.model)]["cost_nanos"] += line.amount_nanos
        metered = {key: sums for key, sums in rollups.items() if key[0] == currency}
        token_and_cost = ("uncached_input", "cached_input", "output", "cost_nanos")
        found = _compare(
            tenant.tenant_id, "invoiced vs rollups", metered, dict(charged), token_and_cost
        )
        if invoice.status == "final":
            report.pending += found
        else:
            report.differences += found
    return report


def _charge(sums: dict[str, int], token_kind: str | None, quantity: int) -> None:
    if token_kind is not None:
        sums[token_kind] += quantity


def _check_arithmetic(tenant_id: str, invoice: Any) -> list[Difference]:
    found = []
    check = f"invoice {invoice.number} arithmetic"
    for line in invoice.lines:
        rounded = round_to_minor(line.amount_nanos, invoice.currency)
        if line.amount != rounded:
            found.append(Difference(tenant_id, check, line.line_key, rounded, line.amount))
    subtotal = sum((line.amount for line in invoice.lines), Decimal(0))
    if invoice.subtotal != subtotal:
        found.append(Difference(tenant_id, check, "subtotal", subtotal, invoice.subtotal))
    tax_exact = Decimal(to_nanos(invoice.subtotal)) * invoice.tax_rate
    tax = round_to_minor(int(tax_exact), invoice.currency)
    if invoice.tax != tax:
        found.append(Difference(tenant_id, check, "tax", tax, invoice.tax))
    if invoice.total != invoice.subtotal + invoice.tax:
        found.append(
            Difference(tenant_id, check, "total", invoice.subtotal + invoice.tax, invoice.total)
        )
    return found
