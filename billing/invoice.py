"""Monthly invoices per tenant, built from the rollups (never from raw ledger rows).

A month is the calendar month in the tenant's time zone, cut on the 15-minute UTC rollup
buckets. Lines, for each model and price version:

* one **usage** line per token kind (uncached input, cached input, output): quantity,
  list unit price and amount = quantity x list unit price (exact), rounded once (rule 3);
* one **discount** line: the exact difference between what the requests cost (the costs
  callers were told) and the same usage at list price (plan discount, off-peak included in
  neither since the list price is the same time-of-day price), rounded once;
* **adjustment** lines on a later invoice for usage that arrived after an earlier month was
  finalised: the difference between the rollups for that month now and everything already
  invoiced for it.

The exact amounts of a month's usage and discount lines add up to the exact sum of its
requests' costs. Subtotal is the sum of the rounded lines; tax is the rounded subtotal x
the tenant's tax rate, rounded once (rule 3); total is subtotal + tax.

A draft is recomputed on every call. `finalize_invoice` stores the invoice whole with its
lines; from then on the stored document is returned and never changes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

from billing.money import format_price_per_million, round_to_minor, to_nanos
from billing.store.engine import epoch_seconds
from billing.store.invoices import (
    invoice_document,
    invoice_numbers,
    invoiced,
    store_final_invoice,
)
from billing.store.schema import BUCKET_SECONDS
from billing.store.usage import rollup_sums

if TYPE_CHECKING:
    from billing.ledger import Ledger


TOKEN_KINDS: tuple[tuple[str, str, str], ...] = (
    # (token kind, rollup token column, rollup list price column)
    ("uncached_input", "uncached_input", "list_price_input_nanos"),
    ("cached_input", "cached_input", "list_price_cached_nanos"),
    ("output", "output", "list_price_output_nanos"),
)
TOKEN_KIND_LABELS = {
    "uncached_input": "input tokens (uncached)",
    "cached_input": "input tokens (cached)",
    "output": "output tokens",
}
LineKind = Literal["usage", "discount", "adjustment"]


@dataclass(slots=True)
class TenantBilling:
    """Who is invoiced, in which time zone and currency, at which tax rate."""

    tenant_id: str
    name: str
    timezone: str = "UTC"
    currency: str = "USD"
    tax_rate: Decimal = Decimal(0)


@dataclass(slots=True)
class InvoiceLine:
    """One invoice line. `amount_nanos` is exact; `amount` is it rounded once (rule 3)."""

    kind: LineKind
    description: str
    usage_month: str  # the month whose usage this line charges
    model: str
    price_version: str
    token_kind: str | None  # None on discount lines
    quantity: int  # tokens; 0 on discount lines
    unit_price_nanos: int  # nano-units per token (list price); 0 on discount lines
    amount_nanos: int
    amount: Decimal
    line_key: str

    @property
    def unit_price_per_million(self) -> str:
        return format_price_per_million(self.unit_price_nanos) if self.token_kind else ""


@dataclass(slots=True)
class Invoice:
    """A tenant's invoice for one month (`status` is "draft" or "final")."""

    number: str
    tenant_id: str
    tenant_name: str
    month: str
    timezone: str
    currency: str
    period_start: datetime  # local midnight on the 1st, in `timezone`
    period_end: datetime  # exclusive
    status: Literal["draft", "final"]
    issued_at: datetime  # UTC: when it was built (a draft) or finalised
    lines: list[InvoiceLine] = field(default_factory=list)
    tax_rate: Decimal = Decimal(0)
    subtotal: Decimal = Decimal(0)
    tax: Decimal = Decimal(0)
    total: Decimal = Decimal(0)

    @property
    def exact_nanos(self) -> int:
        """The exact (unrounded) sum of all lines."""
        return sum(line.amount_nanos for line in self.lines)

    def lines_for(self, usage_month: str) -> list[InvoiceLine]:
        return [line for line in self.lines if line.usage_month == usage_month]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: amounts as decimal strings, exact amounts as integer nano-units."""
        data = asdict(self)
        for name in ("period_start", "period_end", "issued_at"):
            data[name] = getattr(self, name).isoformat()
        for name in ("tax_rate", "subtotal", "tax", "total"):
            data[name] = str(getattr(self, name))
        data["exact_nanos"] = self.exact_nanos
        for line, raw in zip(self.lines, data["lines"], strict=True):
            raw["amount"] = str(line.amount)
            raw["unit_price_per_million"] = line.unit_price_per_million
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Invoice:
        lines = [
            InvoiceLine(
                **{
                    key: value
                    for key, value in raw.items()
                    if key not in ("amount", "unit_price_per_million")
                },
                amount=Decimal(raw["amount"]),
            )
            for raw in data["lines"]
        ]
        return cls(
            number=data["number"],
            tenant_id=data["tenant_id"],
            tenant_name=data["tenant_name"],
            month=data["month"],
            timezone=data["timezone"],
            currency=data["currency"],
            period_start=datetime.fromisoformat(data["period_start"]),
            period_end=datetime.fromisoformat(data["period_end"]),
            status=data["status"],
            issued_at=datetime.fromisoformat(data["issued_at"]),
            lines=lines,
            tax_rate=Decimal(data["tax_rate"]),
            subtotal=Decimal(data["subtotal"]),
            tax=Decimal(data["tax"]),
            total=Decimal(data["total"]),
        )


def invoice_number(tenant_id: str, month: str) -> str:
    """Stable and unique per tenant-month."""
    return f"INV-{tenant_id}-{month}"


def parse_month(month: str) -> tuple[int, int]:
    """'2026-11' as (2026, 11); raises ValueError otherwise."""
    try:
        year_text, month_text = month.split("-")
        year, number = int(year_text), int(month_text)
    except ValueError:
        raise ValueError(f"month must look like 2026-11, not {month!r}") from None
    if not 1 <= number <= 12 or len(year_text) != 4 or len(month_text) != 2:
        raise ValueError(f"month must look like 2026-11, not {month!r}")
    return year, number


def next_month(month: str) -> str:
    year, number = parse_month(month)
    return f"{year + number // 12}-{number % 12 + 1:02d}"


def month_period(month: str, timezone: str) -> tuple[datetime, datetime]:
    """The month in `timezone` as [start, end), both local (aware) datetimes."""
    year, number = parse_month(month)
    zone = ZoneInfo(timezone)
    start = datetime(year, number, 1, tzinfo=zone)
    follow_year, follow_number = parse_month(next_month(month))
    end = datetime(follow_year, follow_number, 1, tzinfo=zone)
    return start, end


def month_buckets(month: str, timezone: str) -> tuple[int, int]:
    """The month in `timezone` as a [first, end) range of rollup buckets (epoch seconds)."""
    start, end = month_period(month, timezone)
    first, last = epoch_seconds(start), epoch_seconds(end)
    if first % BUCKET_SECONDS or last % BUCKET_SECONDS:
        raise ValueError(f"time zone {timezone} is not offset from UTC by whole quarter hours")
    return first, last


def month_of(moment: datetime, timezone: str) -> str:
    """The month (in `timezone`) a moment falls in; naive moments are UTC."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    local = aware.astimezone(ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}"


