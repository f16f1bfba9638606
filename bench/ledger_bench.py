"""Ledger benchmark: ingest rate through `Ledger.record()` and invoice generation time for
one tenant-month holding 10 million ledger rows (synthetic, bulk-loaded in SQL).

    python bench/ledger_bench.py                         # SQLite, 10M-row invoice
    python bench/ledger_bench.py --postgres-url postgresql+asyncpg://user@127.0.0.1:5432/db
    python bench/ledger_bench.py --invoice-rows 1000000  # a quicker run
    python bench/ledger_bench.py --prefill 10000000      # write cost: fresh vs 10M rows
    python bench/ledger_bench.py --prefill 10000000 --baseline  # the same, writer as before
    python bench/ledger_bench.py --initdb --postgres-only --prefill 10000000
    python bench/ledger_bench.py --initdb --ceiling-seconds 15  # one PostgreSQL's ceiling

Ingest: records are built first, then recorded in a loop that yields to the event loop
every 100 records (as a busy server would), while the background writer commits batches;
the rate is records / (time from the first record() to the end of the final flush).
Invoice: raw rows are generated in SQL (a recursive CTE on SQLite, generate_series on
PostgreSQL) and their 15-minute rollups are built with one GROUP BY, as the ledger keeps
them; then `build_invoice` is timed (best and median of 5).
Write cost (`--prefill N`): a ledger of N realistic rows is bulk-loaded in SQL (minutes for
10 million), then batches of new records go through the real writer on a fresh ledger and on
the prefilled one; the medians per request of wall time, process CPU and bytes read/written
(PostgreSQL: WAL bytes) are printed, with the ledger's bytes per row. Ceiling
(`--ceiling-seconds`): rows/s that 1, 2, 4 concurrent writers get into one PostgreSQL.
`--initdb` starts a throwaway PostgreSQL with production durability for any of these.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import billing.ledger
from billing.ids import new_request_id
from billing.invoice import TenantBilling, build_invoice
from billing.journal import encode_record
from billing.ledger import (
    ENTRIES,
    ROLLUPS,
    Ledger,
    LedgerConfig,
    SqliteWriter,
    create_ledger_engine,
    sqlite_file,
    write_entries_postgres,
)
from billing.record import GATEWAY_DIED, UsageRecord
from billing.usage import Usage

MONTH = "2026-10"
MONTH_START = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_SECONDS = 31 * 24 * 3600
MODELS = ("gpt-sim", "deep-sim", "glm-sim", "qwen-sim")


def synthetic_records(count: int, tenants: int = 100) -> list[UsageRecord]:
    records = []
    for index in range(count):
        usage = Usage(100 + index % 1000, index % 300, 50 + index % 500, index % 40)
        model = MODELS[index % len(MODELS)]
        records.append(
            UsageRecord(
                request_id=new_request_id(),
                started_at=MONTH_START + timedelta(milliseconds=137 * index),
                tenant_id=f"tenant-{index % tenants}",
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
    {request_id} AS request_id,
    {started_at} AS started_at,
    {tenant} AS tenant_id,
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
            select_rows = _ROW_SQL.format(
                i="i",
                request_id="'bulk-' || i",
                started_at=started_at,
                tenant="'bench'",
                stream="(i % 2 = 0)",
            )
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
            select_rows = _ROW_SQL.format(
                i="i",
                request_id="'bulk-' || i",
                started_at=started_at,
                tenant="'bench'",
                stream="(i % 2 = 0)",
            )
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


# -- a ledger at scale: prefill, then the write cost per request -------------------------

PREFILL_TENANTS = 100
PREFILL_DAYS = 30


def _prefill_row_sql(postgres: bool, ids: str, start_ms: int, step_ms: float) -> str:
    """One SELECT list of a realistic ledger row for sequence number `i` (SQL)."""
    ms = f"({start_ms} + CAST(i * {step_ms} AS BIGINT))"
    if postgres:
        started_at = f"(timestamp 'epoch' + {ms} * interval '1 millisecond')"
        if ids == "ordered":  # the layout of billing.ids: ms timestamp, '7', random
            request_id = (
                f"'req_' || lpad(to_hex({ms}), 12, '0') || '7'"
                " || substr(md5(random()::text), 1, 19)"
            )
        else:
            request_id = "'req_' || md5(random()::text)"
        tenant = f"'tenant-' || (i % {PREFILL_TENANTS})"
        stream = "(i % 2 = 0)"
    else:
        started_at = (
            f"strftime('%Y-%m-%d %H:%M:%S', {ms} / 1000, 'unixepoch')"
            f" || printf('.%06d', ({ms} % 1000) * 1000)"
        )
        if ids == "ordered":
            request_id = (
                f"'req_' || printf('%012x', {ms}) || '7'"
                " || substr(lower(hex(randomblob(10))), 1, 19)"
            )
        else:
            request_id = "'req_' || lower(hex(randomblob(16)))"
        tenant = f"'tenant-' || (i % {PREFILL_TENANTS})"
        stream = "(i % 2 = 0)"
    return _ROW_SQL.format(
        i="i", request_id=request_id, started_at=started_at, tenant=tenant, stream=stream
    )


def _prefill_window(rows: int) -> tuple[int, float]:
    """Rows spread evenly over the 30 days ending an hour ago: (first ms, ms per row)."""
    end_ms = int(time.time() * 1000) - 3_600_000
    start_ms = end_ms - PREFILL_DAYS * 86_400_000
    return start_ms, PREFILL_DAYS * 86_400_000 / rows


async def _migrated(url: str, journal: Path) -> None:
    ledger = await Ledger.open(LedgerConfig(url=url, url_env=None, journal_dir=journal))
    await ledger.aclose()


def prefill_sqlite(path: Path, rows: int, ids: str) -> float:
    """Bulk-load `rows` realistic rows with their rollups into a migrated SQLite ledger."""
    started = time.perf_counter()
    start_ms, step_ms = _prefill_window(rows)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=OFF")  # a bulk load: nothing to recover
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-2000000")
        connection.execute("BEGIN")
        connection.execute("DROP INDEX ix_ledger_entries_tenant_started")
        select_rows = _prefill_row_sql(False, ids, start_ms, step_ms)
        connection.execute(
            f"INSERT INTO ledger_entries WITH RECURSIVE seq(i) AS"
            f" (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < {rows - 1})"
            f" SELECT {select_rows} FROM seq"
        )
        bucket = "(CAST(strftime('%s', started_at) AS INTEGER) / 900 * 900)"
        connection.execute(_ROLLUP_SQL.format(bucket=bucket))
        connection.execute(
            "CREATE INDEX ix_ledger_entries_tenant_started"
            " ON ledger_entries (tenant_id, started_at)"
        )
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()
    return time.perf_counter() - started


async def prefill_postgres(url: str, rows: int, ids: str) -> float:
    """Bulk-load `rows` realistic rows with their rollups into a migrated PostgreSQL ledger."""
    from sqlalchemy.ext.asyncio import create_async_engine

    started = time.perf_counter()
    start_ms, step_ms = _prefill_window(rows)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("DROP INDEX ix_ledger_entries_tenant_started"))
            select_rows = _prefill_row_sql(True, ids, start_ms, step_ms)
            await connection.execute(
                text(
                    f"INSERT INTO ledger_entries SELECT {select_rows}"
                    f" FROM generate_series(0, {rows - 1}) AS i"
                )
            )
            bucket = "(extract(epoch FROM started_at)::bigint / 900 * 900)"
            await connection.execute(text(_ROLLUP_SQL.format(bucket=bucket)))
            await connection.execute(
                text(
                    "CREATE INDEX ix_ledger_entries_tenant_started"
                    " ON ledger_entries (tenant_id, started_at)"
                )
            )
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE"))
            await connection.execute(text("CHECKPOINT"))
    finally:
        await engine.dispose()
    return time.perf_counter() - started


def live_records(count: int, ids: str) -> list[UsageRecord]:
    """Records as the gateway makes them now: 100 tenants, 4 models, new request ids."""
    now = datetime.now(UTC)
    records = synthetic_records(count, tenants=PREFILL_TENANTS)
    for index, record in enumerate(records):
        record.request_id = new_request_id() if ids == "ordered" else _uuid4_id()
        record.started_at = now + timedelta(microseconds=index)
    return records


def _io_bytes() -> tuple[int, int]:
    """Bytes this process has read and written through system calls (Linux), else zeros."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        return 0, 0
    return int(fields["rchar"]), int(fields["wchar"])


