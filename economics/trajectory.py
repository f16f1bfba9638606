"""A projection's months as data: per model and month (`ModelMonth`), per month
(`MonthTotals`), the months where a model's margin turns (`Turn`), and the whole
`Trajectory` with its text and JSON forms (`economics.projection` builds it,
`economics.charts.trajectory_chart` draws it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from economics.report import Margin
from economics.scenario import Scenario

__all__ = ["ModelMonth", "MonthTotals", "Trajectory", "Turn"]


@dataclass(slots=True)
class ModelMonth(Margin):
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
