"""The usage ledger: one row per request, written in batches off the request path.

`Ledger.admit` journals a provisional record for a request the moment it is admitted: the
row the crash policy gives it (`closed_by_crash`) should the process die before the real
outcome is known. `Ledger.record` appends the final record to the crash journal
(`billing.journal`) and queues it;
a background task writes queued records to the database in batches, one transaction per
batch, inserting each request id at most once and adding only the rows actually inserted
to the 15-minute rollups in the same transaction. Only then is the journal trimmed (the
provisional records of requests still in flight are written again into each new segment, so
trimming never drops one). On open, segments left by a stopped process are replayed the same
idempotent way, a final record winning over a provisional one, so a crash at any point
leaves every admitted request in the ledger exactly once.

SQLite (the embedded default) and PostgreSQL run the same code; the schema is migrated to
the newest Alembic revision on open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel
from sqlalchemy import Table, delete, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.journal import Journal
from billing.money import format_amount
from billing.record import GATEWAY_DIED, UsageRecord
from billing.store.engine import bucket_of, dialect_insert, naive_utc, sqlite_file
from billing.store.migrations import upgrade
from billing.store.schema import (
    BUCKET_SECONDS,
    ENTRIES,
    ROLLUP_KEY,
    ROLLUP_SUMS,
    ROLLUPS,
    STATE,
)
from billing.store.usage import rollup_sums

log = logging.getLogger(__name__)

_USAGE_SUMS = ROLLUP_SUMS.index("list_cost_nanos")  # the sums a `UsageRow` carries
PRUNED_BEFORE_KEY = "pruned_before"
_RETENTION_CHECK_SECONDS = 3600.0


class LedgerConfig(BaseModel):
    """Where the ledger lives and how it batches.

    `url` is an SQLAlchemy async URL (`sqlite+aiosqlite:///path.db` or
    `postgresql+asyncpg://user:pass@host/db`); the environment variable named by `url_env`
    wins when it is set. `journal_dir` defaults to `<db stem>.journal/` beside an SQLite
    file, else `./var/journal`.
    """

    url: str = "sqlite+aiosqlite:///maas-ledger.db"
    url_env: str | None = "MAAS_LEDGER_URL"
    journal_dir: Path | None = None
    batch_size: int = 1000
    flush_interval_ms: int = 100
    retention_days: int | None = None

    def resolved_url(self) -> str:
        if self.url_env and os.environ.get(self.url_env):
            return os.environ[self.url_env]
        return self.url

    def resolved_journal_dir(self) -> Path:
        if self.journal_dir is not None:
            return self.journal_dir
        db_file = sqlite_file(self.resolved_url())
        if db_file is not None:
            return db_file.with_name(db_file.stem + ".journal")
        return Path("var") / "journal"


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one tenant, local day and model (a usage-endpoint row)."""

    tenant_id: str
    day: date
    model: str
    currency: str
    requests: int
    error_requests: int
    uncached_input: int
    cached_input: int
    output: int
    reasoning: int
    cost_nanos: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tokens as integers, cost both exact (nanos) and as a decimal string."""
        return {
            "tenant_id": self.tenant_id,
            "day": self.day.isoformat(),
            "model": self.model,
            "currency": self.currency,
            "requests": self.requests,
            "error_requests": self.error_requests,
            "uncached_input_tokens": self.uncached_input,
            "cached_input_tokens": self.cached_input,
            "output_tokens": self.output,
            "reasoning_tokens": self.reasoning,
            "cost_nanos": self.cost_nanos,
            "cost": format_amount(self.cost_nanos),
        }


_EPOCH = datetime(1970, 1, 1)
_SECOND = timedelta(seconds=1)


ENTRY_COLUMNS: tuple[str, ...] = tuple(column.name for column in ENTRIES.columns)
_STARTED_AT = ENTRY_COLUMNS.index("started_at")  # 1: the SQLite path relies on it
_STATUS = ENTRY_COLUMNS.index("status_code")
_ROLLUP_KEY_INDEX = tuple(ENTRY_COLUMNS.index(name) for name in ROLLUP_KEY if name != "bucket")
_ROLLUP_TOKEN_INDEX = tuple(ENTRY_COLUMNS.index(name) for name in ROLLUP_SUMS[2:])


_RECORD_HAS_LIST_PRICES = "list_unit_price_input_nanos" in getattr(
    UsageRecord, "__dataclass_fields__", {}
)


def entry_values(rec: UsageRecord) -> tuple[Any, ...]:
    """A usage record as a `ledger_entries` row, in `ENTRY_COLUMNS` order.

    List unit prices come from `list_unit_price_*_nanos` when the record carries them,
    else the applied unit prices stand in (then no plan discount line can be shown).
    """
    usage = rec.usage
    started = rec.started_at
    started = started.replace(tzinfo=None) if started.tzinfo is UTC else naive_utc(started)
    if _RECORD_HAS_LIST_PRICES or type(rec) is not UsageRecord:
        list_prices = (
            _list_price(rec, "input"),
            _list_price(rec, "cached"),
            _list_price(rec, "output"),
        )
    else:
        list_prices = (
            rec.unit_price_input_nanos,
            rec.unit_price_cached_nanos,
            rec.unit_price_output_nanos,
        )
    return (
        rec.request_id,
        started,
        rec.tenant_id,
        rec.key_id,
        rec.model,
        rec.endpoint,
        rec.provider,
        rec.deployment,
        usage.uncached_input,
        usage.cached_input,
        usage.output,
        usage.reasoning,
        rec.currency.upper(),
        rec.price_version,
        rec.unit_price_input_nanos,
        rec.unit_price_cached_nanos,
        rec.unit_price_output_nanos,
        *list_prices,
        rec.cost_nanos,
        rec.list_cost_nanos,
        rec.compute_cost_nanos,
        rec.status_code,
        rec.error_type,
        rec.stream,
        rec.stream_cut_by,
        rec.attempts,
        rec.ttft_ms,
        rec.duration_ms,
    )


def _list_price(rec: UsageRecord, kind: str) -> int:
    value = getattr(rec, f"list_unit_price_{kind}_nanos", None)
    return int(value) if value is not None else int(getattr(rec, f"unit_price_{kind}_nanos"))


def rollup_deltas(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Entry rows (`ENTRY_COLUMNS` order) summed into rollup rows (`ROLLUP_COLUMNS` order)."""
    sums: dict[tuple[Any, ...], list[int]] = {}
    key_index = _ROLLUP_KEY_INDEX
    u, c, o, r, cost, listed, compute = _ROLLUP_TOKEN_INDEX
    for row in rows:
        seconds = (row[_STARTED_AT] - _EPOCH) // _SECOND  # started_at is naive UTC here
        key = (seconds - seconds % BUCKET_SECONDS, *[row[i] for i in key_index])
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0]
        acc[0] += 1
        if row[_STATUS] >= 400:
            acc[1] += 1
        acc[2] += row[u]
        acc[3] += row[c]
        acc[4] += row[o]
        acc[5] += row[r]
        acc[6] += row[cost]
        acc[7] += row[listed]
        acc[8] += row[compute]
    return [(key[1], key[0], *key[2:], *acc) for key, acc in sums.items()]