async def write_cost(
    url: str, batches: int, batch_size: int, ids: str, varied: bool = False
) -> tuple[float, float, float, float]:
    """The real writer's cost per request: wall µs, this process's CPU µs, and bytes this
    process read and wrote through system calls (SQLite's page reads, WAL, checkpoints);
    on PostgreSQL, 0 and the bytes of WAL the server generated (full-page images included).

    `batches` batches of `batch_size` new records go through the writer `Ledger` uses
    (`SqliteWriter` or `write_entries_postgres`), one transaction each, with rollups;
    `varied`: batches of 50 to 250 records instead (a fixed random sequence), as a gateway's
    flushes are at a few thousand requests a second.
    """
    rng = random.Random(7)
    sizes = [rng.randint(50, 250) if varied else batch_size for _ in range(batches)]
    records = live_records(sum(sizes), ids)
    db_file = sqlite_file(url)
    writer = SqliteWriter(db_file) if db_file is not None else None
    engine = None if writer is not None else create_ledger_engine(url)
    try:
        read_before, written_before = _io_bytes()
        if engine is not None:
            written_before = await _wal_position(engine)
        wall = time.perf_counter()
        cpu = time.process_time()
        starts = itertools.accumulate(sizes, initial=0)
        for start, size in zip(starts, sizes, strict=False):
            batch = records[start : start + size]
            if writer is not None:
                written = await writer.write(batch)
            else:
                assert engine is not None
                written = await write_entries_postgres(engine, batch)
            assert written == len(batch), (written, len(batch))
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        read_after, written_after = _io_bytes()
        if engine is not None:
            read_after, written_after = read_before, await _wal_position(engine)
    finally:
        if writer is not None:
            await writer.close()
        if engine is not None:
            await engine.dispose()
    rows = len(records)
    return (
        wall / rows * 1e6,
        cpu / rows * 1e6,
        (read_after - read_before) / rows,
        (written_after - written_before) / rows,
    )


