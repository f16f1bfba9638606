"""Quotas and budgets: admission and spending as one atomic step each.

Before a request is forwarded, `QuotaStore.admit` reserves its worst case (prompt tokens
plus the granted `max_tokens`, and the matching money) against every limit of every scope
(key, tenant, tenant x model) and the tenant's prepaid balance, all in one atomic step, so
concurrent requests cannot overshoot. After the response, `settle` charges what was really
used and releases the rest. Two backends keep the same contract: `MemoryQuotaStore` (one
process, the embedded default) and `billing.quota_redis.RedisQuotaStore` (Lua scripts, one
truth shared by every gateway replica).

Semantics, shared by both backends:

- **Windows.** Requests and tokens per minute use a *sliding* window of one-second buckets
  (epoch milliseconds // 1000): an admission counts what the last 61 buckets hold (the
  current second and the 60 before it), so no 60-second span, wherever it starts, ever
  admits more than the limit; a request counts against it for 60 to 61 seconds.
  `retry_after_s` is the time until enough of the window has left it for this request to
  fit; `x-ratelimit-reset-*` the time until the oldest request (or tokens) still counted
  leave the window, when `remaining` next grows.
- **Periods.** Daily and monthly token budgets are calendar periods in the scope's time
  zone (the same boundaries the invoices use): a day runs from local midnight to local
  midnight (23 or 25 hours across a daylight-saving change).
- **Reservation.** Token limits (tpm, per day, per month) are charged ``prompt_tokens +
  granted`` at admission and corrected to ``prompt + completion`` at settle; the balance
  holds ``input_cost_nanos + granted x output_price_nanos`` until settle charges the actual
  cost. The granted maximum is ``min(max_tokens, every token budget's room - prompt_tokens,
  (balance - held - input_cost) // output_price)``; below ``min_tokens`` the request is
  refused (`QuotaExceeded`).
- **Expiry.** A reservation not settled within `reservation_ttl_s` (a crashed gateway) is
  released by the next admission that touches the same scope or account. A settle that
  arrives after that still charges what was used.
- **Refusals.** Exhausted daily/monthly budgets and balance are ``insufficient_quota``
  (retrying does not help); rpm, tpm and concurrency are ``rate_limit`` with a retry hint.
  When several limits refuse, the ``insufficient_quota`` ones are reported first.
- **Headers.** `Admission.headers` and `QuotaExceeded.headers` carry
  ``x-ratelimit-{limit,remaining,reset}-requests`` for the scope with the fewest requests
  left (rpm) and ``...-tokens`` for the token limit with the fewest tokens left (tpm, daily
  or monthly); a trio is absent when no scope has such a limit.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from billing.idempotency import (
    RESULT_KEEP_MS,
    Claim,
    MemoryIdempotency,
    Stored,
    resolve,
)
from billing.money import format_amount

__all__ = [
    "MAX_BALANCE_NANOS",
    "AccountReading",
    "Admission",
    "AdmitRequest",
    "FailOpenQuotaStore",
    "Limits",
    "MemoryQuotaStore",
    "QuotaConfig",
    "QuotaExceeded",
    "QuotaStore",
    "QuotaUnavailable",
    "Scope",
    "ScopeCharge",
    "ScopeReading",
    "build_quota_store",
    "format_reset",
]

logger = logging.getLogger(__name__)

RefusalKind = Literal["rate_limit", "insufficient_quota"]
RefusalReason = Literal[
    "rpm", "tpm", "concurrency", "tokens_per_day", "tokens_per_month", "balance"
]

#: How long the structures that index reservations are kept after the last admission.
HOLDS_KEEP_MS = 40 * 24 * 3_600_000
#: How long counters outlive their period (late settles still correct them).
PERIOD_MARGIN_MS = 3_600_000
#: How long a settled request id is remembered (so a repeated settle is ignored).
SETTLED_KEEP_MS = 86_400_000
#: Retry hint when a concurrency limit refuses (a slot frees when any request finishes).
CONCURRENCY_RETRY_S = 1.0
#: The largest prepaid balance (nanos): Redis Lua counts in doubles, exact below 2**53.
MAX_BALANCE_NANOS = 2**53 - 1
#: Rolling windows: one-second buckets, and how many of them an admission counts (the
#: current one and the 60 before it: a 60-second span touches at most 61 buckets).
BUCKET_MS = 1_000
WINDOW_BUCKETS = 61
#: How long a rolling-window hash outlives its last write.
WINDOW_TTL_MS = (WINDOW_BUCKETS + 1) * BUCKET_MS


class Limits(BaseModel):
    """Limits of one scope; `None` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)


