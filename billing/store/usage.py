"""The read queries over the ledger: sums from the 15-minute rollups, and raw rows.

Invoices, reconciliation, the console and the economics reports all call these; none of
them builds SQL over `usage_rollups` or `ledger_entries` itself. Buckets are epoch seconds
(`billing.store.engine.bucket_of`); a range of buckets is `[first, end)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.store.engine import naive_utc
from billing.store.schema import ENTRIES, ROLLUP_SUMS, ROLLUPS


@dataclass(frozen=True, slots=True)
class Sums:
    """Sums of some requests: counts, tokens by kind, what they cost and what they cost to
    serve (nano-units). Sums add up with `+`."""

    requests: int = 0
    error_requests: int = 0
    uncached_input: int = 0
    cached_input: int = 0
    output: int = 0
    reasoning: int = 0
    cost_nanos: int = 0
    list_cost_nanos: int = 0
    compute_cost_nanos: int = 0

    @property
    def input_tokens(self) -> int:
        return self.uncached_input + self.cached_input

    @property
    def tokens(self) -> int:
        """Input (cached or not) and output tokens."""
        return self.uncached_input + self.cached_input + self.output

    @property
    def margin_nanos(self) -> int:
        """What the requests cost their tenants minus what they cost to serve."""
        return self.cost_nanos - self.compute_cost_nanos

    @property
    def margin_percent(self) -> float | None:
        """The margin as a share of what they cost; None when they cost nothing."""
        if not self.cost_nanos:
            return None
        return 100.0 * self.margin_nanos / self.cost_nanos

    def __add__(self, other: Sums) -> Sums:
        return Sums(*(getattr(self, name) + getattr(other, name) for name in ROLLUP_SUMS))


@dataclass(frozen=True, slots=True)
class Group:
    """The sums of one group: `key` holds the values of the grouping columns, in order."""

    key: tuple[Any, ...]
    sums: Sums


def _sums(values: Sequence[Any]) -> Sums:
    return Sums(*(int(value or 0) for value in values))


async def rollup_sums(
    engine: AsyncEngine,
    *,
    by: Sequence[str] = (),
    first: int,
    end: int | None = None,
    tenant_id: str | None = None,
    currency: str | None = None,
    day_starts: Sequence[int] | None = None,
    ordered: bool = False,
) -> list[Group]:
    """Rollup sums over the buckets `[first, end)` (no `end`: to the newest), grouped by the
    rollup columns named in `by`; only `tenant_id`'s and only `currency`'s when given.

    With `day_starts` (the first bucket of each local day, ascending; the first day starts
    at `first`) the key begins with the day's index, so the database sums whole local days.
    `ordered` sorts the groups by their key.
    """
    keys: list[Any] = [ROLLUPS.c[name] for name in by]
    if day_starts is not None:
        day = case(
            *((ROLLUPS.c.bucket < start, i - 1) for i, start in enumerate(day_starts[1:], 1)),
            else_=len(day_starts) - 1,
        ).label("day")
        keys.insert(0, day)
    query = select(*keys, *(func.sum(ROLLUPS.c[name]) for name in ROLLUP_SUMS)).where(
        ROLLUPS.c.bucket >= first
    )
    if end is not None:
        query = query.where(ROLLUPS.c.bucket < end)
    if tenant_id is not None:
        query = query.where(ROLLUPS.c.tenant_id == tenant_id)
    if currency is not None:
        query = query.where(ROLLUPS.c.currency == currency.upper())
    if keys:
        query = query.group_by(*keys)
    if ordered:
        query = query.order_by(*keys)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    width = len(keys)
    return [Group(tuple(row[:width]), _sums(row[width:])) for row in rows]


async def entry_sums(
    engine: AsyncEngine, *, by: Sequence[str], tenant_id: str, start: datetime, end: datetime
) -> list[Group]:
    """The raw rows of a tenant started in `[start, end)`, summed as the rollups sum them
    (an error is a status of 400 or more), grouped by the entry columns named in `by`."""
    keys = [ENTRIES.c[name] for name in by]
    sums = [
        func.count(),
        func.sum(case((ENTRIES.c.status_code >= 400, 1), else_=0)),
        *(func.sum(ENTRIES.c[name]) for name in ROLLUP_SUMS[2:]),
    ]
    query = (
        select(*keys, *sums)
        .where(
            ENTRIES.c.tenant_id == tenant_id,
            ENTRIES.c.started_at >= naive_utc(start),
            ENTRIES.c.started_at < naive_utc(end),
        )
        .group_by(*keys)
    )
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    width = len(keys)
    return [Group(tuple(row[:width]), _sums(row[width:])) for row in rows]


async def busiest_bucket(
    engine: AsyncEngine, tenant_id: str, first: int, end: int
) -> tuple[int, int]:
    """The most requests and the most tokens of a tenant in any one bucket of `[first, end)`."""
    per_bucket = (
        select(
            func.sum(ROLLUPS.c.requests).label("requests"),
            func.sum(ROLLUPS.c.uncached_input + ROLLUPS.c.cached_input + ROLLUPS.c.output).label(
                "tokens"
            ),
        )
        .where(ROLLUPS.c.tenant_id == tenant_id, ROLLUPS.c.bucket >= first, ROLLUPS.c.bucket < end)
        .group_by(ROLLUPS.c.bucket)
        .subquery()
    )
    query = select(func.max(per_bucket.c.requests), func.max(per_bucket.c.tokens))
    async with engine.connect() as connection:
        row = (await connection.execute(query)).one()
    return int(row[0] or 0), int(row[1] or 0)


async def first_bucket(engine: AsyncEngine, tenant_id: str) -> int | None:
    """The tenant's oldest bucket with usage, or None (no usage yet)."""
    async with engine.connect() as connection:
        value = await connection.scalar(
            select(func.min(ROLLUPS.c.bucket)).where(ROLLUPS.c.tenant_id == tenant_id)
        )
    return None if value is None else int(value)


