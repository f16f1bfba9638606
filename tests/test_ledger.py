"""The usage ledger: idempotent writes, rollups in step with raw rows, usage by local day,
clean shutdown, pruning, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, func, select, text

from billing.invoice import TenantBilling, build_invoice
from billing.invoice_render import render_invoice
from billing.ledger import ENTRIES, ROLLUPS, Ledger, LedgerConfig, write_entries_postgres
from billing.record import UsageRecord
from billing.usage import Usage

PRICES = {"input": 2_000, "cached": 500, "output": 8_000}  # nano-units per token


@dataclass(slots=True)
class ListPricedRecord(UsageRecord):
    """A record carrying list unit prices (what the ledger stores for discount lines)."""

    list_unit_price_input_nanos: int | None = None
    list_unit_price_cached_nanos: int | None = None
    list_unit_price_output_nanos: int | None = None


def make_record(
    request_id: str,
    started_at: datetime,
    *,
    tenant: str = "acme",
    model: str = "gpt-sim",
    usage: Usage | None = None,
    version: str = "gpt-sim@2026-01-01T00:00Z",
    prices: dict[str, int] | None = None,
    list_prices: dict[str, int] | None = None,
    status_code: int = 200,
    error_type: str | None = None,
    stream: bool = False,
    stream_cut_by: str | None = None,
    currency: str = "USD",
) -> UsageRecord:
    """A record priced the way billing.pricing prices it (rule 2: integer arithmetic)."""
    usage = usage if usage is not None else Usage(100, 20, 50, 10)
    prices = prices or PRICES
    listed = list_prices or prices

    def cost(unit: dict[str, int]) -> int:
        return (
            usage.uncached_input * unit["input"]
            + usage.cached_input * unit["cached"]
            + usage.output * unit["output"]
        )

    return ListPricedRecord(
        request_id=request_id,
        started_at=started_at,
        tenant_id=tenant,
        key_id="key-1",
        model=model,
        endpoint="/v1/chat/completions",
        provider="simulated",
        usage=usage,
        currency=currency,
        price_version=version,
        unit_price_input_nanos=prices["input"],
        unit_price_cached_nanos=prices["cached"],
        unit_price_output_nanos=prices["output"],
        cost_nanos=cost(prices),
        list_cost_nanos=cost(listed),
        status_code=status_code,
        error_type=error_type,
        stream=stream,
        stream_cut_by=stream_cut_by,
        list_unit_price_input_nanos=listed["input"],
        list_unit_price_cached_nanos=listed["cached"],
        list_unit_price_output_nanos=listed["output"],
    )


def sqlite_config(tmp_path: Path, **overrides: Any) -> LedgerConfig:
    return LedgerConfig(
        url=f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", url_env=None, **overrides
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """An open ledger on SQLite, and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        config = sqlite_config(tmp_path)
    else:
        url = request.getfixturevalue("postgres_database")
        config = LedgerConfig(url=url, url_env=None, journal_dir=tmp_path / "journal")
    opened = await Ledger.open(config)
    yield opened
    await opened.aclose()


async def count_rows(ledger: Ledger, request_id: str | None = None) -> int:
    query = select(func.count()).select_from(ENTRIES)
    if request_id is not None:
        query = query.where(ENTRIES.c.request_id == request_id)
    async with ledger.engine.connect() as connection:
        return int(await connection.scalar(query) or 0)


async def table_sums(ledger: Ledger, table: Table) -> tuple[int, ...]:
    columns = ("uncached_input", "cached_input", "output", "reasoning", "cost_nanos")
    query = select(*(func.sum(table.c[name]) for name in columns))
    async with ledger.engine.connect() as connection:
        row = (await connection.execute(query)).one()
    return tuple(int(value or 0) for value in row)


NOV_3 = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)


async def test_same_request_id_twice_is_one_row(ledger: Ledger) -> None:
    first = make_record("req-dup", NOV_3, usage=Usage(10, 0, 5, 0))
    replay = make_record("req-dup", NOV_3, usage=Usage(999, 0, 999, 0))
    ledger.record(first)
    ledger.record(replay)  # same batch
    await ledger.flush()
    ledger.record(replay)  # a later batch
    await ledger.flush()
    assert await count_rows(ledger, "req-dup") == 1
    assert await table_sums(ledger, ROLLUPS) == (10, 0, 5, 0, first.cost_nanos)


async def test_rollups_equal_raw_sums(ledger: Ledger) -> None:
    for index in range(300):
        usage = Usage(index, index % 7, index % 13, index % 3)
        started = NOV_3 + timedelta(minutes=7 * index)
        model = "gpt-sim" if index % 2 else "deep-sim"
        ledger.record(make_record(f"req-{index}", started, usage=usage, model=model))
        if index % 50 == 0:
            ledger.record(make_record(f"req-{index // 2}", started))  # replays in the mix
        if index == 150:
            await ledger.flush()  # so that later replays meet rows already written
    await ledger.flush()
    assert await count_rows(ledger) == 300
    assert await table_sums(ledger, ROLLUPS) == await table_sums(ledger, ENTRIES)
    async with ledger.engine.connect() as connection:
        requests = await connection.scalar(select(func.sum(ROLLUPS.c.requests)))
    assert requests == 300