@dataclass(slots=True)
class Scope:
    """Something limits apply to: ``"tenant:acme"``, ``"key:k_1"``, ``"tenant:acme:model:x"``.

    `timezone` sets the calendar of the daily and monthly budgets.
    """

    id: str
    limits: Limits
    timezone: str = "UTC"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(kw_only=True, slots=True)
class AdmitRequest:
    """One request's claim on its scopes and balance.

    `input_cost_nanos` is the whole prompt at the uncached input price; `output_price_nanos`
    the price of one output token; `balance_account` the tenant id when it is prepaid.
    `request_id` must be unique per request. Embeddings pass ``max_tokens=0, min_tokens=0``.
    """

    request_id: str
    scopes: list[Scope]
    prompt_tokens: int
    max_tokens: int
    min_tokens: int = 1
    input_cost_nanos: int = 0
    output_price_nanos: int = 0
    balance_account: str | None = None
    now: datetime = field(default_factory=_utcnow)


@dataclass(frozen=True, slots=True)
class ScopeCharge:
    """What one scope's reservation charged: the counters settle corrects."""

    scope: str
    base: str
    counters: tuple[str, ...]


@dataclass(slots=True)
class Admission:
    """A granted reservation; pass it back to `settle` exactly once (repeats are ignored).

    The caller sets the upstream ``max_tokens`` to `granted_max_tokens`.
    """

    request_id: str
    granted_max_tokens: int
    reserved_tokens: int
    reserved_nanos: int
    headers: dict[str, str]
    balance_account: str | None = None
    charges: tuple[ScopeCharge, ...] = ()
    backend: str = "memory"