# -- computing lines -----------------------------------------------------------------------


@dataclass(slots=True)
class _Amount:
    quantity: int = 0
    nanos: int = 0


@dataclass(slots=True)
class _LineSpec:
    model: str
    price_version: str
    token_kind: str | None
    unit_price_nanos: int


_LINE_GROUP = (
    "model",
    "price_version",
    "list_price_input_nanos",
    "list_price_cached_nanos",
    "list_price_output_nanos",
)


async def month_amounts(
    ledger: Ledger, tenant: TenantBilling, month: str
) -> dict[str, tuple[_LineSpec, _Amount]]:
    """The month's usage and discount amounts from the rollups, by line key (exact)."""
    first, end = month_buckets(month, tenant.timezone)
    groups = await rollup_sums(
        ledger.engine,
        by=_LINE_GROUP,
        first=first,
        end=end,
        tenant_id=tenant.tenant_id,
        currency=tenant.currency,
    )
    amounts: dict[str, tuple[_LineSpec, _Amount]] = {}

    def add(spec: _LineSpec, quantity: int, nanos: int) -> None:
        key = _line_key(spec)
        entry = amounts.get(key)
        if entry is None:
            entry = amounts[key] = (spec, _Amount())
        entry[1].quantity += quantity
        entry[1].nanos += nanos

    for group in groups:
        model, version, list_in, list_cached, list_out = group.key
        sums = group.sums
        cost = sums.cost_nanos
        tokens = {
            "uncached_input": sums.uncached_input,
            "cached_input": sums.cached_input,
            "output": sums.output,
        }
        prices = {"uncached_input": list_in, "cached_input": list_cached, "output": list_out}
        listed = 0
        for kind, _column, _price in TOKEN_KINDS:
            quantity, price = tokens[kind], int(prices[kind])
            listed += quantity * price
            if quantity:
                add(_LineSpec(model, version, kind, price), quantity, quantity * price)
        discount = int(cost) - listed
        if discount:
            add(_LineSpec(model, version, None, 0), 0, discount)
    return amounts


