"""A scope's plan for one admission: time periods, key names and key lifetimes.

Both stores name their state alike (the in-process store mirrors Redis key for key), so an
admission served by one can be settled in the other (`billing.quota.fail_open`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from billing.quota.contract import AdmitRequest, Scope

__all__ = [
    "BUCKET_MS",
    "HOLDS_KEEP_MS",
    "PERIOD_MARGIN_MS",
    "SETTLED_KEEP_MS",
    "WINDOW_BUCKETS",
    "WINDOW_TTL_MS",
    "Periods",
    "Planner",
    "ScopePlan",
    "counter_expiry_ms",
    "epoch_ms",
    "leaves_ms",
    "oldest_bucket",
    "periods",
    "request_tag",
    "split_window_counter",
    "tenant_of",
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
    """Key names, limits and periods of one scope in one second (`Planner` caches it)."""

    scope: Scope
    base: str
    """The prefix of the scope's keys (hash-tagged in a Redis Cluster)."""
    bucket: int
    """The one-second bucket of the rolling windows."""
    day: str
    """The suffix of the local day's counter, ``:day:<YYYY-MM-DD>``."""
    day_end_ms: int
    month: str
    month_end_ms: int
    counters: tuple[str, ...]
    """Suffixes of the token counters this scope charges (tpm, day, month); a rolling
    window's is ``:tpm@<bucket>``: the bucket (hash field) of the ``:tpm`` hash charged."""
    holds: bool
    """Whether an admission keeps a reservation in this scope."""
    args: tuple[int | str, ...]
    """The admission script's arguments for this scope (see ``admit.lua``)."""
    rpm: str = ":rpm"
    tpm: str = ":tpm"


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def tenant_of(scope_id: str) -> str | None:
    """The tenant of a ``tenant:<id>`` or ``tenant:<id>:model:<name>`` scope, else None."""
    if not scope_id.startswith("tenant:"):
        return None
    tenant = scope_id[7:].split(":", 1)[0]
    return tenant or None


class Planner:
    """Scope plans, cached: a scope's key names and limits are worked out once per second
    (not per request), its calendar once per minute and zone.

    With `tagged` (Redis Cluster), every key of one request carries one hash tag, ``{<tag>}``,
    so that its scripts touch one slot: the request's tag is its balance account, else the
    tenant of its first tenant scope; a scope takes its own `Scope.shard`, else its tenant,
    else the request's tag. Without it, key names have no tag (a standalone Redis).
    """

    __slots__ = ("_plans", "prefix", "tagged")

    def __init__(self, prefix: str, *, tagged: bool = False) -> None:
        self.prefix = prefix
        self.tagged = tagged
        self._plans: dict[tuple[str, str, str | None], ScopePlan] = {}

    def plans(self, req: AdmitRequest, now_ms: int) -> tuple[list[ScopePlan], str | None]:
        """The plans of a request's scopes, and its hash tag (None when not tagged)."""
        if not self.tagged:
            return [self.plan(scope, now_ms) for scope in req.scopes], None
        tag = request_tag(req)
        plans = []
        for scope in req.scopes:
            own = scope.shard or tenant_of(scope.id) or tag
            if own != tag:
                raise ValueError(
                    f"scope {scope.id} is in shard {own!r}, not {tag!r}: the scopes and the"
                    " balance account of one request must share one shard"
                )
            plans.append(self.plan(scope, now_ms, tag))
        return plans, tag

    def plan(self, scope: Scope, now_ms: int, tag: str | None = None) -> ScopePlan:
        """The plan of one scope at `now_ms` (`tag`: the hash tag, when tagged)."""
        if self.tagged and tag is None:
            tag = self.tag_of(scope)
        key = (scope.id, scope.timezone, tag)
        cached = self._plans.get(key)
        bucket = now_ms // BUCKET_MS
        if (
            cached is not None
            and cached.bucket == bucket
            and (cached.scope.limits is scope.limits or cached.scope.limits == scope.limits)
        ):
            return cached
        plan = self._plan(scope, bucket, tag)
        if len(self._plans) >= 100_000:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _plan(self, scope: Scope, bucket: int, tag: str | None) -> ScopePlan:
        day, day_end, month, month_end = _calendar(scope.timezone, bucket * BUCKET_MS // 60_000)
        limits = scope.limits
        day_suffix, month_suffix = f":day:{day}", f":month:{month}"
        counters = tuple(
            suffix
            for limit, suffix in (
                (limits.tpm, f":tpm@{bucket}"),
                (limits.tokens_per_day, day_suffix),
                (limits.tokens_per_month, month_suffix),
            )
            if limit is not None
        )
        has_day, has_month = limits.tokens_per_day is not None, limits.tokens_per_month is not None
        return ScopePlan(
            scope=scope,
            base=self.base(f"s:{scope.id}", tag),
            bucket=bucket,
            day=day_suffix,
            day_end_ms=day_end,
            month=month_suffix,
            month_end_ms=month_end,
            counters=counters,
            holds=bool(counters) or limits.max_concurrent is not None,
            args=(
                _limit(limits.rpm),
                _limit(limits.tpm),
                _limit(limits.max_concurrent),
                _limit(limits.tokens_per_day),
                _limit(limits.tokens_per_month),
                day_suffix if has_day else "",
                day_end if has_day else 0,
                month_suffix if has_month else "",
                month_end if has_month else 0,
            ),
        )

    def tag_of(self, scope: Scope) -> str | None:
        """A scope's hash tag on its own (for reading it): its shard, else its tenant, else
        its id; None when not tagged."""
        if not self.tagged:
            return None
        return scope.shard or tenant_of(scope.id) or scope.id

    def base(self, name: str, tag: str | None) -> str:
        """A key name under the prefix, after the hash tag when tagged."""
        if tag is None or not self.tagged:
            return f"{self.prefix}{name}"
        return f"{self.prefix}{{{tag}}}:{name}"

    def account_base(self, account: str) -> str:
        """The key of a balance account (its tag is the account itself)."""
        return self.base(f"a:{account}", account)

    def done_key(self, request_id: str, tag: str | None) -> str:
        """The key marking a request as settled."""
        return self.base(f"done:{request_id}", tag)


def request_tag(req: AdmitRequest) -> str:
    """The hash tag of a request's keys in a Redis Cluster (see `Planner`)."""
    if req.balance_account is not None:
        return req.balance_account
    for scope in req.scopes:
        tag = scope.shard or tenant_of(scope.id)
        if tag:
            return tag
    return req.scopes[0].id if req.scopes else req.request_id


def counter_expiry_ms(plan: ScopePlan, suffix: str, reservation_ttl_ms: int, now_ms: int) -> int:
    """When a counter key expires: a window some time after its last write, a calendar
    counter at the end of its period plus the reservation TTL and a margin (late settles
    still correct it)."""
    if suffix in (plan.rpm, plan.tpm) or "@" in suffix:
        return now_ms + WINDOW_TTL_MS
    end = plan.day_end_ms if suffix == plan.day else plan.month_end_ms
    return end + reservation_ttl_ms + PERIOD_MARGIN_MS


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