class QuotaExceeded(Exception):
    """A request refused by a limit. Map to HTTP 429 (OpenAI error shape).

    ``kind == "rate_limit"``: error code ``rate_limit_exceeded`` and a ``retry-after``
    header from `retry_after_s` (None when the request can never fit the limit).
    ``kind == "insufficient_quota"``: code ``insufficient_quota`` and
    ``x-should-retry: false``.
    """

    def __init__(
        self,
        kind: RefusalKind,
        reason: RefusalReason,
        scope: str,
        message: str,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.scope = scope
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class QuotaUnavailable(Exception):
    """The quota store cannot answer (Redis unreachable). Map to HTTP 503."""


class QuotaStore(ABC):
    """The quota contract. Every method is one atomic step in the store."""

    backend: str = "abstract"

    @abstractmethod
    async def admit(self, req: AdmitRequest) -> Admission:
        """Reserve the worst case over all scopes and the balance, clamping `max_tokens`.

        Raises `QuotaExceeded` (nothing is reserved) or `QuotaUnavailable`.
        """

    @abstractmethod
    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        """Charge the actual usage (prompt + completion tokens, cost) and release the rest.

        Idempotent per request id.
        """

    @abstractmethod
    async def topup(self, account: str, nanos: int) -> int:
        """Add `nanos` (> 0) to a prepaid balance; returns the new balance. `ValueError`
        (nothing added) when the balance would pass `MAX_BALANCE_NANOS`."""

    @abstractmethod
    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        """`topup` under an idempotency key, recorded in the same atomic step.

        Returns (balance, replayed): a key already used by the same request returns the
        balance its first top-up produced and adds nothing. Raises
        `billing.idempotency.IdempotencyConflict` for a key used by another request or one
        still running, `ValueError` as `topup` does (nothing is recorded then).
        """

    @abstractmethod
    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        """Claim an idempotency key for a request; the stored result to replay, or None
        (go ahead, then `idempotency_finish` or `idempotency_abandon`). Raises
        `IdempotencyConflict`."""

    @abstractmethod
    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        """Store a claimed request's result for replay."""

    @abstractmethod
    async def idempotency_abandon(self, claim: Claim) -> None:
        """Drop a claim whose request failed (a retry runs it again)."""

    @abstractmethod
    async def set_balance(self, account: str, nanos: int) -> None:
        """Set an initial balance, only if the account is not yet known (so a restart never
        resets a balance). Does not raise when the store is unavailable: a store that can
        be unavailable keeps the balance and writes it before anything else once it answers.
        """

    @abstractmethod
    async def balance(self, account: str) -> int | None:
        """The settled balance (reservations not deducted), None for an unknown account."""

    @abstractmethod
    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        """What is left of each limit (keys as in `Limits`), None where unlimited."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks."""


class QuotaConfig(BaseModel):
    """The `quotas:` section of the gateway configuration.

    `redis_url_env` names an environment variable holding the Redis URL (it may carry a
    password); when set it wins over `redis_url`. `on_unavailable="open"` serves from a
    per-process memory store while Redis is unreachable and returns to Redis by itself.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    redis_url_env: str | None = "MAAS_REDIS_URL"
    on_unavailable: Literal["closed", "open"] = "closed"
    reservation_ttl_s: float = Field(default=600, gt=0)
    default_max_tokens: int = Field(default=4096, gt=0)
    timeout_ms: int = Field(default=1000, gt=0)
    retry_interval_ms: int = Field(default=500, ge=0)
    max_connections: int = Field(default=64, gt=0)
    key_prefix: str = "maas:quota:"

    def resolved_redis_url(self) -> str | None:
        if self.redis_url_env and os.environ.get(self.redis_url_env):
            return os.environ[self.redis_url_env]
        return self.redis_url


def build_quota_store(config: QuotaConfig) -> QuotaStore:
    """The configured store. Connects lazily: no I/O happens here."""
    memory = MemoryQuotaStore(
        reservation_ttl_s=config.reservation_ttl_s, key_prefix=config.key_prefix
    )
    if config.backend == "memory":
        return memory
    url = config.resolved_redis_url()
    if not url:
        raise ValueError(
            "quotas.backend is 'redis' but no URL is configured: set quotas.redis_url or the"
            f" environment variable named by quotas.redis_url_env ({config.redis_url_env!r})"
        )
    from billing.quota_redis import RedisQuotaStore

    redis_store = RedisQuotaStore(
        url,
        reservation_ttl_s=config.reservation_ttl_s,
        timeout_ms=config.timeout_ms,
        retry_interval_ms=config.retry_interval_ms,
        key_prefix=config.key_prefix,
        max_connections=config.max_connections,
    )
    if config.on_unavailable == "open":
        return FailOpenQuotaStore(redis_store, memory)
    return redis_store


# --------------------------------------------------------------------------------------
# Shared arithmetic: periods, key names, the admission decision, refusals and headers.
# Both backends use these; the Redis Lua script mirrors `decide` exactly.
# --------------------------------------------------------------------------------------

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


@dataclass(frozen=True, slots=True)
class ScopeReading:
    """One scope's state as read inside the atomic step (0 where a limit is not set)."""

    requests: int
    inflight: int
    tpm: int
    day: int
    month: int
    rpm_reset_ms: int = 0
    """Until the oldest request counted leaves the rolling window (or this one would)."""
    rpm_retry_ms: int = 0
    """Until enough requests have left for one more to fit (0 when it fits now)."""
    tpm_reset_ms: int = 0
    tpm_retry_ms: int = 0
    """As for requests, for the tokens this request needs at least (prompt + min_tokens)."""


class RollingWindow:
    """One rolling window in memory: its buckets, oldest first, and their running total."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.total = 0

    def prune(self, now_ms: int) -> None:
        """Drop the buckets that have left the window."""
        oldest = oldest_bucket(now_ms)
        stale = []
        for bucket in self.buckets:
            if bucket >= oldest:
                break
            stale.append(bucket)
        for bucket in stale:
            self.total -= self.buckets.pop(bucket)

    def add(self, bucket: int, amount: int) -> None:
        self.buckets[bucket] = self.buckets.get(bucket, 0) + amount
        self.total += amount

    def correct(self, bucket: int, delta: int) -> None:
        """Add `delta` to a bucket still in the window (a settle or a released hold)."""
        if bucket in self.buckets:
            self.buckets[bucket] += delta
            self.total += delta

    def first(self) -> int | None:
        return next(iter(self.buckets), None)


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


def window_times(
    buckets: dict[int, int], first: int | None, now_ms: int, excess: int
) -> tuple[int, int]:
    """(reset ms, retry ms) of a rolling window's live buckets (see `ScopeReading`).

    `first` is the oldest bucket kept (None: none); `excess` is how much must leave the
    window before the request fits (<= 0: it fits).
    """
    reset = leaves_ms(first if first is not None else now_ms // BUCKET_MS, now_ms)
    if excess <= 0:
        return reset, 0
    freed = 0
    last = now_ms // BUCKET_MS
    for bucket in sorted(buckets):
        freed += buckets[bucket]
        last = bucket
        if freed >= excess:
            break
    return reset, leaves_ms(last, now_ms)


@dataclass(frozen=True, slots=True)
class AccountReading:
    balance: int | None
    held: int


def balance_room(account: AccountReading, input_cost: int, output_price: int) -> int | None:
    """How many output tokens the balance can pay for after the prompt (None: unbounded)."""
    available = (account.balance or 0) - account.held - input_cost
    if output_price > 0:
        return available // output_price
    return -1 if available < 0 else None


def decide(
    req: AdmitRequest, readings: list[ScopeReading], account: AccountReading | None
) -> tuple[bool, int]:
    """Whether the request is admitted, and the granted max_tokens."""
    blocked = False
    granted = req.max_tokens
    for scope, reading in zip(req.scopes, readings, strict=True):
        limits = scope.limits
        if limits.rpm is not None and reading.requests + 1 > limits.rpm:
            blocked = True
        if limits.max_concurrent is not None and reading.inflight + 1 > limits.max_concurrent:
            blocked = True
        for limit, used in _token_limits(limits, reading):
            granted = min(granted, limit - used - req.prompt_tokens)
    if account is not None:
        room = balance_room(account, req.input_cost_nanos, req.output_price_nanos)
        if room is not None:
            granted = min(granted, room)
    return (not blocked and granted >= min_tokens(req)), granted


def min_tokens(req: AdmitRequest) -> int:
    return min(req.min_tokens, req.max_tokens)


def _token_limits(limits: Limits, reading: ScopeReading) -> list[tuple[int, int]]:
    pairs = (
        (limits.tpm, reading.tpm),
        (limits.tokens_per_day, reading.day),
        (limits.tokens_per_month, reading.month),
    )
    return [(limit, used) for limit, used in pairs if limit is not None]


def format_reset(ms: int) -> str:
    """A duration in OpenAI's reset-header style: "20ms", "1s", "6m0s", "5h3m0s"."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ratelimit_headers(
    plans: list[ScopePlan], readings: list[ScopeReading], requests: int, tokens: int
) -> dict[str, str]:
    """The six x-ratelimit headers after charging `requests` and `tokens` (0 on refusal)."""
    best_requests: tuple[int, int, int] | None = None  # remaining, limit, reset_ms
    best_tokens: tuple[int, int, int] | None = None
    for plan, reading in zip(plans, readings, strict=True):
        limits, p = plan.scope.limits, plan.periods
        if limits.rpm is not None:
            left = (
                max(limits.rpm - reading.requests - requests, 0),
                limits.rpm,
                reading.rpm_reset_ms,
            )
            if best_requests is None or left[0] < best_requests[0]:
                best_requests = left
        for limit, used, reset in (
            (limits.tpm, reading.tpm, reading.tpm_reset_ms),
            (limits.tokens_per_day, reading.day, p.day_reset_ms),
            (limits.tokens_per_month, reading.month, p.month_reset_ms),
        ):
            if limit is not None:
                left = (max(limit - used - tokens, 0), limit, reset)
                if best_tokens is None or left[0] < best_tokens[0]:
                    best_tokens = left
    headers: dict[str, str] = {}
    for name, best in (("requests", best_requests), ("tokens", best_tokens)):
        if best is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(best[1])
            headers[f"x-ratelimit-remaining-{name}"] = str(best[0])
            headers[f"x-ratelimit-reset-{name}"] = format_reset(best[2])
    return headers


