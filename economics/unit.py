"""Unit economics: price, cost and margin per million input and output tokens.

Per model and deployment (and per model over all its deployments), from the rollups of the
report's window (each tenant over its own month, as invoices count it):

- **list price** per million input tokens: the rollups' list cost of input tokens
  (``uncached x list_price_input + cached x list_price_cached``) over the input tokens;
  per million output tokens, ``output x list_price_output`` over the output tokens. A
  rollup's list prices include an off-peak window's multiplier (its price version names
  the window); the list price here is before it, the rollup's divided by the multiplier.
- **realised price**: what tenants were charged (`cost_nanos`, after plans and off-peak
  discounts), split between input and output in proportion to their list cost, row by
  row (a plan or off-peak multiplier applies to the whole request).
- **compute cost**: `compute_cost_nanos`; the input part is the input tokens at the cost
  rate in force for the row's bucket, the output part the rest.
- **gross margin**: realised price minus compute cost, per million tokens of that kind
  (idle capacity is a cost of the deployment, not of a token; the margin report shows it).

Figures are exact fractions of nano-units until shown (4 decimal places of the currency).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.compute_cost import ComputeCosts
from billing.ledger import Ledger
from billing.pricing import OffPeakWindow
from billing.store.usage import rollup_sums

__all__ = ["MEASURES", "UnitEconomics", "unit_economics"]

MEASURES = ("list_price", "realised_price", "compute_cost", "gross_margin")

_KEYS = (
    "tenant_id",
    "model",
    "deployment",
    "bucket",
    "price_version",
    "list_price_input_nanos",
    "list_price_cached_nanos",
    "list_price_output_nanos",
)


@dataclass(slots=True)
class UnitEconomics:
    """One model (and deployment, or "*" for all of them): money per token kind, in nanos."""

    model: str
    deployment: str
    input_tokens: int = 0
    output_tokens: int = 0
    list_input: Fraction = Fraction(0)
    list_output: Fraction = Fraction(0)
    realised_input: Fraction = Fraction(0)
    realised_output: Fraction = Fraction(0)
    compute_input: Fraction = Fraction(0)
    compute_output: Fraction = Fraction(0)

    def add(self, other: UnitEconomics) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.list_input += other.list_input
        self.list_output += other.list_output
        self.realised_input += other.realised_input
        self.realised_output += other.realised_output
        self.compute_input += other.compute_input
        self.compute_output += other.compute_output

    def per_million(self, measure: str, kind: str) -> Decimal | None:
        """`measure` (one of MEASURES) per million `kind` ("input"/"output") tokens, in
        currency units rounded to 4 places; None without tokens of that kind."""
        tokens = self.input_tokens if kind == "input" else self.output_tokens
        if not tokens:
            return None
        if measure == "gross_margin":
            nanos = getattr(self, f"realised_{kind}") - getattr(self, f"compute_{kind}")
        else:
            nanos = getattr(self, f"{measure.removesuffix('_price').removesuffix('_cost')}_{kind}")
        value = nanos * 1_000_000 / tokens / 1_000_000_000
        return round(Decimal(value.numerator) / Decimal(value.denominator), 4)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "deployment": self.deployment,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        for kind in ("input", "output"):
            for measure in MEASURES:
                value = self.per_million(measure, kind)
                data[f"{measure}_per_million_{kind}"] = None if value is None else str(value)
        return data


async def unit_economics(
    ledger: Ledger,
    costs: ComputeCosts,
    windows: dict[str, tuple[int, int]],
    off_peak: Sequence[OffPeakWindow] = (),
) -> list[UnitEconomics]:
    """Rows per (model, deployment), then per model ("*"), from the rollups in `windows`
    (tenant -> [first bucket, end bucket)); `off_peak` are the pricing's windows."""
    labels = {w.label(): Fraction(w.multiplier) for w in off_peak if w.multiplier}
    first = min(lo for lo, _ in windows.values())
    last = max(hi for _, hi in windows.values())
    groups = await rollup_sums(ledger.engine, by=_KEYS, first=first, end=last)
    pairs: dict[tuple[str, str], UnitEconomics] = {}
    for group in groups:
        tenant, model, deployment, bucket, version, lp_in, lp_cached, lp_out = group.key
        lo, hi = windows.get(tenant, (first, last))
        if not lo <= bucket < hi or not deployment:
            continue  # another month of this tenant, or never served (no tokens)
        sums = group.sums
        uncached, cached, output = sums.uncached_input, sums.cached_input, sums.output
        cost, list_cost, compute = sums.cost_nanos, sums.list_cost_nanos, sums.compute_cost_nanos
        row = UnitEconomics(model, deployment, uncached + cached, output)
        list_input = Fraction(uncached * lp_in + cached * lp_cached)
        hours = next((m for label, m in labels.items() if label in version), Fraction(1))
        row.list_input = list_input / hours
        row.list_output = Fraction(output * lp_out) / hours
        if list_cost:
            row.realised_input = Fraction(cost) * list_input / list_cost
            row.realised_output = cost - row.realised_input
        rate = costs.rate(deployment, datetime.fromtimestamp(bucket, UTC))
        if rate is not None:
            row.compute_input = Fraction(uncached * rate.input_nanos + cached * rate.cached_nanos)
        row.compute_output = compute - row.compute_input
        pairs.setdefault((model, deployment), UnitEconomics(model, deployment)).add(row)
    result = [pairs[key] for key in sorted(pairs)]
    totals: dict[str, UnitEconomics] = {}
    for row in result:
        totals.setdefault(row.model, UnitEconomics(row.model, "*")).add(row)
    return result + [totals[m] for m in sorted(totals)]


def unit_table(rows: list[UnitEconomics]) -> list[str]:
    """The rows as text lines (per million tokens; input and output lines per row)."""
    labels = [
        f"{r.model} via {r.deployment}" if r.deployment != "*" else f"{r.model} (all)" for r in rows
    ]
    width = max([len("model via deployment"), *map(len, labels)])
    lines = [
        f"  {'model via deployment':<{width}} {'':>3} {'list':>9} {'realised':>9}"
        f" {'compute':>9} {'margin':>9} {'margin%':>8}"
    ]
    for row, label in zip(rows, labels, strict=True):
        for kind in ("input", "output"):
            values = [row.per_million(m, kind) for m in MEASURES]
            shown = ["-" if v is None else f"{v:.4f}" for v in values]
            realised, margin = values[1], values[3]
            pct = f"{100 * margin / realised:.1f}%" if realised and margin is not None else "-"
            lines.append(
                f"  {label if kind == 'input' else '':<{width}} {kind[:3]:>3}"
                + "".join(f" {v:>9}" for v in shown)
                + f" {pct:>8}"
            )
    return lines


def prometheus_text(rows: list[UnitEconomics], currency: str) -> str:
    """The rows as Prometheus series (text exposition format; see `UnitEconomicsGauge`)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from gateway.metrics import UnitEconomicsGauge

    gauge = UnitEconomicsGauge(currency)
    for row in rows:
        for kind in ("input", "output"):
            for measure in MEASURES:
                value = row.per_million(measure, kind)
                if value is not None:
                    gauge.set(row.model, row.deployment, kind, measure, float(value))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(gauge)
    return generate_latest(registry).decode()