def _line_key(spec: _LineSpec) -> str:
    if spec.token_kind is None:
        return f"discount|{spec.model}|{spec.price_version}"
    return f"usage|{spec.model}|{spec.price_version}|{spec.token_kind}|{spec.unit_price_nanos}"


def _describe(spec: _LineSpec, kind: LineKind, usage_month: str, nanos: int) -> str:
    if spec.token_kind is None:
        what = "Plan discount" if nanos < 0 else "Plan pricing above list"
        text = f"{what}: {spec.model} ({spec.price_version})"
    else:
        label = TOKEN_KIND_LABELS[spec.token_kind]
        text = f"{spec.model} {label} ({spec.price_version})"
    if kind == "adjustment":
        text = f"Late usage for {usage_month}: {text}"
    return text


def _make_line(
    spec: _LineSpec, amount: _Amount, kind: LineKind, usage_month: str, currency: str
) -> InvoiceLine:
    line_kind: LineKind = kind
    if kind != "adjustment":
        line_kind = "discount" if spec.token_kind is None else "usage"
    return InvoiceLine(
        kind=line_kind,
        description=_describe(spec, kind, usage_month, amount.nanos),
        usage_month=usage_month,
        model=spec.model,
        price_version=spec.price_version,
        token_kind=spec.token_kind,
        quantity=amount.quantity,
        unit_price_nanos=spec.unit_price_nanos,
        amount_nanos=amount.nanos,
        amount=round_to_minor(amount.nanos, currency),
        line_key=_line_key(spec),
    )


def _line_order(line: InvoiceLine) -> tuple[Any, ...]:
    kinds = {"uncached_input": 0, "cached_input": 1, "output": 2, None: 3}
    group = {"usage": 0, "discount": 0, "adjustment": 1}[line.kind]
    return (group, line.usage_month, line.model, line.price_version, kinds[line.token_kind])


async def _finalised_months_before(ledger: Ledger, tenant_id: str, month: str) -> list[str]:
    finalised = await invoice_numbers(ledger.engine, tenant_id)
    return sorted(m for m in finalised if m < month)


async def invoiced_amounts(ledger: Ledger, tenant_id: str, usage_month: str) -> dict[str, _Amount]:
    """Everything finalised invoices have charged for a month's usage, by line key."""
    charged = await invoiced(ledger.engine, tenant_id, usage_month)
    return {key: _Amount(quantity, nanos) for key, (quantity, nanos) in charged.items()}


def spec_from_key(key: str) -> _LineSpec:
    parts = key.split("|")
    if parts[0] == "discount":
        return _LineSpec(parts[1], parts[2], None, 0)
    return _LineSpec(parts[1], parts[2], parts[3], int(parts[4]))


async def _adjustments(ledger: Ledger, tenant: TenantBilling, month: str) -> list[InvoiceLine]:
    lines: list[InvoiceLine] = []
    for earlier in await _finalised_months_before(ledger, tenant.tenant_id, month):
        now = await month_amounts(ledger, tenant, earlier)
        charged = await invoiced_amounts(ledger, tenant.tenant_id, earlier)
        for key in sorted(set(now) | set(charged)):
            spec = now[key][0] if key in now else spec_from_key(key)
            current = now[key][1] if key in now else _Amount()
            before = charged.get(key, _Amount())
            delta = _Amount(current.quantity - before.quantity, current.nanos - before.nanos)
            if delta.quantity or delta.nanos:
                lines.append(_make_line(spec, delta, "adjustment", earlier, tenant.currency))
    return lines