async def _wal_position(engine: Any) -> int:
    async with engine.connect() as connection:
        return int(
            await connection.scalar(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))
        )


async def ledger_size(url: str) -> dict[str, int]:
    """Rows, rollup rows and bytes (table, indexes) of a ledger database."""
    db_file = sqlite_file(url)
    if db_file is not None:
        with contextlib.closing(sqlite3.connect(db_file)) as connection:
            rows = connection.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]
            rollups = connection.execute("SELECT count(*) FROM usage_rollups").fetchone()[0]
            try:
                by_name = dict(
                    connection.execute(
                        "SELECT name, sum(pgsize) FROM dbstat GROUP BY name"
                    ).fetchall()
                )
            except sqlite3.Error:  # no dbstat in this SQLite build
                by_name = {}
        index_names = ("sqlite_autoindex_ledger_entries_1", "ix_ledger_entries_tenant_started")
        return {
            "rows": rows,
            "rollup_rows": rollups,
            "file_bytes": db_file.stat().st_size,
            "entries_table_bytes": by_name.get("ledger_entries", 0),
            "entries_index_bytes": sum(by_name.get(name, 0) for name in index_names),
            "rollups_bytes": sum(v for k, v in by_name.items() if "usage_rollups" in k),
        }
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.scalar(text("SELECT count(*) FROM ledger_entries"))
            rollups = await connection.scalar(text("SELECT count(*) FROM usage_rollups"))
            table = await connection.scalar(text("SELECT pg_table_size('ledger_entries')"))
            indexes = await connection.scalar(text("SELECT pg_indexes_size('ledger_entries')"))
            rollup_bytes = await connection.scalar(
                text("SELECT pg_total_relation_size('usage_rollups')")
            )
            database = await connection.scalar(text("SELECT pg_database_size(current_database())"))
    finally:
        await engine.dispose()
    return {
        "rows": int(rows or 0),
        "rollup_rows": int(rollups or 0),
        "file_bytes": int(database or 0),
        "entries_table_bytes": int(table or 0),
        "entries_index_bytes": int(indexes or 0),
        "rollups_bytes": int(rollup_bytes or 0),
    }


def _remove_sqlite(db_file: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db_file) + suffix).unlink(missing_ok=True)