_PRIORITY: dict[str, int] = {
    "balance": 0,
    "tokens_per_month": 1,
    "tokens_per_day": 2,
    "rpm": 3,
    "concurrency": 4,
    "tpm": 5,
}


def refusal(
    req: AdmitRequest,
    plans: list[ScopePlan],
    readings: list[ScopeReading],
    account: AccountReading | None,
) -> QuotaExceeded:
    """Explain why `decide` refused: the most telling limit, as a `QuotaExceeded`."""
    need_out = min_tokens(req)
    need = req.prompt_tokens + need_out
    found: list[QuotaExceeded] = []
    for plan, reading in zip(plans, readings, strict=True):
        limits, p, sid = plan.scope.limits, plan.periods, plan.scope.id
        if limits.rpm is not None and reading.requests + 1 > limits.rpm:
            found.append(
                QuotaExceeded(
                    "rate_limit",
                    "rpm",
                    sid,
                    f"Rate limit reached for requests per minute on {sid}: limit {limits.rpm},"
                    f" used {reading.requests} in the last 60s. Please try again in"
                    f" {format_reset(reading.rpm_retry_ms)}.",
                    retry_after_s=reading.rpm_retry_ms / 1000,
                )
            )
        if limits.max_concurrent is not None and reading.inflight + 1 > limits.max_concurrent:
            found.append(
                QuotaExceeded(
                    "rate_limit",
                    "concurrency",
                    sid,
                    f"Too many concurrent requests on {sid}: limit {limits.max_concurrent},"
                    f" in flight {reading.inflight}. Please try again when one finishes.",
                    retry_after_s=CONCURRENCY_RETRY_S,
                )
            )
        if limits.tpm is not None and reading.tpm + need > limits.tpm:
            if need > limits.tpm:
                message = (
                    f"Request too large for tokens per minute on {sid}: limit {limits.tpm},"
                    f" requested at least {need} ({req.prompt_tokens} prompt + {need_out}"
                    " completion). Reduce the prompt."
                )
                retry: float | None = None
            else:
                message = (
                    f"Rate limit reached for tokens per minute on {sid}: limit {limits.tpm},"
                    f" used {reading.tpm} in the last 60s, requested at least {need}. Please"
                    f" try again in {format_reset(reading.tpm_retry_ms)}."
                )
                retry = reading.tpm_retry_ms / 1000
            found.append(QuotaExceeded("rate_limit", "tpm", sid, message, retry_after_s=retry))
        budgets: list[tuple[RefusalReason, int | None, int, str, int]] = [
            ("tokens_per_day", limits.tokens_per_day, reading.day, "Daily", p.day_reset_ms),
            (
                "tokens_per_month",
                limits.tokens_per_month,
                reading.month,
                "Monthly",
                p.month_reset_ms,
            ),
        ]
        for reason, limit, used, label, reset_ms in budgets:
            if limit is not None and used + need > limit:
                found.append(
                    QuotaExceeded(
                        "insufficient_quota",
                        reason,
                        sid,
                        f"{label} token budget exceeded on {sid}: limit {limit}, used {used},"
                        f" this request needs at least {need}. It resets in"
                        f" {format_reset(reset_ms)} (calendar in {plan.scope.timezone}).",
                    )
                )
    if account is not None and req.balance_account is not None:
        room = balance_room(account, req.input_cost_nanos, req.output_price_nanos)
        if room is not None and room < need_out:
            name = req.balance_account
            if account.balance is None:
                message = f"No prepaid balance for account {name}. Top up to continue."
            else:
                available = account.balance - account.held
                cost = req.input_cost_nanos + need_out * req.output_price_nanos
                message = (
                    f"Insufficient prepaid balance on account {name}: available"
                    f" {format_amount(available)}, this request needs at least"
                    f" {format_amount(cost)}. Top up to continue."
                )
            found.append(QuotaExceeded("insufficient_quota", "balance", f"account:{name}", message))
    if not found:  # defensive: decide() refused, so some limit must have
        found.append(QuotaExceeded("rate_limit", "tpm", "", "Request refused by quota."))
    chosen = min(found, key=lambda e: _PRIORITY[e.reason])
    chosen.headers = ratelimit_headers(plans, readings, 0, 0)
    return chosen