def _totals(invoice: Invoice) -> None:
    subtotal = sum((line.amount for line in invoice.lines), Decimal(0))
    invoice.subtotal = subtotal
    tax_exact = Decimal(to_nanos(subtotal)) * Decimal(invoice.tax_rate)
    if tax_exact != tax_exact.to_integral_value():
        raise ValueError(f"tax rate {invoice.tax_rate} has more decimal places than supported")
    invoice.tax = round_to_minor(int(tax_exact), invoice.currency)
    invoice.total = invoice.subtotal + invoice.tax


async def _compute(ledger: Ledger, tenant: TenantBilling, month: str) -> Invoice:
    start, end = month_period(month, tenant.timezone)
    lines = [
        _make_line(spec, amount, "usage", month, tenant.currency)
        for spec, amount in (await month_amounts(ledger, tenant, month)).values()
    ]
    lines += await _adjustments(ledger, tenant, month)
    lines.sort(key=_line_order)
    invoice = Invoice(
        number=invoice_number(tenant.tenant_id, month),
        tenant_id=tenant.tenant_id,
        tenant_name=tenant.name,
        month=month,
        timezone=tenant.timezone,
        currency=tenant.currency.upper(),
        period_start=start,
        period_end=end,
        status="draft",
        issued_at=datetime.now(UTC),
        lines=lines,
        tax_rate=Decimal(tenant.tax_rate),
    )
    _totals(invoice)
    return invoice


async def stored_invoice(ledger: Ledger, tenant_id: str, month: str) -> Invoice | None:
    """The finalised invoice for a tenant-month, if there is one."""
    document = await invoice_document(ledger.engine, tenant_id, month)
    return None if document is None else Invoice.from_dict(json.loads(document))


async def build_invoice(ledger: Ledger, tenant: TenantBilling, month: str) -> Invoice:
    """The tenant's invoice for `month` ('2026-11'): the stored one once finalised, else a
    draft computed now from the rollups."""
    parse_month(month)
    stored = await stored_invoice(ledger, tenant.tenant_id, month)
    return stored if stored is not None else await _compute(ledger, tenant, month)


async def finalize_invoice(
    ledger: Ledger, tenant: TenantBilling, month: str, *, allow_open_period: bool = False
) -> Invoice:
    """Finalise the tenant's invoice for `month`; it never changes afterwards.

    Flushes the ledger first. Refuses a month that has not yet ended in the tenant's time
    zone unless `allow_open_period`. Finalising twice returns the stored invoice.
    """
    stored = await stored_invoice(ledger, tenant.tenant_id, month)
    if stored is not None:
        return stored
    _start, end = month_period(month, tenant.timezone)
    if not allow_open_period and datetime.now(UTC) < end:
        raise ValueError(f"{month} has not ended in {tenant.timezone}; it cannot be finalised")
    await ledger.flush()
    invoice = await _compute(ledger, tenant, month)
    invoice.status = "final"
    by_key: dict[tuple[str, str], _Amount] = defaultdict(_Amount)
    for line in invoice.lines:
        amount = by_key[(line.usage_month, line.line_key)]
        amount.quantity += line.quantity
        amount.nanos += line.amount_nanos
    await store_final_invoice(
        ledger.engine,
        tenant.tenant_id,
        month,
        number=invoice.number,
        finalized_at=invoice.issued_at,
        document=json.dumps(invoice.to_dict()),
        charged={key: (amount.quantity, amount.nanos) for key, amount in by_key.items()},
    )
    final = await stored_invoice(ledger, tenant.tenant_id, month)
    assert final is not None
    return final


def period_label(invoice: Invoice) -> str:
    """'2026-11-01 to 2026-11-30 (Asia/Shanghai)'."""
    last_day: date = (invoice.period_end.replace(tzinfo=None) - timedelta(days=1)).date()
    return (
        f"{invoice.period_start.date().isoformat()} to {last_day.isoformat()} ({invoice.timezone})"
    )
