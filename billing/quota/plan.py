"""A scope's plan for one admission: time periods, key names and key lifetimes.

Both stores name their state alike (the in-process store mirrors Redis key for key), so an
admission served by one can be settled in the other (`billing.quota.fail_open`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from billing.quota.contract import Scope

__all__ = [
    "BUCKET_MS",
    "HOLDS_KEEP_MS",
    "PERIOD_MARGIN_MS",
    "SETTLED_KEEP_MS",
    "WINDOW_BUCKETS",
    "WINDOW_TTL_MS",
    "Periods",
    "ScopePlan",
    "account_base",
    "counter_ttl_ms",
    "epoch_ms",
    "leaves_ms",
    "oldest_bucket",
    "periods",
    "plan_scope",
    "split_window_counter",
]

#: How long the structures that index reservations are kept after the last admission.
HOLDS_KEEP_MS = 40 * 24 * 3_600_000
#: How long counters outlive their period (late settles still correct them).
PERIOD_MARGIN_MS = 3_600_000
#: How long a settled request id is remembered (so a repeated settle is ignored).
SETTLED_KEEP_MS = 86_400_000
#: Rolling windows: one-second buckets, and how many of them an admission counts (the
#: current one and the 60 before it: a 60-second span touches at most 61 buckets).
BUCKET_MS = 1_000
WINDOW_BUCKETS = 61
#: How long a rolling-window hash outlives its last write.
WINDOW_TTL_MS = (WINDOW_BUCKETS + 1) * BUCKET_MS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch (a naive datetime is UTC), exact."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


@dataclass(frozen=True, slots=True)
class Periods:
    """The windows a moment falls in, for one time zone, and how long until each ends."""

    now_ms: int
    minute: int
    bucket: int
    """The current one-second bucket of the rolling windows."""
    day: str
    day_reset_ms: int
    month: str
    month_reset_ms: int


def periods(now: datetime, timezone: str) -> Periods:
    """The rolling-window bucket and the local calendar day and month of `now` in `timezone`."""
    now_ms = epoch_ms(now)
    minute = now_ms // 60_000
    calendar = _calendar(timezone, minute)
    return Periods(
        now_ms=now_ms,
        minute=minute,
        bucket=now_ms // BUCKET_MS,
        day=calendar[0],
        day_reset_ms=calendar[1] - now_ms,
        month=calendar[2],
        month_reset_ms=calendar[3] - now_ms,
    )


_CALENDARS: dict[tuple[str, int], tuple[str, int, str, int]] = {}


def _calendar(timezone: str, minute: int) -> tuple[str, int, str, int]:
    """(day, day end ms, month, month end ms) of a UTC minute in a zone, memoised.

    Local days and months start on whole minutes in every zone in use today.
    """
    cached = _CALENDARS.get((timezone, minute))
    if cached is not None:
        return cached
    zone = ZoneInfo(timezone)
    today = (_EPOCH + timedelta(minutes=minute)).astimezone(zone).date()
    next_day = datetime.combine(today + timedelta(days=1), time(), tzinfo=zone)
    year, month = divmod(today.year * 12 + today.month, 12)  # the month after, 0-based
    next_month = datetime.combine(date(year, month + 1, 1), time(), tzinfo=zone)
    calendar = (today.isoformat(), epoch_ms(next_day), f"{today:%Y-%m}", epoch_ms(next_month))
    if len(_CALENDARS) >= 4096:
        _CALENDARS.clear()
    _CALENDARS[(timezone, minute)] = calendar
    return calendar


@dataclass(frozen=True, slots=True)
class ScopePlan:
    """Key names and periods of one scope for one admission."""

    scope: Scope
    base: str
    periods: Periods
    rpm: str
    tpm: str
    day: str
    month: str

    counters: tuple[str, ...]
    """Suffixes of the token counters this scope charges (tpm, day, month); a rolling
    window's is ``:tpm@<bucket>``: the bucket (hash field) of the ``:tpm`` hash charged."""
    holds: bool
    """Whether an admission keeps a reservation in this scope."""


def plan_scope(scope: Scope, now: datetime, prefix: str) -> ScopePlan:
    p = periods(now, scope.timezone)
    limits = scope.limits
    day, month = f":day:{p.day}", f":month:{p.month}"
    counters = tuple(
        suffix
        for limit, suffix in (
            (limits.tpm, f":tpm@{p.bucket}"),
            (limits.tokens_per_day, day),
            (limits.tokens_per_month, month),
        )
        if limit is not None
    )
    return ScopePlan(
        scope=scope,
        base=f"{prefix}s:{scope.id}",
        periods=p,
        rpm=":rpm",
        tpm=":tpm",
        day=day,
        month=month,
        counters=counters,
        holds=bool(counters) or limits.max_concurrent is not None,
    )


def account_base(prefix: str, account: str) -> str:
    return f"{prefix}a:{account}"


def counter_ttl_ms(plan: ScopePlan, suffix: str, reservation_ttl_ms: int) -> int:
    """How long a counter key lives: to the end of its period plus a margin."""
    p = plan.periods
    if suffix in (plan.rpm, plan.tpm) or "@" in suffix:
        return WINDOW_TTL_MS
    period_ms = p.day_reset_ms if suffix == plan.day else p.month_reset_ms
    return period_ms + reservation_ttl_ms + PERIOD_MARGIN_MS


def split_window_counter(suffix: str) -> tuple[str, int] | None:
    """``(":tpm", bucket)`` for a rolling-window counter suffix, None for a plain counter."""
    name, at, bucket = suffix.rpartition("@")
    if at and bucket.isdigit():
        return name, int(bucket)
    return None


def oldest_bucket(now_ms: int) -> int:
    """The oldest one-second bucket a rolling window counts at `now_ms`."""
    return now_ms // BUCKET_MS - WINDOW_BUCKETS + 1


def leaves_ms(bucket: int, now_ms: int) -> int:
    """How long until `bucket` leaves the rolling window."""
    return (bucket + WINDOW_BUCKETS) * BUCKET_MS - now_ms
