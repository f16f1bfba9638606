"""What the console's pages show, read from the 15-minute rollups (never raw ledger rows),
except the operator's live view, which reads the last minutes of the ledger per tenant
through its (tenant, started_at) index."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import case, func, select

from billing.invoice import month_buckets, month_of
from billing.ledger import ENTRIES, ROLLUPS, Ledger, naive_utc

#: How requests refused before a model was known (a bad key, an unknown model) are listed.
NO_MODEL = "(no model)"


@dataclass(slots=True)
class Totals:
    """Sums of some usage: requests, tokens by kind, what it cost and what it cost to serve."""

    requests: int = 0
    errors: int = 0
    uncached_input: int = 0
    cached_input: int = 0
    output: int = 0
    cost_nanos: int = 0
    compute_cost_nanos: int = 0

    @property
    def tokens(self) -> int:
        return self.uncached_input + self.cached_input + self.output

    @property
    def margin_nanos(self) -> int:
        return self.cost_nanos - self.compute_cost_nanos

    @property
    def margin_percent(self) -> float | None:
        if not self.cost_nanos:
            return None
        return 100.0 * self.margin_nanos / self.cost_nanos

    def add(self, row: Any) -> None:
        self.requests += int(row.requests or 0)
        self.errors += int(row.errors or 0)
        self.uncached_input += int(row.uncached_input or 0)
        self.cached_input += int(row.cached_input or 0)
        self.output += int(row.output or 0)
        self.cost_nanos += int(row.cost_nanos or 0)
        self.compute_cost_nanos += int(row.compute_cost_nanos or 0)


_SUMS = (
    func.sum(ROLLUPS.c.requests).label("requests"),
    func.sum(ROLLUPS.c.error_requests).label("errors"),
    func.sum(ROLLUPS.c.uncached_input).label("uncached_input"),
    func.sum(ROLLUPS.c.cached_input).label("cached_input"),
    func.sum(ROLLUPS.c.output).label("output"),
    func.sum(ROLLUPS.c.cost_nanos).label("cost_nanos"),
    func.sum(ROLLUPS.c.compute_cost_nanos).label("compute_cost_nanos"),
)


@dataclass(slots=True)
class MonthUsage:
    """One tenant's month: totals, by local day and by model."""

    month: str
    total: Totals = field(default_factory=Totals)
    by_day: dict[date, Totals] = field(default_factory=dict)
    by_model: dict[str, Totals] = field(default_factory=dict)


def current_month(timezone: str, now: datetime | None = None) -> str:
    return month_of(now or datetime.now(UTC), timezone)