ROLLUP_COLUMNS: tuple[str, ...] = (
    "tenant_id",
    "bucket",
    *(name for name in ROLLUP_KEY if name not in ("tenant_id", "bucket")),
    *ROLLUP_SUMS,
)


_SQLITE_MAX_VARIABLES = 32766  # SQLite's limit on bound parameters in one statement
_SQLITE_ENTRY_ROWS = min(1000, _SQLITE_MAX_VARIABLES // len(ENTRY_COLUMNS))


@functools.cache
def _sqlite_entries_sql(rows: int) -> str:
    # One multi-row statement: parameters are bound in one go and SQLite then runs with the
    # GIL released, instead of handing the GIL back and forth per row (executemany).
    values = ", ".join(["(" + ", ".join("?" * len(ENTRY_COLUMNS)) + ")"] * rows)
    return (
        f"INSERT INTO ledger_entries ({', '.join(ENTRY_COLUMNS)}) VALUES {values} "
        "ON CONFLICT (request_id) DO NOTHING"
    )


@functools.cache
def _sqlite_rollups_sql(rows: int) -> str:
    values = ", ".join(["(" + ", ".join("?" * len(ROLLUP_COLUMNS)) + ")"] * rows)
    updates = ", ".join(f"{name} = usage_rollups.{name} + excluded.{name}" for name in ROLLUP_SUMS)
    return (
        f"INSERT INTO usage_rollups ({', '.join(ROLLUP_COLUMNS)}) VALUES {values} "
        f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {updates}"
    )


def _pg_array_types(table: Table, columns: Iterable[str]) -> list[str]:
    names = {"BIGINT": "bigint", "INTEGER": "integer", "BOOLEAN": "boolean", "FLOAT": "float8"}
    types = []
    for name in columns:
        sql_type = str(table.c[name].type).split("(")[0]
        if sql_type.startswith("TIMESTAMP") or sql_type == "DATETIME":
            types.append("timestamp")
        else:
            types.append(names.get(sql_type, "text"))
    return types


@functools.cache
def _pg_entries_sql() -> str:
    types = _pg_array_types(ENTRIES, ENTRY_COLUMNS)
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
    return (
        f"INSERT INTO ledger_entries ({', '.join(ENTRY_COLUMNS)}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
    )


@functools.cache
def _pg_rollups_sql() -> str:
    types = _pg_array_types(ROLLUPS, ROLLUP_COLUMNS)
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(types, start=1))
    updates = ", ".join(f"{name} = usage_rollups.{name} + excluded.{name}" for name in ROLLUP_SUMS)
    return (
        f"INSERT INTO usage_rollups ({', '.join(ROLLUP_COLUMNS)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {updates}"
    )