async def test_every_request_is_recorded_with_its_outcome(ledger: Ledger) -> None:
    ledger.record(make_record("ok", NOV_3))
    ledger.record(
        make_record("refused", NOV_3, usage=Usage(), status_code=429, error_type="rate_limit")
    )
    ledger.record(make_record("cut", NOV_3, stream=True, stream_cut_by="client"))
    await ledger.flush()
    async with ledger.engine.connect() as connection:
        rows = {row.request_id: row for row in (await connection.execute(select(ENTRIES))).all()}
    assert rows["refused"].cost_nanos == 0
    assert rows["refused"].status_code == 429
    assert rows["refused"].error_type == "rate_limit"
    assert rows["cut"].stream_cut_by == "client"
    assert rows["cut"].stream is True
    assert rows["ok"].key_id == "key-1"
    assert rows["ok"].started_at == datetime(2026, 11, 3, 12, 0)


async def test_usage_by_local_day_and_model(ledger: Ledger) -> None:
    # 2026-11-30T16:30Z is 2026-12-01 00:30 in Shanghai (+08:00).
    ledger.record(make_record("a", datetime(2026, 11, 30, 15, 59, tzinfo=UTC)))
    ledger.record(make_record("b", datetime(2026, 11, 30, 16, 30, tzinfo=UTC)))
    ledger.record(make_record("c", datetime(2026, 11, 30, 16, 30, tzinfo=UTC), tenant="other"))
    await ledger.flush()
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC)
    rows = await ledger.usage("acme", start, end, "Asia/Shanghai")
    assert [(row.day, row.requests) for row in rows] == [
        (date(2026, 11, 30), 1),
        (date(2026, 12, 1), 1),
    ]
    assert rows[0].cost_nanos == make_record("x", NOV_3).cost_nanos
    everyone = await ledger.usage(None, start, end, "UTC")
    assert {(row.tenant_id, row.day, row.requests) for row in everyone} == {
        ("acme", date(2026, 11, 30), 2),
        ("other", date(2026, 11, 30), 1),
    }


async def test_pruning_keeps_invoices(ledger: Ledger) -> None:
    for index in range(40):
        ledger.record(make_record(f"p-{index}", datetime(2026, 10, 1 + index % 28, tzinfo=UTC)))
    await ledger.flush()
    tenant = TenantBilling("acme", "Acme")
    before = render_invoice(await build_invoice(ledger, tenant, "2026-10"), "csv")
    assert await ledger.prune(datetime(2026, 10, 15, tzinfo=UTC)) == 26  # days 1-14
    assert await count_rows(ledger) == 14
    after = render_invoice(await build_invoice(ledger, tenant, "2026-10"), "csv")
    assert after == before
    assert await ledger.pruned_before() == datetime(2026, 10, 15)


async def test_clean_shutdown_flushes_everything(tmp_path: Path) -> None:
    config = sqlite_config(tmp_path, flush_interval_ms=60_000, batch_size=100_000)
    ledger = await Ledger.open(config)
    for index in range(500):
        ledger.record(make_record(f"s-{index}", NOV_3))
    assert ledger.queue_depth == 500
    await asyncio.sleep(0.05)
    assert ledger.lag_seconds >= 0.05
    await ledger.aclose()
    assert list(config.resolved_journal_dir().glob("*.jsonl")) == []
    reopened = await Ledger.open(config)
    try:
        assert await count_rows(reopened) == 500
        assert reopened.queue_depth == 0 and reopened.lag_seconds == 0.0
    finally:
        await reopened.aclose()


async def test_background_writer_commits_without_flush(tmp_path: Path) -> None:
    ledger = await Ledger.open(sqlite_config(tmp_path, flush_interval_ms=20))
    try:
        ledger.record(make_record("bg", NOV_3))
        for _ in range(100):
            if await count_rows(ledger) == 1:
                break
            await asyncio.sleep(0.02)
        assert await count_rows(ledger) == 1
        assert ledger.queue_depth == 0
    finally:
        await ledger.aclose()


def _head_revision() -> str:
    """The newest migration in billing/store/migrations/versions, read from the files."""
    from alembic.script import ScriptDirectory

    import billing.store.migrations

    scripts = ScriptDirectory(str(Path(billing.store.migrations.__file__).parent))
    heads = scripts.get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return str(heads[0])


async def test_migrations_bring_the_schema_to_head(tmp_path: Path) -> None:
    ledger = await Ledger.open(sqlite_config(tmp_path))
    try:
        async with ledger.engine.connect() as connection:
            version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
        assert version == _head_revision()
    finally:
        await ledger.aclose()


def test_env_url_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MAAS_LEDGER_URL", f"sqlite+aiosqlite:///{tmp_path}/env.db")
    config = LedgerConfig()
    assert config.resolved_url().endswith("/env.db")
    assert config.resolved_journal_dir() == tmp_path / "env.journal"


async def test_gateways_writing_the_same_rollups_at_once_do_not_deadlock(
    postgres_database: str, tmp_path: Path
) -> None:
    """Two gateways' writers commit batches touching the same rollup rows, met in opposite
    orders; PostgreSQL must not abort either as a deadlock, and the rollups add up."""
    config = LedgerConfig(url=postgres_database, url_env=None, journal_dir=tmp_path / "j")
    ledger = await Ledger.open(config)
    try:
        tenants = [f"tenant-{index:03d}" for index in range(300)]
        for round_ in range(4):
            forward = [
                make_record(f"f{round_}-{tenant}", NOV_3, tenant=tenant) for tenant in tenants
            ]
            backward = [
                make_record(f"b{round_}-{tenant}", NOV_3, tenant=tenant)
                for tenant in reversed(tenants)
            ]
            written = await asyncio.gather(
                write_entries_postgres(ledger.engine, forward),
                write_entries_postgres(ledger.engine, backward),
            )
            assert written == [300, 300]
        assert await count_rows(ledger) == 2400
        assert await table_sums(ledger, ROLLUPS) == await table_sums(ledger, ENTRIES)
    finally:
        await ledger.aclose()