# --------------------------------------------------------------------------------------
# The in-process store.
# --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Hold:
    expires_ms: int
    amount: int
    counters: tuple[str, ...] = ()


class MemoryQuotaStore(QuotaStore):
    """The quota contract for one process: dictionaries behind a lock, no awaits inside.

    It mirrors the Redis store key for key, so the same admission can be replayed there.
    """

    backend = "memory"

    def __init__(self, *, reservation_ttl_s: float = 600, key_prefix: str = "maas:quota:") -> None:
        self.reservation_ttl_ms = int(reservation_ttl_s * 1000)
        self.prefix = key_prefix
        self._lock = threading.Lock()
        self._counters: dict[str, list[int]] = {}  # key -> [value, expires_ms]
        self._windows: dict[str, RollingWindow] = {}
        self._holds: dict[str, dict[str, _Hold]] = {}  # scope or account base -> holds
        self._accounts: dict[str, list[int]] = {}  # account -> [balance, held]
        self._settled: dict[str, int] = {}  # request id -> forget after (ms)
        self._next_sweep_ms = 0
        self._clock_ms = 0  # the latest admission time seen
        self.idempotency = MemoryIdempotency()

    async def admit(self, req: AdmitRequest) -> Admission:
        return self.admit_now(req)

    def admit_now(self, req: AdmitRequest) -> Admission:
        plans = [plan_scope(scope, req.now, self.prefix) for scope in req.scopes]
        now_ms = plans[0].periods.now_ms if plans else epoch_ms(req.now)
        with self._lock:
            self._sweep(now_ms)
            need = req.prompt_tokens + min_tokens(req)
            readings = [self._read_scope(plan, need, now_ms) for plan in plans]
            account = None
            if req.balance_account is not None:
                account = self._read_account(req.balance_account, now_ms)
            admitted, granted = decide(req, readings, account)
            if not admitted:
                raise refusal(req, plans, readings, account)
            return self._reserve(req, plans, readings, granted, now_ms)

    def _get(self, key: str) -> int:
        entry = self._counters.get(key)
        return entry[0] if entry is not None else 0

    def _add(self, key: str, amount: int, ttl_ms: int, now_ms: int) -> None:
        entry = self._counters.setdefault(key, [0, 0])
        entry[0] += amount
        entry[1] = now_ms + ttl_ms

    def _correct(self, base: str, suffix: str, delta: int) -> None:
        """Add `delta` to a charged counter, if it (or its window bucket) is still there."""
        window = split_window_counter(suffix)
        if window is not None:
            rolling = self._windows.get(base + window[0])
            if rolling is not None:
                rolling.correct(window[1], delta)
            return
        entry = self._counters.get(base + suffix)
        if entry is not None:
            entry[0] += delta

    def _window_used(self, key: str, now_ms: int) -> int:
        rolling = self._windows.get(key)
        if rolling is None:
            return 0
        rolling.prune(now_ms)
        return rolling.total

    def _window_reading(
        self, key: str, limit: int | None, need: int, now_ms: int
    ) -> tuple[int, int, int]:
        """(used, reset ms, retry ms) of a rolling window against a limit."""
        if limit is None:
            return 0, 0, 0
        rolling = self._windows.get(key)
        if rolling is None:
            rolling = self._windows[key] = RollingWindow()
        rolling.prune(now_ms)
        used = rolling.total
        reset, retry = window_times(rolling.buckets, rolling.first(), now_ms, used + need - limit)
        return used, reset, retry

    def _release_expired(self, base: str, now_ms: int, account: str | None = None) -> None:
        holds = self._holds.get(base)
        if not holds:
            return
        for request_id in [rid for rid, hold in holds.items() if hold.expires_ms <= now_ms]:
            hold = holds.pop(request_id)
            if account is not None:
                self._accounts[account][1] -= hold.amount
            for suffix in hold.counters:
                self._correct(base, suffix, -hold.amount)

    def _read_scope(self, plan: ScopePlan, need: int, now_ms: int) -> ScopeReading:
        self._release_expired(plan.base, now_ms)
        limits = plan.scope.limits
        requests, rpm_reset, rpm_retry = self._window_reading(
            plan.base + plan.rpm, limits.rpm, 1, now_ms
        )
        tpm, tpm_reset, tpm_retry = self._window_reading(
            plan.base + plan.tpm, limits.tpm, need, now_ms
        )
        return ScopeReading(
            requests=requests,
            inflight=len(self._holds.get(plan.base, ())),
            tpm=tpm,
            day=self._get(plan.base + plan.day) if limits.tokens_per_day is not None else 0,
            month=self._get(plan.base + plan.month) if limits.tokens_per_month is not None else 0,
            rpm_reset_ms=rpm_reset,
            rpm_retry_ms=rpm_retry,
            tpm_reset_ms=tpm_reset,
            tpm_retry_ms=tpm_retry,
        )

    def _read_account(self, account: str, now_ms: int) -> AccountReading:
        state = self._accounts.get(account)
        if state is None:
            return AccountReading(None, 0)
        self._release_expired(account_base(self.prefix, account), now_ms, account)
        return AccountReading(state[0], state[1])

    def _reserve(
        self,
        req: AdmitRequest,
        plans: list[ScopePlan],
        readings: list[ScopeReading],
        granted: int,
        now_ms: int,
    ) -> Admission:
        tokens = req.prompt_tokens + granted
        expires_ms = now_ms + self.reservation_ttl_ms
        charges = []
        for plan in plans:
            bucket = plan.periods.bucket
            if plan.scope.limits.rpm is not None:
                self._windows[plan.base + plan.rpm].add(bucket, 1)
            for suffix in plan.counters:
                if split_window_counter(suffix) is not None:
                    self._windows[plan.base + plan.tpm].add(bucket, tokens)
                    continue
                ttl = counter_ttl_ms(plan, suffix, self.reservation_ttl_ms)
                self._add(plan.base + suffix, tokens, ttl, now_ms)
            if plan.holds:
                hold = _Hold(expires_ms, tokens, plan.counters)
                self._holds.setdefault(plan.base, {})[req.request_id] = hold
                charges.append(ScopeCharge(plan.scope.id, plan.base, plan.counters))
        nanos = 0
        if req.balance_account is not None:
            nanos = req.input_cost_nanos + granted * req.output_price_nanos
            state = self._accounts.setdefault(req.balance_account, [0, 0])
            state[1] += nanos
            base = account_base(self.prefix, req.balance_account)
            self._holds.setdefault(base, {})[req.request_id] = _Hold(expires_ms, nanos)
        return Admission(
            request_id=req.request_id,
            granted_max_tokens=granted,
            reserved_tokens=tokens,
            reserved_nanos=nanos,
            headers=ratelimit_headers(plans, readings, 1, tokens),
            balance_account=req.balance_account,
            charges=tuple(charges),
            backend=self.backend,
        )

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        self.settle_now(admission, used_tokens, cost_nanos)

    def settle_now(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        rid = admission.request_id
        with self._lock:
            if rid in self._settled:
                return
            self._settled[rid] = self._clock_ms + self.reservation_ttl_ms + SETTLED_KEEP_MS
            for charge in admission.charges:
                held = self._holds.get(charge.base, {}).pop(rid, None) is not None
                delta = used_tokens - admission.reserved_tokens if held else used_tokens
                for suffix in charge.counters:
                    self._correct(charge.base, suffix, delta)
            account = admission.balance_account
            if account is not None:
                state = self._accounts.setdefault(account, [0, 0])
                base = account_base(self.prefix, account)
                if self._holds.get(base, {}).pop(rid, None) is not None:
                    state[1] -= admission.reserved_nanos
                state[0] -= cost_nanos

    def _sweep(self, now_ms: int) -> None:
        """Forget counters past their period and old settle markers (once a minute)."""
        self._clock_ms = max(self._clock_ms, now_ms)
        if now_ms < self._next_sweep_ms:
            return
        self._next_sweep_ms = now_ms + 60_000
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now_ms}
        for rolling in self._windows.values():
            rolling.prune(now_ms)
        self._windows = {k: v for k, v in self._windows.items() if v.buckets}
        self._holds = {k: v for k, v in self._holds.items() if v}
        self._settled = {k: v for k, v in self._settled.items() if v > now_ms}

    async def topup(self, account: str, nanos: int) -> int:
        _check_topup(nanos)
        with self._lock:
            state = self._accounts.setdefault(account, [0, 0])
            _check_topup(nanos, state[0])
            state[0] += nanos
            return state[0]

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        _check_topup(nanos)
        records = self.idempotency
        with self._lock, records.lock:
            stored = resolve(claim, records.get(claim.key))
            if stored is not None:
                return int(stored.n or 0), True
            state = self._accounts.setdefault(account, [0, 0])
            _check_topup(nanos, state[0])
            state[0] += nanos
            records.put(claim.key, Stored(claim.fingerprint, 200, n=state[0]), RESULT_KEEP_MS)
            return state[0], False

    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        return self.idempotency.begin(claim)

    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        self.idempotency.finish(claim, status, body)

    async def idempotency_abandon(self, claim: Claim) -> None:
        self.idempotency.abandon(claim)

    async def set_balance(self, account: str, nanos: int) -> None:
        with self._lock:
            self._accounts.setdefault(account, [nanos, 0])

    async def balance(self, account: str) -> int | None:
        state = self._accounts.get(account)
        return state[0] if state is not None else None

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        plan = plan_scope(scope, now, self.prefix)
        now_ms = plan.periods.now_ms
        with self._lock:
            live = sum(1 for h in self._holds.get(plan.base, {}).values() if h.expires_ms > now_ms)
            return remaining_from(
                scope.limits,
                self._window_used(plan.base + plan.rpm, now_ms),
                self._window_used(plan.base + plan.tpm, now_ms),
                live,
                self._get(plan.base + plan.day),
                self._get(plan.base + plan.month),
            )