def _print_size(name: str, size: dict[str, int]) -> None:
    rows = size["rows"]
    if not rows:
        return
    print(
        f"  {name}: {size['rows']:,} rows, {size['rollup_rows']:,} rollup rows;"
        f" {size['file_bytes'] / 2**20:,.0f} MiB in all;"
        f" per row: {size['entries_table_bytes'] / rows:.0f} B table"
        f" + {size['entries_index_bytes'] / rows:.0f} B indexes"
        f" (+ rollups {size['rollups_bytes'] / rows:.1f} B)"
    )


def journal_bytes_per_request() -> tuple[int, int]:
    """Bytes one request writes to the crash journal: (provisional, final) record lines."""
    final = live_records(1, "ordered")[0]
    provisional = live_records(1, "ordered")[0]
    provisional.error_type = GATEWAY_DIED
    provisional.status_code = 500
    return len(encode_record(provisional)), len(encode_record(final))


async def bench_scale(args: argparse.Namespace, workdir: Path) -> None:
    """Write cost per request on a fresh ledger and on one of `--prefill` rows."""
    provisional, final = journal_bytes_per_request()
    print(
        f"journal bytes per request: {provisional} (provisional, at admission)"
        f" + {final} (final record) = {provisional + final}"
    )
    targets: list[tuple[str, str, str]] = []
    for label, rows in (("fresh", 0), (f"{args.prefill:,} rows", args.prefill)):
        path = workdir / f"scale-{args.ids}-{rows}.db"
        if not args.postgres_only:
            targets.append(("sqlite", label, f"sqlite+aiosqlite:///{path}"))
    if args.postgres_url:
        targets.append(("postgres", "fresh", args.postgres_url))
        targets.append(("postgres", f"{args.prefill:,} rows", args.postgres_url))
    prepared: set[str] = set()
    for engine_name, label, url in targets:
        rows = 0 if label == "fresh" else args.prefill
        db_file = sqlite_file(url)
        journal = workdir / f"journal-scale-{engine_name}"
        if db_file is not None:
            if not (db_file.exists() and args.reuse):
                _remove_sqlite(db_file)
                await _migrated(url, journal)
                if rows:
                    seconds = prefill_sqlite(db_file, rows, args.ids)
                    print(f"  prefilled sqlite with {rows:,} rows in {seconds:.0f} s")
        elif (url, rows) not in prepared:
            await _reset_postgres(url)
            await _migrated(url, journal)
            if rows:
                seconds = await prefill_postgres(url, rows, args.ids)
                print(f"  prefilled postgres with {rows:,} rows in {seconds:.0f} s")
        prepared.add(url)
        before = await ledger_size(url)
        walls, cpus, reads, writes = [], [], [], []
        for _ in range(args.write_repeat):
            wall, cpu, read, written = await write_cost(
                url, args.write_batches, 1000, args.ids, args.varied_batches
            )
            walls.append(wall)
            cpus.append(cpu)
            reads.append(read)
            writes.append(written)
        after = await ledger_size(url)
        print(
            f"write cost {engine_name}, {label} ({args.ids} ids"
            f"{', baseline writer' if args.baseline else ''}):"
            f" median {statistics.median(walls):.1f} µs wall,"
            f" {statistics.median(cpus):.1f} µs CPU of this process,"
            + (
                f" {statistics.median(writes):,.0f} B of WAL per request"
                if engine_name == "postgres"
                else f" {statistics.median(reads):,.0f} B read + {statistics.median(writes):,.0f}"
                " B written by it per request"
            )
            + f" (runs: {', '.join(f'{w:.1f}' for w in walls)} µs wall;"
            f" {args.write_batches} batches of "
            + ("50 to 250" if args.varied_batches else "1000")
            + " each)"
        )
        _print_size("size before the writes", before)
        added = max(1, after["rows"] - before["rows"])
        print(
            f"  the writes added {after['rows'] - before['rows']:,} rows,"
            f" {after['rollup_rows'] - before['rollup_rows']:,} rollup rows"
            f" ({(after['rollup_rows'] - before['rollup_rows']) / added:.3f} per request),"
            f" {(after['file_bytes'] - before['file_bytes']) / added:.0f} bytes per request"
        )


