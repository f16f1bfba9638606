"""Reconciliation: after a mixed month (streams and not, cached input, errors, refusals,
client disconnects, upstream cuts, off-peak and tiered prices, a plan discount) the usage
callers were told = the ledger = the rollups = the invoice lines, exactly, and the report
shows no difference; a tampered rollup or a foreign currency is reported."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from billing.invoice import TenantBilling, build_invoice, finalize_invoice
from billing.ledger import Ledger, LedgerConfig
from billing.reconcile import reconcile
from billing.record import UsageRecord
from billing.store.schema import ENTRIES, ROLLUPS
from billing.usage import Usage
from tests.test_ledger import make_record, sqlite_config

LIST = {"input": 2_000, "cached": 500, "output": 8_000}
OFF_PEAK = {"input": 1_000, "cached": 250, "output": 4_000}
LONG_TIER = {"input": 4_000, "cached": 1_000, "output": 12_000}


def plan(prices: dict[str, int]) -> dict[str, int]:
    return {kind: price * 9 // 10 for kind, price in prices.items()}


def mixed_month(tenant: str, start: datetime) -> list[UsageRecord]:
    """A month of varied traffic, each record as the gateway would have told its caller."""
    records: list[UsageRecord] = []
    for index in range(400):
        started = start + timedelta(minutes=97 * index)
        kind = index % 8
        version, listed = "gpt-sim@2026-01-01T00:00Z", LIST
        if kind == 1:
            version, listed = "gpt-sim@2026-01-01T00:00Z;off-peak x0.5", OFF_PEAK
        elif kind == 2:
            version, listed = "gpt-sim@2026-01-01T00:00Z;tier 2", LONG_TIER
        usage = Usage(300 + index, (index * 37) % 200, 40 + index % 90, index % 11)
        options: dict[str, object] = {"stream": index % 2 == 0}
        if kind == 3:  # the client hung up: prompt + delivered tokens
            options |= {"stream": True, "stream_cut_by": "client", "status_code": 200}
        elif kind == 4:  # the upstream failed mid-stream: what reached the client
            options |= {"stream": True, "stream_cut_by": "upstream", "error_type": "upstream"}
        elif kind == 5:  # refused before forwarding: recorded, free
            usage = Usage()
            options |= {"status_code": 429, "error_type": "rate_limit_exceeded"}
        elif kind == 6:  # an upstream error before any output: error text is never billed
            usage = Usage(0, 0, 0, 0)
            options |= {"status_code": 502, "error_type": "upstream_error"}
        records.append(
            make_record(
                f"{tenant}-{index}",
                started,
                tenant=tenant,
                model="gpt-sim" if index % 3 else "deep-sim",
                usage=usage,
                version=version,
                prices=plan(listed),
                list_prices=listed,
                **options,  # type: ignore[arg-type]
            )
        )
    return records


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        config = sqlite_config(tmp_path)
    else:
        url = request.getfixturevalue("postgres_database")
        config = LedgerConfig(url=url, url_env=None, journal_dir=tmp_path / "journal")
    opened = await Ledger.open(config)
    yield opened
    await opened.aclose()


TENANTS = [
    TenantBilling("acme", "Acme", timezone="Asia/Kolkata", tax_rate=Decimal("0.18")),
    TenantBilling("globex", "Globex", timezone="America/Los_Angeles"),
]


async def test_mixed_month_agrees_everywhere(ledger: Ledger) -> None:
    told: dict[str, list[UsageRecord]] = {}
    for tenant in TENANTS:
        zone_start = datetime(2026, 10, 1, 12, tzinfo=UTC)
        told[tenant.tenant_id] = mixed_month(tenant.tenant_id, zone_start)
        for record in told[tenant.tenant_id]:
            ledger.record(record)
            ledger.record(record)  # a retry of the write never doubles anything
    report = await reconcile(ledger, TENANTS, "2026-10")
    assert report.ok, str(report)
    assert report.differences == [] and report.pending == []

    for tenant in TENANTS:
        records = [r for r in told[tenant.tenant_id] if r.started_at.month == 10]
        invoice = await build_invoice(ledger, tenant, "2026-10")
        for kind in ("uncached_input", "cached_input", "output"):
            told_tokens = sum(getattr(r.usage, kind) for r in records)
            invoiced = sum(line.quantity for line in invoice.lines if line.token_kind == kind)
            assert invoiced == told_tokens
        assert invoice.exact_nanos == sum(r.cost_nanos for r in records)
        async with ledger.engine.connect() as connection:
            ledger_cost = await connection.scalar(
                select(func.sum(ENTRIES.c.cost_nanos)).where(
                    ENTRIES.c.tenant_id == tenant.tenant_id
                )
            )
        assert ledger_cost == sum(r.cost_nanos for r in told[tenant.tenant_id])
        assert any(line.kind == "discount" for line in invoice.lines)
    assert "OK, no differences" in str(report)


async def test_a_tampered_rollup_is_reported(ledger: Ledger) -> None:
    for record in mixed_month("acme", datetime(2026, 10, 1, 12, tzinfo=UTC)):
        ledger.record(record)
    assert (await reconcile(ledger, TENANTS[:1], "2026-10")).ok
    async with ledger.engine.begin() as connection:
        bucket = await connection.scalar(
            select(func.min(ROLLUPS.c.bucket)).where(ROLLUPS.c.model == "gpt-sim")
        )
        await connection.execute(
            update(ROLLUPS)
            .where(ROLLUPS.c.bucket == bucket, ROLLUPS.c.model == "gpt-sim")
            .values(cost_nanos=ROLLUPS.c.cost_nanos + 1)
        )
    report = await reconcile(ledger, TENANTS[:1], "2026-10")
    assert not report.ok
    [difference] = report.differences
    assert difference.check == "ledger rows vs rollups"
    assert difference.key == "USD gpt-sim cost_nanos"
    assert difference.actual - difference.expected == 1
    assert "DIFFERENCE" in str(report)


async def test_foreign_currency_usage_is_reported(ledger: Ledger) -> None:
    ledger.record(make_record("eur", datetime(2026, 10, 5, tzinfo=UTC), currency="EUR"))
    report = await reconcile(ledger, TENANTS[:1], "2026-10")
    assert [d.check for d in report.differences] == ["usage in a currency other than USD"]


async def test_late_usage_after_finalisation_is_pending_not_wrong(ledger: Ledger) -> None:
    tenant = TenantBilling("acme", "Acme")
    ledger.record(make_record("a", datetime(2026, 10, 5, tzinfo=UTC)))
    await finalize_invoice(ledger, tenant, "2026-10")
    ledger.record(make_record("late", datetime(2026, 10, 6, tzinfo=UTC)))
    report = await reconcile(ledger, [tenant], "2026-10")
    assert report.ok
    assert {d.key for d in report.pending} >= {"USD gpt-sim cost_nanos"}
    await finalize_invoice(ledger, tenant, "2026-11", allow_open_period=True)
    assert (await reconcile(ledger, [tenant], "2026-10")).pending == []


async def test_pruned_months_reconcile_through_rollups(ledger: Ledger) -> None:
    for record in mixed_month("acme", datetime(2026, 10, 1, 12, tzinfo=UTC)):
        ledger.record(record)
    await ledger.flush()
    await ledger.prune(datetime(2026, 11, 1, tzinfo=UTC))
    report = await reconcile(ledger, TENANTS[:1], "2026-10")
    assert report.ok, str(report)
    assert any("pruned" in note for note in report.notes)
