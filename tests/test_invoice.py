"""Monthly invoices: lines per model, token kind and price version at list price, plan
discount lines, rounding once per line, tax, the tenant's time zone and currency,
finalisation, and late usage as adjustment lines on the next invoice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from billing.invoice import (
    Invoice,
    TenantBilling,
    build_invoice,
    finalize_invoice,
    month_buckets,
)
from billing.ledger import Ledger
from billing.money import round_to_minor
from billing.usage import Usage
from tests.test_ledger import make_record, sqlite_config

LIST = {"input": 2_000, "cached": 500, "output": 8_000}
PLAN = {"input": 1_600, "cached": 400, "output": 6_400}  # a plan at x0.8
OCT_10 = datetime(2026, 10, 10, 9, 0, tzinfo=UTC)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    opened = await Ledger.open(sqlite_config(tmp_path))
    yield opened
    await opened.aclose()


def usage_lines(invoice: Invoice) -> dict[tuple[str, str | None], tuple[int, int, Decimal]]:
    return {
        (line.model, line.token_kind): (line.quantity, line.unit_price_nanos, line.amount)
        for line in invoice.lines
        if line.kind == "usage"
    }


async def test_lines_discount_and_totals(ledger: Ledger) -> None:
    records = [
        make_record(
            f"r{i}", OCT_10, usage=Usage(1_000, 200, 500, 50), prices=PLAN, list_prices=LIST
        )
        for i in range(30)
    ]
    for record in records:
        ledger.record(record)
    await ledger.flush()
    tenant = TenantBilling("acme", "Acme Corp", tax_rate=Decimal("0.0825"))
    invoice = await build_invoice(ledger, tenant, "2026-10")

    assert invoice.number == "INV-acme-2026-10"
    assert invoice.status == "draft"
    assert usage_lines(invoice) == {
        ("gpt-sim", "uncached_input"): (30_000, 2_000, Decimal("0.06")),
        ("gpt-sim", "cached_input"): (6_000, 500, Decimal("0.00")),
        ("gpt-sim", "output"): (15_000, 8_000, Decimal("0.12")),
    }
    [discount] = [line for line in invoice.lines if line.kind == "discount"]
    total_cost = sum(r.cost_nanos for r in records)
    total_list = sum(r.list_cost_nanos for r in records)
    assert discount.amount_nanos == total_cost - total_list == -36_600_000
    assert discount.amount == Decimal("-0.04")
    # The exact lines add up to exactly what the requests cost.
    assert invoice.exact_nanos == total_cost
    assert invoice.subtotal == Decimal("0.06") + Decimal("0.00") + Decimal("0.12") - Decimal("0.04")
    assert invoice.tax == Decimal("0.01")  # 0.14 x 8.25% = 0.01155 -> 0.01
    assert invoice.total == Decimal("0.15")


async def test_each_line_is_rounded_once_half_up(ledger: Ledger) -> None:
    # 5 tokens x 1_000_000 nanos = 0.005 USD exactly: half-up gives 0.01 (the sum, not each
    # request, is rounded: five 0.001 requests would each round to 0.00).
    price = {"input": 1_000_000, "cached": 0, "output": 0}
    for i in range(5):
        ledger.record(make_record(f"h{i}", OCT_10, usage=Usage(1, 0, 0, 0), prices=price))
    await ledger.flush()
    invoice = await build_invoice(ledger, TenantBilling("acme", "Acme"), "2026-10")
    [line] = invoice.lines
    assert line.amount_nanos == 5_000_000
    assert line.amount == Decimal("0.01") == round_to_minor(5_000_000, "USD")


async def test_price_versions_are_separate_lines(ledger: Ledger) -> None:
    peak = make_record("peak", OCT_10, version="gpt-sim@v1", usage=Usage(10, 0, 0, 0))
    off = make_record(
        "off",
        OCT_10,
        version="gpt-sim@v1;off-peak",
        usage=Usage(10, 0, 0, 0),
        prices={"input": 1_000, "cached": 250, "output": 4_000},
    )
    ledger.record(peak)
    ledger.record(off)
    await ledger.flush()
    invoice = await build_invoice(ledger, TenantBilling("acme", "Acme"), "2026-10")
    assert sorted(
        (line.price_version, line.quantity, line.unit_price_nanos) for line in invoice.lines
    ) == [
        ("gpt-sim@v1", 10, 2_000),
        ("gpt-sim@v1;off-peak", 10, 1_000),
    ]


async def test_yen_rounds_to_whole_units(ledger: Ledger) -> None:
    price = {"input": 600_000_000, "cached": 0, "output": 0}  # 0.6 JPY per token
    ledger.record(
        make_record("y", OCT_10, usage=Usage(1, 0, 0, 0), prices=price, tenant="jp", currency="JPY")
    )
    await ledger.flush()
    tenant = TenantBilling(
        "jp", "Nippon", timezone="Asia/Tokyo", currency="JPY", tax_rate=Decimal("0.1")
    )
    invoice = await build_invoice(ledger, tenant, "2026-10")
    assert invoice.lines[0].amount == Decimal("1")
    assert (invoice.subtotal, invoice.tax, invoice.total) == (
        Decimal("1"),
        Decimal("0"),
        Decimal("1"),
    )


@pytest.mark.parametrize(
    ("timezone", "last_november", "first_december"),
    [
        (
            "Asia/Shanghai",
            datetime(2026, 11, 30, 15, 59, tzinfo=UTC),
            datetime(2026, 11, 30, 16, 30, tzinfo=UTC),
        ),
        (
            "Asia/Kolkata",
            datetime(2026, 11, 30, 18, 29, tzinfo=UTC),
            datetime(2026, 11, 30, 18, 30, tzinfo=UTC),
        ),
        (
            "Asia/Kathmandu",
            datetime(2026, 11, 30, 18, 14, tzinfo=UTC),
            datetime(2026, 11, 30, 18, 15, tzinfo=UTC),
        ),
        (
            "America/New_York",
            datetime(2026, 12, 1, 4, 59, tzinfo=UTC),
            datetime(2026, 12, 1, 5, 0, tzinfo=UTC),
        ),
        (
            "UTC",
            datetime(2026, 11, 30, 23, 59, tzinfo=UTC),
            datetime(2026, 12, 1, 0, 0, tzinfo=UTC),
        ),
    ],
)
async def test_months_are_cut_in_the_tenant_time_zone(
    ledger: Ledger, timezone: str, last_november: datetime, first_december: datetime
) -> None:
    ledger.record(make_record("nov", last_november, usage=Usage(1, 0, 0, 0)))
    ledger.record(make_record("dec", first_december, usage=Usage(2, 0, 0, 0)))
    await ledger.flush()
    tenant = TenantBilling("acme", "Acme", timezone=timezone)
    november = await build_invoice(ledger, tenant, "2026-11")
    december = await build_invoice(ledger, tenant, "2026-12")
    assert [line.quantity for line in november.lines] == [1]
    assert [line.quantity for line in december.lines] == [2]


def test_month_buckets_are_whole_quarter_hours() -> None:
    first, end = month_buckets("2026-11", "Asia/Kathmandu")
    assert first == int(datetime(2026, 10, 31, 18, 15, tzinfo=UTC).timestamp())
    assert end == int(datetime(2026, 11, 30, 18, 15, tzinfo=UTC).timestamp())
    with pytest.raises(ValueError):
        month_buckets("2026-13", "UTC")


async def test_finalised_invoice_never_changes_and_late_usage_is_adjusted(ledger: Ledger) -> None:
    tenant = TenantBilling("acme", "Acme")
    ledger.record(make_record("on-time", OCT_10, usage=Usage(100, 0, 10, 0)))
    ledger.record(
        make_record("november", datetime(2026, 11, 2, tzinfo=UTC), usage=Usage(7, 0, 0, 0))
    )
    final = await finalize_invoice(ledger, tenant, "2026-10")
    assert final.status == "final"
    assert (await finalize_invoice(ledger, tenant, "2026-10")).to_dict() == final.to_dict()

    ledger.record(make_record("late", OCT_10, usage=Usage(5, 0, 3, 0)))
    await ledger.flush()
    again = await build_invoice(ledger, tenant, "2026-10")
    assert again.to_dict() == final.to_dict()  # the stored invoice, unchanged

    november = await build_invoice(ledger, tenant, "2026-11")
    adjustments = [line for line in november.lines if line.kind == "adjustment"]
    assert {(line.usage_month, line.token_kind, line.quantity) for line in adjustments} == {
        ("2026-10", "uncached_input", 5),
        ("2026-10", "output", 3),
    }
    assert (
        sum(line.amount_nanos for line in adjustments)
        == make_record("x", OCT_10, usage=Usage(5, 0, 3, 0)).cost_nanos
    )
    assert [line.quantity for line in november.lines if line.kind == "usage"] == [7]

    # Once November is finalised with the adjustment, December owes nothing more for October.
    await finalize_invoice(ledger, tenant, "2026-11", allow_open_period=True)
    december = await build_invoice(ledger, tenant, "2026-12")
    assert december.lines == []


async def test_an_open_month_cannot_be_finalised(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="has not ended"):
        await finalize_invoice(ledger, TenantBilling("acme", "Acme"), "2999-01")


async def test_off_peak_hours_at_a_local_month_boundary(ledger: Ledger) -> None:
    """DeepSeek-style off-peak (00:30-08:30 Beijing) around the first of December in
    Shanghai, still November 30 in UTC: each request is priced by its local hour and
    invoiced in its local month."""
    from tests.test_pricing import catalog

    prices = catalog()
    moments = {
        "nov-peak": datetime(2026, 11, 30, 15, 50, tzinfo=UTC),  # Nov 30 23:50 in Shanghai
        "dec-peak": datetime(2026, 11, 30, 16, 15, tzinfo=UTC),  # Dec 1 00:15
        "dec-off-peak": datetime(2026, 11, 30, 16, 45, tzinfo=UTC),  # Dec 1 00:45
    }
    for name, at in moments.items():
        quote = prices.quote("deepseek-chat", 10, at)
        unit = {"input": quote.input_nanos, "cached": quote.cached_nanos,
                "output": quote.output_nanos}  # fmt: skip
        ledger.record(make_record(name, at, model="deepseek-chat", version=quote.version,
                                  usage=Usage(1_000, 0, 100, 0), prices=unit))  # fmt: skip
    await ledger.flush()
    tenant = TenantBilling("acme", "Acme", timezone="Asia/Shanghai")
    november = await build_invoice(ledger, tenant, "2026-11")
    december = await build_invoice(ledger, tenant, "2026-12")
    assert usage_lines(november) == {
        ("deepseek-chat", "uncached_input"): (1_000, 270, Decimal("0.00")),
        ("deepseek-chat", "output"): (100, 1_100, Decimal("0.00")),
    }
    lines = sorted(
        (line.price_version.endswith("x0.5"), line.token_kind, line.quantity, line.unit_price_nanos)
        for line in december.lines
        if line.kind == "usage"
    )
    assert lines == [
        (False, "output", 100, 1_100),
        (False, "uncached_input", 1_000, 270),
        (True, "output", 100, 550),
        (True, "uncached_input", 1_000, 135),
    ]
