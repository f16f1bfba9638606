"""Ledger benchmark: ingest rate through `Ledger.record()` and invoice generation time for
one tenant-month holding 10 million ledger rows (synthetic, bulk-loaded in SQL).

    python bench/ledger_bench.py                         # SQLite, 10M-row invoice
    python bench/ledger_bench.py --postgres-url postgresql+asyncpg://user@127.0.0.1:5432/db
    python bench/ledger_bench.py --invoice-rows 1000000  # a quicker run

Ingest: records are built first, then recorded in a loop that yields to the event loop
every 100 records (as a busy server would), while the background writer commits batches;
the rate is records / (time from the first record() to the end of the final flush).
Invoice: raw rows are generated in SQL (a recursive CTE on SQLite, generate_series on
PostgreSQL) and their 15-minute rollups are built with one GROUP BY, as the ledger keeps
them; then `build_invoice` is timed (best and median of 5).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from billing.invoice import TenantBilling, build_invoice
from billing.ledger import ENTRIES, ROLLUPS, Ledger, LedgerConfig
from billing.record import UsageRecord
from billing.usage import Usage

MONTH = "2026-10"
MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_SECONDS = 31 * 24 * 3600
MODELS = ("gpt-sim", "deep-sim", "glm-sim", "qwen-sim")


def synthetic_records(count: int) -> list[UsageRecord]:
    records = []
    for index in range(count):
        usage = Usage(100 + index % 1000, index % 300, 50 + index % 500, index % 40)
        model = MODELS[index % len(MODELS)]
        records.append(
            UsageRecord(
                request_id=f"ingest-{index:012d}",
                started_at=MONTH_START + timedelta(milliseconds=137 * index),
                tenant_id=f"tenant-{index % 100}",
                key_id=f"key-{index % 1000}",
                model=model,
                endpoint="/v1/chat/completions",
                provider="simulated",
                usage=usage,
                price_version=f"{model}@2026-01-01T00:00Z",
                unit_price_input_nanos=2_000,
                unit_price_cached_nanos=500,
                unit_price_output_nanos=8_000,
                cost_nanos=usage.uncached_input * 2_000
                + usage.cached_input * 500
                + usage.output * 8_000,
                stream=index % 2 == 0,
                ttft_ms=120.5,
                duration_ms=900.25,
            )
        )
    return records


async def bench_ingest(url: str, journal: Path, count: int) -> float:
    records = synthetic_records(count)
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, journal_dir=journal))
    try:
        started = time.perf_counter()
        for index, record in enumerate(records, start=1):
            ledger.record(record)
            if index % 100 == 0:
                await asyncio.sleep(0)
        await ledger.flush()
        elapsed = time.perf_counter() - started
        async with ledger.engine.connect() as connection:
            stored = await connection.scalar(select(func.count()).select_from(ENTRIES))
        assert stored == count, (stored, count)
    finally:
        await ledger.aclose()
    return count / elapsed


# Raw rows: row i starts at MONTH_START + i * step seconds; model, price version and token
# counts are simple functions of i; prices are per model (list) and x0.8 (the plan).
_ROW_SQL = """
    'bulk-' || {i} AS request_id,
    {started_at} AS started_at,
    'bench' AS tenant_id,
    'key-' || ({i} % 50) AS key_id,
    CASE {i} % 4 WHEN 0 THEN 'gpt-sim' WHEN 1 THEN 'deep-sim' WHEN 2 THEN 'glm-sim'
        ELSE 'qwen-sim' END AS model,
    '/v1/chat/completions' AS endpoint,
    'simulated' AS provider,
    '' AS deployment,
    100 + {i} % 1000 AS uncached_input,
    {i} % 300 AS cached_input,
    50 + {i} % 500 AS output,
    {i} % 40 AS reasoning,
    'USD' AS currency,
    CASE WHEN {i} % 8 < 4 THEN 'v1' ELSE 'v1;off-peak' END AS price_version,
    (1 + {i} % 4) * 1600 AS unit_price_input_nanos,
    (1 + {i} % 4) * 400 AS unit_price_cached_nanos,
    (1 + {i} % 4) * 6400 AS unit_price_output_nanos,
    (1 + {i} % 4) * 2000 AS list_price_input_nanos,
    (1 + {i} % 4) * 500 AS list_price_cached_nanos,
    (1 + {i} % 4) * 8000 AS list_price_output_nanos,
    (1 + {i} % 4) * ((100 + {i} % 1000) * 1600 + ({i} % 300) * 400 + (50 + {i} % 500) * 6400)
        AS cost_nanos,
    (1 + {i} % 4) * ((100 + {i} % 1000) * 2000 + ({i} % 300) * 500 + (50 + {i} % 500) * 8000)
        AS list_cost_nanos,
    0 AS compute_cost_nanos,
    CASE WHEN {i} % 50 = 0 THEN 500 ELSE 200 END AS status_code,
    NULL AS error_type,
    {stream} AS stream,
    NULL AS stream_cut_by,
    1 AS attempts,
    150.0 AS ttft_ms,
    1000.0 AS duration_ms
"""

_ROLLUP_SQL = """
INSERT INTO usage_rollups
SELECT tenant_id, {bucket} AS bucket, model, deployment, price_version, currency,
       list_price_input_nanos, list_price_cached_nanos, list_price_output_nanos,
       count(*), sum(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END),
       sum(uncached_input), sum(cached_input), sum(output), sum(reasoning),
       sum(cost_nanos), sum(list_cost_nanos), sum(compute_cost_nanos)