def _check_topup(nanos: int, balance: int = 0) -> None:
    if nanos <= 0:
        raise ValueError(f"a top-up must be positive, not {nanos}")
    if balance + nanos > MAX_BALANCE_NANOS:
        raise ValueError(f"a balance cannot exceed {format_amount(MAX_BALANCE_NANOS)}")


def remaining_from(
    limits: Limits, requests: int, tpm: int, inflight: int, day: int, month: int
) -> dict[str, int | None]:
    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(limit - used, 0)

    return {
        "rpm": left(limits.rpm, requests),
        "tpm": left(limits.tpm, tpm),
        "max_concurrent": left(limits.max_concurrent, inflight),
        "tokens_per_day": left(limits.tokens_per_day, day),
        "tokens_per_month": left(limits.tokens_per_month, month),
    }


# --------------------------------------------------------------------------------------
# Fail open: Redis when it answers, the in-process store while it does not.
# --------------------------------------------------------------------------------------


class FailOpenQuotaStore(QuotaStore):
    """Serve from `fallback` while `primary` is unavailable; back to `primary` by itself.

    While failed open, limits are enforced per process from an empty state and prepaid
    balances are not checked (the point of failing open is to keep serving). Each such
    request's usage and cost are still replayed into the primary once it answers again
    (settles are idempotent), so balances and budgets catch up.
    """

    backend = "fail-open"

    def __init__(self, primary: QuotaStore, fallback: MemoryQuotaStore) -> None:
        self.primary = primary
        self.fallback = fallback
        self.failed_open = 0

    async def admit(self, req: AdmitRequest) -> Admission:
        try:
            return await self.primary.admit(req)
        except QuotaUnavailable as exc:
            self.failed_open += 1
            logger.warning("quota store unavailable, failing open to memory: %s", exc)
        admission = await self.fallback.admit(replace(req, balance_account=None))
        admission.balance_account = req.balance_account
        admission.backend = "fallback"
        return admission

    async def settle(self, admission: Admission, used_tokens: int, cost_nanos: int) -> None:
        if admission.backend == "fallback":
            local = replace(admission, balance_account=None)
            await self.fallback.settle(local, used_tokens, cost_nanos)
        await self.primary.settle(admission, used_tokens, cost_nanos)

    async def topup(self, account: str, nanos: int) -> int:
        return await self.primary.topup(account, nanos)

    async def topup_once(self, account: str, nanos: int, claim: Claim) -> tuple[int, bool]:
        return await self.primary.topup_once(account, nanos, claim)

    async def idempotency_begin(self, claim: Claim) -> Stored | None:
        return await self.primary.idempotency_begin(claim)

    async def idempotency_finish(self, claim: Claim, status: int, body: str) -> None:
        await self.primary.idempotency_finish(claim, status, body)

    async def idempotency_abandon(self, claim: Claim) -> None:
        await self.primary.idempotency_abandon(claim)

    async def set_balance(self, account: str, nanos: int) -> None:
        await self.primary.set_balance(account, nanos)

    async def balance(self, account: str) -> int | None:
        return await self.primary.balance(account)

    async def remaining(self, scope: Scope, now: datetime) -> dict[str, int | None]:
        try:
            return await self.primary.remaining(scope, now)
        except QuotaUnavailable:
            return await self.fallback.remaining(scope, now)

    async def aclose(self) -> None:
        await self.primary.aclose()
        await self.fallback.aclose()