@dataclass(frozen=True, slots=True)
class Recent:
    """A tenant's requests since a moment, from the raw rows."""

    requests: int
    errors: int
    ttft_ms_sum: float
    ttft_count: int
    ttft_ms_max: float | None


async def recent(engine: AsyncEngine, tenant_ids: Sequence[str], since: datetime) -> list[Recent]:
    """Per tenant, its requests started since `since` (one index range per tenant)."""
    found = []
    async with engine.connect() as connection:
        for tenant_id in tenant_ids:
            query = select(
                func.count(),
                func.sum(case((ENTRIES.c.status_code >= 400, 1), else_=0)),
                func.sum(ENTRIES.c.ttft_ms),
                func.count(ENTRIES.c.ttft_ms),
                func.max(ENTRIES.c.ttft_ms),
            ).where(ENTRIES.c.tenant_id == tenant_id, ENTRIES.c.started_at >= naive_utc(since))
            row = (await connection.execute(query)).one()
            found.append(
                Recent(
                    int(row[0] or 0),
                    int(row[1] or 0),
                    float(row[2] or 0),
                    int(row[3] or 0),
                    None if row[4] is None else float(row[4]),
                )
            )
    return found


async def entries(
    engine: AsyncEngine,
    columns: Sequence[str],
    *,
    tenant_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    ordered: bool = False,
    chunk: int = 2000,
) -> AsyncIterator[Sequence[Row[Any]]]:
    """Raw rows (the named columns), a tenant's started in `[start, end)` when given,
    in chunks of up to `chunk` rows, streamed; `ordered` by start time, then request id."""
    query = select(*(ENTRIES.c[name] for name in columns))
    if tenant_id is not None:
        query = query.where(ENTRIES.c.tenant_id == tenant_id)
    if start is not None:
        query = query.where(ENTRIES.c.started_at >= naive_utc(start))
    if end is not None:
        query = query.where(ENTRIES.c.started_at < naive_utc(end))
    if ordered:
        query = query.order_by(ENTRIES.c.started_at, ENTRIES.c.request_id)
    async with engine.connect() as connection:
        result = await connection.stream(query)
        async for rows in result.partitions(chunk):
            yield rows