FROM ledger_entries
GROUP BY tenant_id, {bucket}, model, deployment, price_version, currency,
         list_price_input_nanos, list_price_cached_nanos, list_price_output_nanos
"""


async def bulk_load(ledger: Ledger, rows: int) -> None:
    step = MONTH_SECONDS / rows
    start = int(MONTH_START.timestamp())
    postgres = ledger.engine.dialect.name == "postgresql"
    async with ledger.engine.begin() as connection:
        await connection.execute(text("DROP INDEX ix_ledger_entries_tenant_started"))
        if postgres:
            started_at = f"to_timestamp({start} + floor(i * {step}))::timestamp"
            select_rows = _ROW_SQL.format(i="i", started_at=started_at, stream="(i % 2 = 0)")
            await connection.execute(
                text(
                    f"INSERT INTO ledger_entries SELECT {select_rows}"
                    f" FROM generate_series(0, {rows - 1}) AS i"
                )
            )
            bucket = "(extract(epoch FROM started_at)::bigint / 900 * 900)"
        else:
            started_at = (
                f"strftime('%Y-%m-%d %H:%M:%S', {start} + CAST(i * {step} AS INTEGER),"
                " 'unixepoch') || '.000000'"
            )
            select_rows = _ROW_SQL.format(i="i", started_at=started_at, stream="(i % 2 = 0)")
            await connection.execute(
                text(
                    f"INSERT INTO ledger_entries WITH RECURSIVE seq(i) AS"
                    f" (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {rows - 1})"
                    f" SELECT {select_rows} FROM seq"
                )
            )
            bucket = "(CAST(strftime('%s', started_at) AS INTEGER) / 900 * 900)"
        await connection.execute(text(_ROLLUP_SQL.format(bucket=bucket)))
        await connection.execute(
            text(
                "CREATE INDEX ix_ledger_entries_tenant_started"
                " ON ledger_entries (tenant_id, started_at)"
            )
        )
    async with ledger.engine.begin() as connection:
        await connection.execute(text("ANALYZE"))


async def bench_invoice(url: str, journal: Path, rows: int) -> tuple[float, float, float]:
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, journal_dir=journal))
    try:
        loaded = time.perf_counter()
        await bulk_load(ledger, rows)
        load_seconds = time.perf_counter() - loaded
        async with ledger.engine.connect() as connection:
            assert await connection.scalar(select(func.count()).select_from(ENTRIES)) == rows
            rollup_rows = await connection.scalar(select(func.count()).select_from(ROLLUPS))
        tenant = TenantBilling("bench", "Bench Ltd")
        timings = []
        invoice = None
        for _ in range(5):
            started = time.perf_counter()
            invoice = await build_invoice(ledger, tenant, MONTH)
            timings.append(time.perf_counter() - started)
        assert invoice is not None
        requests = sum(line.quantity for line in invoice.lines if line.token_kind == "output")
        print(
            f"  loaded {rows:,} raw rows and {rollup_rows:,} rollup rows in {load_seconds:.0f} s;"
            f" invoice: {len(invoice.lines)} lines, total {invoice.total} USD,"
            f" {requests:,} output tokens"
        )
    finally:
        await ledger.aclose()
    return min(timings), statistics.median(timings), load_seconds


async def run(args: argparse.Namespace, workdir: Path) -> None:
    print(f"ledger benchmark ({os.cpu_count()} CPUs), work directory {workdir}")
    targets = [("sqlite", f"sqlite+aiosqlite:///{workdir / 'ingest.db'}")]
    if args.postgres_url:
        targets.append(("postgres", args.postgres_url))
    for name, url in targets:
        for attempt in range(args.repeat):
            if name == "postgres":
                await _reset_postgres(url)
            else:
                (workdir / "ingest.db").unlink(missing_ok=True)
            rate = await bench_ingest(url, workdir / f"journal-{name}", args.ingest_rows)
            print(
                f"ingest {name} run {attempt + 1}: {args.ingest_rows:,} records, {rate:,.0f} rows/s"
            )
    if args.invoice_rows:
        invoice_targets = [("sqlite", f"sqlite+aiosqlite:///{workdir / 'invoice.db'}")]
        if args.postgres_url:
            invoice_targets.append(("postgres", args.postgres_url))
        for name, url in invoice_targets:
            if name == "postgres":
                await _reset_postgres(url)
            else:
                (workdir / "invoice.db").unlink(missing_ok=True)
            best, median, _load = await bench_invoice(
                url, workdir / f"journal-{name}", args.invoice_rows
            )
            print(
                f"invoice {name}: one tenant-month of {args.invoice_rows:,} ledger rows:"
                f" best {best * 1000:.1f} ms, median {median * 1000:.1f} ms"
            )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


async def _reset_postgres(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as connection:  # every table, whatever the migrations added
        await connection.execute(text("DROP SCHEMA public CASCADE"))
        await connection.execute(text("CREATE SCHEMA public"))
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest-rows", type=int, default=200_000)
    parser.add_argument("--invoice-rows", type=int, default=10_000_000)
    parser.add_argument("--postgres-url", help="also benchmark this (emptied!) PostgreSQL DB")
    parser.add_argument("--repeat", type=int, default=3, help="ingest runs per database")
    parser.add_argument("--workdir", help="keep the databases here (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ledger-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args, workdir))


if __name__ == "__main__":
    main()