def month_days(month: str) -> list[date]:
    year, number = (int(part) for part in month.split("-"))
    first = date(year, number, 1)
    following = date(year + number // 12, number % 12 + 1, 1)
    return [first + timedelta(days=i) for i in range((following - first).days)]


async def tenant_month(ledger: Ledger, tenant_id: str, timezone: str, month: str) -> MonthUsage:
    """A tenant's month in its time zone, summed by the database from the rollups into
    local days and models (about days x models rows come back, whatever the traffic)."""
    first, end = month_buckets(month, timezone)
    zone = ZoneInfo(timezone)
    days = month_days(month)
    # Each local day as a run of buckets: [midnight, next midnight) in epoch seconds.
    starts = [int(datetime.combine(d, datetime.min.time(), zone).timestamp()) for d in days]
    day_index = case(
        *((ROLLUPS.c.bucket < start, index - 1) for index, start in enumerate(starts[1:], 1)),
        else_=len(days) - 1,
    ).label("day")
    query = (
        select(day_index, ROLLUPS.c.model, *_SUMS)
        .where(ROLLUPS.c.tenant_id == tenant_id, ROLLUPS.c.bucket >= first, ROLLUPS.c.bucket < end)
        .group_by(day_index, ROLLUPS.c.model)
    )
    usage = MonthUsage(month)
    async with ledger.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    for row in rows:
        usage.total.add(row)
        usage.by_day.setdefault(days[row.day], Totals()).add(row)
        usage.by_model.setdefault(row.model or NO_MODEL, Totals()).add(row)
    return usage


async def busiest_quarter(
    ledger: Ledger, tenant_id: str, timezone: str, month: str
) -> tuple[int, int]:
    """The most requests and the most tokens in any one 15-minute bucket of the month."""
    first, end = month_buckets(month, timezone)
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
    async with ledger.engine.connect() as connection:
        row = (await connection.execute(query)).one()
    return int(row[0] or 0), int(row[1] or 0)


@dataclass(slots=True)
class MonthBreakdown:
    """Every tenant's month: by tenant, by model, and by (tenant, model)."""

    by_tenant: dict[str, Totals] = field(default_factory=dict)
    by_model: dict[str, Totals] = field(default_factory=dict)
    by_pair: dict[tuple[str, str], Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)


async def month_breakdown(ledger: Ledger, tenants: dict[str, str], month: str) -> MonthBreakdown:
    """Revenue (what requests cost), compute cost and margin for `month`; `tenants` maps
    each tenant id to its time zone (each tenant's month is its own calendar month)."""
    breakdown = MonthBreakdown()
    async with ledger.engine.connect() as connection:
        for tenant_id, timezone in tenants.items():
            first, end = month_buckets(month, timezone)
            query = (
                select(ROLLUPS.c.model, *_SUMS)
                .where(
                    ROLLUPS.c.tenant_id == tenant_id,
                    ROLLUPS.c.bucket >= first,
                    ROLLUPS.c.bucket < end,
                )
                .group_by(ROLLUPS.c.model)
            )
            breakdown.by_tenant[tenant_id] = Totals()
            for row in (await connection.execute(query)).all():
                model = row.model or NO_MODEL
                breakdown.by_tenant[tenant_id].add(row)
                breakdown.by_model.setdefault(model, Totals()).add(row)
                breakdown.by_pair.setdefault((tenant_id, model), Totals()).add(row)
                breakdown.total.add(row)
    return breakdown


@dataclass(slots=True)
class LiveStats:
    """The last `window_s` seconds of traffic from the ledger."""

    window_s: int
    requests: int = 0
    errors: int = 0
    ttft_ms_avg: float | None = None
    ttft_ms_max: float | None = None

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.window_s

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


async def live_stats(ledger: Ledger, tenant_ids: list[str], window_s: int = 300) -> LiveStats:
    """Request rate, error rate and time to first token over the last few minutes."""
    since = naive_utc(datetime.now(UTC) - timedelta(seconds=window_s))
    stats = LiveStats(window_s)
    ttft_sum, ttft_count = 0.0, 0
    async with ledger.engine.connect() as connection:
        for tenant_id in tenant_ids:  # one index range per tenant
            row = (
                await connection.execute(
                    select(
                        func.count(),
                        func.sum(case((ENTRIES.c.status_code >= 400, 1), else_=0)),
                        func.sum(ENTRIES.c.ttft_ms),
                        func.count(ENTRIES.c.ttft_ms),
                        func.max(ENTRIES.c.ttft_ms),
                    ).where(ENTRIES.c.tenant_id == tenant_id, ENTRIES.c.started_at >= since)
                )
            ).one()
            stats.requests += int(row[0] or 0)
            stats.errors += int(row[1] or 0)
            ttft_sum += float(row[2] or 0)
            ttft_count += int(row[3] or 0)
            if row[4] is not None:
                stats.ttft_ms_max = max(stats.ttft_ms_max or 0.0, float(row[4]))
    if ttft_count:
        stats.ttft_ms_avg = ttft_sum / ttft_count
    return stats


USAGE_CSV_COLUMNS = (
    "request_id",
    "started_at",
    "key_id",
    "model",
    "endpoint",
    "status_code",
    "uncached_input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "currency",
    "price_version",
    "cost_nanos",
    "cost",
)


async def usage_csv(
    ledger: Ledger, tenant_id: str, start: datetime, end: datetime
) -> AsyncIterator[bytes]:
    """A tenant's requests in [start, end) as CSV, streamed in chunks (an export, so it does
    read the ledger rows, through the tenant's index)."""
    from billing.money import format_amount

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(USAGE_CSV_COLUMNS)
    query = (
        select(
            ENTRIES.c.request_id,
            ENTRIES.c.started_at,
            ENTRIES.c.key_id,
            ENTRIES.c.model,
            ENTRIES.c.endpoint,
            ENTRIES.c.status_code,
            ENTRIES.c.uncached_input,
            ENTRIES.c.cached_input,
            ENTRIES.c.output,
            ENTRIES.c.reasoning,
            ENTRIES.c.currency,
            ENTRIES.c.price_version,
            ENTRIES.c.cost_nanos,
        )
        .where(
            ENTRIES.c.tenant_id == tenant_id,
            ENTRIES.c.started_at >= naive_utc(start),
            ENTRIES.c.started_at < naive_utc(end),
        )
        .order_by(ENTRIES.c.started_at, ENTRIES.c.request_id)
    )
    async with ledger.engine.connect() as connection:
        result = await connection.stream(query)
        async for chunk in result.partitions(2000):
            for row in chunk:
                started = row.started_at.replace(tzinfo=UTC).isoformat()
                writer.writerow((*row[:1], started, *row[2:], format_amount(row.cost_nanos)))
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    if out.getvalue():  # the header alone: no requests in the range
        yield out.getvalue().encode()
