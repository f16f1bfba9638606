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

from billing.invoice import month_buckets, month_of
from billing.ledger import Ledger
from billing.store.usage import Sums, busiest_bucket, entries, recent, rollup_sums

#: How requests refused before a model was known (a bad key, an unknown model) are listed.
NO_MODEL = "(no model)"


def _add(totals: dict[Any, Sums], key: Any, sums: Sums) -> None:
    totals[key] = totals[key] + sums if key in totals else sums


@dataclass(slots=True)
class MonthUsage:
    """One tenant's month: totals, by local day and by model."""

    month: str
    total: Sums = field(default_factory=Sums)
    by_day: dict[date, Sums] = field(default_factory=dict)
    by_model: dict[str, Sums] = field(default_factory=dict)


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
    groups = await rollup_sums(
        ledger.engine, by=("model",), first=first, end=end, tenant_id=tenant_id, day_starts=starts
    )
    usage = MonthUsage(month)
    for group in groups:
        day, model = group.key
        usage.total += group.sums
        _add(usage.by_day, days[day], group.sums)
        _add(usage.by_model, model or NO_MODEL, group.sums)
    return usage


async def busiest_quarter(
    ledger: Ledger, tenant_id: str, timezone: str, month: str
) -> tuple[int, int]:
    """The most requests and the most tokens in any one 15-minute bucket of the month."""
    first, end = month_buckets(month, timezone)
    return await busiest_bucket(ledger.engine, tenant_id, first, end)


@dataclass(slots=True)
class MonthBreakdown:
    """Every tenant's month: by tenant, by model, and by (tenant, model)."""

    by_tenant: dict[str, Sums] = field(default_factory=dict)
    by_model: dict[str, Sums] = field(default_factory=dict)
    by_pair: dict[tuple[str, str], Sums] = field(default_factory=dict)
    total: Sums = field(default_factory=Sums)


async def month_breakdown(ledger: Ledger, tenants: dict[str, str], month: str) -> MonthBreakdown:
    """Revenue (what requests cost), compute cost and margin for `month`; `tenants` maps
    each tenant id to its time zone (each tenant's month is its own calendar month)."""
    breakdown = MonthBreakdown()
    for tenant_id, timezone in tenants.items():
        first, end = month_buckets(month, timezone)
        groups = await rollup_sums(
            ledger.engine, by=("model",), first=first, end=end, tenant_id=tenant_id
        )
        breakdown.by_tenant[tenant_id] = Sums()
        for group in groups:
            model = group.key[0] or NO_MODEL
            _add(breakdown.by_tenant, tenant_id, group.sums)
            _add(breakdown.by_model, model, group.sums)
            _add(breakdown.by_pair, (tenant_id, model), group.sums)
            breakdown.total += group.sums
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
    since = datetime.now(UTC) - timedelta(seconds=window_s)
    stats = LiveStats(window_s)
    ttft_sum, ttft_count = 0.0, 0
    for tenant in await recent(ledger.engine, tenant_ids, since):
        stats.requests += tenant.requests
        stats.errors += tenant.errors
        ttft_sum += tenant.ttft_ms_sum
        ttft_count += tenant.ttft_count
        if tenant.ttft_ms_max is not None:
            stats.ttft_ms_max = max(stats.ttft_ms_max or 0.0, tenant.ttft_ms_max)
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
#: The ledger columns behind them (all but `cost`, which is `cost_nanos` as a decimal).
_CSV_ENTRY_COLUMNS = tuple(name.removesuffix("_tokens") for name in USAGE_CSV_COLUMNS[:-1])


async def usage_csv(
    ledger: Ledger, tenant_id: str, start: datetime, end: datetime
) -> AsyncIterator[bytes]:
    """A tenant's requests in [start, end) as CSV, streamed in chunks (an export, so it does
    read the ledger rows, through the tenant's index)."""
    from billing.money import format_amount

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(USAGE_CSV_COLUMNS)
    rows = entries(
        ledger.engine, _CSV_ENTRY_COLUMNS, tenant_id=tenant_id, start=start, end=end, ordered=True
    )
    async for chunk in rows:
        for row in chunk:
            started = row.started_at.replace(tzinfo=UTC).isoformat()
            writer.writerow((*row[:1], started, *row[2:], format_amount(row.cost_nanos)))
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.getvalue():  # the header alone: no requests in the range
        yield out.getvalue().encode()