async def bench_ceiling(url: str, writers: int, seconds: float, ids: str) -> float:
    """Rows/s that `writers` concurrent connections get into one PostgreSQL through the real
    writer (`write_entries_postgres`: batched idempotent inserts plus their rollups)."""
    engine = create_ledger_engine(url)
    pools = [live_records(1000, ids) for _ in range(writers)]
    done = 0
    stop = time.perf_counter() + seconds

    async def writer(pool: list[UsageRecord]) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            now = datetime.now(UTC)
            for record in pool:  # new requests (the writer has made its rows already)
                record.request_id = new_request_id() if ids == "ordered" else _uuid4_id()
                record.started_at = now
            done += await write_entries_postgres(engine, pool)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(writer(pool) for pool in pools))
        elapsed = time.perf_counter() - started
    finally:
        await engine.dispose()
    return done / elapsed


def _uuid4_id() -> str:
    return "req_" + uuid.uuid4().hex  # the request ids before billing.ids


async def run(args: argparse.Namespace, workdir: Path) -> None:
    print(f"ledger benchmark ({os.cpu_count()} CPUs), work directory {workdir}")
    if args.prefill:
        await bench_scale(args, workdir)
        return
    if args.ceiling_seconds:
        if not args.postgres_url:
            raise SystemExit("--ceiling-seconds needs a PostgreSQL (--postgres-url or --initdb)")
        await _reset_postgres(args.postgres_url)
        await _migrated(args.postgres_url, workdir / "journal-ceiling")
        for writers in args.ceiling_writers:
            rates = [
                await bench_ceiling(args.postgres_url, writers, args.ceiling_seconds, args.ids)
                for _ in range(args.repeat)
            ]
            print(
                f"postgres ingest ceiling, {writers} writer connection(s):"
                f" median {statistics.median(rates):,.0f} rows/s"
                f" (runs: {', '.join(f'{rate:,.0f}' for rate in rates)})"
            )
        return
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
    parser.add_argument(
        "--initdb",
        action="store_true",
        help="start a throwaway PostgreSQL (initdb in a temp dir, fsync on) and use it",
    )
    parser.add_argument("--repeat", type=int, default=3, help="ingest runs per database")
    parser.add_argument("--workdir", help="keep the databases here (default: a temp dir)")
    parser.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="measure the write cost per request on a fresh ledger and on one of this many rows",
    )
    parser.add_argument(
        "--ids",
        choices=("ordered", "random"),
        default="ordered",
        help="request ids: time-ordered (billing.ids, the default) or random (uuid4, as before)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="the writer as before billing.ids: random ids and SQLite's default page cache,"
        " memory map and checkpoint interval",
    )
    parser.add_argument("--write-batches", type=int, default=100, help="1000-row batches per run")
    parser.add_argument(
        "--varied-batches",
        action="store_true",
        help="write batches of 50 to 250 rows (as a gateway flushes) instead of 1000",
    )
    parser.add_argument("--write-repeat", type=int, default=3, help="write-cost runs per ledger")
    parser.add_argument("--postgres-only", action="store_true", help="--prefill: skip SQLite")
    parser.add_argument("--reuse", action="store_true", help="reuse prefilled SQLite files")
    parser.add_argument(
        "--ceiling-seconds",
        type=float,
        default=0,
        help="measure one PostgreSQL's ingest ceiling for this long per run",
    )
    parser.add_argument(
        "--ceiling-writers",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 2, 4],
        help="concurrent writer connections, e.g. 1,2,4",
    )
    args = parser.parse_args()
    if args.baseline:
        args.ids = "random"
        billing.ledger._SQLITE_WRITER_PRAGMAS = ()  # the writer before this change
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ledger-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.initdb:
            args.postgres_url = stack.enter_context(durable_postgres())
        try:
            asyncio.run(run(args, workdir))
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def durable_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL with production durability (fsync, synchronous_commit and
    full_page_writes on), `shared_buffers=1GB`, `max_wal_size=8GB`; yields its URL."""
    from tests.fixtures.postgres_server import PostgresServer, find_postgres_bin

    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise SystemExit("--initdb needs PostgreSQL's initdb and postgres")
    base = Path(
        tempfile.mkdtemp(prefix="ledger-bench-pg-")
    )  # in /tmp: the server user can reach it
    server = PostgresServer(bin_dir, base, durable=True)
    server.start()
    try:
        server.create_database("bench")
        yield server.url("bench")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