def _sqlite_time(moment: datetime) -> str:
    # The exact text SQLAlchemy's SQLite DateTime type writes, so comparisons stay textual.
    return moment.isoformat(sep=" ", timespec="microseconds")


class _DuplicatesInBatch(Exception):
    """Some rows of a batch were already in the ledger (a replay): redo it the careful way."""


def _unique(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with distinct request ids (the first of each wins)."""
    unique: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        unique.setdefault(row[0], row)
    return list(unique.values())


async def write_entries_postgres(engine: AsyncEngine, records: list[UsageRecord]) -> int:
    """Insert records idempotently, with their rollups, in one PostgreSQL transaction.

    Returns how many rows were new; only those are added to the rollups.
    """
    batch = _unique(entry_values(rec) for rec in records)
    if not batch:
        return 0
    async with engine.begin() as connection:
        columns = tuple(list(column) for column in zip(*batch, strict=True))
        result = await connection.exec_driver_sql(_pg_entries_sql(), columns)
        inserted_ids = {request_id for (request_id,) in result.all()}
        inserted = [row for row in batch if row[0] in inserted_ids]
        # In key order: writers of several gateways then lock shared rollup rows in one
        # order and wait for each other instead of deadlocking.
        deltas = sorted(rollup_deltas(inserted))
        if deltas:
            columns = tuple(list(column) for column in zip(*deltas, strict=True))
            await connection.exec_driver_sql(_pg_rollups_sql(), columns)
    return len(inserted)


#: The writer's own connection. A batch touches the right-hand edge of each index (request
#: ids are time-ordered, see `billing.ids`), one page per tenant in the (tenant, started_at)
#: index and the current bucket's rollup rows: a few hundred pages, whatever the file's
#: size, kept in a 64 MiB page cache. Reads go through a memory map (no read system calls);
#: the WAL is checkpointed every 8,000 pages (32 MiB) rather than 1,000, so a page written
#: by many batches (a rollup, an index edge) is copied back into the file once, not each time.
_SQLITE_WRITER_PRAGMAS: tuple[str, ...] = (
    "PRAGMA cache_size=-65536",
    "PRAGMA mmap_size=1073741824",
    "PRAGMA wal_autocheckpoint=8000",
)


class SqliteWriter:
    """Writes batches to an SQLite file from one dedicated thread, one call per batch.

    A whole batch (conversion, insert, rollups, commit) runs in the thread, so the event
    loop hands the GIL over twice per batch rather than at every driver call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._connection: sqlite3.Connection | None = None

    async def write(self, records: list[UsageRecord]) -> int:
        """Insert records idempotently with their rollups; returns how many were new."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, records)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=30000")
            for pragma in _SQLITE_WRITER_PRAGMAS:
                connection.execute(pragma)
            self._connection = connection
        return self._connection

    def _write(self, records: list[UsageRecord]) -> int:
        batch = _unique(entry_values(rec) for rec in records)
        if not batch:
            return 0
        try:
            return self._transaction(batch, assume_new=True)
        except _DuplicatesInBatch:
            return self._transaction(batch, assume_new=False)

    def _transaction(self, batch: list[tuple[Any, ...]], assume_new: bool) -> int:
        connection = self._connect()
        connection.execute("BEGIN IMMEDIATE")  # the write lock first: nobody inserts between
        try:
            inserted = self._insert(connection, batch, assume_new)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        return inserted

    @staticmethod
    def _insert(
        connection: sqlite3.Connection, batch: list[tuple[Any, ...]], assume_new: bool
    ) -> int:
        # The fast path expects every row to be new and checks the count (cheaper than
        # RETURNING); a replay that meets rows already written rolls back and comes here
        # again with assume_new=False, leaving out the ids the ledger already has.
        if not assume_new:
            existing: set[str] = set()
            for chunk in _chunks([row[0] for row in batch], 30000):
                marks = ", ".join("?" * len(chunk))
                cursor = connection.execute(
                    f"SELECT request_id FROM ledger_entries WHERE request_id IN ({marks})", chunk
                )
                existing.update(request_id for (request_id,) in cursor.fetchall())
            batch = [row for row in batch if row[0] not in existing]
            if not batch:
                return 0
        for chunk in _chunks(batch, _SQLITE_ENTRY_ROWS):
            params = tuple(
                itertools.chain.from_iterable(
                    (row[0], _sqlite_time(row[1]), *row[2:]) for row in chunk
                )
            )
            cursor = connection.execute(_sqlite_entries_sql(len(chunk)), params)
            if cursor.rowcount != len(chunk):
                if assume_new:
                    raise _DuplicatesInBatch
                raise RuntimeError("ledger rows appeared during a write; it will be retried")
        deltas = rollup_deltas(batch)
        for chunk in _chunks(deltas, _SQLITE_MAX_VARIABLES // len(ROLLUP_COLUMNS)):
            params = tuple(itertools.chain.from_iterable(chunk))
            connection.execute(_sqlite_rollups_sql(len(chunk)), params)
        return len(batch)


def merge_replayed(records: Iterable[UsageRecord]) -> list[UsageRecord]:
    """One record per request id from journal lines in the order written.

    A final record wins over a provisional one (`error_type == GATEWAY_DIED`) whatever the
    order; among records of the same kind the later wins (a later checkpoint).
    """
    merged: dict[str, UsageRecord] = {}
    for rec in records:
        seen = merged.get(rec.request_id)
        if seen is None or seen.error_type == GATEWAY_DIED or rec.error_type != GATEWAY_DIED:
            merged[rec.request_id] = rec
    return list(merged.values())


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def create_ledger_engine(url: str) -> AsyncEngine:
    """An async engine; SQLite gets WAL mode and a busy timeout (readers never block)."""
    db_file = sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    if not make_url(url).get_backend_name().startswith("sqlite"):
        return create_async_engine(url, pool_pre_ping=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


class Ledger:
    """The usage ledger. Open with `await Ledger.open(config)`; close with `aclose()`.

    `record` must be called from the event loop's thread.
    """

    def __init__(self, config: LedgerConfig, engine: AsyncEngine, journal: Journal) -> None:
        self.config = config
        self.engine = engine
        self._journal = journal
        db_file = sqlite_file(config.resolved_url())
        self._sqlite_writer = SqliteWriter(db_file) if db_file is not None else None
        self._queue: deque[tuple[float, UsageRecord]] = deque()
        self._inflight: list[tuple[float, UsageRecord]] = []
        self._open: dict[str, Callable[[], UsageRecord]] = {}
        self._admitted: list[str] = []  # admitted this turn of the event loop, not yet journaled
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._last_retention_check = 0.0

    @classmethod
    async def open(cls, config: LedgerConfig) -> Ledger:
        """Migrate to head, replay journals left by stopped processes, start the writer."""
        url = config.resolved_url()
        if make_url(url).get_backend_name() == "sqlite" and sqlite_file(url) is None:
            raise ValueError("the ledger needs an SQLite file, not an in-memory database")
        engine = create_ledger_engine(url)
        ledger: Ledger | None = None
        try:
            await upgrade(engine)
            journal = Journal(config.resolved_journal_dir())
            ledger = cls(config, engine, journal)
            await ledger._replay_orphans()
            journal.open()
        except BaseException:
            if ledger is not None and ledger._sqlite_writer is not None:
                await ledger._sqlite_writer.close()
            await engine.dispose()
            raise
        ledger._writer = asyncio.create_task(ledger._write_loop(), name="ledger-writer")
        return ledger

    # -- the request path -------------------------------------------------------------

    def admit(self, request_id: str, provisional: Callable[[], UsageRecord]) -> None:
        """Journal an admitted request's provisional record (a few microseconds).

        `provisional()` returns the row the crash policy gives the request if the process
        dies before `record` is called for it (`error_type == GATEWAY_DIED`); it is called
        now and again each time the journal starts a new segment, so it may report output
        delivered so far. `record` replaces it.
        """
        if self._closed:
            raise RuntimeError("the ledger is closed")
        self._open[request_id] = provisional
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: journal at once
            self._journal.append(provisional())
            return
        if not self._admitted:
            loop.call_soon(self.journal_admitted)
        self._admitted.append(request_id)

    def journal_admitted(self) -> None:
        """Journal the provisional records of this turn's admissions in one write.

        Runs by itself at the end of the event-loop turn that admitted them: one system
        call for all of them, not one per request, and before an upstream's answer to any
        of them can have arrived (that takes another turn). Call it to journal them at once,
        as the relay does before a stream's first bytes go out.
        """
        if not self._admitted:
            return
        admitted, self._admitted = self._admitted, []
        still_open = [self._open[i]() for i in admitted if i in self._open]
        try:
            self._journal.append_many(still_open)
        except OSError:  # a full disk: the final records will fail loudly on their own
            log.exception("journaling %d admitted requests failed", len(still_open))

    @property
    def open_requests(self) -> int:
        """Requests admitted and not yet recorded."""
        return len(self._open)

    def record(self, rec: UsageRecord) -> None:
        """Journal the record and queue it for the database (a few microseconds).

        When this returns, the record survives the process being killed: the caller may
        then send the response's final bytes.
        """
        if self._closed:
            raise RuntimeError("the ledger is closed")
        self._journal.append(rec)
        self._open.pop(rec.request_id, None)
        self._queue.append((time.monotonic(), rec))
        if len(self._queue) >= self.config.batch_size:
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        """Records recorded but not yet committed to the database."""
        return len(self._queue) + len(self._inflight)

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest record not yet committed to the database (0 when none)."""
        oldest = self._inflight[0][0] if self._inflight else None
        if oldest is None and self._queue:
            oldest = self._queue[0][0]
        return 0.0 if oldest is None else time.monotonic() - oldest

    # -- writing ----------------------------------------------------------------------

    async def flush(self) -> None:
        """Commit everything recorded so far, then trim the journal."""
        async with self._flush_lock:
            if not self._queue:
                return
            self._journal.rotate()
            self._rejournal_open()
            self._inflight = list(self._queue)
            self._queue.clear()
            try:
                while self._inflight:
                    chunk = self._inflight[: self.config.batch_size]
                    await self._write([rec for _, rec in chunk])
                    del self._inflight[: len(chunk)]
            finally:
                if self._inflight:  # keep what failed, in order, for the next attempt
                    self._queue.extendleft(reversed(self._inflight))
                    self._inflight = []
            self._journal.discard_closed()

    def _rejournal_open(self) -> None:
        """Write the provisional records of requests in flight into the new segment."""
        self._admitted.clear()  # every open request is written here, these included
        if self._open:
            self._journal.append_many([provisional() for provisional in self._open.values()])

    async def aclose(self) -> None:
        """Stop the writer and flush everything; the journal is emptied on success.

        Requests still in flight are closed by the crash policy (their provisional record).
        """
        if self._closed:
            return
        for provisional in list(self._open.values()):
            self.record(provisional())
        self._closed = True  # record() refuses from here on
        self._wake.set()
        if self._writer is not None:
            await self._writer  # lets a batch in flight finish
        try:
            await self.flush()
            self._journal.close(discard=True)
        except BaseException:
            self._journal.close(discard=False)  # replayed on the next open
            raise
        finally:
            if self._sqlite_writer is not None:
                await self._sqlite_writer.close()
            await self.engine.dispose()

    async def _write(self, records: list[UsageRecord]) -> int:
        if self._sqlite_writer is not None:
            return await self._sqlite_writer.write(records)
        return await write_entries_postgres(self.engine, records)

    async def _write_loop(self) -> None:
        interval = self.config.flush_interval_ms / 1000
        delay = interval
        failures = 0
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            if self._closed:
                return
            try:
                await self.flush()
                await self._apply_retention()
                failures, delay = 0, interval
            except Exception:
                failures += 1
                delay = min(30.0, interval * 2**failures)
                log.exception("ledger write failed (attempt %d); records stay journaled", failures)

    async def _replay_orphans(self) -> None:
        # Every orphan at once: a request's provisional record and its final one may be in
        # different segments, and the final one must win.
        segments = list(self._journal.orphans())
        if not segments:
            return
        try:
            lines = [rec for segment in segments for rec in segment.read()]
            records = merge_replayed(lines)
            crashed = sum(1 for rec in records if rec.error_type == GATEWAY_DIED)
            inserted = 0
            for chunk in _chunks(records, self.config.batch_size):
                inserted += await self._write(chunk)
        except BaseException:
            for segment in segments:
                segment.release()
            raise
        for segment in segments:
            segment.discard()
        log.info(
            "replayed %d journal segments: %d requests (%d closed by the crash policy), %d new",
            len(segments),
            len(records),
            crashed,
            inserted,
        )

    async def _apply_retention(self) -> None:
        days = self.config.retention_days
        now = time.monotonic()
        if days is None or now - self._last_retention_check < _RETENTION_CHECK_SECONDS:
            return
        self._last_retention_check = now
        await self.prune(datetime.now(UTC) - timedelta(days=days))

    # -- reading ----------------------------------------------------------------------

    async def usage(
        self, tenant_id: str | None, start: datetime, end: datetime, timezone: str
    ) -> list[UsageRow]:
        """Usage by local day (in `timezone`) and model, from the rollups.

        `tenant_id=None` returns every tenant (the admin view). `start` is inclusive and
        `end` exclusive; both are taken to the 15-minute bucket holding them.
        """
        zone = ZoneInfo(timezone)
        groups = await rollup_sums(
            self.engine,
            by=("tenant_id", "bucket", "model", "currency"),
            first=bucket_of(start),
            end=bucket_of(end),
            tenant_id=tenant_id,
        )
        totals: dict[tuple[str, date, str, str], list[int]] = {}
        for group in groups:
            tenant, bucket, model, currency = group.key
            sums = astuple(group.sums)[:_USAGE_SUMS]
            day = datetime.fromtimestamp(bucket, zone).date()
            acc = totals.setdefault((tenant, day, model, currency), [0] * len(sums))
            for index, value in enumerate(sums):
                acc[index] += value
        return [
            UsageRow(tenant, day, model, currency, *sums)
            for (tenant, day, model, currency), sums in sorted(totals.items())
        ]

    async def prune(self, before: datetime) -> int:
        """Delete raw rows that started before `before`; rollups (and invoices) stay."""
        cutoff = naive_utc(before)
        async with self.engine.begin() as connection:
            # Per tenant, so the (tenant_id, started_at) index serves the delete.
            tenants = (await connection.scalars(select(ROLLUPS.c.tenant_id).distinct())).all()
            deleted = 0
            for tenant_id in tenants:
                result = await connection.execute(
                    delete(ENTRIES).where(
                        ENTRIES.c.tenant_id == tenant_id, ENTRIES.c.started_at < cutoff
                    )
                )
                deleted += int(result.rowcount or 0)
            previous = await connection.scalar(
                select(STATE.c.value).where(STATE.c.key == PRUNED_BEFORE_KEY)
            )
            if previous is None or datetime.fromisoformat(previous) < cutoff:
                upsert = dialect_insert(connection, STATE)
                upsert = upsert.on_conflict_do_update(
                    index_elements=["key"], set_={"value": upsert.excluded.value}
                )
                await connection.execute(
                    upsert, {"key": PRUNED_BEFORE_KEY, "value": cutoff.isoformat()}
                )
        return deleted

    async def pruned_before(self) -> datetime | None:
        """The retention watermark (naive UTC): raw rows before it may have been pruned."""
        async with self.engine.connect() as connection:
            value = await connection.scalar(
                select(STATE.c.value).where(STATE.c.key == PRUNED_BEFORE_KEY)
            )
        return None if value is None else datetime.fromisoformat(value)
